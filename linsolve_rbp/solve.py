"""The :func:`solve` facade and the method registry."""

from __future__ import annotations

import importlib
import numbers

import numpy as np

from . import backend as _b
from ._result import SolveError, SolveResult, Status
from .operators import LinearOperator, aslinearoperator
from .solvers._base import Problem, Solver

__all__ = ["solve", "methods", "get_method", "register_method"]

# name -> "module:Class", imported on first use.
_REGISTRY: dict[str, str | type] = {
    "fixed_point": "linsolve_rbp.solvers.fixed_point:FixedPoint",
    "neumann": "linsolve_rbp.solvers.neumann:Neumann",
    "cg": "linsolve_rbp.solvers.cg:CG",
    "cgne": "linsolve_rbp.solvers.cgne:CGNE",
    "gmres": "linsolve_rbp.solvers.gmres:GMRES",
    "bicgstab": "linsolve_rbp.solvers.bicgstab:BiCGStab",
    "lsqr": "linsolve_rbp.solvers.lsqr:LSQR",
    "minres": "linsolve_rbp.solvers.minres:MINRES",
    "scipy.cg": "linsolve_rbp.solvers.scipy:ScipyCG",
    "scipy.gmres": "linsolve_rbp.solvers.scipy:ScipyGMRES",
    "scipy.lgmres": "linsolve_rbp.solvers.scipy:ScipyLGMRES",
    "scipy.gcrotmk": "linsolve_rbp.solvers.scipy:ScipyGCROTMK",
    "scipy.bicgstab": "linsolve_rbp.solvers.scipy:ScipyBiCGStab",
    "scipy.lsqr": "linsolve_rbp.solvers.scipy:ScipyLSQR",
    "scipy.lsmr": "linsolve_rbp.solvers.scipy:ScipyLSMR",
}
_INSTANCES: dict[str, Solver] = {}


def register_method(name: str, solver_cls: type) -> None:
    """Register a :class:`~linsolve_rbp.solvers._base.Solver` subclass under ``name``."""
    if not (isinstance(solver_cls, type) and issubclass(solver_cls, Solver)):
        raise TypeError(f"solver_cls must be a Solver subclass, got {solver_cls!r}")
    _REGISTRY[name] = solver_cls
    _INSTANCES.pop(name, None)


def _available(name: str) -> bool:
    entry = _REGISTRY[name]
    if isinstance(entry, type):
        return True
    return importlib.util.find_spec(entry.split(":")[0]) is not None


def methods() -> list[str]:
    """Names of the available methods, for :func:`solve`'s ``method`` argument."""
    return [name for name in _REGISTRY if _available(name)]


def get_method(name: str) -> Solver:
    """The solver object behind method ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    if name not in _INSTANCES:
        if name not in _REGISTRY or not _available(name):
            raise ValueError(f"method must be one of {', '.join(['auto'] + methods())}; got {name!r}")
        entry = _REGISTRY[name]
        if isinstance(entry, str):
            mod, cls = entry.split(":")
            entry = getattr(importlib.import_module(mod), cls)
        _INSTANCES[name] = entry()
    return _INSTANCES[name]


def _resolve_auto(A: LinearOperator) -> str:
    if A.shape[0] != A.shape[1]:
        return "lsqr"
    return "gmres"


def _check_tol(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number or None, got {value!r}")
    return float(value)


def _check_same(x, b, name):
    if not _b.is_array(x):
        raise TypeError(f"{name} must be an array like b, got {type(x).__name__}")
    if _b.backend_name(x) != _b.backend_name(b):
        raise TypeError(f"{name} is a {_b.backend_name(x)} array but b is a {_b.backend_name(b)} array")
    if str(_b.device_of(x)) != str(_b.device_of(b)):
        raise ValueError(f"{name} is on device {_b.device_of(x)} but b is on device {_b.device_of(b)}")
    if x.dtype != b.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but b has dtype {b.dtype}; they must agree")


def _batched_product(f, batched):
    if f is None:
        return None
    if batched:
        return f
    return lambda X: f(X[0, ...])[None, ...]


def solve(
    A,
    b,
    method: str = "auto",
    x0=None,
    rtol: float | None = 1e-5,
    atol: float | None = 0.0,
    maxiter: int | None = None,
    M=None,
    callback=None,
    throw: bool = False,
    *,
    batch_dims: int = 0,
    check_every: int = 1,
    divtol: float | None = 1e5,
    **options,
) -> SolveResult:
    """Solve ``A x = b`` (or the least-squares problem, for ``lsqr``-type methods).

    Parameters
    ----------
    A : LinearOperator, array, sparse matrix or scipy LinearOperator
        The operator; anything :func:`aslinearoperator` accepts.
    b : array, shape (m,) or (B, m)
        The right-hand side, in any array-API backend (numpy, torch, cupy, ...). With
        ``batch_dims=1`` each row is an independent system.
    method : str
        One of :func:`methods`, or ``"auto"`` (``gmres`` for square operators, which needs only
        products with ``A``; ``lsqr`` for rectangular ones).
    x0 : array, optional
        Initial guess, same shape, backend, device and dtype as the solution. Default zero.
        A system whose right-hand side is zero starts from zero, its solution, whatever
        ``x0`` says (as scipy's solvers do), except in fixed-budget mode.
    rtol, atol : float or None
        Stop when ``||b - A x|| <= max(rtol * ||b||, atol)`` (scipy's test). With both None the
        solve runs exactly ``maxiter`` iterations (fixed-budget mode, as RBP and Neumann-RBP in
        the paper) and ends COMPLETED.
    maxiter : int, optional
        Iteration limit. Default ``min(10 n, 10000)``; required in fixed-budget mode.
    M : LinearOperator, matrix or callable, optional
        Preconditioner (an approximation of ``A^{-1}``), for methods that accept one.
    callback : callable, optional
        Called as ``callback(iteration, x, residual_norm)`` after every iteration, with arrays
        in ``b``'s backend. ``x`` is the current iterate, or None for methods that do not form
        it every iteration (their docstrings say so).
    throw : bool
        Raise :class:`SolveError` when the solve did not succeed.
    batch_dims : {0, 1}
        1 solves the independent systems ``A x_i = b_i`` for the rows of ``b`` at once; inner
        products, step sizes, tests and statuses are per system, and systems that have
        converged stop changing.
    check_every : int
        Synchronise with the host (to test whether all systems have stopped) every this many
        iterations; raise it on GPUs for long solves.
    divtol : float or None
        Stop with DIVERGED when a residual norm exceeds ``divtol`` times the initial one
        (PETSc's KSP uses the same test with ``dtol = 1e5``). None disables the test.
    **options
        Method-specific options (see each method's documentation).

    Returns
    -------
    SolveResult

    Raises
    ------
    TypeError, ValueError
        For bad input; the message names the argument.
    SolveError
        When ``throw=True`` and the solve did not succeed.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = lr.solve(A, np.array([1.0, 2.0]), method="cg", rtol=1e-10)
    >>> res.status, np.allclose(A @ res.x, [1.0, 2.0])
    (<Status.CONVERGED: 'converged: the residual norm met max(rtol * ||b||, atol)'>, True)
    """
    A = aslinearoperator(A)
    if batch_dims not in (0, 1) or isinstance(batch_dims, bool):
        raise ValueError(f"batch_dims must be 0 or 1, got {batch_dims!r}")
    if method == "auto":
        method = _resolve_auto(A)
    solver = get_method(method)
    m, n = A.shape
    if solver.needs_square and m != n:
        raise ValueError(f"method {method!r} needs a square operator; A has shape {A.shape} (use lsqr)")
    A.check_vector(b, "b", m, batch_dims=batch_dims)
    xp = _b.array_namespace(b)
    if not _b.is_floating_dtype(xp, b.dtype):
        raise TypeError(f"b must have a floating dtype (float32, float64, complex), got {b.dtype}")
    if x0 is not None:
        _check_same(x0, b, "x0")
        if tuple(x0.shape) != tuple(b.shape[:-1]) + (n,):
            raise ValueError(f"x0 must have shape {tuple(b.shape[:-1]) + (n,)}, got {tuple(x0.shape)}")
    rtol = _check_tol(rtol, "rtol")
    atol = _check_tol(atol, "atol")
    if maxiter is None:
        if rtol is None and atol is None:
            raise ValueError("maxiter must be given in fixed-budget mode (rtol=None, atol=None)")
        maxiter = solver.default_maxiter(n)
    elif isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive integer or None, got {maxiter!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, numbers.Integral) or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    if divtol is not None:
        divtol = _check_tol(divtol, "divtol")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if solver.needs_rmatvec and not A.has_rmatvec:
        raise ValueError(
            f"method {method!r} needs products with A^H (rmatvec), which this operator lacks; "
            "give the operator an rmatvec, or use a method that needs only matvec: "
            "gmres, bicgstab, fixed_point, neumann, scipy.gmres"
        )
    psolve = None
    if M is not None:
        if not solver.accepts_preconditioner:
            raise ValueError(f"method {method!r} does not accept a preconditioner M")
        if callable(M) and not isinstance(M, LinearOperator):
            M = LinearOperator((n, n), matvec=M)
        else:
            try:
                M = aslinearoperator(M)
            except TypeError:
                raise TypeError(
                    f"M must be a LinearOperator, a matrix or a callable, got {type(M).__name__}"
                ) from None
        if M.shape != (n, n):
            raise ValueError(f"M must have shape {(n, n)}, got {M.shape}")
        psolve = _batched_product(M._mv, batch_dims == 1)
    options = solver.check_options(options)

    batched = batch_dims == 1
    B = b if batched else b[None, ...]
    X0 = None if x0 is None else (x0 if batched else x0[None, ...])
    if X0 is not None and not (rtol is None and atol is None):
        # As scipy does: x = 0 solves a system whose right-hand side is zero, and is what a
        # zero threshold max(rtol * 0, atol) can be met by; start such systems there.
        zero_b = xp.linalg.vector_norm(B, axis=-1) == 0
        if bool(xp.any(zero_b)):  # only then: x0 is otherwise passed on as given, not copied
            X0 = xp.where(zero_b[:, None], xp.zeros_like(X0), X0)
    prob = Problem(
        xp=xp, A=A,
        mv=_batched_product(A._mv, batched),
        rmv=_batched_product(A._rmv, batched) if A.has_rmatvec else None,
        psolve=psolve, b=B, x0=X0, rtol=rtol, atol=atol, maxiter=int(maxiter),
        callback=callback, check_every=int(check_every), divtol=divtol, batched=batched,
        options=options, dtype=b.dtype, real_dtype=_b.real_dtype(xp, b.dtype),
        device=_b.device_of(b),
    )
    mv0, rmv0 = A.matvec_count, A.rmatvec_count
    out = solver.run(prob)
    result = _to_result(out, prob, method, A.matvec_count - mv0, A.rmatvec_count - rmv0)
    if throw and not result.success:
        raise SolveError(result)
    return result


def _host(a):
    return np.asarray(_b.to_numpy(a))


def _to_result(out, prob: Problem, method: str, matvecs: int, rmatvecs: int) -> SolveResult:
    codes = _host(out.codes).astype(int)
    statuses = tuple(Status.from_code(c) for c in codes)
    worst = Status.from_code(int(codes.max()))
    rnorm = _host(out.residual_norm).astype(float)
    history = np.stack([_host(h).astype(float) for h in out.history]) if out.history else np.zeros((0, len(codes)))
    converged = codes == Status.CONVERGED.code
    ok_ls = getattr(out, "accept_least_squares", False)
    success = bool(all(s.success or (ok_ls and s is Status.LEAST_SQUARES) for s in statuses))
    x = out.x if prob.batched else out.x[0, ...]
    if prob.batched:
        counts = {}
        for s in statuses:
            counts[s.name] = counts.get(s.name, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        message = (
            f"{method}: {summary} of {len(statuses)} systems after {out.iterations} iterations "
            f"(largest residual norm {np.max(rnorm):.3e})"
        )
        if not success:
            message += f"; {worst.value}"
        return SolveResult(
            x=x, status=worst, converged=converged, success=success, iterations=out.iterations,
            matvecs=matvecs, rmatvecs=rmatvecs, residual_norm=rnorm, residual_history=history,
            message=message, method=method, statuses=statuses, info=out.info,
        )
    thr = prob.thresholds()
    thr_txt = "" if thr is None else f", threshold {float(_host(thr)[0]):.3e}"
    message = (
        f"{method}: {worst.value} (after {out.iterations} iterations, residual norm "
        f"{rnorm[0]:.3e}{thr_txt})"
    )
    return SolveResult(
        x=x, status=worst, converged=bool(converged[0]), success=success,
        iterations=out.iterations, matvecs=matvecs, rmatvecs=rmatvecs,
        residual_norm=float(rnorm[0]), residual_history=history[:, 0], message=message,
        method=method, statuses=None, info=out.info,
    )
