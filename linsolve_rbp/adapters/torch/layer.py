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

from ... import backend as _b
from ..._result import SolveResult, Status
from ..._validate import ArgumentTypeError, boolean, nonnegative_real, positive_int
from ..._warnings import warn_failure
from ...operators import IdentityOperator
from ._checks import (
    all_finite,
    apply_policy,
    autocast,
    autocast_state,
    call_site,
    check_adjoint_request,
    check_batch_dims,
    check_f_output,
    check_jvp,
    check_policy,
    prepare_solve,
    check_state,
    flat,
    nonfinite_error,
)
from .jacobian import JacobianOperator

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
        The forward iteration: ``iterations`` applications of ``f``, ``residual_norm`` the last
        step ``||f(h) - h||`` (per sample with ``batch_dims=1``), status CONVERGED,
        MAX_ITERATIONS, COMPLETED (``forward_tol=None``) or NONFINITE. ``x`` is ``h*``.
    backward : linsolve_rbp.SolveResult or None
        The adjoint solve of the latest backward pass through this call; None until then
        (set before the failure policy acts, so also when ``backward()`` raises).
    backward_results : list of linsolve_rbp.SolveResult
        Every adjoint solve through this call (more than one when back-propagating several
        times with ``retain_graph=True``).
    """

    forward: SolveResult
    backward: SolveResult | None = None
    backward_results: list = field(default_factory=list)


# -- the fixed-point layer ------------------------------------------------------------------
def _forward_iterate(f, h0, maxiter, tol, batch_dims):
    h = h0.detach()
    history = []
    status = None
    k = 0
    # Norms of half-precision states are accumulated in float32 (and reported as floats).
    ndtype = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else None
    with torch.no_grad():
        for k in range(1, maxiter + 1):
            h_new = check_f_output(f(h), h0)
            step = flat(h_new - h, batch_dims)
            dnorm = torch.linalg.vector_norm(step, dim=-1, dtype=ndtype)
            history.append(dnorm)
            h = h_new
            if not bool(torch.isfinite(dnorm).all()):
                status = Status.NONFINITE
                break
            if tol is not None:
                hnorm = torch.linalg.vector_norm(flat(h, batch_dims), dim=-1, dtype=ndtype)
                if bool((dnorm <= tol * torch.clamp(hnorm, min=1.0)).all()):
                    status = Status.CONVERGED
                    break
    if status is None:
        status = Status.COMPLETED if tol is None else Status.MAX_ITERATIONS
    hist = np.stack([_b.to_numpy(d).astype(float) for d in history]) if history else np.zeros((0,))
    last = hist[-1] if len(hist) else np.zeros(() if batch_dims == 0 else (h.shape[0],))
    batched = batch_dims == 1
    if tol is None:
        thr = "no tolerance (forward_tol=None)"
    else:
        thr = f"forward_tol {tol:.1e}"
    hint = {
        Status.MAX_ITERATIONS: "; raise forward_maxiter, loosen forward_tol, or make f contracting",
        Status.NONFINITE: "; the iteration produced NaN or inf: f is not contracting from h0",
    }.get(status, "")
    message = (
        f"{status.name.lower()} after {k} iterations, last step "
        f"norm {float(np.max(last)):.3e} ({thr}){hint}"
    )
    result = SolveResult(
        x=h, status=status, converged=status is Status.CONVERGED, success=status.success,
        iterations=k, matvecs=0, rmatvecs=0,
        residual_norm=last if batched else float(last),
        residual_history=hist, message=message,
        method="forward", statuses=None, info={},
    )
    return h, result


class _ZeroGradTo(torch.autograd.Function):
    """Identity on ``y``; gives ``h0`` a zero gradient (a fixed point does not depend on where
    the iteration started)."""

    @staticmethod
    def forward(ctx, y, h0):
        ctx.h0_meta = (h0.shape, h0.dtype, h0.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.h0_meta
        gy = g if ctx.needs_input_grad[0] else None
        return gy, torch.zeros(shape, dtype=dtype, device=device)


def _graph_leaves(output, exclude):
    """The leaf tensors (AccumulateGrad nodes' ``.variable``) that ``output``'s graph reaches,
    except ``exclude``."""
    leaves, seen, stack = [], set(), [output.grad_fn]
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


class _AdjointHook:
    """Replaces the gradient ``g`` arriving at ``f(h*)`` by the solution ``z`` of
    ``(I - J^T) z = g``; autograd then carries ``z`` through the graph of ``f`` to everything
    ``f`` closes over."""

    def __init__(self, f, h_star, prepared, jvp, on_failure, warm, batch_dims, info,
                 location=None, autocast_region=None):
        self.f = f
        self.h_star = h_star
        # The adjoint solve, its options validated once when fixed_point was called.
        self.prepared = prepared
        self.jvp = jvp
        self.on_failure = on_failure
        self.warm = warm
        self.batch_dims = batch_dims
        self.info = info
        self.location = location  # the line that called fixed_point: warnings point there
        self.autocast_region = autocast_region  # where fixed_point ran f; re-entered for J

    def __call__(self, g):
        if g is None:  # an undefined gradient (no loss depends on the output) stays undefined
            return None
        b = flat(g.detach(), self.batch_dims)
        if b.dtype != self.h_star.dtype:
            b = b.to(self.h_star.dtype)
        with autocast(self.autocast_region):
            # f, h* and the options were checked when fixed_point was called.
            J = JacobianOperator._checked(self.f, self.h_star, self.jvp, self.batch_dims)
        A = IdentityOperator(J.shape[0], like=b) - J.T
        x0 = self.warm.get(b) if self.warm is not None else None
        try:
            result = self.prepared(A, b, x0)
            leaves = _graph_leaves(J.output, J._h) if J.output.requires_grad else []
        finally:
            J.release()
        # The result belongs to this call (its info) and to the layer's store, if it has one.
        self.info.backward = result
        self.info.backward_results.append(result)
        if self.warm is not None:
            self.warm.last_result = result
        apply_policy(result, self.on_failure, "fixed_point backward (adjoint solve)", stacklevel=2,
                     location=self.location)
        if self.warm is not None:
            self.warm.store(result.x)
        if leaves:
            _FiniteGradGuard(leaves, result, self.on_failure, self.location)
        return result.x.reshape(g.shape).to(g.dtype)


def fixed_point(
    f: Callable,
    h0,
    *,
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

    The forward pass iterates ``h <- f(h)`` from ``h0`` under :func:`torch.no_grad` (no graph,
    so memory does not grow with the iterations) until the step is small, then applies ``f``
    once more with the graph kept and returns that ``f(h*)``. In the backward pass the gradient
    ``g`` arriving at the output is replaced by the solution ``z`` of ``(I - J^T) z = g``
    (``J = df/dh`` at ``h*``), which autograd carries through that one evaluation of ``f`` to
    every parameter and input ``f`` closes over: ``.grad`` of an :class:`torch.nn.Module`'s
    parameters, and the graph of inputs computed upstream (an encoder's output, say).

    Parameters
    ----------
    f : callable
        State -> state of the same shape and dtype; closes over its parameters and inputs.
    h0 : torch.Tensor
        The starting state. It gets a zero gradient: the fixed point does not depend on it.
    forward_maxiter : int
        Maximum number of forward iterations.
    forward_tol : float or None
        Stop when ``||f(h) - h|| <= forward_tol * max(1, ||f(h)||)`` (per sample with
        ``batch_dims=1``, all samples must meet it). None runs exactly ``forward_maxiter``
        iterations.
    backward : dict, optional
        The adjoint solve: ``method`` (any of :func:`linsolve_rbp.methods`, default
        ``"gmres"``), ``jvp`` (see :class:`JacobianOperator`) and any option of
        :func:`linsolve_rbp.solve` (``rtol``, ``atol``, ``maxiter``, ...) or of the method.
        Validated at this call, not in ``backward()``; ``x0``, ``batch_dims``, ``throw`` and
        ``on_failure`` are set by :func:`fixed_point` and refused here. Default
        ``{"method": "gmres", "rtol": 1e-6}``.
    on_failure : {"warn", "raise", "ignore"}
        Applied to the forward iteration (tolerance not met in ``forward_maxiter``, or
        non-finite states) and to the adjoint solve: a :class:`linsolve_rbp.ConvergenceWarning`
        with the result's message (deduplicated per call site, see
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
    h : torch.Tensor
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

    Notes
    -----
    The construction (a gradient hook on one differentiable evaluation of ``f`` at the fixed
    point) is the one of deep equilibrium models (Bai et al., 2019). Called inside
    :func:`torch.autocast`, ``f`` runs in low precision there (and again when the backward
    pass records the Jacobian), its output is cast to the dtype of ``h0``, and the adjoint
    solve runs in that dtype. Warnings of the backward pass point at the line that called
    :func:`fixed_point`. Each backward pass
    evaluates ``f`` once more, at ``h*``, to record the Jacobian for the adjoint solve. The
    adjoint solution ``z`` has no graph: double backward (``create_graph=True``) through a
    fixed point is not supported. The adjoint result belongs to the call: it is
    ``info.backward`` (``return_info=True``) and, with a store, ``warm_start.last_result``;
    nothing is kept at module level, so layers and threads do not see each other's results.

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
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    check_state(h0, "h0")
    batch_dims = check_batch_dims(batch_dims, h0, "h0")
    on_failure = check_policy(on_failure)
    forward_maxiter = positive_int(forward_maxiter, "forward_maxiter")
    forward_tol = nonnegative_real(forward_tol, "forward_tol", allow_none=True)
    return_info = boolean(return_info, "return_info")
    warm = _check_warm_start(warm_start)
    if backward is None:
        backward = {"method": "gmres", "rtol": 1e-6}
    if not isinstance(backward, dict):
        raise TypeError(f"backward must be a dict of solve options, got {type(backward).__name__}")
    for key in ("x0", "batch_dims", "throw", "on_failure"):
        if key in backward:
            raise ValueError(
                f"backward must not set {key!r}: fixed_point sets it (use warm_start, batch_dims "
                "and on_failure instead)"
            )
    options = dict(backward)
    method = options.pop("method", "gmres")
    jvp = check_jvp(options.pop("jvp", "auto"), "backward['jvp']")
    # Validate the backward options now rather than in the middle of loss.backward().
    prepared = prepare_solve(method, dict(options, batch_dims=batch_dims), "backward")
    check_adjoint_request(method, prepared.options, h0, batch_dims, "backward")

    # Warnings of the backward pass, issued from inside autograd, point at this call.
    site = call_site(1)
    h_star, fwd = _forward_iterate(f, h0, forward_maxiter, forward_tol, batch_dims)
    info = FixedPointInfo(forward=fwd)
    apply_policy(fwd, on_failure, "fixed_point forward iteration", stacklevel=3)
    h_star = h_star.detach()
    if torch.is_grad_enabled():
        out = check_f_output(f(h_star), h_star)
        if out.requires_grad:
            out.register_hook(
                _AdjointHook(f, h_star, prepared, jvp, on_failure, warm, batch_dims, info,
                             location=site, autocast_region=autocast_state(h_star.device))
            )
        if h0.requires_grad:
            out = _ZeroGradTo.apply(out, h0)
    else:
        out = h_star
    return (out, info) if return_info else out
