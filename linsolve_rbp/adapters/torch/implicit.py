"""Implicit (RBP) gradients at a given fixed point: solve ``(I - J^T) z = dL/dh*`` with any
method of :func:`linsolve_rbp.solve`, then one vector-Jacobian product ``z^T df/dw``.

Reference: R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018
(Eq. 6; Algorithms 1 and 2 are the fixed-budget ``fixed_point`` and ``neumann`` solves).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable

import numpy as np
import torch

from ..._result import SolveResult, Status
from ..._validate import nonnegative_real, positive_int
from ..._warnings import warn_failure
from ...operators import IdentityOperator
from ...solve import solve as _solve
from ._checks import (
    all_finite,
    apply_policy,
    as_params,
    check_adjoint_request,
    check_jvp,
    check_policy,
    check_solve_options,
    flat,
    nonfinite_error,
)
from ._tree import flat_state, is_structured
from .jacobian import JacobianOperator, refuse_transform

__all__ = ["implicit_grad", "APPROXIMATE_METHODS", "check_approximate", "approximate_adjoint"]


def implicit_grad(
    f: Callable,
    h_star,
    grad_h,
    params,
    method: str = "gmres",
    on_failure: str = "warn",
    *,
    batch_dims: int = 0,
    jvp: str = "auto",
    x0=None,
    **solve_options,
):
    """Implicit (RBP) gradient of a loss at a fixed point with respect to parameters.

    Solves the adjoint system ``(I - J^T) z = grad_h`` with :func:`linsolve_rbp.solve` on the
    operator ``IdentityOperator(n) - J.T`` (``J`` a :class:`JacobianOperator` of ``f`` at
    ``h_star``), then returns ``z^T df/dp`` for every ``p`` of ``params`` by one
    vector-Jacobian product on the same recorded evaluation of ``f``.

    Parameters
    ----------
    f : callable
        The fixed-point map, state -> state of the same structure and shapes; closes over
        ``params``.
    h_star : torch.Tensor, or tuple, list or dict of torch.Tensor
        The (approximate) fixed point ``h* = f(h*)``: one tensor, or a structure of tensors
        (nested freely, one dtype and device), solved for as one vector (its tensors flattened
        and concatenated in order).
    grad_h : torch.Tensor, or a structure like ``h_star``
        ``dL/dh*``, with the structure, shapes and dtype of ``h_star``.
    params : torch.Tensor or sequence of torch.Tensor
        Tensors ``f`` closes over, each requiring grad.
    method : str
        Any of :func:`linsolve_rbp.methods`. ``gmres`` and ``bicgstab`` need only VJPs;
        ``cgne`` and ``lsqr`` also need JVPs (see ``jvp``). Or an approximate gradient, as
        for :func:`fixed_point`'s ``backward``: ``"phantom"`` (options ``steps`` and
        ``damping``) or ``"jfb"``.
    on_failure : {"warn", "raise", "ignore"}
        What to do when the solve does not succeed: issue a
        :class:`linsolve_rbp.ConvergenceWarning` with the result's message, raise
        :class:`linsolve_rbp.SolveError`, or nothing.
    batch_dims : {0, 1}
        1: the leading axis of ``h_star`` indexes independent samples; each sample's adjoint
        system is solved separately (see :class:`JacobianOperator`).
    jvp : {"auto", "forward", "double_backward"}
        How ``J v`` is computed, for methods that need it.
    x0 : torch.Tensor, optional
        Initial guess for ``z`` (a warm start), state-shaped, flat, or a structure like
        ``h_star``. Refused by ``"phantom"`` and ``"jfb"``, which start from zero.
    **solve_options
        Passed to :func:`linsolve_rbp.solve` (``rtol``, ``atol``, ``maxiter``, ``callback``,
        ``check_every``, ``divtol``, method options), validated with ``method`` before ``f``
        is evaluated. ``rtol=None, atol=None, maxiter=K``
        runs a fixed budget: with ``method="neumann"`` that is Neumann-RBP with ``K + 1``
        terms, with ``method="fixed_point"`` it is RBP (Algorithms 2 and 1 of Liao et al.,
        2018).

    Returns
    -------
    grads : tuple of torch.Tensor
        ``z^T df/dp``, one per parameter (zeros for parameters ``f`` does not use).
    result : linsolve_rbp.SolveResult
        The adjoint solve; ``result.x`` is ``z`` (flat: for a structured state, its parts in
        the order of the state's tensors).

    Raises
    ------
    TypeError, ValueError
        For bad input; the message names the argument.
    linsolve_rbp.SolveError
        With ``on_failure="raise"`` when the solve did not succeed or the gradient is not
        finite.
    RuntimeError
        Inside a ``torch.func`` transform (``vmap``, ``grad``): the gradients with respect
        to tensors ``f`` closes over need :mod:`torch.autograd`, which those transforms do
        not allow inside them. Per-sample adjoint systems are ``batch_dims=1``; per-sample
        parameter gradients are ``torch.func.vmap(torch.func.grad(loss))`` over a loss that
        calls :func:`fixed_point` with fixed budgets.

    Notes
    -----
    At ``h* = f(h*, w)``, ``dL/dw = z^T df/dw`` with ``(I - J^T) z = dL/dh*`` (Almeida 1987,
    Pineda 1987; Eq. 6 of Liao et al., 2018). ``f`` is evaluated once (plus once per
    forward-mode JVP). A gradient with non-finite entries is never returned silently: it
    raises with ``on_failure="raise"``, and otherwise warns (even with ``"ignore"``) and has
    those entries set to zero.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> W = torch.tensor([[0.2, 0.1], [0.0, 0.3]], dtype=torch.float64, requires_grad=True)
    >>> x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> f = lambda h: torch.tanh(h @ W.T + x)
    >>> h = lrt.unroll(f, torch.zeros(2, dtype=torch.float64), steps=100).detach()
    >>> (gW,), res = lrt.implicit_grad(f, h, torch.ones(2, dtype=torch.float64), [W], rtol=1e-10)
    >>> res.converged, gW.shape
    (True, torch.Size([2, 2]))
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    batch_dims, structure, h_star = flat_state(h_star, "h_star", batch_dims)
    on_failure = check_policy(on_failure)
    jvp = check_jvp(jvp)
    if structure is not None:
        grad_h = structure.pack(grad_h, "grad_h")
        if x0 is not None and is_structured(x0):
            x0 = structure.pack(x0, "x0")
        f = structure.wrap(f)
    if not isinstance(grad_h, torch.Tensor):
        raise TypeError(f"grad_h must be a torch.Tensor, got {type(grad_h).__name__}")
    if grad_h.shape != h_star.shape:
        raise ValueError(f"grad_h must have the shape of h_star {tuple(h_star.shape)}, got {tuple(grad_h.shape)}")
    if grad_h.dtype != h_star.dtype or grad_h.device != h_star.device:
        raise TypeError(
            f"grad_h ({grad_h.dtype} on {grad_h.device}) must have the dtype and device of "
            f"h_star ({h_star.dtype} on {h_star.device})"
        )
    params = as_params(params)
    # Everything that can be checked without f is checked before f is evaluated.
    approximate = check_approximate(method, solve_options, "implicit_grad") if method in APPROXIMATE_METHODS else None
    if approximate is None:
        solve_options = check_solve_options(method, solve_options)
        check_adjoint_request(method, solve_options, h_star, batch_dims)
    elif x0 is not None:
        raise ValueError(f"x0 is not used by method {method!r}, which starts from z = 0; pass x0=None")
    refuse_transform(
        "implicit_grad",
        "for per-sample adjoint systems pass batch_dims=1; for per-sample parameter gradients "
        "use torch.func.vmap(torch.func.grad(loss)) with lrt.fixed_point(..., forward_tol=None, "
        "backward={'method': 'neumann', 'rtol': None, 'atol': None, 'maxiter': K}) in the loss",
    )
    b = flat(grad_h.detach(), batch_dims)
    if x0 is not None:
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if x0.numel() != b.numel():
            raise ValueError(f"x0 must have {b.numel()} elements (the shape of h_star), got shape {tuple(x0.shape)}")
        if x0.dtype != b.dtype or x0.device != b.device:
            raise TypeError(
                f"x0 ({x0.dtype} on {x0.device}) must have the dtype and device of h_star "
                f"({b.dtype} on {b.device})"
            )
        x0 = x0.detach().reshape(b.shape)
    J = JacobianOperator._checked(f, h_star, jvp, batch_dims)
    if approximate is not None:
        result = approximate_adjoint(J._rmatvec, b, method, approximate["steps"], approximate["damping"], batch_dims)
        apply_policy(result, on_failure, f"implicit_grad ({method} adjoint)")
        grads = J.vjp_params(result.x, params, release=True)
        return _finite_grads(grads, result, on_failure, "implicit_grad"), result
    A = IdentityOperator(J.shape[0], like=b) - J.T
    result = _solve(A, b, method=method, x0=x0, batch_dims=batch_dims, **solve_options)
    apply_policy(result, on_failure, "implicit_grad adjoint solve")
    grads = J.vjp_params(result.x, params, release=True)
    return _finite_grads(grads, result, on_failure, "implicit_grad"), result


def _finite_grads(grads, result, on_failure, context):
    bad = [i for i, g in enumerate(grads) if not all_finite(g)]
    if not bad:
        return grads
    msg = (
        f"the gradient of params {bad} has non-finite entries (adjoint solve: "
        f"{result.message}); f or its derivative is not finite at the fixed point"
    )
    if on_failure == "raise":
        raise nonfinite_error(result, f"{context}: {msg}")
    # stacklevel 3: this function, implicit_grad, the caller of implicit_grad.
    warn_failure(result, context, message=msg + "; those entries were set to zero", stacklevel=3)
    return tuple(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) if i in bad else g for i, g in enumerate(grads))


# -- approximate adjoints: phantom gradients and Jacobian-free backprop -----------------------
#: Backward methods that approximate ``(I - J^T)^{-1} g`` on purpose, next to the solvers.
APPROXIMATE_METHODS = ("phantom", "jfb")
_APPROXIMATE_OPTIONS = MappingProxyType({"phantom": ("steps", "damping"), "jfb": ()})


def check_approximate(method, options, where="backward") -> dict:
    """Validate the options of an approximate backward method (``options`` without
    ``method``): ``{"steps": k, "damping": lam}`` for ``"phantom"`` (``steps`` a positive
    integer, required; ``damping`` in ``(0, 1]``, default 1), nothing for ``"jfb"`` (which is
    ``steps=1, damping=1``). Returns ``{"steps": k, "damping": lam}``."""
    accepted = _APPROXIMATE_OPTIONS[method]
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise TypeError(
            f"{where}: method {method!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            + (f"it accepts: {', '.join(accepted)}" if accepted else "it takes no options")
            + " (an approximate gradient has no tolerance or solver options)"
        )
    if method == "jfb":
        return {"steps": 1, "damping": 1.0}
    if "steps" not in options:
        raise TypeError(
            f"{where}: method 'phantom' needs {where}['steps'], the number of damped steps k "
            "(for example {'method': 'phantom', 'steps': 5, 'damping': 0.5})"
        )
    steps = positive_int(options["steps"], f"{where}['steps']")
    damping = nonnegative_real(options.get("damping", 1.0), f"{where}['damping']", allow_inf=False)
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"{where}['damping'] must be in (0, 1], got {options.get('damping')!r}")
    return {"steps": steps, "damping": damping}


def approximate_adjoint(rmv, b, method, steps, damping, batch_dims) -> SolveResult:
    """The approximate adjoint ``z`` of ``(I - J^T) z = b`` (``b`` flat), as a SolveResult.

    ``z_0 = 0``, ``z_{i+1} = (1 - damping) z_i + damping (J^T z_i + b)`` for ``steps`` steps:
    ``z = damping * sum_{i<k} ((1 - damping) I + damping J^T)^i b``, the phantom gradient of
    Geng et al. (2021) in its Neumann-series form, which at a fixed point equals
    back-propagating through ``k`` damped steps ``h <- (1 - damping) h + damping f(h)``
    unrolled from ``h*``. ``steps=1, damping=1`` gives ``z = b``: Jacobian-free backprop
    (Fung et al., 2022). ``rmv`` is ``u -> J^T u`` (unused when ``steps == 1``); ``steps - 1``
    products. The residual reported is the free one of the fixed_point solver, ``||b - (I -
    J^T) z_{k-1}||`` (the last step divided by ``damping``); the status is COMPLETED (no
    tolerance is asked), NONFINITE with the last finite iterate where NaN or inf appeared.
    """
    ndtype = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else None
    batched = batch_dims == 1

    z = torch.zeros_like(b)
    norms = []
    for i in range(steps):
        r = b if i == 0 else b - z + rmv(z)  # the residual of z_i, b - (I - J^T) z_i
        norms.append(torch.linalg.vector_norm(r, dim=-1, dtype=ndtype))
        z = z + damping * r
    hist = torch.stack(norms).to(torch.float64).cpu().numpy()  # the one host read
    bad = ~np.isfinite(hist).all(axis=0)
    products = steps - 1
    if np.any(bad) or not all_finite(z):
        # Replayed (on this failure path only) with each system kept at its last finite iterate.
        z = torch.zeros_like(b)
        alive = torch.ones(b.shape[:-1], dtype=torch.bool, device=b.device)
        for i in range(steps):
            r = b if i == 0 else b - z + rmv(z)
            z_new = z + damping * r
            alive = alive & torch.isfinite(z_new).all(dim=-1)
            z = torch.where(alive.unsqueeze(-1), z_new, z)
        bad = ~alive.cpu().numpy()
        products = 2 * (steps - 1)
    hist = np.concatenate([hist[:1], hist]) if len(hist) else hist
    last = hist[-1]
    if batched:
        statuses = tuple(Status.NONFINITE if x else Status.COMPLETED for x in np.atleast_1d(bad))
        status = Status.NONFINITE if np.any(bad) else Status.COMPLETED
        residual = last
        converged = np.zeros(len(statuses), dtype=bool)
    else:
        statuses = None
        status = Status.NONFINITE if bool(np.any(bad)) else Status.COMPLETED
        residual = float(last)
        converged = False
    if method == "jfb":
        what = (
            "jfb: z = g, the Jacobian-free approximation of (I - J^T)^{-1} g (Fung et al., 2022); "
            "no Jacobian product; residual_norm is ||g||, that of z = 0"
        )
    else:
        rule = "z <- J^T z + g" if damping == 1.0 else f"z <- (1 - {damping:g}) z + {damping:g} (J^T z + g)"
        what = (
            f"phantom: {steps} damped step(s) {rule} "
            f"from z = 0 (Geng et al., 2021), {steps - 1} product(s); an approximate adjoint, no "
            f"tolerance asked; residual norm {float(np.max(last)):.3e} (of the iterate before the "
            "last step)"
        )
    if status is Status.NONFINITE:
        what += "; " + Status.NONFINITE.value
    return SolveResult(
        x=z, status=status, converged=converged, success=status.success,
        iterations=steps, matvecs=products, rmatvecs=0,
        residual_norm=residual, residual_history=hist, message=what,
        method=method, statuses=statuses,
        info={"steps": steps, "damping": damping, "approximate": True},
    )
