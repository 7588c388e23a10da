""":func:`~linsolve_rbp.adapters.torch.fixed_point` inside :func:`torch.compile`.

When ``fixed_point`` is traced by :func:`torch.compile` (``torch.compiler.is_compiling()``),
it runs :func:`fixed_point_compiled`: fixed budgets forward and backward, no host reads, no
tensor hooks, so that ``torch.compile(model, fullgraph=True)`` compiles a model with a
fixed-point layer into one graph, its backward included.

- Forward: ``forward_maxiter`` iterations of ``h <- f(h)`` (``forward="iterate"``, or
  ``{"method": "iterate", "tau": t}`` for ``h <- h + t (f(h) - h)``) under
  :func:`torch.no_grad`, then ``y = f(h*)`` with the graph kept.
- Backward: an :class:`torch.autograd.Function` whose backward replaces the gradient ``g``
  arriving at ``y`` by ``z = lam sum_{i<T} ((1 - lam) I + lam J^T)^i g``, computed with
  vector-Jacobian products of ``f`` at ``h*`` (:func:`torch.func.vjp`: one graph of ``f``,
  memory constant in ``T``); autograd then carries ``z`` through ``y = f(h*)`` to everything
  ``f`` closes over. ``lam = 1`` and ``T = maxiter + 1`` is ``neumann`` with a fixed budget of
  ``maxiter`` terms (``maxiter`` products), ``T = maxiter`` is ``fixed_point`` from zero
  (``maxiter - 1`` products), exactly the sums the uncompiled solvers return in fixed-budget
  mode with ``divtol=None``; ``{"method": "phantom", "steps": k, "damping": lam}`` gives
  ``T = k`` and ``{"method": "jfb"}`` ``T = 1`` (``z = g``). The arithmetic is the
  uncompiled one: a series is summed in float32 for a float16 or bfloat16 state (the products
  in the state's dtype), phantom runs the uncompiled recursion ``z <- z + lam (g - z + J^T
  z)``.
- An ``h0`` that requires grad gets a zero gradient, as uncompiled (a fixed point does not
  depend on where the iteration started).

Nothing is measured inside the graph (a residual or a status would be read on the host):
there is no result, no warning and no divergence test, and ``return_info``, ``warm_start``
and tolerances are refused with an error naming what works. Run the model uncompiled to see
the forward and backward results (``return_info=True``).
"""

from __future__ import annotations

import torch

from ..._validate import ArgumentTypeError
from ._tree import flat_state

# The checks here use only what torch.compile traces (isinstance, comparisons of Python
# numbers): the package's validators also accept 0-d arrays, which dynamo cannot check.

__all__ = ["fixed_point_compiled"]

_WHERE = "fixed_point inside torch.compile"
_BUDGET_KEYS = ("rtol", "atol", "maxiter", "divtol", "check_every", "compile", "jvp")
_WORKS = (
    "backward={'method': 'neumann' or 'fixed_point', 'rtol': None, 'atol': None, "
    "'maxiter': K}, or {'method': 'phantom', 'steps': k, 'damping': lam}, or {'method': 'jfb'}"
)


def _budget(backward) -> tuple[int, float]:
    """``(T, lam)`` of the backward (see the module docstring); errors name what works."""
    if backward is None:
        raise ValueError(
            f"{_WHERE} needs a fixed-budget backward (the default, gmres to a tolerance, reads "
            f"values on the host): pass {_WORKS}"
        )
    if not isinstance(backward, dict):
        raise ArgumentTypeError(f"backward must be a dict of solve options, got {type(backward).__name__}")
    options = dict(backward)
    method = options.pop("method", "gmres")
    if method == "jfb" and not options:
        return 1, 1.0
    if method == "phantom" and set(options) <= {"steps", "damping"}:
        steps = _positive_int(options.get("steps"), "backward['steps']")
        damping = options.get("damping", 1.0)
        if not (_is_real(damping) and 0.0 < damping <= 1.0):
            raise ValueError(f"backward['damping'] must be in (0, 1], got {damping!r}")
        return steps, float(damping)
    ok, extra, got = fixed_budget_series(method, options, _BUDGET_KEYS)
    if not ok:
        if method in _SERIES and not extra:
            got += " with a tolerance or without maxiter"
        raise ValueError(f"{_WHERE} needs a fixed-budget backward without host reads: {_WORKS}; got {got}")
    maxiter = _positive_int(options["maxiter"], "backward['maxiter']")
    return series_terms(method, maxiter), 1.0


_SERIES = ("neumann", "fixed_point")


def fixed_budget_series(method, options, allowed) -> tuple[bool, list, str]:
    """Whether the backward ``method`` with ``options`` (without ``"method"``) sums a series
    with a fixed budget and no host read: ``neumann`` or ``fixed_point`` with ``rtol=None``,
    ``atol=None``, a ``maxiter``, and no option outside ``allowed``. Returns ``(ok, extra,
    got)``: the options outside ``allowed`` (sorted) and what was given, for an error."""
    extra = sorted(k for k in options if k not in allowed)
    ok = (
        method in _SERIES
        and options.get("rtol", 1.0) is None
        and options.get("atol", 1.0) is None
        and options.get("maxiter") is not None
        and not extra
    )
    got = f"backward method {method!r}" + (f" with {', '.join(map(repr, extra))}" if extra else "")
    return ok, extra, got


def series_terms(method, maxiter) -> int:
    """The terms ``T`` of the series a fixed-budget ``neumann`` (``maxiter + 1``: ``maxiter``
    products) or ``fixed_point`` from zero (``maxiter``) sums."""
    return maxiter + 1 if method == "neumann" else maxiter


def iterate_fixed(f, h, maxiter, tau):
    """``h`` after exactly ``maxiter`` iterations ``h <- h + tau (f(h) - h)``, without a graph
    (no host read: traceable by torch.compile and torch.func)."""
    h = h.detach()
    with torch.no_grad():
        for _ in range(maxiter):
            h = f(h) if tau == 1.0 else h + tau * (f(h) - h)
    h = h.detach()
    return h


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v, name) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool)):
        raise ArgumentTypeError(f"{name} must be a positive integer, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _forward_tau(forward) -> float:
    """The damping ``tau`` of ``forward="iterate"`` (or ``{"method": "iterate", "tau": t}``)."""
    if forward == "iterate":
        return 1.0
    if isinstance(forward, dict) and forward.get("method") == "iterate" and set(forward) <= {"method", "tau"}:
        tau = forward.get("tau", 1.0)
        if not (_is_real(tau) and tau > 0):
            raise ValueError(f"forward['tau'] must be a positive real, got {tau!r}")
        return float(tau)
    got = forward if isinstance(forward, str) else forward.get("method") if isinstance(forward, dict) else forward
    raise ValueError(
        f"{_WHERE} needs forward='iterate' (or {{'method': 'iterate', 'tau': t}}) with "
        f"forward_tol=None, got forward={got!r}: the other forward methods take decisions on "
        "values on the host"
    )


class _Adjoint(torch.autograd.Function):
    """Identity on ``y = f(h*)``; its backward replaces the gradient ``g`` by
    ``z = lam sum_{i<T} ((1 - lam) I + lam J^T)^i g`` (``J = df/dh`` at ``h*``), with the
    arithmetic of the uncompiled backward: for a series (neumann, fixed_point) the terms
    ``v <- J^T v`` summed, in float32 for a half-precision state (as the solvers iterate, the
    products in the state's dtype); for phantom the uncompiled recursion ``z <- z + lam (g - z
    + J^T z)`` in the state's dtype."""

    @staticmethod
    def forward(ctx, y, h, f, steps, lam, phantom):
        ctx.save_for_backward(h)
        ctx.f, ctx.steps, ctx.lam, ctx.phantom = f, steps, lam, phantom
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        steps, lam = ctx.steps, ctx.lam
        if steps <= 1:
            return g, None, None, None, None, None
        # One graph of f at h*, whatever the number of products.
        _, vjp = torch.func.vjp(ctx.f, h)
        if ctx.phantom:
            z = lam * g
            for _ in range(steps - 1):
                (u,) = vjp(z)
                z = z + lam * (g - z + u)
            return z, None, None, None, None, None
        low = g.dtype
        work = torch.float32 if low in (torch.float16, torch.bfloat16) else low
        v = g.to(work)
        z = v
        for _ in range(steps - 1):
            (u,) = vjp(v.to(low))
            u = u.to(work)
            v = u if lam == 1.0 else (1.0 - lam) * v + lam * u
            z = z + v
        if lam != 1.0:
            z = lam * z
        return z.to(low), None, None, None, None, None


class _ZeroGradTo(torch.autograd.Function):
    """Identity on ``y``; gives ``h0`` a zero gradient (a fixed point does not depend on where
    the iteration started; ``h0``'s gradient is then zeros, not None). The compiled and the
    uncompiled layer both use it."""

    @staticmethod
    def forward(ctx, y, h0):
        ctx.h0_meta = (h0.shape, h0.dtype, h0.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.h0_meta
        gy = g if ctx.needs_input_grad[0] else None
        return gy, torch.zeros(shape, dtype=dtype, device=device)


def fixed_point_compiled(f, h0, *, forward="iterate", forward_maxiter=50, forward_tol=1e-6,
                         backward=None, on_failure="warn", warm_start=None, batch_dims=0,
                         return_info=False):
    """:func:`~linsolve_rbp.adapters.torch.fixed_point` as :func:`torch.compile` traces it:
    fixed budgets, no host reads, no hooks (see the module docstring). Same arguments; the
    output ``f(h*)`` has the state's structure and is differentiable as the uncompiled one
    is, with the fixed-budget backward.

    Raises
    ------
    ValueError
        For a tolerance (``forward_tol`` not None; a backward to a tolerance or by a method
        that decides on the host), a forward method other than ``"iterate"``,
        ``return_info=True`` or a ``warm_start`` store: each needs host reads. torch reports
        the error as an ``Unsupported: Observed exception`` whose text quotes this message.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if forward_tol is not None:
        raise ValueError(
            f"{_WHERE} needs a fixed forward budget: pass forward_tol=None (it then runs exactly "
            "forward_maxiter iterations); a tolerance test reads values on the host"
        )
    tau = _forward_tau(forward)
    if return_info:
        raise ValueError(
            f"{_WHERE} cannot return_info: nothing is measured inside the graph (it would read "
            "values on the host); call the model uncompiled to see the results"
        )
    if warm_start is not None and warm_start is not False:
        raise ValueError(f"{_WHERE} cannot keep a warm-start store: pass warm_start=None")
    maxiter = _positive_int(forward_maxiter, "forward_maxiter")
    steps, lam = _budget(backward)
    phantom = backward.get("method") in ("phantom", "jfb")
    batch_dims, structure, h0 = flat_state(h0, "h0", batch_dims)
    if structure is not None:
        f = structure.wrap(f)
    h = iterate_fixed(f, h0, maxiter, tau)
    if torch.is_grad_enabled():
        y = f(h)
        out = _Adjoint.apply(y, h, f, steps, lam, phantom) if y.requires_grad else y
        if h0.requires_grad:
            # As uncompiled: h0 gets a zero gradient (not None).
            out = _ZeroGradTo.apply(out, h0)
    else:
        out = h
    return structure.unpack(out) if structure is not None else out
