"""PyTorch adapter: Jacobians as operators, implicit gradients and recurrent back-propagation.

At a fixed point ``h* = f(h*)`` of a map ``f`` that closes over parameters ``w``, the gradient
of a loss ``L(h*)`` is ``dL/dw = z^T df/dw`` where ``(I - J^T) z = dL/dh*`` and ``J = df/dh``
at ``h*`` (recurrent back-propagation, RBP; Almeida 1987, Pineda 1987; Liao et al., 2018).
This module provides:

- :class:`JacobianOperator`: ``J`` as a :class:`linsolve_rbp.LinearOperator`; ``J.T @ u`` is a
  vector-Jacobian product on one recorded evaluation of ``f``, ``J @ v`` a Jacobian-vector
  product (forward mode, or the double-backward trick).
- :func:`implicit_grad`: solves the adjoint system with any method of
  :func:`linsolve_rbp.methods` and returns ``z^T df/dw``.
- :func:`fixed_point`: a differentiable fixed-point layer; the forward pass iterates without a
  graph, the backward pass solves the adjoint system.
- :func:`unroll`: back-propagation through time (BPTT) and its truncated variant (TBPTT), the
  baselines of the paper.

References
----------
R. Liao, Y. Xiong, E. Fetaya, L. Zhang, K. Yoon, X. Pitkow, R. Urtasun, R. Zemel,
"Reviving and Improving Recurrent Back-Propagation", ICML 2018.

S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the gradient hook
used by :func:`fixed_point`).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import backend as _b
from .._result import SolveError, SolveResult, Status
from .._warnings import warn_failure
from ..operators import IdentityOperator, LinearOperator, OperatorMismatchError
from ..solve import check_options as _check_options
from ..solve import solve as _solve

__all__ = [
    "JacobianOperator",
    "implicit_grad",
    "fixed_point",
    "unroll",
    "FixedPointInfo",
    "WarmStart",
    "last_backward_result",
]

_JVP_MODES = ("auto", "forward", "double_backward")
_POLICIES = ("warn", "raise", "ignore")


# -- validation helpers ---------------------------------------------------------------------
def _check_state(h, name):
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {h.layout}")
    if not h.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {h.dtype}"
        )


def _check_batch_dims(batch_dims, h, name="h"):
    if isinstance(batch_dims, bool) or batch_dims not in (0, 1):
        raise ValueError(f"batch_dims must be 0 or 1, got {batch_dims!r}")
    if batch_dims == 1 and (h.ndim < 1 or h.shape[0] == 0):
        raise ValueError(
            f"batch_dims=1 needs {name} with a non-empty leading batch axis, got shape "
            f"{tuple(h.shape)}"
        )


def _check_policy(on_failure):
    if on_failure not in _POLICIES:
        raise ValueError(f"on_failure must be one of {', '.join(map(repr, _POLICIES))}; got {on_failure!r}")


def _autocast_state(device):
    """``(device_type, dtype)`` of the autocast region active for ``device``, or None."""
    device_type = torch.device(device).type
    try:
        if torch.is_autocast_enabled(device_type):
            return device_type, torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # a device type autocast does not know
        return None
    return None


def _autocast(state):
    """Re-enter the autocast region ``state`` (from :func:`_autocast_state`); a no-op for None."""
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[1])


def _check_f_output(out, h):
    """Check that ``f(h)`` is a tensor like ``h``; return it, cast to ``h``'s dtype where
    autocast made it lower precision."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != h.shape:
        raise ValueError(
            f"f must map a state to a state of the same shape: f(h) has shape "
            f"{tuple(out.shape)} but h has shape {tuple(h.shape)}"
        )
    if out.dtype != h.dtype:
        # Under torch.autocast, f's operations run in low precision and return, say, bfloat16
        # for a float32 state; the state (and the adjoint solve) keep the state's dtype, so
        # the output is cast back, differentiably. Outside autocast a dtype change is a bug.
        if (
            out.dtype.is_floating_point
            and torch.finfo(out.dtype).bits < torch.finfo(h.dtype).bits
            and _autocast_state(h.device) is not None
        ):
            return out.to(h.dtype)
        raise TypeError(f"f(h) has dtype {out.dtype} but h has dtype {h.dtype}; they must agree")
    return out


def _apply_policy(result: SolveResult, on_failure: str, context: str, stacklevel: int = 3, location=None):
    """The failure policy: nothing on success or ``"ignore"``, SolveError on ``"raise"``,
    otherwise a deduplicated ConvergenceWarning (see :func:`linsolve_rbp._warnings.warn_failure`);
    ``stacklevel`` counts as for :func:`warnings.warn` from this function."""
    if result.success or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise SolveError(result, context)
    warn_failure(result, context, stacklevel=stacklevel, location=location)


def _call_site(depth):
    """``(filename, lineno, module)`` of the frame ``depth`` levels above the caller."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "")


# -- the Jacobian as an operator ------------------------------------------------------------
class JacobianOperator(LinearOperator):
    """The Jacobian ``J = df/dh`` of a PyTorch function at a state, as a linear operator.

    ``f`` is evaluated once, at construction, on a detached copy of ``h`` with the graph kept.
    Products with ``J^T`` (vector-Jacobian products, VJPs) back-propagate through that record
    with ``retain_graph=True``; ``f`` is not evaluated again. Products with ``J``
    (Jacobian-vector products, JVPs) use forward-mode differentiation
    (:func:`torch.func.jvp`) or the double-backward trick on the same record.

    Parameters
    ----------
    f : callable
        Maps a state tensor to a state tensor of the same shape and dtype; it may close over
        parameters and inputs (an :class:`torch.nn.Module` call is fine).
    h : torch.Tensor
        The state at which ``J`` is taken, any shape, real floating dtype, CPU or CUDA. It is
        not modified, and the operator does not differentiate into it.
    jvp : {"auto", "forward", "double_backward"}
        How ``J @ v`` is computed. ``"forward"``: :func:`torch.func.jvp`, which evaluates ``f``
        (primal and tangent) once per product. ``"double_backward"``: the VJP ``u -> J^T u`` is
        recorded once with ``create_graph=True`` and ``J v`` is its VJP in ``u``; this works
        for any ``f`` that back-propagates, and evaluates ``f`` no further. ``"auto"`` tries
        forward mode on the first product and falls back to double backward where ``f`` does
        not support it (in-place operations on leaves, operations without a forward-mode
        formula).
    batch_dims : {0, 1}
        0: vectors are flat, of shape ``(n,)`` with ``n = h.numel()`` (or ``(K, n)`` for ``K``
        vectors). 1: ``h`` is a batch of ``B`` samples that do not interact; the operator is
        the per-sample block of the block-diagonal Jacobian, of shape ``(m, m)`` with
        ``m = h[0].numel()``, and acts on ``(B, m)`` arrays (row ``i`` against sample ``i``),
        as :func:`linsolve_rbp.solve` passes them with ``batch_dims=1``.

    Attributes
    ----------
    output : torch.Tensor
        The recorded ``f(h)``, attached to the graph of everything ``f`` closes over.
    f_evals : int
        Evaluations of ``f`` made by this operator (1 at construction, plus one per forward-mode
        JVP).
    jvp_mode : str or None
        The JVP route in use (``"forward"`` or ``"double_backward"``); None before the first
        ``J @ v`` in ``"auto"`` mode.
    matvec_count, rmatvec_count : int
        JVPs and VJPs applied so far (a batched product counts once).

    Raises
    ------
    TypeError
        If ``h`` is not a real floating dense tensor or ``f`` does not return a tensor of the
        dtype of ``h`` (under :func:`torch.autocast`, a lower-precision floating output is
        accepted and cast to the dtype of ``h``).
    ValueError
        If ``f(h)`` has another shape than ``h``, or ``jvp`` / ``batch_dims`` are invalid.
    RuntimeError
        From any product after :meth:`release`.

    Notes
    -----
    Memory is constant in the number of products: the record (and, for double backward, the
    graph of one VJP) is kept once, and products are returned detached, so an outer autograd
    graph does not record them. Call :meth:`release` to free the record early.

    The operator is tagged ``symmetric=False``: a Jacobian is not symmetric in general, so
    :func:`linsolve_rbp.solve` refuses cg and minres on ``I - J.T`` up front.

    Constructed inside a :func:`torch.autocast` region, the operator records ``f`` there (and
    re-enters the region for forward-mode JVPs); ``f``'s output is cast to the dtype of ``h``,
    which is the operator's dtype.

    With ``batch_dims=1``, ``f`` must treat samples independently (no batch normalisation in
    training mode, no attention across the batch); the operator then equals every diagonal
    block of the full Jacobian.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> W = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
    >>> J = lrt.JacobianOperator(lambda h: h @ W.T, torch.zeros(2, dtype=torch.float64))
    >>> J @ torch.tensor([1.0, 1.0], dtype=torch.float64)
    tensor([0.6000, 0.3000], dtype=torch.float64)
    >>> J.T @ torch.tensor([1.0, 1.0], dtype=torch.float64)
    tensor([0.5000, 0.4000], dtype=torch.float64)
    """

    def __init__(self, f: Callable, h, *, jvp: str = "auto", batch_dims: int = 0):
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        _check_state(h, "h")
        _check_batch_dims(batch_dims, h)
        if jvp not in _JVP_MODES:
            raise ValueError(f"jvp must be one of {', '.join(map(repr, _JVP_MODES))}; got {jvp!r}")
        self.f = f
        self.batch_dims = batch_dims
        self.state_shape = tuple(h.shape)
        self._jvp_request = jvp
        self.jvp_mode = None if jvp == "auto" else jvp
        self._dbl = None
        self._released = False
        # Forward-mode JVPs evaluate f again: under the autocast region f was recorded in.
        self._autocast = _autocast_state(h.device)
        self._h = h.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = f(self._h)
        self.output = _check_f_output(out, h)
        self.f_evals = 1
        if batch_dims == 1:
            self.nbatch = h.shape[0]
            m = h[0, ...].numel()
        else:
            self.nbatch = None
            m = h.numel()
        setup = dict(dtype=h.dtype, xp=_b.array_namespace(h), device=h.device, backend="torch")
        # A Jacobian is in general not symmetric: tag it, so that solve refuses cg / minres on
        # I - J^T up front instead of running them to their iteration limit.
        if "symmetric" in inspect.signature(self._setup).parameters:
            self._setup((m, m), symmetric=False, **setup)
        else:
            self._setup((m, m), **setup)
            self.symmetric = False

    def __repr__(self):
        return (
            f"JacobianOperator(state shape {self.state_shape}, batch_dims={self.batch_dims}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # -- shapes ---------------------------------------------------------------------------------
    def _rows(self, x, apply):
        """Apply ``apply`` (state-shaped -> state-shaped) to flat vectors ``x``."""
        m = self.shape[0]
        if self.batch_dims == 1:
            if x.ndim != 2 or x.shape[0] != self.nbatch:
                raise OperatorMismatchError(
                    f"a batched Jacobian (batch_dims=1) acts on arrays of shape "
                    f"({self.nbatch}, {m}), one row per sample; got shape {tuple(x.shape)}"
                )
            return apply(x.reshape(self.state_shape)).reshape(self.nbatch, m)
        if x.ndim == 1:
            return apply(x.reshape(self.state_shape)).reshape(m)
        return torch.stack([apply(x[i, ...].reshape(self.state_shape)).reshape(m) for i in range(x.shape[0])])

    # -- products ---------------------------------------------------------------------------------
    def _check_alive(self, what):
        if self._released:
            raise RuntimeError(
                f"{what} of a released JacobianOperator: release() freed the recorded "
                "evaluation of f, so no product with J or J^T is available any more; build a "
                "new JacobianOperator(f, h)"
            )

    def _vjp(self, u):
        if not self.output.requires_grad:
            return torch.zeros_like(u)
        (g,) = torch.autograd.grad(self.output, self._h, grad_outputs=u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if g is None else g.detach()

    def _jvp_forward(self, v):
        h = self._h.detach()
        with torch.no_grad(), _autocast(self._autocast):
            out, t = torch.func.jvp(self.f, (h,), (v,))
        self.f_evals += 1
        if not isinstance(t, torch.Tensor) or t.shape != h.shape:
            raise ValueError("forward-mode JVP of f returned an unexpected value")
        return t.detach().to(h.dtype)

    def _jvp_double_backward(self, v):
        if self._dbl is None:
            if not self.output.requires_grad:
                self._dbl = (None, None)
            else:
                u = torch.zeros_like(self.output, requires_grad=True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(
                        self.output, self._h, grad_outputs=u, create_graph=True, retain_graph=True, allow_unused=True
                    )
                self._dbl = (u, g)
        u, g = self._dbl
        if g is None or not g.requires_grad:
            return torch.zeros_like(v)
        (jv,) = torch.autograd.grad(g, u, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if jv is None else jv.detach()

    def _jvp(self, v):
        if self.jvp_mode == "forward":
            return self._jvp_forward(v)
        if self.jvp_mode == "double_backward":
            return self._jvp_double_backward(v)
        try:
            out = self._jvp_forward(v)
        except Exception:  # noqa: BLE001 - any failure of forward mode means: use the fallback
            self.jvp_mode = "double_backward"
            return self._jvp_double_backward(v)
        self.jvp_mode = "forward"
        return out

    def _matvec(self, x):
        self._check_alive("J @ v (a Jacobian-vector product)")
        return self._rows(x, self._jvp)

    def _rmatvec(self, x):
        self._check_alive("J.T @ u (a vector-Jacobian product)")
        return self._rows(x, self._vjp)

    # -- parameters ------------------------------------------------------------------------------
    def vjp_params(self, z, params, *, release: bool = False):
        """``z^T df/dp`` for each tensor ``p`` of ``params``, from the recorded evaluation.

        Parameters
        ----------
        z : torch.Tensor
            A flat vector ``(n,)`` (``(B, m)`` with ``batch_dims=1``) or a state-shaped tensor.
        params : sequence of torch.Tensor
            Tensors ``f`` closes over that require grad (leaves or not).
        release : bool
            Free the record afterwards (no further products are possible).

        Returns
        -------
        tuple of torch.Tensor
            One gradient per parameter, zeros for parameters ``f`` does not use.
        """
        self._check_alive("vjp_params")
        params = _as_params(params)
        z = z.reshape(self.state_shape).to(dtype=self.output.dtype)
        if self.output.requires_grad and params:
            grads = torch.autograd.grad(
                self.output, params, grad_outputs=z, retain_graph=not release, allow_unused=True
            )
        else:
            grads = (None,) * len(params)
        if release:
            self.release()
        return tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads))

    def release(self) -> None:
        """Free the recorded graph. Any later product (``J @ v``, ``J.T @ u``,
        :meth:`vjp_params`) raises RuntimeError; releasing twice is harmless."""
        self.output = self.output.detach()
        self._dbl = None
        self._released = True

    @property
    def released(self) -> bool:
        """Whether :meth:`release` freed the record (no products are available then)."""
        return self._released


def _as_params(params):
    if isinstance(params, torch.Tensor):
        params = (params,)
    try:
        params = tuple(params)
    except TypeError:
        raise TypeError(f"params must be a tensor or a sequence of tensors, got {type(params).__name__}") from None
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] does not require grad, so no gradient can be taken with respect to "
                "it; call requires_grad_() on it before evaluating f"
            )
    return params


def _check_adjoint_request(method, options, h, batch_dims, where=None):
    """Refuse, before any work, what the adjoint system ``(I - J^T) z = g`` of a state like
    ``h`` cannot serve: a method that needs a symmetric operator (``I - J^T`` is not), a scipy
    bridge with per-sample (``batch_dims=1``) Jacobians, an ``M`` of the wrong kind or shape."""
    from ..solve import get_method

    pre = f"{where}: " if where else ""
    solver = get_method("gmres" if method == "auto" else method)
    if solver.needs_symmetric:
        raise ValueError(
            f"{pre}method {method!r} needs a symmetric operator, and the adjoint operator "
            "I - J^T is not symmetric; use gmres, bicgstab, cgne, lsqr, neumann or fixed_point"
        )
    if batch_dims == 1 and not solver.batched_products:
        raise ValueError(
            f"{pre}method {method!r} solves one system at a time with (n,) vectors, and the "
            "per-sample Jacobian (batch_dims=1) takes (B, n) batches; use the package's own "
            "methods (gmres, bicgstab, neumann, ...)"
        )
    M = options.get("M")
    if M is not None and not callable(M):
        n = h[0, ...].numel() if batch_dims == 1 else h.numel()
        if not isinstance(M, (torch.Tensor, LinearOperator)):
            raise TypeError(
                f"{pre}M must be a torch tensor, a LinearOperator or a callable for a torch "
                f"state, got {type(M).__module__}.{type(M).__name__}"
            )
        if tuple(M.shape) != (n, n):
            raise ValueError(f"{pre}M must have shape {(n, n)} (the flattened state), got {tuple(M.shape)}")
        if isinstance(M, torch.Tensor) and (M.dtype != h.dtype or M.device != h.device):
            raise TypeError(
                f"{pre}M ({M.dtype} on {M.device}) must have the dtype and device of the state "
                f"({h.dtype} on {h.device})"
            )


def _check_solve_options(method, options, where=None):
    """Validate a method name and its solve options before any work (``where``, if given,
    names the argument in messages); returns the options to pass to :func:`linsolve_rbp.solve`."""
    if where is None:
        return dict(_check_options(method, dict(options)))
    try:
        return dict(_check_options(method, dict(options)))
    except (TypeError, ValueError) as exc:
        msg = f"{where}: {exc}"
        if "unknown option" in msg:
            msg += (
                f" (in {where}, 'method' and 'jvp' are accepted too; x0, batch_dims, throw and "
                "on_failure are set by fixed_point)"
            )
        raise type(exc)(msg) from None


def _flat(t, batch_dims):
    return t.reshape(t.shape[0], -1) if batch_dims == 1 else t.reshape(-1)


# -- implicit gradients ---------------------------------------------------------------------
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
    _check_state(h_star, "h_star")
    _check_policy(on_failure)
    if not isinstance(grad_h, torch.Tensor):
        raise TypeError(f"grad_h must be a torch.Tensor, got {type(grad_h).__name__}")
    if grad_h.shape != h_star.shape:
        raise ValueError(f"grad_h must have the shape of h_star {tuple(h_star.shape)}, got {tuple(grad_h.shape)}")
    if grad_h.dtype != h_star.dtype or grad_h.device != h_star.device:
        raise TypeError(
            f"grad_h ({grad_h.dtype} on {grad_h.device}) must have the dtype and device of "
            f"h_star ({h_star.dtype} on {h_star.device})"
        )
    params = _as_params(params)
    # Everything that can be checked without f is checked before f is evaluated.
    solve_options = _check_solve_options(method, solve_options)
    _check_adjoint_request(method, solve_options, h_star, batch_dims)
    b = _flat(grad_h.detach(), batch_dims)
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
    _apply_policy(result, on_failure, "implicit_grad adjoint solve")
    grads = J.vjp_params(result.x, params, release=True)
    return _finite_grads(grads, result, on_failure, "implicit_grad"), result


def _nonfinite_error(result, message):
    """A SolveError whose text is ``message`` (the solve may have converged: what failed is the
    gradient, so "with method ... failed" would mislead)."""
    err = SolveError(result, message)
    err.args = (message,)
    return err


def _finite_grads(grads, result, on_failure, context):
    bad = [i for i, g in enumerate(grads) if not bool(torch.isfinite(g).all())]
    if not bad:
        return grads
    msg = (
        f"the gradient of params {bad} has non-finite entries (adjoint solve: "
        f"{result.message}); f or its derivative is not finite at the fixed point"
    )
    if on_failure == "raise":
        raise _nonfinite_error(result, f"{context}: {msg}")
    # stacklevel 3: this function, implicit_grad, the caller of implicit_grad.
    warn_failure(result, context, message=msg + "; those entries were set to zero", stacklevel=3)
    return tuple(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) if i in bad else g for i, g in enumerate(grads))


# -- warm starts ----------------------------------------------------------------------------
class WarmStart:
    """Keeps the last adjoint solution of a fixed-point layer to start the next solve from.

    Pass one instance per layer as ``fixed_point(..., warm_start=ws)``; ``warm_start=True``
    uses one store shared by every call that asks for it. A stored solution is used only when
    its shape, dtype and device match the new system; otherwise the solve starts from zero.

    Attributes
    ----------
    x : torch.Tensor or None
        The last solution stored.
    hits, misses : int
        Solves that did and did not start from a stored solution.
    """

    def __init__(self):
        self.x = None
        self.hits = 0
        self.misses = 0

    def get(self, b):
        x = self.x
        if x is not None and x.shape == b.shape and x.dtype == b.dtype and x.device == b.device:
            self.hits += 1
            return x
        self.misses += 1
        return None

    def store(self, x) -> None:
        self.x = x.detach()

    def clear(self) -> None:
        """Forget the stored solution."""
        self.x = None


_DEFAULT_WARM_START = WarmStart()
_LAST = threading.local()


def last_backward_result():
    """The :class:`linsolve_rbp.SolveResult` of the most recent adjoint solve run by a
    :func:`fixed_point` backward pass in this thread, or None.

    For several fixed-point layers, ask :func:`fixed_point` for its :class:`FixedPointInfo`
    (``return_info=True``) instead: each layer's info keeps its own results.
    """
    return getattr(_LAST, "result", None)


@dataclass
class FixedPointInfo:
    """What a :func:`fixed_point` call did.

    Attributes
    ----------
    forward : linsolve_rbp.SolveResult
        The forward iteration: ``iterations`` applications of ``f``, ``residual_norm`` the last
        step ``||f(h) - h||`` (per sample with ``batch_dims=1``), status CONVERGED,
        MAX_ITERATIONS, COMPLETED (``forward_tol=None``) or NONFINITE. ``x`` is ``h*``.
    backward : linsolve_rbp.SolveResult or None
        The adjoint solve of the latest backward pass through this call; None until then.
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
            h_new = _check_f_output(f(h), h0)
            step = _flat(h_new - h, batch_dims)
            dnorm = torch.linalg.vector_norm(step, dim=-1, dtype=ndtype)
            history.append(dnorm)
            h = h_new
            if not bool(torch.isfinite(dnorm).all()):
                status = Status.NONFINITE
                break
            if tol is not None:
                hnorm = torch.linalg.vector_norm(_flat(h, batch_dims), dim=-1, dtype=ndtype)
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
            if grad is None or bool(torch.isfinite(grad).all()):
                return None
            if self.on_failure == "raise":
                self._remove()
                raise _nonfinite_error(
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

    def __init__(self, f, h_star, method, jvp, options, on_failure, warm, batch_dims, info,
                 location=None, autocast=None):
        self.f = f
        self.h_star = h_star
        self.method = method
        self.jvp = jvp
        self.options = options
        self.on_failure = on_failure
        self.warm = warm
        self.batch_dims = batch_dims
        self.info = info
        self.location = location  # the line that called fixed_point: warnings point there
        self.autocast = autocast  # the autocast region fixed_point ran f in, re-entered for J

    def __call__(self, g):
        if g is None:  # an undefined gradient (no loss depends on the output) stays undefined
            return None
        b = _flat(g.detach(), self.batch_dims).to(self.h_star.dtype)
        with _autocast(self.autocast):
            J = JacobianOperator(self.f, self.h_star, jvp=self.jvp, batch_dims=self.batch_dims)
        A = IdentityOperator(J.shape[0], like=b) - J.T
        x0 = self.warm.get(b) if self.warm is not None else None
        try:
            result = _solve(A, b, method=self.method, x0=x0, batch_dims=self.batch_dims, **self.options)
            leaves = _graph_leaves(J.output, J._h) if J.output.requires_grad else []
        finally:
            J.release()
        self.info.backward = result
        self.info.backward_results.append(result)
        _LAST.result = result
        _apply_policy(result, self.on_failure, "fixed_point backward (adjoint solve)", stacklevel=2,
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
    warm_start=False,
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
    warm_start : bool or WarmStart
        Start the adjoint solve from the previous solution when its shape matches: a
        :class:`WarmStart` instance (one per layer), or True for a store shared by all calls.
    batch_dims : {0, 1}
        1: the leading axis of ``h0`` indexes samples that do not interact; the forward test
        and the adjoint solves are per sample.
    return_info : bool
        Also return a :class:`FixedPointInfo` with the forward result and, after a backward
        pass, the adjoint result.

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
    fixed point is not supported. :func:`last_backward_result` returns the latest adjoint
    result of this thread.

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
    _check_state(h0, "h0")
    _check_batch_dims(batch_dims, h0, "h0")
    _check_policy(on_failure)
    if isinstance(forward_maxiter, bool) or not isinstance(forward_maxiter, numbers.Integral) or forward_maxiter < 1:
        raise ValueError(f"forward_maxiter must be a positive integer, got {forward_maxiter!r}")
    if forward_tol is not None:
        if isinstance(forward_tol, bool) or not isinstance(forward_tol, numbers.Real) or not forward_tol >= 0:
            raise ValueError(f"forward_tol must be a non-negative number or None, got {forward_tol!r}")
        forward_tol = float(forward_tol)
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
    jvp = options.pop("jvp", "auto")
    if jvp not in _JVP_MODES:
        raise ValueError(f"backward['jvp'] must be one of {', '.join(map(repr, _JVP_MODES))}; got {jvp!r}")
    # Validate the backward options now rather than in the middle of loss.backward().
    options = _check_solve_options(method, options, "backward")
    _check_adjoint_request(method, options, h0, batch_dims, "backward")
    if warm_start is True:
        warm = _DEFAULT_WARM_START
    elif warm_start is False or warm_start is None:
        warm = None
    elif isinstance(warm_start, WarmStart):
        warm = warm_start
    else:
        raise TypeError(f"warm_start must be a bool or a WarmStart, got {type(warm_start).__name__}")

    # Warnings of the backward pass, issued from inside autograd, point at this call.
    site = _call_site(1)
    h_star, fwd = _forward_iterate(f, h0, int(forward_maxiter), forward_tol, batch_dims)
    info = FixedPointInfo(forward=fwd)
    _apply_policy(fwd, on_failure, "fixed_point forward iteration", stacklevel=3)
    h_star = h_star.detach()
    if torch.is_grad_enabled():
        out = _check_f_output(f(h_star), h_star)
        if out.requires_grad:
            out.register_hook(
                _AdjointHook(f, h_star, method, jvp, options, on_failure, warm, batch_dims, info,
                             location=site, autocast=_autocast_state(h_star.device))
            )
        if h0.requires_grad:
            out = _ZeroGradTo.apply(out, h0)
    else:
        out = h_star
    return (out, info) if return_info else out


# -- baselines ------------------------------------------------------------------------------
def unroll(f: Callable, h0, steps: int, truncate: int | None = None):
    """Iterate ``h <- f(h)`` ``steps`` times: back-propagation through time (BPTT) or its
    truncated variant (TBPTT), the baselines of recurrent back-propagation.

    Parameters
    ----------
    f : callable
        State -> state of the same shape.
    h0 : torch.Tensor
        The starting state.
    steps : int
        Number of iterations (0 returns ``h0``).
    truncate : int, optional
        None: every iteration is recorded (BPTT; memory grows with ``steps``). ``K``: the first
        ``steps - K`` iterations run under :func:`torch.no_grad` and only the last ``K`` are
        recorded (TBPTT); ``h0`` then receives no gradient unless ``K >= steps``.

    Returns
    -------
    torch.Tensor
        The state after ``steps`` iterations.

    Raises
    ------
    TypeError, ValueError
        For bad input.

    Notes
    -----
    At a converged fixed point, the TBPTT gradient with truncation ``K`` equals Neumann-RBP
    with ``K`` terms, ``z = sum_{k<K} (J^T)^k g`` (Proposition 1 of Liao et al., 2018); with
    :func:`implicit_grad` that is ``method="neumann", rtol=None, atol=None, maxiter=K - 1``.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> h = lrt.unroll(lambda h: w * h + 1.0, torch.tensor(0.0, dtype=torch.float64), steps=3)
    >>> h.item()
    1.75
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(h0, torch.Tensor):
        raise TypeError(f"h0 must be a torch.Tensor, got {type(h0).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if truncate is not None:
        if isinstance(truncate, bool) or not isinstance(truncate, numbers.Integral) or truncate < 0:
            raise ValueError(f"truncate must be a non-negative integer or None, got {truncate!r}")
        if truncate > steps:
            raise ValueError(f"truncate ({truncate}) must not exceed steps ({steps})")
    recorded = steps if truncate is None else int(truncate)
    h = h0
    free = steps - recorded
    if free:
        with torch.no_grad():
            for _ in range(free):
                h = f(h)
        h = h.detach()
    for _ in range(recorded):
        h = f(h)
    return h
