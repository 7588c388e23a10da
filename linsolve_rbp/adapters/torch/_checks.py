"""Checks shared by the torch adapter: states, ``f``'s outputs, parameters, the failure policy,
the adjoint solve's options, and the autocast region ``f`` runs in.

Everything a call can refuse is refused here, before ``f`` is evaluated. Generic values
(positive integers, choices, booleans) are judged by :mod:`linsolve_rbp._validate`, so an
argument reads the same here as at :func:`linsolve_rbp.solve`. This module holds no state.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch

from ..._result import SolveError, SolveResult
from ..._validate import ON_FAILURE, check_common, choice
from ..._warnings import warn_failure
from ...operators import LinearOperator
from ...solve import PreparedSolve, get_method

__all__ = [
    "JVP_MODES",
    "check_state",
    "check_batch_dims",
    "check_policy",
    "check_jvp",
    "check_f_output",
    "match_output",
    "as_params",
    "check_adjoint_request",
    "check_solve_options",
    "prepare_solve",
    "apply_policy",
    "nonfinite_error",
    "autocast_state",
    "autocast",
    "call_site",
    "flat",
    "all_finite",
]

#: How ``J @ v`` may be computed (see :class:`~linsolve_rbp.adapters.torch.JacobianOperator`).
JVP_MODES = ("auto", "forward", "double_backward")


# -- arguments --------------------------------------------------------------------------------
def check_state(h, name):
    """Refuse anything but a dense tensor of a real floating dtype, naming ``name``."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {h.layout}")
    if not h.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {h.dtype}"
        )


def check_batch_dims(batch_dims, h, name="h") -> int:
    """``batch_dims`` (0 or 1, judged as :func:`linsolve_rbp.solve` judges it) as an int; with
    1, ``h`` must have a non-empty leading batch axis."""
    batch_dims = check_common({"batch_dims": batch_dims})["batch_dims"]
    if batch_dims == 1 and (h.ndim < 1 or h.shape[0] == 0):
        raise ValueError(
            f"batch_dims=1 needs {name} with a non-empty leading batch axis, got shape "
            f"{tuple(h.shape)}"
        )
    return batch_dims


def check_policy(on_failure) -> str:
    """``on_failure``: one of ``"warn"``, ``"raise"``, ``"ignore"``."""
    return choice(on_failure, "on_failure", ON_FAILURE)


def check_jvp(jvp, name="jvp") -> str:
    """``jvp``: one of :data:`JVP_MODES`."""
    return choice(jvp, name, JVP_MODES)


def check_f_output(out, h):
    """Check that ``f(h)`` is a tensor like ``h``; return it, cast to ``h``'s dtype where
    autocast made it lower precision."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != h.shape or out.dtype != h.dtype:
        return match_output(out, h.shape, h.dtype, h.device)
    return out


def match_output(out, shape, dtype, device, got="f(h)", want="h"):
    """The tensor ``out`` of ``f``'s output (called ``got`` in errors) checked against the
    state's ``shape`` and ``dtype`` (called ``want``); returned as it is, or cast to ``dtype``
    where autocast made it lower precision."""
    if out.shape != shape:
        raise ValueError(
            f"f must map a state to a state of the same shape: {got} has shape "
            f"{tuple(out.shape)} but {want} has shape {tuple(shape)}"
        )
    if out.dtype != dtype:
        # Under torch.autocast, f's operations run in low precision and return, say, bfloat16
        # for a float32 state; the state (and the adjoint solve) keep the state's dtype, so
        # the output is cast back, differentiably. Outside autocast a dtype change is a bug.
        if (
            out.dtype.is_floating_point
            and torch.finfo(out.dtype).bits < torch.finfo(dtype).bits
            and autocast_state(device) is not None
        ):
            return out.to(dtype)
        raise TypeError(f"{got} has dtype {out.dtype} but {want} has dtype {dtype}; they must agree")
    return out


def as_params(params) -> tuple:
    """``params`` as a tuple of tensors that require grad (one tensor is a tuple of one)."""
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


def check_adjoint_request(method, options, h, batch_dims, where=None):
    """Refuse, before any work, what the adjoint system ``(I - J^T) z = g`` of a state like
    ``h`` cannot serve: a method that needs a symmetric operator (``I - J^T`` is not), a scipy
    bridge with per-sample (``batch_dims=1``) Jacobians, an ``M`` of the wrong kind or shape."""
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


def check_solve_options(method, options, where=None) -> dict:
    """Validate a method name and its solve options before any work (``where``, if given,
    names the argument in messages); returns the options to pass to :func:`linsolve_rbp.solve`."""
    return dict(prepare_solve(method, options, where).options)


def prepare_solve(method, options, where=None) -> PreparedSolve:
    """:func:`check_solve_options` as a :class:`linsolve_rbp.solve.PreparedSolve`: the
    options validated once, here, and the solve that runs them later (in ``backward()``)
    without validating them again. Its ``options`` are the validated options."""
    if where is None:
        return PreparedSolve(method, dict(options))
    try:
        return PreparedSolve(method, dict(options))
    except (TypeError, ValueError) as exc:
        msg = f"{where}: {exc}"
        if "unknown option" in msg:
            msg += (
                f" (in {where}, 'method' and 'jvp' are accepted too; x0, batch_dims, throw and "
                "on_failure are set by fixed_point)"
            )
        raise type(exc)(msg) from None


# -- the failure policy -------------------------------------------------------------------------
def apply_policy(result: SolveResult, on_failure: str, context: str, stacklevel: int = 3, location=None):
    """The failure policy: nothing on success or ``"ignore"``, SolveError on ``"raise"``,
    otherwise a deduplicated ConvergenceWarning (see :func:`linsolve_rbp._warnings.warn_failure`);
    ``stacklevel`` counts as for :func:`warnings.warn` from this function."""
    if result.success or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise SolveError(result, context)
    warn_failure(result, context, stacklevel=stacklevel, location=location)


def nonfinite_error(result, message):
    """A SolveError whose text is ``message`` (the solve may have converged: what failed is the
    gradient, so "with method ... failed" would mislead)."""
    err = SolveError(result, message)
    err.args = (message,)
    return err


# -- autocast and call sites --------------------------------------------------------------------
def autocast_state(device):
    """``(device_type, dtype)`` of the autocast region active for ``device``, or None."""
    device_type = torch.device(device).type
    try:
        if torch.is_autocast_enabled(device_type):
            return device_type, torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # a device type autocast does not know
        return None
    return None


def autocast(state):
    """Re-enter the autocast region ``state`` (from :func:`autocast_state`); a no-op for None."""
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[1])


def call_site(depth):
    """``(filename, lineno, module)`` of the frame ``depth`` levels above the caller, or, when
    that frame is the package's own (the :class:`DEQ` module calling :func:`fixed_point`) or
    torch's (``nn.Module.__call__``), of the first frame above it that is neither: the user's
    line, so that warnings point there and each layer of a model has its own."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return None
    first = frame
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("linsolve_rbp.", "torch.")):
        frame = frame.f_back
    if frame is None:
        frame = first
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "")


def flat(t, batch_dims):
    """A state as the solver sees it: ``(n,)``, or ``(B, m)`` with ``batch_dims=1``."""
    return t.reshape(t.shape[0], -1) if batch_dims == 1 else t.reshape(-1)


def all_finite(t) -> bool:
    """Whether every entry of ``t`` is finite (one host read).

    The sum of the entries decides it in one pass where it is finite (a NaN or an infinite
    entry makes any sum NaN or infinite); only a sum that is not finite (which finite entries
    can give too, by overflow) asks the entries themselves. On a 192 x 192 gradient this is
    several times cheaper than ``isfinite(t).all()``, which makes three passes."""
    if t.numel() == 0:
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    if math.isfinite(t.sum().item()):
        return True
    return bool(torch.isfinite(t).all())
