"""A differentiable fixed-point layer whose backward pass is recurrent back-propagation.

:func:`fixed_point` iterates ``h <- f(h)`` without a graph, applies ``f`` once more with the
graph kept, and hooks the gradient arriving at that output: it is replaced by the solution of
the adjoint system ``(I - J^T) z = g``, which autograd carries to everything ``f`` closes over.
What a call did is in its :class:`FixedPointInfo`; a layer's warm-start store (:class:`WarmStart`)
is an object the layer owns. Nothing here is kept at module level.

References
----------
R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018.
S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the gradient hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..._result import SolveResult, Status
from ..._validate import ArgumentTypeError, boolean, nonnegative_int, nonnegative_real, positive_int
from ..._warnings import warn_failure
from ...operators import IdentityOperator
from ._checks import (
    all_finite,
    apply_policy,
    autocast,
    autocast_state,
    call_site,
    check_adjoint_request,
    check_f_output,
    check_jvp,
    check_policy,
    prepare_solve,
    flat,
    nonfinite_error,
)
from .forward import check_forward, solve_forward, zero_iterations
from ._tree import flat_state
from .compiled import _ZeroGradTo, fixed_budget_series, fixed_point_compiled, iterate_fixed, series_terms
from .implicit import APPROXIMATE_METHODS, approximate_adjoint, check_approximate
from .jacobian import JacobianOperator, under_transform

__all__ = ["fixed_point", "FixedPointInfo", "WarmStart"]


# -- warm starts ----------------------------------------------------------------------------
class WarmStart:
    """The warm-start store of one fixed-point layer: its last adjoint solution, to start the
    next backward solve from, and its last adjoint result.

    Create one per layer, once (outside the training loop, or in the layer module's
    ``__init__``), and pass it at every call of that layer as
    ``fixed_point(..., warm_start=ws)``. Two layers never share a store unless they are given
    the same one. A stored solution is used only when its shape, dtype and device match the
    new system; otherwise the solve starts from zero (and counts as a miss).

    Attributes
    ----------
    x : torch.Tensor or None
        The last solution stored (detached).
    last_result : linsolve_rbp.SolveResult or None
        The adjoint solve of the latest backward pass through a call that was given this store
        (set even when the failure policy then raises).
    hits, misses : int
        Solves that did and did not start from a stored solution.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> W = torch.tensor([[0.2, 0.1], [0.0, 0.3]], dtype=torch.float64, requires_grad=True)
    >>> ws = lrt.WarmStart()
    >>> for step in range(2):
    ...     h = lrt.fixed_point(lambda h: torch.tanh(h @ W.T + 1.0),
    ...                         torch.zeros(2, dtype=torch.float64), warm_start=ws)
    ...     h.sum().backward()
    >>> ws.misses, ws.hits, ws.last_result.converged
    (1, 1, True)
    """

    def __init__(self):
        self.x = None
        self.last_result = None
        self.hits = 0
        self.misses = 0

    def __repr__(self):
        stored = "empty" if self.x is None else f"x of shape {tuple(self.x.shape)}"
        return f"WarmStart({stored}, hits={self.hits}, misses={self.misses})"

    def get(self, b):
        """The stored solution if it fits the right-hand side ``b`` (shape, dtype, device),
        else None; counts a hit or a miss."""
        x = self.x
        if x is not None and x.shape == b.shape and x.dtype == b.dtype and x.device == b.device:
            self.hits += 1
            return x
        self.misses += 1
        return None

    def store(self, x) -> None:
        """Keep ``x`` (detached) as the start of the next solve."""
        self.x = x.detach()

    def clear(self) -> None:
        """Forget the stored solution and the last result (the counts are kept)."""
        self.x = None
        self.last_result = None


def _check_warm_start(warm_start):
    """The layer's store: a :class:`WarmStart`, or None for cold starts."""
    if warm_start is None or warm_start is False:
        return None
    if isinstance(warm_start, WarmStart):
        return warm_start
    if warm_start is True:
        raise ArgumentTypeError(
            "warm_start=True is not accepted: a store shared by every call would mix the "
            "adjoint solutions of different layers; create one store per layer, once, "
            "ws = lrt.WarmStart(), and pass warm_start=ws at every call of that layer"
        )
    raise ArgumentTypeError(
        f"warm_start must be a WarmStart (create one per layer with lrt.WarmStart()) or None, "
        f"got {type(warm_start).__name__}"
    )


@dataclass
class FixedPointInfo:
    """What one :func:`fixed_point` call did (``return_info=True``). It belongs to that call:
    its backward pass fills in ``backward``, and no other call or thread writes to it.

    Attributes
    ----------
    forward : linsolve_rbp.SolveResult
        The forward solve: ``method`` the forward method (``"iterate"``, ``"anderson"``,
        ``"broyden"``, ``"newton"``), ``iterations``, ``residual_norm`` (for ``"iterate"`` the
        last step ``||f(h) - h||``, for the others the residual of ``h*``; per sample with
        ``batch_dims=1``), ``residual_history``, status CONVERGED, MAX_ITERATIONS, COMPLETED
        (``forward_tol=None``) or NONFINITE (``statuses`` per sample with ``batch_dims=1``),
        ``info`` (``f_evals``, and what the method did: Newton's ``jvps`` and
        ``inner_iterations``, ...; see ``linsolve_rbp.adapters.torch.forward.solve_forward``).
        ``x`` is ``h*``.
    backward : linsolve_rbp.SolveResult or None
        The adjoint solve of the latest backward pass through this call; None until then
        (set before the failure policy acts, so also when ``backward()`` raises). For the
        approximate methods its ``method`` is ``"phantom"`` or ``"jfb"`` and its status
        COMPLETED (NONFINITE where NaN or inf appeared); ``x`` is ``z`` (flat: for a
        structured state, its tensors' parts in order).
    backward_results : list of linsolve_rbp.SolveResult
        Every adjoint solve through this call (more than one when back-propagating several
        times with ``retain_graph=True``).
    """

    forward: SolveResult
    backward: SolveResult | None = None
    backward_results: list = field(default_factory=list)


# -- the fixed-point layer ------------------------------------------------------------------
class _Adjoint(torch.autograd.Function):
    """Identity on ``out = f(h_in)``, the evaluation recorded in the forward pass; in the
    backward pass the gradient ``g`` arriving here is replaced by the adjoint solution ``z``
    (``hook(g, out)``, an :class:`_AdjointHook`), whose products use the graph of that same
    record. ``out`` is held as a saved tensor of this node (no reference cycle through a
    tensor hook), and only until the graph is freed."""

    @staticmethod
    def forward(ctx, out, hook):
        ctx.set_materialize_grads(False)  # an undefined gradient stays undefined
        ctx.hook = hook
        ctx.save_for_backward(out)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return ctx.hook(g, out), None


def _graph_leaves(output, exclude):
    """The leaf tensors (AccumulateGrad nodes' ``.variable``) that ``output``'s graph reaches,
    except ``exclude``."""
    return _node_leaves(output.grad_fn, exclude)


def _node_leaves(node, exclude):
    """The leaf tensors the graph below the autograd node ``node`` reaches, except ``exclude``."""
    leaves, seen, stack = [], set(), [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            if variable is not exclude:
                leaves.append(variable)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _graph_task_id():
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else None


class _FiniteGradGuard:
    """Checks the gradients that one backward pass through a fixed-point layer gives the leaf
    tensors ``f`` closes over, as :func:`implicit_grad` checks its own: non-finite entries
    raise SolveError under ``on_failure="raise"`` and otherwise are set to zero with one
    (deduplicated) ConvergenceWarning, even under ``"ignore"``.

    Why one-shot tensor hooks on the leaves rather than computing ``z^T df/dp`` in the adjoint
    hook: that VJP would be computed twice (once by us, once by autograd through the graph of
    ``f(h*)``), and it would reach into everything upstream of ``f`` (an encoder), a full
    second backward of the model; a leaf hook sees the very gradient autograd is about to
    accumulate, at no extra product. The hooks are removed when they fire, when the backward
    pass ends (a callback queued on the autograd engine), and, should that pass have ended in
    an exception, by a hook that fires in a later pass (it checks the pass's id), so none is
    left behind. A leaf also used outside ``f`` is checked on its total gradient.
    """

    def __init__(self, leaves, result, on_failure, location):
        self.result = result
        self.on_failure = on_failure
        self.location = location
        self.task = _graph_task_id()
        self.bad = []
        self.handles = {i: leaf.register_hook(self._hook_for(i, leaf)) for i, leaf in enumerate(leaves)}
        torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _remove(self):
        for handle in self.handles.values():
            handle.remove()
        self.handles = {}

    def _hook_for(self, index, leaf):
        shape = tuple(leaf.shape)

        def hook(grad):
            if self.task is not None and _graph_task_id() != self.task:
                self._remove()  # left over from a pass that ended in an exception
                return None
            handle = self.handles.pop(index, None)
            if handle is not None:
                handle.remove()
            if grad is None or all_finite(grad):
                return None
            if self.on_failure == "raise":
                self._remove()
                raise nonfinite_error(
                    self.result,
                    f"fixed_point backward: the gradient of a tensor of shape {shape} that f "
                    f"closes over has non-finite entries (adjoint solve: {self.result.message}); "
                    "f or its derivative is not finite at the fixed point",
                )
            self.bad.append(shape)
            return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

        return hook

    def _finish(self):
        self._remove()
        if self.bad:
            shapes = ", ".join(str(s) for s in self.bad)
            warn_failure(
                self.result,
                "fixed_point backward",
                message=(
                    f"the gradient of {len(self.bad)} tensor(s) f closes over (shapes {shapes}) "
                    f"has non-finite entries (adjoint solve: {self.result.message}); f or its "
                    "derivative is not finite at the fixed point; those entries were set to zero"
                ),
                location=self.location,
                stacklevel=2,
            )


class _BackwardHook:
    """What the backward hooks share: the right-hand side made from the gradient ``g``
    arriving at ``f(h*)``, and the adjoint's result reported and returned in ``g``'s place."""

    def __init__(self, f, h_star, on_failure, warm, batch_dims, info, location, autocast_region):
        self.f = f
        self.h_star = h_star
        self.on_failure = on_failure
        self.warm = warm
        self.batch_dims = batch_dims
        self.info = info
        self.location = location  # the line that called fixed_point: warnings point there
        self.autocast_region = autocast_region  # where fixed_point ran f; re-entered for J

    def _rhs(self, g, where):
        """``g`` as the adjoint's right-hand side: flat, detached, in the state's dtype."""
        if torch.is_grad_enabled():  # backward(create_graph=True): z would carry no graph
            raise RuntimeError(_double_backward_message(where))
        b = flat(g.detach(), self.batch_dims)
        if b.dtype != self.h_star.dtype:
            b = b.to(self.h_star.dtype)
        return b

    def _report(self, result, context):
        """The result belongs to this call (its info) and to the layer's store, if it has
        one; then the failure policy acts."""
        self.info.backward = result
        self.info.backward_results.append(result)
        if self.warm is not None:
            self.warm.last_result = result
        apply_policy(result, self.on_failure, context, stacklevel=3, location=self.location)

    def _deliver(self, result, leaves, g):
        """``z`` in ``g``'s shape and dtype, with the non-finite gradient guard on ``leaves``."""
        if leaves:
            _FiniteGradGuard(leaves, result, self.on_failure, self.location)
        return result.x.reshape(g.shape).to(g.dtype)


class _AdjointHook(_BackwardHook):
    """Replaces the gradient ``g`` arriving at ``f(h*)`` by the solution ``z`` of
    ``(I - J^T) z = g``; autograd then carries ``z`` through the graph of ``f`` to everything
    ``f`` closes over."""

    def __init__(self, f, h_star, prepared, jvp, on_failure, warm, batch_dims, info,
                 location=None, autocast_region=None, h_in=None, leaves=None):
        super().__init__(f, h_star, on_failure, warm, batch_dims, info, location, autocast_region)
        # The adjoint solve, its options validated once when fixed_point was called.
        self.prepared = prepared
        self.jvp = jvp
        # With h_in: the forward pass recorded f(h_in) (h_in a leaf requiring grad) and passes
        # that record to __call__; leaves are the tensors f closes over that it reaches.
        self.h_in = h_in
        self.leaves = leaves

    def __call__(self, g, record=None):
        if g is None:  # an undefined gradient (no loss depends on the output) stays undefined
            return None
        b = self._rhs(g, "fixed_point backward")
        if record is not None:
            # The forward pass's record: its graph gives the products, and then z's way to the
            # parameters (no second evaluation of f).
            J = JacobianOperator._from_record(self.f, self.h_in, record, self.jvp, self.batch_dims,
                                              autocast_region=self.autocast_region)
        else:
            with autocast(self.autocast_region):
                # f, h* and the options were checked when fixed_point was called.
                J = JacobianOperator._checked(self.f, self.h_star, self.jvp, self.batch_dims)
        x0 = self.warm.get(b) if self.warm is not None else None
        try:
            result = None
            if x0 is None and self.prepared.can_series:
                # Fixed-budget neumann / fixed_point from zero: the series summed on the VJPs
                # themselves, the full path's result without its per-call and per-term work
                # (None when the terms need the full path's handling), in the state's shape.
                stash = None
                engine = getattr(torch.autograd.Variable, "_execution_engine", None)
                out, h_in = J.output, J._h
                if (
                    engine is not None and hasattr(torch._C, "_stash_obj_in_tls") and J._live
                    and out.dtype == b.dtype and tuple(out.shape) == J.state_shape
                ):
                    # What torch.autograd.grad runs for each product, without its per-call
                    # argument checks and bookkeeping (about 15 us of a 70 us VJP of a
                    # d = 192 cell): the cotangents are the state-shaped terms of b's dtype,
                    # valid by construction, and the context autograd.grad stashes for the
                    # engine's device threads is stashed once for all of them.
                    run, outs, ins = engine.run_backward, (out,), (h_in,)
                    public = [False]

                    def vjp(u):
                        if not public[0]:
                            try:
                                (gu,) = run(outs, (u,), True, False, ins, True, False)
                            except TypeError:
                                # An engine whose private signature differs from the one this
                                # route was written for (torch 2.1-2.13): the public route.
                                public[0] = True
                            else:
                                return torch.zeros_like(u) if gu is None else gu
                        return J._vjp(u)

                    import contextvars

                    stash = contextvars.copy_context()
                else:
                    vjp = J._vjp
                if stash is None:
                    result = self.prepared.series(vjp, b.reshape(J.state_shape), b.shape)
                else:
                    torch._C._stash_obj_in_tls("context", stash)
                    try:
                        result = self.prepared.series(vjp, b.reshape(J.state_shape), b.shape)
                    finally:
                        torch._C._remove_obj_from_tls("context")
            if result is None:
                A = IdentityOperator(J.shape[0], like=b) - J.T
                result = self.prepared(A, b, x0)
            if self.leaves is not None:
                leaves = self.leaves
            else:
                leaves = _graph_leaves(J.output, J._h) if J.output.requires_grad else []
        finally:
            J.release()
        self._report(result, "fixed_point backward (adjoint solve)")
        if self.warm is not None:
            self.warm.store(result.x)
        return self._deliver(result, leaves, g)


def _double_backward_message(where):
    """The error for a second derivative through the layer (``create_graph=True``, or a
    ``torch.func`` transform differentiating inside another)."""
    return (
        f"{where}: a second derivative through fixed_point (backward with create_graph=True, "
        "torch.func.hessian, jvp of grad, grad of grad) is not supported: the adjoint z is "
        "computed without a graph and h* is found without one, so it would miss the terms "
        "through z and h*; differentiate once (create_graph=False), or, for exact second "
        "derivatives, unroll the iteration with lrt.unroll(f, h0, steps) (BPTT)"
    )


class _ApproximateHook(_BackwardHook):
    """Replaces the gradient ``g`` arriving at ``f(h*)`` by an approximate adjoint (phantom
    gradient or Jacobian-free backprop, see
    :func:`linsolve_rbp.adapters.torch.implicit.approximate_adjoint`), reported in the call's
    :class:`FixedPointInfo` as the exact methods are. ``node`` is the ``grad_fn`` of ``f(h*)``,
    whose leaves the non-finite gradient guard watches when no Jacobian is recorded (jfb)."""

    def __init__(self, f, h_star, method, approximate, on_failure, warm, batch_dims, info,
                 location=None, autocast_region=None, node=None):
        super().__init__(f, h_star, on_failure, warm, batch_dims, info, location, autocast_region)
        self.method = method
        self.steps = approximate["steps"]
        self.damping = approximate["damping"]
        self.node = node

    def __call__(self, g):
        if g is None:
            return None
        b = self._rhs(g, f"fixed_point backward ({self.method})")
        J = None
        if self.steps > 1:  # one step (jfb) applies no Jacobian product: nothing to record
            with autocast(self.autocast_region):
                J = JacobianOperator._checked(self.f, self.h_star, "auto", self.batch_dims)
        try:
            result = approximate_adjoint(None if J is None else J._rmatvec, b, self.method, self.steps,
                                         self.damping, self.batch_dims)
            if J is not None:
                leaves = _graph_leaves(J.output, J._h) if J.output.requires_grad else []
            else:
                leaves = _node_leaves(self.node, None)
        finally:
            if J is not None:
                J.release()
        # The store keeps the result, but stores no x: phantom and jfb start from zero.
        self._report(result, f"fixed_point backward ({self.method} adjoint)")
        return self._deliver(result, leaves, g)


def _prepare_backward(method, options, batch_dims):
    """The exact adjoint solve's options, validated (naming ``backward``); an unknown method
    name is told the approximate ones too."""
    try:
        return prepare_solve(method, dict(options, batch_dims=batch_dims), "backward")
    except ValueError as exc:
        if "method must be one of" not in str(exc):
            raise
        raise ValueError(
            f"{exc}; or, for an approximate gradient, {' or '.join(map(repr, APPROXIMATE_METHODS))} "
            "(backward={'method': 'phantom', 'steps': k, 'damping': lam} or {'method': 'jfb'})"
        ) from None


def check_backward(backward, batch_dims, who):
    """A ``backward`` dict validated (``who`` says who sets the options it must not):
    ``(method, jvp, approximate, prepared)``, one of the last two None."""
    if not isinstance(backward, dict):
        raise ArgumentTypeError(
            f"backward must be a dict of options or None, got {type(backward).__name__}"
        )
    for key in ("x0", "batch_dims", "throw", "on_failure"):
        if key in backward:
            raise ValueError(f"backward must not set {key!r}: {who}")
    options = dict(backward)
    method = options.pop("method", "gmres")
    jvp = check_jvp(options.pop("jvp", "auto"), "backward['jvp']")
    if method in APPROXIMATE_METHODS:
        return method, jvp, check_approximate(method, options, "backward"), None
    return method, jvp, None, _prepare_backward(method, options, batch_dims)


_TRANSFORM_BACKWARD = (
    "backward={'method': 'neumann', 'rtol': None, 'atol': None, 'maxiter': K} (or 'fixed_point' "
    "with the same budget), {'method': 'phantom', 'steps': k, 'damping': lam} or {'method': 'jfb'}"
)


def _transformed(f, h0, forward_method, forward_options, maxiter, tol, method, prepared, approximate,
                 warm, batch_dims):
    """:func:`fixed_point` inside a ``torch.func`` transform (``vmap``, ``grad``, ...): fixed
    budgets, no host reads, no hooks.

    The forward runs ``forward_maxiter`` iterations under :func:`torch.no_grad`. The backward is
    built into the graph: with ``e_0 = 0`` and ``e_{j+1} = (1 - lam) e_j + lam (f(h* + e_j) -
    sg(f(h* + e_j)))`` (``sg``: detach) for ``T`` steps, the output is ``sg(f(h*)) + e_T``, whose
    value is ``f(h*)`` exactly (every ``e_j`` is zero) and whose gradient is ``z^T df/dw`` with
    ``z = lam sum_{i<T} ((1 - lam) I + lam J^T)^i g`` and every Jacobian taken at ``h*``: the
    fixed-budget Neumann series (``lam = 1``, ``T = maxiter + 1`` for neumann, ``maxiter``
    for fixed_point), the phantom gradient (``T = steps``, ``lam = damping``) or jfb (``T = 1``).
    """
    where = "fixed_point inside a torch.func transform (vmap, grad, ...)"
    if tol is not None:
        raise ValueError(
            f"{where} needs a fixed forward budget: pass forward_tol=None (it then runs exactly "
            "forward_maxiter iterations); a tolerance test reads values on the host, which the "
            "transforms do not allow"
        )
    if forward_method != "iterate":
        raise ValueError(
            f"{where} needs forward='iterate' (with forward_tol=None), got forward="
            f"{forward_method!r}: the other forward methods take decisions on values on the host"
        )
    tau = float(forward_options.get("tau", 1.0))
    if warm is not None:
        raise ValueError(f"{where} cannot keep a warm-start store: pass warm_start=None")
    h = iterate_fixed(f, h0, maxiter, tau)
    out = h
    if torch.is_grad_enabled():
        y = f(h)
        out = y.detach()
        if _tracked(y):  # a gradient can reach f's inputs: build the adjoint into the graph
            if _differentiating_levels() > 1:
                raise RuntimeError(_double_backward_message(where))
            steps, lam = _transform_budget(method, prepared, approximate, where)
            e = lam * (y - out)
            for _ in range(steps - 1):
                y = f(h + e)
                e = (1.0 - lam) * e + lam * (y - y.detach())
            out = out + e
    nan = np.full((h.shape[0],), np.nan) if batch_dims == 1 else float("nan")
    fwd = SolveResult(
        x=h, status=Status.COMPLETED, converged=False, success=True,
        iterations=maxiter, matvecs=0, rmatvecs=0, residual_norm=nan,
        residual_history=np.zeros((0,)),
        message=(
            f"completed forward_maxiter={maxiter} iterations inside a torch.func transform; "
            "residuals are not measured there (that would read values on the host)"
        ),
        method="iterate",
        statuses=None if batch_dims == 0 else (Status.COMPLETED,) * h.shape[0],
        info={"f_evals": maxiter, "transform": True},
    )
    return out, FixedPointInfo(forward=fwd)


def _input_for_record(h, approximate):
    """The state at which the forward pass records ``f``: for the exact methods a leaf that
    requires grad, so that the record's graph also gives the adjoint's products; for the
    approximate ones (which record their own steps) ``h`` detached."""
    if approximate is None:
        return h.detach().requires_grad_(True)
    return h.detach()


def _refuse_forward_ad(out):
    """Forward-mode AD (``torch.autograd.forward_ad``) would give ``f(h*)`` the tangent of one
    application of ``f`` at a detached ``h*``, not the implicit one: refuse it, naming the
    route that gives the implicit tangent."""
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", -1) >= 0 and forward_ad.unpack_dual(out).tangent is not None:
        raise RuntimeError(
            "fixed_point does not propagate torch.autograd.forward_ad tangents (the tangent of "
            "h* would miss the factor (I - J)^{-1}); use torch.func.jvp or torch.func.jacfwd "
            "with forward_tol=None and backward={'method': 'neumann', 'rtol': None, 'atol': "
            "None, 'maxiter': K}, which give the implicit tangent"
        )


def _differentiating_levels() -> int:
    """How many ``torch.func`` transforms that differentiate (``grad``, ``vjp``, ``jacrev``,
    ``jvp``, ``jacfwd``) are active: two or more ask for a second derivative."""
    functorch = torch._C._functorch
    differentiating = (functorch.TransformType.Grad, functorch.TransformType.Jvp)
    return sum(i.key() in differentiating for i in (functorch.get_interpreter_stack() or ()))


def _tracked(t) -> bool:
    """Whether a derivative may be taken through ``t``: a differentiating torch.func transform
    (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ...) is active, or autograd tracks the
    tensor ``t`` wraps at some level (under ``torch.func.vmap`` a batched tensor reports
    ``requires_grad=False`` even where the tensor it wraps requires grad)."""
    functorch = torch._C._functorch
    differentiating = (functorch.TransformType.Grad, functorch.TransformType.Jvp)
    if any(i.key() in differentiating for i in (functorch.get_interpreter_stack() or ())):
        return True
    while True:
        if t.requires_grad:
            return True
        if not functorch.is_functorch_wrapped_tensor(t):
            return False
        t = functorch.get_unwrapped(t)


def _transform_budget(method, prepared, approximate, where):
    """``(T, lam)`` of the backward built into the graph under a torch.func transform; an
    error naming the options that work for a backward that needs host reads."""
    if approximate is not None:
        return approximate["steps"], approximate["damping"]
    opts = dict(prepared.options)
    ok, _, got = fixed_budget_series(
        method, opts, ("rtol", "atol", "maxiter", "batch_dims", "divtol", "check_every"))
    if not ok:
        raise ValueError(
            f"{where} needs a fixed-budget backward without host reads: {_TRANSFORM_BACKWARD}; "
            f"got {got}" + ("" if method in ("neumann", "fixed_point") else
                            f" ({method} decides on values on the host)")
        )
    return series_terms(method, opts["maxiter"]), 1.0


def fixed_point(
    f: Callable,
    h0,
    *,
    forward="iterate",
    forward_maxiter: int = 50,
    forward_tol: float | None = 1e-6,
    backward: dict | None = None,
    on_failure: str = "warn",
    warm_start: WarmStart | None = None,
    batch_dims: int = 0,
    return_info: bool = False,
):
    """A differentiable fixed point ``h* = f(h*)`` whose backward pass is recurrent
    back-propagation.

    The forward pass solves ``h = f(h)`` from ``h0`` under :func:`torch.no_grad` (no graph,
    so memory does not grow with the iterations; by default plain iteration ``h <- f(h)``)
    until the residual is small, then applies ``f``
    once more with the graph kept and returns that ``f(h*)``. In the backward pass the gradient
    ``g`` arriving at the output is replaced by the solution ``z`` of ``(I - J^T) z = g``
    (``J = df/dh`` at ``h*``), which autograd carries through that one evaluation of ``f`` to
    every parameter and input ``f`` closes over: ``.grad`` of an :class:`torch.nn.Module`'s
    parameters, and the graph of inputs computed upstream (an encoder's output, say).

    Parameters
    ----------
    f : callable
        State -> state of the same structure, shapes and dtype; closes over its parameters and
        inputs.
    h0 : torch.Tensor, or tuple, list or dict of torch.Tensor
        The starting state: one tensor, or a structure of tensors (nested freely, one dtype and
        device; a multiscale DEQ's resolutions, say). ``f`` receives and returns the structure
        as it is; inside, the state is one vector (its tensors flattened and concatenated in
        order), for the forward solver and the adjoint solve alike. It gets a zero gradient:
        the fixed point does not depend on it.
    forward : str or dict
        The forward solver: ``"iterate"`` (plain iteration, the default), ``"anderson"``
        (Anderson acceleration), ``"broyden"`` (Broyden's method), ``"newton"`` (Newton-Krylov:
        each step solves ``(I - J) dh = f(h) - h`` with this package's gmres on
        Jacobian-vector products, with a backtracking line search), or a dict
        ``{"method": name, **options}``. Options: ``"iterate"``: ``tau`` (damping, 1.0);
        ``"anderson"``: ``m`` (memory, 5), ``lam`` (regularisation, relative, 1e-8), ``tau``
        (mixing, 1.0); ``"broyden"``: ``memory`` (rank of the inverse-Jacobian update, None:
        unbounded), ``line_search`` (False), ``max_backtracks`` (8); ``"newton"``:
        ``inner_rtol`` (1e-3), ``inner_maxiter`` (20), ``restart`` (gmres restart), ``line_search``
        (True), ``tau`` (first step length, 1.0), ``max_backtracks`` (8), ``jvp``
        (``"auto"``); see ``linsolve_rbp.adapters.torch.forward``. The forward and backward
        methods are chosen independently: the gradient is the implicit one either way.
    forward_maxiter : int
        Maximum number of forward iterations (of any forward method). 0 takes ``h0`` as the
        fixed point (one computed elsewhere): no iteration runs, and the residual
        ``||f(h0) - h0||`` is measured on the one evaluation of ``f`` that records the graph
        and tested against ``forward_tol`` as an iteration's would be.
    forward_tol : float or None
        Stop when ``||f(h) - h|| <= forward_tol * max(1, ||f(h)||)`` (per sample with
        ``batch_dims=1``: a sample that meets it stops changing; all must meet it for
        success). None runs exactly ``forward_maxiter`` iterations.
    backward : dict, optional
        The adjoint solve: ``method`` (any of :func:`linsolve_rbp.methods`, default
        ``"gmres"``), ``jvp`` (see :class:`JacobianOperator`) and any option of
        :func:`linsolve_rbp.solve` (``rtol``, ``atol``, ``maxiter``, ...) or of the method.
        Validated at this call, not in ``backward()``; ``x0``, ``batch_dims``, ``throw`` and
        ``on_failure`` are set by :func:`fixed_point` and refused here. Default
        ``{"method": "gmres", "rtol": 1e-6}``. Or an approximate gradient:
        ``{"method": "phantom", "steps": k, "damping": lam}`` (``damping`` in ``(0, 1]``,
        default 1), the phantom gradient of Geng et al. (2021): the gradient of ``k`` damped
        steps ``h <- (1 - lam) h + lam f(h)`` unrolled from ``h*``, computed as
        ``z = lam sum_{i<k} ((1 - lam) I + lam J^T)^i g`` with ``k - 1`` vector-Jacobian
        products at ``h*`` (memory constant in ``k``); or ``{"method": "jfb"}``, Jacobian-free
        backprop (Fung et al., 2022): ``z = g``, the gradient through one application of ``f``
        at ``h*``, no product. Both are reported like the solves (``info.backward`` with method
        ``"phantom"``/``"jfb"``, status COMPLETED, ``matvecs`` the products, the free residual
        estimate of the fixed_point method) and start from zero (a warm-start store keeps
        only their ``last_result``).
    on_failure : {"warn", "raise", "ignore"}
        Applied to the forward solve (tolerance not met in ``forward_maxiter``, or
        non-finite states; when it fails, ``f`` is evaluated twice more at ``h*`` and the
        message says so if ``f`` is random, dropout for example) and to the adjoint solve: a
        :class:`linsolve_rbp.ConvergenceWarning` with the result's message (deduplicated per call site, see
        :func:`linsolve_rbp.show_all_convergence_warnings`), a :class:`linsolve_rbp.SolveError`,
        or nothing. Non-finite gradients are handled as by :func:`implicit_grad`: an error with
        ``"raise"``, otherwise (even with ``"ignore"``) a warning and the entries set to zero.
    warm_start : WarmStart or None
        The layer's warm-start store: start the adjoint solve from the solution the previous
        backward pass through a call given the same store left there, when its shape, dtype
        and device match, and keep the new one (and its result, ``warm_start.last_result``)
        there. Create one :class:`WarmStart` per layer, once, and pass it at every call.
        None (or False): every solve starts from zero.
    batch_dims : {0, 1}
        1: the leading axis of ``h0`` indexes samples that do not interact; the forward test
        and the adjoint solves are per sample.
    return_info : bool
        Also return this call's :class:`FixedPointInfo`: the forward result now and, once a
        backward pass has run through the call, the adjoint result (``info.backward``).

    Returns
    -------
    h : torch.Tensor, or a structure like ``h0``
        ``f(h*)``, differentiable with respect to everything ``f`` closes over (``h*`` itself,
        without a graph, when gradients are disabled).
    info : FixedPointInfo
        Only with ``return_info=True``.

    Raises
    ------
    TypeError, ValueError
        For bad input; the message names the argument.
    linsolve_rbp.SolveError
        With ``on_failure="raise"``, from the forward pass when it did not converge, and from
        ``backward()`` when the adjoint solve did not or a gradient is not finite.
    RuntimeError
        Under ``torch.autograd.forward_ad`` (dual tensors), whose tangent would not be the
        implicit one; ``torch.func.jvp`` and ``torch.func.jacfwd`` with fixed budgets give it
        (see the Notes).

    Notes
    -----
    The construction (the gradient arriving at one differentiable evaluation of ``f`` at the
    fixed point replaced by the adjoint solution) is the one of deep equilibrium models (Bai
    et al., 2019). For the exact methods that evaluation is recorded at a copy of ``h*`` that
    requires grad, so that its graph gives the adjoint's vector-Jacobian products too: the
    backward pass evaluates ``f`` no more (forward-mode products, ``jvp="forward"``, evaluate
    it per product). ``phantom`` records its own ``k`` steps from ``h*``; ``"jfb"`` applies no
    Jacobian product. Called inside :func:`torch.autocast`, ``f`` runs in low precision
    there, its output is cast to the dtype of ``h0``, and the adjoint solve runs in that
    dtype. Warnings of the backward pass point at the line that called
    :func:`fixed_point`. The adjoint solution ``z`` has no graph:
    double backward (``create_graph=True``) through a fixed point is not supported and raises
    RuntimeError, whatever the backward method (for exact second derivatives differentiate
    :func:`unroll`). The adjoint result belongs to the call: it is
    ``info.backward`` (``return_info=True``) and, with a store, ``warm_start.last_result``;
    nothing is kept at module level, so layers and threads do not see each other's results.

    Inside ``torch.func`` transforms (``torch.func.vmap``, ``torch.func.grad``,
    ``vmap(grad(loss))`` for per-sample gradients, forward mode with ``torch.func.jvp`` and
    ``torch.func.jacfwd``) nothing may read values on the host and
    tensor hooks are not available, so there the layer needs fixed budgets:
    ``forward="iterate"`` with ``forward_tol=None`` (``forward_maxiter`` iterations), and, when
    a gradient is taken, ``backward={"method": "neumann", "rtol": None, "atol": None,
    "maxiter": K}`` (or ``"fixed_point"`` with the same budget), ``"phantom"`` or ``"jfb"``;
    anything else is refused with an error that names these options. The backward is then
    built into the graph as ``T`` evaluations of ``f`` at ``h*`` plus zero-valued
    perturbations (``T = K + 1`` for neumann, ``K`` for fixed_point, ``k`` for phantom, 1 for
    jfb), whose gradient is the same series with every Jacobian at ``h*`` as the hook's; the
    output's value is ``f(h*)`` exactly; it is a first derivative only (``h*`` has no graph),
    so a transform differentiating inside another (``torch.func.hessian``, ``jvp`` of
    ``grad``) is refused. Nothing is measured there (``info.forward`` says so,
    ``info.backward`` stays None), so ``on_failure`` has nothing to act on and
    ``warm_start`` is refused.

    Traced by :func:`torch.compile` (``torch.compile(model, fullgraph=True)``) the layer needs
    the same fixed budgets and compiles without graph breaks, its backward included: the
    gradient is the same series, computed in the backward by vector-Jacobian products of
    ``f`` at ``h*`` (memory constant in ``K``; see
    ``linsolve_rbp.adapters.torch.compiled``). Nothing is measured there either:
    ``return_info`` and ``warm_start`` are refused, and there is no divergence test.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> W = torch.tensor([[0.2, 0.1], [0.0, 0.3]], dtype=torch.float64, requires_grad=True)
    >>> x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> h, info = lrt.fixed_point(lambda h: torch.tanh(h @ W.T + x),
    ...                           torch.zeros(2, dtype=torch.float64), return_info=True)
    >>> h.sum().backward()
    >>> info.forward.converged, info.backward.converged, W.grad.shape
    (True, True, torch.Size([2, 2]))

    A state of two tensors keeps its structure, and the phantom gradient is one option away:

    >>> g = lambda s: (torch.tanh(s[0] @ W.T + x), 0.5 * s[1] + s[0].sum())
    >>> s0 = (torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    >>> (a, b), info = lrt.fixed_point(g, s0, backward={"method": "phantom", "steps": 5},
    ...                                return_info=True)
    >>> (a.sum() + b.sum()).backward()
    >>> a.shape, b.shape, info.backward.method, info.backward.matvecs
    (torch.Size([2]), torch.Size([1]), 'phantom', 4)
    """
    if torch.compiler.is_compiling():
        # Traced by torch.compile: fixed budgets, no host reads, no hooks (see compiled.py).
        return fixed_point_compiled(
            f, h0, forward=forward, forward_maxiter=forward_maxiter, forward_tol=forward_tol,
            backward=backward, on_failure=on_failure, warm_start=warm_start,
            batch_dims=batch_dims, return_info=return_info,
        )
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    # A structured state (tuple, list, dict of tensors) is solved for as one flat tensor; f
    # sees the structure, the output has it again.
    batch_dims, structure, h0 = flat_state(h0, "h0", batch_dims)
    if structure is not None:
        f = structure.wrap(f)
    on_failure = check_policy(on_failure)
    forward_maxiter = nonnegative_int(forward_maxiter, "forward_maxiter")
    forward_tol = nonnegative_real(forward_tol, "forward_tol", allow_none=True)
    forward_method, forward_options = check_forward(forward, "forward")
    return_info = boolean(return_info, "return_info")
    warm = _check_warm_start(warm_start)
    if backward is None:
        backward = {"method": "gmres", "rtol": 1e-6}
    # Validate the backward options now rather than in the middle of loss.backward().
    method, jvp, approximate, prepared = check_backward(
        backward, batch_dims, "fixed_point sets it (use warm_start, batch_dims and on_failure instead)"
    )
    if prepared is not None:
        check_adjoint_request(method, prepared.options, h0, batch_dims, "backward")
    if under_transform():
        # torch.func.vmap / grad: no host reads, no hooks; fixed budgets, the adjoint as graph.
        out, info = _transformed(f, h0, forward_method, forward_options, forward_maxiter, forward_tol,
                                 method, prepared, approximate, warm, batch_dims)
        if structure is not None:
            out = structure.unpack(out)
            info.forward.x = structure.unpack(info.forward.x)
        return (out, info) if return_info else out

    # Warnings of the backward pass, issued from inside autograd, point at this call.
    site = call_site(1)
    recorded = h_in = None
    grad = torch.is_grad_enabled()
    if forward_maxiter == 0:
        # h0 is the fixed point: its residual is measured on the evaluation that records the
        # graph (one evaluation of f in all).
        if grad:
            h_in = _input_for_record(h0, approximate)
            recorded = check_f_output(f(h_in), h0)
        h_star, fwd = zero_iterations(f, h0, recorded, forward_method, tol=forward_tol,
                                      batch_dims=batch_dims)
    else:
        h_star, fwd = solve_forward(f, h0, forward_method, forward_options, maxiter=forward_maxiter,
                                    tol=forward_tol, batch_dims=batch_dims)
    info = FixedPointInfo(forward=fwd)
    if structure is not None:
        fwd.x = structure.unpack(fwd.x)  # h* in the state's structure
    apply_policy(fwd, on_failure, "fixed_point forward solve", stacklevel=3, location=site)
    h_star = h_star.detach()
    if grad:
        if recorded is None:
            h_in = _input_for_record(h_star, approximate)
            recorded = check_f_output(f(h_in), h_star)
        out = recorded
        _refuse_forward_ad(out)
        leaves = None
        if approximate is None and out.requires_grad:
            # The record is f(h_in), h_in requiring grad: a gradient is owed only where f
            # closes over tensors that require one.
            leaves = _graph_leaves(out, h_in)
            if not leaves:
                out = out.detach()
        if out.requires_grad and approximate is not None:
            out.register_hook(
                _ApproximateHook(f, h_star, method, approximate, on_failure, warm, batch_dims, info,
                                 location=site, autocast_region=autocast_state(h_star.device),
                                 node=out.grad_fn)
            )
        elif out.requires_grad:
            out = _Adjoint.apply(
                out,
                _AdjointHook(f, h_star, prepared, jvp, on_failure, warm, batch_dims, info,
                             location=site, autocast_region=autocast_state(h_star.device),
                             h_in=h_in, leaves=leaves),
            )
        if h0.requires_grad:
            out = _ZeroGradTo.apply(out, h0)
    else:
        out = h_star
    if structure is not None:
        out = structure.unpack(out)
    return (out, info) if return_info else out
