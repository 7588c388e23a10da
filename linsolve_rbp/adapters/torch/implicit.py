"""Implicit (RBP) gradients at a given fixed point: solve ``(I - J^T) z = dL/dh*`` with any
method of :func:`linsolve_rbp.solve`, then one vector-Jacobian product ``z^T df/dw``.

Reference: R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018
(Eq. 6; Algorithms 1 and 2 are the fixed-budget ``fixed_point`` and ``neumann`` solves).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..._warnings import warn_failure
from ...operators import IdentityOperator
from ...solve import solve as _solve
from ._checks import (
    all_finite,
    apply_policy,
    as_params,
    check_adjoint_request,
    check_batch_dims,
    check_jvp,
    check_policy,
    check_solve_options,
    check_state,
    flat,
    nonfinite_error,
)
from .jacobian import JacobianOperator

__all__ = ["implicit_grad"]


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
        The fixed-point map, state -> state of the same shape; closes over ``params``.
    h_star : torch.Tensor
        The (approximate) fixed point ``h* = f(h*)``.
    grad_h : torch.Tensor
        ``dL/dh*``, the shape and dtype of ``h_star``.
    params : torch.Tensor or sequence of torch.Tensor
        Tensors ``f`` closes over, each requiring grad.
    method : str
        Any of :func:`linsolve_rbp.methods`. ``gmres`` and ``bicgstab`` need only VJPs;
        ``cgne`` and ``lsqr`` also need JVPs (see ``jvp``).
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
        Initial guess for ``z`` (a warm start), state-shaped or flat.
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
        The adjoint solve; ``result.x`` is ``z`` (flat).

    Raises
    ------
    TypeError, ValueError
        For bad input; the message names the argument.
    linsolve_rbp.SolveError
        With ``on_failure="raise"`` when the solve did not succeed or the gradient is not
        finite.

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
    check_state(h_star, "h_star")
    on_failure = check_policy(on_failure)
    batch_dims = check_batch_dims(batch_dims, h_star, "h_star")
    jvp = check_jvp(jvp)
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
    solve_options = check_solve_options(method, solve_options)
    check_adjoint_request(method, solve_options, h_star, batch_dims)
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
    J = JacobianOperator(f, h_star, jvp=jvp, batch_dims=batch_dims)
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
