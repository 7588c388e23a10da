"""The :func:`solve` facade and the method registry."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from . import backend as _b
from ._result import SolveError, SolveResult, Status
from ._validate import COMMON_OPTIONS, check_common, did_you_mean, unknown_option
from .operators import LinearOperator, OperatorMismatchError, aslinearoperator
from .solvers._base import Problem, Solver, refuse_reduction, run_scaled, safe_norm, using_reduction

__all__ = ["solve", "methods", "get_method", "register_method", "check_options", "SolveOptions", "PreparedSolve"]

from ._warnings import warn_failure as _warn_failure

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


def methods() -> list[str]:
    """Names of the available methods, for :func:`solve`'s ``method`` argument."""
    return list(_REGISTRY)


def get_method(name: str) -> Solver:
    """The solver object behind method ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    if name not in _INSTANCES:
        if name not in _REGISTRY:
            names = methods()
            raise ValueError(
                f"method must be one of {', '.join(['auto'] + names)}; got {name!r}"
                f"{did_you_mean(name, names)}"
            )
        entry = _REGISTRY[name]
        if isinstance(entry, str):
            mod, cls = entry.split(":")
            entry = getattr(importlib.import_module(mod), cls)
        _INSTANCES[name] = entry()
    return _INSTANCES[name]


def check_method_name(method) -> str:
    """``method`` if it names a registered method or ``"auto"``; else an error listing them
    with the closest name."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    names = methods()
    if method != "auto" and method not in names:
        raise ValueError(
            f"method must be one of {', '.join(['auto'] + names)}; got {method!r}"
            f"{did_you_mean(method, names)}"
        )
    return method


def _check_preconditioner_kind(M, solver):
    """``M`` if it can be a preconditioner (None, an operator, a matrix or a callable) for
    ``solver`` (None: not known yet)."""
    if M is None:
        return M
    if solver is not None and not solver.accepts_preconditioner:
        able = [n for n in methods() if get_method(n).accepts_preconditioner]
        raise ValueError(
            f"method {solver.name!r} does not accept a preconditioner M; methods that do: "
            f"{', '.join(able)}"
        )
    if not (isinstance(M, LinearOperator) or callable(M) or _b.is_array(M) or _b.is_sparse(M)):
        raise TypeError(f"M must be a LinearOperator, a matrix or a callable, got {type(M).__name__}")
    return M


def check_options(method: str, options: dict) -> dict:
    """Validate a method name and a dict of solve options, without needing ``A`` or ``b``.

    Parameters
    ----------
    method : str
        A name from :func:`linsolve_rbp.methods`, or ``"auto"`` (whose method options are
        those of ``gmres`` or ``lsqr``, the two methods it picks from; they are checked again
        once ``A`` says which).
    options : dict
        Any of the common options ``rtol, atol, maxiter, x0, M, callback, throw, on_failure,
        batch_dims, check_every, divtol`` and the method's own options (``restart`` for
        ``gmres``, ...). ``x0`` and ``M`` can be checked here only for their kind (an array,
        a callable); their shape, backend, device and dtype are checked against ``b`` by
        :func:`linsolve_rbp.solve`.

    Returns
    -------
    dict
        The same keys, with normalised values (ints as ``int``, reals as ``float``), ready to
        pass on as ``solve(A, b, method=method, **options)``. Defaults are not filled in.

    Raises
    ------
    TypeError, ValueError
        Naming the method or the option and what was expected. An unknown option's error
        lists every option the method accepts and suggests the closest name.

    Examples
    --------
    >>> from linsolve_rbp.solve import check_options
    >>> check_options("gmres", {"rtol": 1e-6, "restart": 30})
    {'rtol': 1e-06, 'restart': 30}
    >>> check_options("gmres", {"restrat": 5})
    Traceback (most recent call last):
    ...
    TypeError: method 'gmres' got unknown option 'restrat' (did you mean 'restart'?); it accepts: atol, batch_dims, callback, check_every, compile, divtol, M, maxiter, on_failure, orthogonalization, reduction, restart, rtol, throw, x0
    """
    method = check_method_name(method)
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict of solve options, got {type(options).__name__}")
    bad_keys = [k for k in options if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"option names must be strings, got {bad_keys[0]!r}")
    if method == "auto":
        solvers = [get_method("gmres"), get_method("lsqr")]
    else:
        solvers = [get_method(method)]
    own = {}
    for s in solvers:
        own.update({k: None for k in s.options})
    accepted = set(COMMON_OPTIONS) | set(own)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise unknown_option(method, unknown, accepted)
    out = check_common(options)
    if out.get("reduction") is not None:  # a bridge refuses sharded input before any work
        for s in solvers:
            refuse_reduction(s, out["reduction"])
    if "M" in options:
        out["M"] = _check_preconditioner_kind(options["M"], solvers[0] if len(solvers) == 1 else None)
    for s in solvers:
        mine = {k: v for k, v in options.items() if k in s.options}
        if mine or len(solvers) == 1:
            checked = s.check_options(mine)
            out.update({k: checked[k] for k in mine})
    return {k: out[k] for k in options}


def _resolve_auto(A: LinearOperator, shape=None) -> str:
    m, n = A.shape if shape is None else shape
    if m != n:
        return "lsqr"
    return "gmres"


def _global_shape(A: LinearOperator, reduction, b) -> tuple:
    """``A.shape``, or with a reduction the shape of the whole sharded operator: the sums of
    the shards' (one collective, made on every rank whatever its shard holds), so that the
    ranks take the decisions that depend on it alike (the method ``"auto"`` picks, the
    default budget, whether there is anything to iterate). The collective is made on an
    array of ``b``'s library and device (NCCL reduces only CUDA tensors)."""
    m, n = A.shape
    if reduction is None:
        return m, n
    if _b.is_array(b):
        xp = _b.array_namespace(b)
        local = xp.asarray([m, n], dtype=xp.int64, device=_b.device_of(b))
    else:  # b is refused later, by the checks of every rank
        xp, local = np, np.asarray([m, n], dtype=np.int64)
    sizes = _b.to_numpy(reduction.allreduce_sum(xp, (local,))[0])
    return int(sizes[0]), int(sizes[1])


@dataclass(frozen=True)
class SolveOptions:
    """The validated options of one :func:`solve` call, built once before any work.

    Attributes
    ----------
    method : str
        The method that runs (``"auto"`` resolved).
    rtol, atol : float or None
        Both None: fixed-budget mode.
    maxiter : int
        The iteration limit (the method's default filled in).
    x0 : array or None
        Checked against ``b`` (shape, backend, device, dtype).
    M : LinearOperator or None
        The preconditioner as an operator, checked against ``b``.
    callback : callable or None
    on_failure : {"warn", "raise", "ignore"}
        The failure policy (``throw=True`` gives ``"raise"``; the default ``None`` gives
        ``"ignore"``).
    batch_dims : {0, 1}
    check_every : int
    divtol : float or None
    method_options : mapping
        The method's own options, defaults filled in (read-only).
    """

    method: str
    rtol: float | None
    atol: float | None
    maxiter: int
    x0: Any
    M: Any
    callback: Callable | None
    on_failure: str
    batch_dims: int
    check_every: int
    divtol: float | None
    method_options: Mapping[str, Any]
    #: Compile the method's iteration with ``torch.compile`` (see :func:`solve`).
    compile: bool = False
    #: The reduction of a solve whose vectors are sharded, or None (see :func:`solve`).
    reduction: Any = None

    @property
    def throw(self) -> bool:
        """Whether a failed solve raises (``on_failure == "raise"``)."""
        return self.on_failure == "raise"

    @property
    def fixed_budget(self) -> bool:
        return self.rtol is None and self.atol is None


def _check_same(x, b, name):
    if not _b.is_array(x):
        raise TypeError(f"{name} must be an array like b, got {type(x).__name__}")
    if _b.backend_name(x) != _b.backend_name(b):
        raise TypeError(f"{name} is a {_b.backend_name(x)} array but b is a {_b.backend_name(b)} array")
    if not _b.same_device(x, b):
        raise ValueError(f"{name} is on device {_b.device_of(x)} but b is on device {_b.device_of(b)}")
    if x.dtype != b.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but b has dtype {b.dtype}; they must agree")


def _as_preconditioner(M, b, n: int) -> LinearOperator:
    """``M`` as an ``(n, n)`` operator of ``b``'s backend, device and dtype, or an error
    naming M."""
    if isinstance(M, LinearOperator):
        op = M
    elif _b.is_array(M):
        if M.ndim != 2:
            raise ValueError(
                f"M must be a 2-D matrix of shape ({n}, {n}) (an approximation of A^-1), a "
                f"LinearOperator or a callable; got an array of shape {tuple(M.shape)} (for a "
                "diagonal preconditioner with diagonal d pass M=lambda x: x / d)"
            )
        op = _as_operator(M, "M")
    elif _b.is_sparse(M) or type(M).__module__.startswith("scipy.sparse.linalg"):
        op = _as_operator(M, "M")
    elif callable(M):
        # A function of b's kind: like=b fixes its backend, device and dtype for the checks.
        op = LinearOperator((n, n), matvec=M, like=b)
    else:
        raise TypeError(f"M must be a LinearOperator, a matrix or a callable, got {type(M).__name__}")
    if op.shape != (n, n):
        raise ValueError(f"M must have shape {(n, n)}, got {op.shape}")
    bb = _b.backend_name(b)
    if op.backend is not None and op.backend != bb:
        raise TypeError(
            f"M works on {op.backend} arrays but b is {_b.array_kind(bb)}; build M from data of "
            "b's backend"
        )
    if op.device is not None and str(op.device) != str(_b.device_of(b)):
        raise ValueError(f"M is on device {op.device} but b is on device {_b.device_of(b)}; move one of them")
    if op.dtype is not None and op.dtype != b.dtype:
        raise TypeError(f"M has dtype {op.dtype} but b has dtype {b.dtype}; cast one so that they agree")
    return op


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _product_error(what, y, x, want_shape):
    """The message for a product ``y = f(x)`` that is not an array of ``x``'s backend,
    device and dtype with shape ``want_shape``; None when it is."""
    kind = _b.array_kind(x)
    expected = f"expected {kind} of shape {_fmt(want_shape)} and dtype {x.dtype}"
    if y is None:
        return TypeError(f"{what} returned None; {expected}")
    if not _b.is_array(y):
        return TypeError(f"{what} returned a {type(y).__module__}.{type(y).__name__}; {expected}")
    if _b.backend_name(y) != _b.backend_name(x):
        return TypeError(f"{what} returned {_b.array_kind(y)} for a {_b.backend_name(x)} input; {expected}")
    if tuple(y.shape) != tuple(want_shape):
        return OperatorMismatchError(
            f"{what} returned shape {_fmt(tuple(y.shape))} for an input of shape "
            f"{_fmt(tuple(x.shape))}; {expected}"
        )
    if y.dtype != x.dtype:
        return TypeError(f"{what} returned dtype {y.dtype} for an input of dtype {x.dtype}; {expected}")
    if not _b.same_device(y, x):
        return OperatorMismatchError(
            f"{what} returned an array on device {_b.device_of(y)} for an input on device "
            f"{_b.device_of(x)}; {expected}"
        )
    return None


def _checked_once(f, what: str, m: int):
    """``f`` (a product mapping ``(..., n)`` to ``(..., m)``) whose first output is checked:
    after one good product, calls go straight through (one flag test)."""
    done = False

    def g(x):
        nonlocal done
        y = f(x)
        if not done:
            err = _product_error(what, y, x, tuple(x.shape[:-1]) + (m,))
            if err is not None:
                raise err
            done = True
        return y

    return g


class _FacadeOperator(LinearOperator):
    """The operator a solver sees: ``A``'s products, the first of each kind checked, counted
    on ``A``; in half precision cast from the working dtype (float32) to ``A``'s and back.

    Solvers that use ``prob.A`` directly (the scipy bridges) get the same checks and casts
    as those that use ``prob.mv``.
    """

    def __init__(self, A: LinearOperator, name: str, like, work_dtype=None):
        self.A = A
        m, n = A.shape
        self._fmv = _checked_once(A._mv, f"{name}'s matvec" if name == "A" else name, m)
        self._fmatvec = _checked_once(A._matvec, f"{name}'s matvec" if name == "A" else name, m)
        self._frmv = self._frmatvec = None
        if A.has_rmatvec:
            self._frmv = _checked_once(A._rmv, f"{name}'s rmatvec", n)
            self._frmatvec = _checked_once(A._rmatvec, f"{name}'s rmatvec", n)
        xp = _b.array_namespace(like)
        if work_dtype is not None:
            low, work = like.dtype, work_dtype
            self._fmv, self._fmatvec, self._frmv, self._frmatvec = (
                None if f is None else (lambda f: lambda x: xp.astype(f(xp.astype(x, low)), work))(f)
                for f in (self._fmv, self._fmatvec, self._frmv, self._frmatvec)
            )
        # The structure tag is A's, asked for when a solver asks (a dense matrix's check reads
        # all of it: gmres, which never asks, does not pay for it).
        self._setup(
            A.shape, dtype=like.dtype if work_dtype is None else work_dtype, xp=xp,
            device=_b.device_of(like), backend=_b.backend_name(like),
        )

    def _detect_symmetric(self):
        return self.A.symmetric

    @property
    def has_rmatvec(self):
        return self._frmv is not None

    @property
    def rowwise(self):
        return self.A.rowwise

    def _mv(self, x):
        return self._fmv(x)

    def _rmv(self, x):
        if self._frmv is None:
            raise self.A._missing_rmatvec()
        return self._frmv(x)

    def _matvec(self, x):
        return self._fmatvec(x)

    def _rmatvec(self, x):
        if self._frmatvec is None:
            raise self.A._missing_rmatvec()
        return self._frmatvec(x)

    def __repr__(self):
        return repr(self.A)


def _batched_product(f, batched):
    if f is None:
        return None
    if batched:
        return f
    return lambda X: f(X[0, ...])[None, ...]


# The package's own method standing in for each scipy bridge, named when a bridge is refused.
_OWN_ALTERNATIVE = {
    "scipy.cg": "cg", "scipy.gmres": "gmres", "scipy.lgmres": "gmres", "scipy.gcrotmk": "gmres",
    "scipy.bicgstab": "bicgstab", "scipy.lsqr": "lsqr", "scipy.lsmr": "lsqr",
}


def _refuse_unservable(method, solver, A, M, batch_dims):
    """Refuse, before any product, a method that cannot serve this operator."""
    m, n = A.shape
    if solver.needs_square and m != n:
        raise ValueError(f"method {method!r} needs a square operator; A has shape {A.shape} (use lsqr)")
    if solver.needs_rmatvec and not A.has_rmatvec:
        raise ValueError(
            f"method {method!r} needs products with A^H (rmatvec), which this operator lacks; "
            "give the operator an rmatvec, or use a method that needs only matvec: "
            "gmres, bicgstab, fixed_point, neumann, scipy.gmres"
        )
    if solver.needs_symmetric:
        for name, op in (("A", A), ("M", M)):
            if op is not None and op.symmetric is False:
                raise ValueError(
                    f"method {method!r} needs a symmetric (Hermitian) {'operator' if name == 'A' else 'preconditioner'}, "
                    f"and {name} is known not to be one ({name}.symmetric is False); use gmres or "
                    "bicgstab (products with A only), or cgne or lsqr (which also need A^H). If "
                    f"{name} is in fact symmetric, set {name}.symmetric = True"
                )
    if batch_dims == 1 and not solver.batched_products:
        for name, op in (("A", A), ("M", M)):
            if op is not None and not op.rowwise:
                alt = _OWN_ALTERNATIVE.get(method, "gmres")
                raise ValueError(
                    f"method {method!r} solves the systems of a batch one at a time with (n,) "
                    f"vectors, so with batch_dims=1 it needs {name} to be known to act row by row "
                    f"(a matrix), and {name} is not ({name!r} may act per system, as a batched "
                    f"Jacobian does); use the package's own {alt!r}, or any of gmres, bicgstab, "
                    "cg, minres, cgne, lsqr, fixed_point, neumann, which take (B, n) batches"
                )


def _refuse_uncompiled(method, solver, xp):
    """Refuse ``compile=True`` for a method without a compiled path or data not in torch."""
    if not getattr(solver, "compiles", False):
        able = [n for n in methods() if getattr(get_method(n), "compiles", False)]
        raise ValueError(
            f"method {method!r} has no compiled iteration (compile=True); methods that have one: "
            f"{', '.join(able) or 'none'}; or drop compile=True"
        )
    from .solvers._compile import check_namespace

    check_namespace(xp, method)


def _empty_result(opts: SolveOptions, A, b, x_shape) -> SolveResult:
    """The result of a solve with no unknowns, no equations or no systems: nothing to iterate."""
    xp = _b.array_namespace(b)
    batched = opts.batch_dims == 1
    nsys = b.shape[0] if batched else 1
    x = xp.zeros(x_shape, dtype=b.dtype, device=_b.device_of(b))
    bnorm = _host(xp.linalg.vector_norm(b, axis=-1)).astype(float).reshape(nsys) if b.shape[-1] else np.zeros(nsys)
    if opts.fixed_budget:
        ok = np.ones(nsys, dtype=bool)
        status = Status.COMPLETED
    else:
        thr = np.maximum((opts.rtol or 0.0) * bnorm, opts.atol or 0.0)
        ok = bnorm <= thr
        status = Status.CONVERGED
    # x = 0 is all there is; where b is not met (A with no columns) it is a least-squares one.
    statuses = tuple(status if o else Status.LEAST_SQUARES for o in ok)
    worst = max(statuses, key=lambda s: s.code) if statuses else status
    accept_ls = bool(opts.method_options.get("least_squares", False))
    success = all(s.success or (accept_ls and s is Status.LEAST_SQUARES) for s in statuses)
    converged = np.array([s is Status.CONVERGED for s in statuses], dtype=bool)
    what = "no systems (an empty batch)" if nsys == 0 else f"an operator of shape {A.shape}"
    message = f"{opts.method}: {worst.value} (nothing to iterate: {what}; 0 iterations)"
    common = dict(
        x=x, status=worst, success=bool(success), iterations=0, matvecs=0, rmatvecs=0,
        message=message, method=opts.method, info={"empty": True},
    )
    if batched:
        return SolveResult(
            converged=converged, residual_norm=bnorm, residual_history=bnorm[None, :],
            statuses=statuses, **common,
        )
    return SolveResult(
        converged=bool(converged[0]), residual_norm=float(bnorm[0]), residual_history=bnorm,
        statuses=None, **common,
    )


def _apply_policy(result: SolveResult, on_failure: str, stacklevel: int) -> None:
    """Apply the failure policy; ``stacklevel`` 1 is the line calling this function."""
    if result.success or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise SolveError(result)
    _warn_failure(result, "linear solve", stacklevel=stacklevel + 1)


def _as_operator(X, name):
    """``aslinearoperator(X)``, with its errors naming the argument ``name``."""
    try:
        return aslinearoperator(X)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if msg.startswith("A must"):
            msg = name + msg[1:]
        elif not msg.startswith(name + " "):
            msg = f"{name}: {msg}"
        raise type(exc)(msg) from None


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
    on_failure: str | None = None,
    batch_dims: int = 0,
    check_every: int = 1,
    divtol: float | None = 1e5,
    compile: bool = False,
    reduction=None,
    **options,
) -> SolveResult:
    """Solve ``A x = b`` (or the least-squares problem, for ``lsqr``-type methods).

    Every argument is validated, and the method checked to be able to serve the operator,
    before any product is applied; the first product of ``A``, ``A^H`` and ``M`` is checked
    (an array of ``b``'s backend, device and dtype, of the right shape).

    Parameters
    ----------
    A : LinearOperator, array, sparse matrix or scipy LinearOperator
        The operator; anything :func:`aslinearoperator` accepts.
    b : array, shape (m,) or (B, m)
        The right-hand side, in any array-API backend (numpy, torch, cupy, ...). With
        ``batch_dims=1`` each row is an independent system. float16 and bfloat16 are solved
        with the iteration in float32 (each product casts to ``b``'s dtype, applies ``A`` and
        casts back); ``res.x`` has ``b``'s dtype. CPU torch tensors (float32, float64,
        complex) that do not require grad are solved by the numpy iteration on views of
        their memory, which is leaner on the host than torch's; the products still apply
        the torch operator (a dense or sparse CPU torch matrix through numpy / scipy views of
        its data), and ``res.x`` is a tensor. When a product returns a tensor that autograd
        tracks, the solve runs on the tensors instead.
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
        Preconditioner (an approximation of ``A^{-1}``), for methods that accept one. A
        matrix must be ``(n, n)`` and of ``b``'s backend, device and dtype; a callable gets
        and must return arrays of ``b``'s kind.
    callback : callable, optional
        Called as ``callback(iteration, x, residual_norm)`` after every iteration, with arrays
        in ``b``'s backend. ``x`` is the current iterate, or None for methods that do not form
        it every iteration (their docstrings say so).
    throw : bool
        Raise :class:`SolveError` when the solve did not succeed: an alias of
        ``on_failure="raise"``.
    on_failure : {"warn", "raise", "ignore"}, optional
        What a solve that did not succeed does: issue a :class:`ConvergenceWarning`
        (deduplicated per call site, see :func:`show_all_convergence_warnings`), raise
        :class:`SolveError`, or nothing. Default None: ``"raise"`` with ``throw=True``, else
        ``"ignore"`` (check ``res.success``).
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
    compile : bool
        Compile the method's iteration with :func:`torch.compile` (torch tensors only; off by
        default). ``neumann`` and ``fixed_point`` compile a fixed budget whole (no host read
        until the end) and their per-iteration step otherwise; ``cg`` and ``gmres`` compile
        their per-iteration step. The first solve of each kind of problem pays the
        compilation (seconds); methods without a compiled iteration refuse it.
    reduction : linsolve_rbp.distributed.Reduction, optional
        For a system whose vectors are split over processes: ``A`` acts on this rank's
        entries (doing its own communication) and ``b``, ``x0`` and ``x`` are this rank's
        entries; every inner product and norm is then summed over the ranks through
        ``reduction`` (:class:`~linsolve_rbp.distributed.TorchDistributed`,
        :class:`~linsolve_rbp.distributed.MPI`), so that all ranks run the same iterations
        and stop together. ``res.info["allreduces"]`` counts the all-reduces the solve
        made (the operator's own communication aside). Default None: the vectors are whole. The scipy bridges refuse a reduction over
        more than one rank. See :doc:`/distributed`.
    **options
        Method-specific options (see each method's documentation).

    Returns
    -------
    SolveResult
        With no unknowns, no equations or no systems (``n = 0``, ``m = 0`` or an empty
        batch) the solver is not called: ``x`` is an empty (or zero) array, 0 iterations.

    Raises
    ------
    TypeError, ValueError
        For bad input, before any work; the message names the argument.
    SolveError
        When ``on_failure="raise"`` (or ``throw=True``) and the solve did not succeed.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = lr.solve(A, np.array([1.0, 2.0]), method="cg", rtol=1e-10)
    >>> res.status, np.allclose(A @ res.x, [1.0, 2.0])
    (<Status.CONVERGED: 'converged: the residual norm met max(rtol * ||b||, atol)'>, True)
    """
    given = dict(
        rtol=rtol, atol=atol, maxiter=maxiter, x0=x0, M=M, callback=callback, throw=throw,
        on_failure=on_failure, batch_dims=batch_dims, check_every=check_every, divtol=divtol,
        compile=compile, reduction=reduction,
    )
    given.update(options)
    v = check_options(method, given)
    A = _as_operator(A, "A")
    shape = None
    if method == "auto":
        shape = _global_shape(A, v.get("reduction"), b)
        method = _resolve_auto(A, shape)
    solver = get_method(method)
    method_options = solver.check_options({k: v[k] for k in options})
    return _solve_checked(A, b, method, solver, v, method_options, stacklevel=3, shape=shape)


class PreparedSolve:
    """A solve whose method and options were validated once (by :func:`check_options`), for
    callers that solve many systems with the same options: the torch adapter validates a
    layer's ``backward`` options when the layer is called and solves in ``backward()``.

    ``prepared(A, b, x0=None)`` is ``solve(A, b, method, x0=x0, **options)``: the same checks
    of ``A``, ``b`` and ``x0``, the same result, warnings and errors, without validating the
    options again.

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.solve import PreparedSolve
    >>> run = PreparedSolve("neumann", {"rtol": None, "atol": None, "maxiter": 3})
    >>> run(np.eye(2) * 0.5, np.ones(2)).status.name
    'COMPLETED'
    """

    __slots__ = ("method", "options", "_v", "_solver", "_method_options", "_series")

    def __init__(self, method: str, options: dict):
        v = check_options(method, options)
        self.method = method
        self.options = MappingProxyType(dict(v))
        # Every common option, defaults filled in (solve()'s signature defaults).
        full = dict(COMMON_OPTIONS)
        full.update({k: v[k] for k in v if k in COMMON_OPTIONS})
        self._v = full
        own = {k: v[k] for k in v if k not in COMMON_OPTIONS}
        if method == "auto":
            self._solver = None
            self._method_options = own
        else:
            self._solver = get_method(method)
            self._method_options = self._solver.check_options(own)
        self._series = self._series_plan()

    def _series_plan(self):
        """``(method, maxiter, divtol)`` when these options make a fixed-budget ``neumann`` or
        ``fixed_point`` solve that :meth:`series` can run, else None."""
        v = self._v
        if self.method not in ("neumann", "fixed_point") or self._method_options:
            return None
        if v["rtol"] is not None or v["atol"] is not None or v["maxiter"] is None:
            return None
        if v["callback"] is not None or v["M"] is not None or v["x0"] is not None or v["check_every"] != 1:
            return None
        # Options added by other features (compiled loops, distributed reductions) take the
        # full path, which knows them.
        if v.get("reduction") is not None or v.get("compile"):
            return None
        if any(v.get(k) not in (None, False) for k in v if k not in COMMON_OPTIONS):
            return None
        return self.method, int(v["maxiter"]), v["divtol"]

    @property
    def can_series(self) -> bool:
        """Whether :meth:`series` may run these options (a fixed-budget ``neumann`` or
        ``fixed_point`` solve without callback, preconditioner or ``x0``, checked every
        iteration)."""
        return self._series is not None

    def series(self, apply, b, shape=None):
        """The solve ``(I - T) x = b`` from ``x0 = 0`` by these options (fixed-budget
        ``neumann`` or ``fixed_point``), given only the product ``apply(v) = T v``; None when
        the full path :meth:`__call__` must run it instead.

        Both methods then sum the same series, ``x = sum_k T^k b`` (``maxiter`` terms after
        the first for ``neumann``, ``maxiter - 1`` for ``fixed_point``), with one product per
        term and no other work per term than adding it and taking its norm. The norms are
        read on the host once, at the end. The result is the one the full path returns on
        ``A = I - T`` (status COMPLETED, iterations, products, residual norm and history
        alike; the terms are ``T v`` itself rather than ``v - (I - T) v``, one rounding
        fewer). When anything the full path treats specially shows up (a non-finite term or
        sum, a term grown past the first, ``b`` too close to the ends of the dtype's range
        for an unscaled norm), this returns None, and the caller runs the full path, which
        reports it; the products spent here are then lost.

        ``b`` is a trusted right-hand side, real float32 or float64 (any other dtype returns
        None), of any shape that holds the flat right-hand side ``shape`` (``(n,)``, or
        ``(B, n)`` with ``batch_dims=1``, whose leading axis ``b`` keeps; default
        ``b.shape``), so that ``apply`` may take and return arrays in a shape of its own
        (a state's) without reshaping; ``res.x`` has ``shape``.
        """
        plan = self._series
        if plan is None:
            return None
        is_torch = _b.is_torch_array(b)
        if is_torch:
            import torch

            if b.dtype not in (torch.float32, torch.float64):
                return None
        elif not _b.is_array(b) or str(b.dtype).rsplit(".", 1)[-1] not in ("float32", "float64"):
            return None
        method, maxiter, divtol = plan
        batched = self._v["batch_dims"] == 1
        shape = tuple(b.shape) if shape is None else tuple(shape)
        if len(shape) != (2 if batched else 1) or 0 in shape or (batched and b.shape[0] != shape[0]):
            return None
        products = maxiter if method == "neumann" else max(maxiter - 1, 0)
        axis = tuple(range(1, b.ndim)) if batched else None
        if is_torch:
            # torch's own functions: the namespace wrapper's Python work is per term here.
            def norm(v):
                return torch.linalg.vector_norm(v, dim=axis)

            stack, total, x = torch.stack, (lambda x: torch.sum(x, dim=axis)), b.clone()
        else:
            xp = _b.array_namespace(b)

            def norm(v):
                return xp.linalg.vector_norm(v, axis=axis)

            stack, total, x = xp.stack, (lambda x: xp.sum(x, axis=axis)), xp.asarray(b, copy=True)
        v = b
        norms = [norm(v)]
        for _ in range(products):
            v = apply(v)
            x += v
            norms.append(norm(v))
        norms.append(total(x))
        # One read on the host: every norm, and the sum of x (finite exactly when x is, or
        # it overflowed: then it is not finite either and the full path decides).
        stacked = stack(norms)
        if is_torch and stacked.device.type == "cpu":
            rows = stacked.numpy().astype(np.float64).reshape(products + 2, -1)
        else:
            rows = np.asarray(_b.to_numpy(stacked), dtype=np.float64).reshape(products + 2, -1)
        if not _series_ok(rows, divtol):
            return None
        hist = rows[:-1]
        if method == "fixed_point":
            hist = np.concatenate([hist[:1], hist])  # its first iteration, x_1 = b, is free
        if tuple(x.shape) != shape:
            x = x.reshape(shape)
        return _completed(method, x, hist, maxiter, products, batched)

    def __call__(self, A, b, x0=None):
        v = self._v
        if x0 is not None or v["x0"] is not None:
            v = dict(v, x0=x0)
        A = _as_operator(A, "A")
        solver, method_options, method = self._solver, self._method_options, self.method
        shape = None
        if solver is None:
            shape = _global_shape(A, v.get("reduction"), b)
            method = _resolve_auto(A, shape)
            solver = get_method(method)
            method_options = solver.check_options(
                {k: val for k, val in method_options.items() if k in solver.options}
            )
        return _solve_checked(A, b, method, solver, v, method_options, stacklevel=3, shape=shape)


def _series_ok(rows, divtol) -> bool:
    """Whether the norms ``rows[:-1]`` of a series' terms (and the sum ``rows[-1]`` of its
    partial sum) show nothing the full path treats specially: all finite, the first within
    the range where an unscaled norm is exact, the last not above the first (the full path
    notes growth), none near ``divtol`` times the first (the full path's divergence test)."""
    if rows.shape[1] == 1:
        vals = rows[:, 0].tolist()
        r0, hist = vals[0], vals[:-1]
        if not all(math.isfinite(r) for r in vals):
            return False
        if (r0 != 0.0 and r0 < 2.0 ** -60) or r0 > 2.0 ** 60 or hist[-1] > r0:
            return False
        return divtol is None or max(hist) <= (1 - 1e-6) * divtol * r0
    hist, r0 = rows[:-1], rows[0]
    if not np.all(np.isfinite(rows)):
        return False
    if np.any((r0 != 0) & (r0 < 2.0 ** -60)) or np.any(r0 > 2.0 ** 60) or np.any(hist[-1] > r0):
        return False
    return divtol is None or bool(np.all(np.max(hist, axis=0) <= (1 - 1e-6) * divtol * r0))


def _completed(method, x, hist, iterations, matvecs, batched) -> SolveResult:
    """The result :func:`_to_result` makes of a fixed-budget solve whose systems all ended
    COMPLETED, ``hist`` its residual history ``(iterations + 1, nsys)`` on the host."""
    done = Status.COMPLETED
    rnorm = hist[-1]
    if batched:
        nsys = hist.shape[1]
        message = (
            f"{method}: {nsys} {done.name} of {nsys} systems after {iterations} iterations "
            f"(largest residual norm {np.max(rnorm):.3e})"
        )
        return SolveResult(
            x=x, status=done, converged=np.zeros(nsys, dtype=bool), success=True,
            iterations=iterations, matvecs=matvecs, rmatvecs=0, residual_norm=rnorm.copy(),
            residual_history=hist, message=message, method=method, statuses=(done,) * nsys, info={},
        )
    r = float(rnorm[0])
    message = f"{method}: {done.value} (after {iterations} iterations, residual norm {r:.3e})"
    return SolveResult(
        x=x, status=done, converged=False, success=True, iterations=iterations, matvecs=matvecs,
        rmatvecs=0, residual_norm=r, residual_history=hist[:, 0], message=message, method=method,
        statuses=None, info={},
    )


def _solve_checked(A, b, method, solver, v, method_options, stacklevel, shape=None):
    """The rest of :func:`solve` once the options are valid: check ``b``, ``x0`` and ``M``
    against ``A``, refuse what the method cannot serve, run, apply the failure policy.
    ``stacklevel`` 1 is the line calling this function (warnings point at the user's call);
    ``shape`` the global shape where the caller found it (:func:`_global_shape`)."""
    x0, M = v["x0"], v["M"]
    batch_dims = v["batch_dims"]
    m, n = A.shape
    A.check_vector(b, "b", m, batch_dims=batch_dims)
    xp = _b.array_namespace(b)
    if not _b.is_floating_dtype(xp, b.dtype):
        raise TypeError(f"b must have a floating dtype (float32, float64, complex), got {b.dtype}")
    x_shape = tuple(b.shape[:-1]) + (n,)
    if x0 is not None:
        _check_same(x0, b, "x0")
        if tuple(x0.shape) != x_shape:
            raise ValueError(f"x0 must have shape {x_shape}, got {tuple(x0.shape)}")
    M_op = _as_preconditioner(M, b, n) if M is not None else None
    _refuse_unservable(method, solver, A, M_op, batch_dims)
    compile_ = bool(v.get("compile", False))
    if compile_:
        _refuse_uncompiled(method, solver, xp)
    maxiter = v["maxiter"]
    red = v.get("reduction")
    # A sharded system: its global size decides the default budget and whether there is
    # anything to iterate, the same on every rank (a rank may hold no rows). Exactly one
    # collective is made before the run (see _run).
    m_all, n_all = shape if shape is not None else _global_shape(A, red, b)
    if maxiter is None:
        maxiter = solver.default_maxiter(n_all)
    policy = v["on_failure"] or ("raise" if v["throw"] else "ignore")
    opts = SolveOptions(
        method=method, rtol=v["rtol"], atol=v["atol"], maxiter=int(maxiter), x0=x0, M=M_op,
        callback=v["callback"], on_failure=policy, batch_dims=batch_dims,
        check_every=v["check_every"], divtol=v["divtol"],
        method_options=MappingProxyType(dict(method_options)), compile=compile_,
        reduction=v.get("reduction"),
    )
    batched = batch_dims == 1
    if m_all == 0 or n_all == 0 or (batched and b.shape[0] == 0):
        result = _empty_result(opts, A, b, x_shape)
        if red is not None:
            result.info["allreduces"] = 1
        _apply_policy(result, policy, stacklevel=stacklevel)
        return result
    return _run(opts, solver, A, b, xp, stacklevel + 1)


class _NeedsTorch(Exception):
    """A product of a solve on numpy views returned a tensor that autograd tracks: the solve
    runs again on torch tensors, so that ``x`` carries the graph as it would have."""


#: dtypes of CPU torch data whose solves run on numpy views of its memory.
_VIEW_DTYPES = ("torch.float32", "torch.float64", "torch.complex64", "torch.complex128")


def _host_views(opts: SolveOptions, b) -> bool:
    """Whether a solve runs its iteration on numpy views of ``b``'s memory: CPU torch data
    (float32/64, complex64/128) without gradient, an own method (the scipy bridges convert
    for themselves), no compiled iteration, no reduction over ranks.

    The iteration is then the numpy one, which on the host is leaner than torch's (whose
    per-call dispatch costs microseconds per vector operation); the products still run the
    user's torch operator, on tensors that share the solver's memory (``torch.from_numpy``),
    or, for a dense or sparse CPU torch matrix, numpy / scipy products on views of its data.
    Tests force the torch iteration on CPU by patching this function to return False."""
    if not _b.is_torch_array(b) or b.device.type != "cpu" or str(b.dtype) not in _VIEW_DTYPES:
        return False
    if b.requires_grad or b.is_conj() or b.is_neg() or opts.method.startswith("scipy."):
        return False
    if opts.compile or opts.reduction is not None:
        return False
    x0 = opts.x0
    return x0 is None or not (x0.requires_grad or x0.is_conj() or x0.is_neg())


def _np_view(y):
    """The numpy view of a product's CPU tensor ``y``; _NeedsTorch when autograd tracks it."""
    if y.requires_grad:
        raise _NeedsTorch
    if y.is_conj() or y.is_neg():
        y = y.resolve_conj().resolve_neg()
    return y.numpy()


def _host_product(op: LinearOperator, checked, kind: str, convert: bool = True, name: str = "A", batched=None):
    """A numpy -> numpy product of ``op`` (``kind`` "mv" or "rmv"), counted on ``op``: its
    own numpy / scipy product where it has one (a numpy, scipy or CPU torch matrix), else
    ``checked`` (the facade's checked product), with ``convert`` on a tensor sharing the
    numpy memory. With ``batched`` (True or False) the product takes the solver's
    ``(B, n)`` arrays (as :func:`_batched_product` makes them), in one call level."""
    own = op._host_products() if hasattr(op, "_host_products") else None
    f = None if own is None else own[0 if kind == "mv" else 1]
    if f is not None:
        # Its first output checked as every product's is (a matrix's always passes).
        what = (f"{name}'s matvec" if kind == "mv" else f"{name}'s rmatvec") if name == "A" else name
        m = op.shape[0 if kind == "mv" else 1]
        is_mv = kind == "mv"
        done = False

        def g(X):
            nonlocal done
            if is_mv:
                op.matvec_count += 1
            else:
                op.rmatvec_count += 1
            x = X[0, ...] if batched is False else X
            y = f(x)
            if not done:
                err = _product_error(what, y, x, tuple(x.shape[:-1]) + (m,))
                if err is not None:
                    raise err
                done = True
            return y[None, ...] if batched is False else y

        return g
    if checked is None or not convert:
        product = checked
    else:
        from_numpy = _b._torch().from_numpy

        def product(x):
            return _np_view(checked(from_numpy(x)))

    return product if batched is None else _batched_product(product, batched)


class _HostView(_FacadeOperator):
    """The operator a solve on numpy views sees: ``A``'s structure, numpy products (``mv``
    and ``rmv`` serve for one and for many vectors alike)."""

    def __init__(self, A: LinearOperator, mv, rmv, dtype):
        self.A = A
        self._fmv = self._fmatvec = mv
        self._frmv = self._frmatvec = rmv
        self._setup(A.shape, dtype=dtype, xp=_b.array_namespace(np.empty(0)), device="cpu",
                    backend="numpy")


def _run_host_views(opts: SolveOptions, solver: Solver, A: LinearOperator, b, stacklevel: int) -> SolveResult:
    """:func:`_run` for CPU torch data (:func:`_host_views`), on numpy views of it; the
    result holds tensors again (sharing the solver's memory)."""
    torch = _b._torch()
    batched = opts.batch_dims == 1
    bn = b.numpy()
    xp = _b.array_namespace(bn)
    A_t = _FacadeOperator(A, "A", b)
    mv = _host_product(A, A_t._fmv, "mv")
    rmv = _host_product(A, A_t._frmv if A_t.has_rmatvec else None, "rmv")
    psolve = None
    if opts.M is not None:
        psolve = _host_product(opts.M, _FacadeOperator(opts.M, "M", b)._fmv, "mv", name="M")
    A_run = _HostView(A, mv, rmv, bn.dtype)
    B = bn if batched else bn[None, ...]
    X0 = None if opts.x0 is None else opts.x0.numpy()
    if X0 is not None and not batched:
        X0 = X0[None, ...]
    callback = opts.callback
    if callback is not None:
        user_cb = callback

        def callback(k, x, r):
            user_cb(k, None if x is None else torch.from_numpy(x), torch.as_tensor(r))
    if X0 is not None and not opts.fixed_budget:
        zero_b = np.linalg.norm(B, axis=-1) == 0
        if zero_b.any():
            X0 = np.where(zero_b[:, None], np.zeros_like(X0), X0)
    prob = Problem(
        xp=xp, A=A_run,
        mv=_host_product(A, A_t._fmv, "mv", batched=batched),
        rmv=_host_product(A, A_t._frmv, "rmv", batched=batched) if rmv is not None else None,
        psolve=None if psolve is None else _batched_product(psolve, batched),
        b=B, x0=X0, rtol=opts.rtol, atol=opts.atol, maxiter=opts.maxiter,
        callback=callback, check_every=opts.check_every, divtol=opts.divtol, batched=batched,
        options=dict(opts.method_options), dtype=B.dtype, real_dtype=_b.real_dtype(xp, B.dtype),
        device="cpu",
    )
    mv0, rmv0 = A.matvec_count, A.rmatvec_count
    out = run_scaled(solver, prob)
    out.x = torch.from_numpy(np.asarray(out.x))
    if out.info:
        out.info = {
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            for k, v in out.info.items()
        }
    result = _to_result(out, prob, opts.method, A.matvec_count - mv0, A.rmatvec_count - rmv0)
    _apply_policy(result, opts.on_failure, stacklevel=stacklevel)
    return result


def _operators_in(*ops):
    """The operators ``ops`` and those they are built of (a sum's, product's, scaled or
    transposed operator's ``A`` and ``B``), each once: whose counts a product increments."""
    seen, todo = {}, [op for op in ops if op is not None]
    while todo:
        op = todo.pop()
        if id(op) not in seen:
            seen[id(op)] = op
            todo.extend(c for c in (getattr(op, "A", None), getattr(op, "B", None)) if isinstance(c, LinearOperator))
    return list(seen.values())


def _run(opts: SolveOptions, solver: Solver, A: LinearOperator, b, xp, stacklevel: int = 3) -> SolveResult:
    red = opts.reduction
    # The collectives of the solve: the global size's (made before this call), and from here.
    red_before = None if red is None else red.allreduces - 1
    if _host_views(opts, b):
        counts = [(op, op.matvec_count, op.rmatvec_count) for op in _operators_in(A, opts.M)]
        try:
            return _run_host_views(opts, solver, A, b, stacklevel + 1)
        except _NeedsTorch:
            # A product is tracked by autograd: solve on the tensors themselves (from the
            # start, the products counted again from where they were).
            for op, mvc, rmvc in counts:
                op.matvec_count, op.rmatvec_count = mvc, rmvc
    batched = opts.batch_dims == 1
    # Half precision: iterate in float32 (inner products, norms and the small dense algebra
    # of float16 lose the solve); the products still run in the operator's own dtype.
    work = xp.float32 if _b.is_half_dtype(xp, b.dtype) else None
    A_run = _FacadeOperator(A, "A", b, work)
    M_run = None if opts.M is None else _FacadeOperator(opts.M, "M", b, work)
    B = b if batched else b[None, ...]
    X0 = opts.x0
    if X0 is not None and not batched:
        X0 = X0[None, ...]
    callback = opts.callback
    if work is not None:
        B = xp.astype(B, work)
        X0 = None if X0 is None else xp.astype(X0, work)
        if callback is not None:
            user_cb, low = callback, b.dtype

            def callback(k, x, r):
                user_cb(k, None if x is None else xp.astype(x, low), r)
    if X0 is not None and not opts.fixed_budget:
        # As scipy does: x = 0 solves a system whose right-hand side is zero, and is what a
        # zero threshold max(rtol * 0, atol) can be met by; start such systems there.
        if opts.reduction is None:
            zero_b = xp.linalg.vector_norm(B, axis=-1) == 0
        else:  # the norm over all ranks, so that all take the same decision
            with using_reduction(opts.reduction):
                zero_b = safe_norm(xp, B) == 0
        if bool(xp.any(zero_b)):  # only then: x0 is otherwise passed on as given, not copied
            X0 = xp.where(zero_b[:, None], xp.zeros_like(X0), X0)
    dtype = B.dtype
    mv, rmv = A_run._fmv, A_run._frmv if A_run.has_rmatvec else None
    if work is None and isinstance(b, np.ndarray) and hasattr(A, "_host_products"):
        # A numpy or scipy matrix: its own products, counted, in one call level.
        mv = _host_product(A, mv, "mv", convert=False, batched=batched)
        rmv = _host_product(A, rmv, "rmv", convert=False, batched=batched) if rmv is not None else None
    else:
        mv = _batched_product(mv, batched)
        rmv = _batched_product(rmv, batched) if rmv is not None else None
    prob = Problem(
        xp=xp, A=A_run,
        # The checked products themselves, not the facade operator's methods: one call level
        # fewer per product.
        mv=mv, rmv=rmv,
        psolve=None if M_run is None else _batched_product(M_run._fmv, batched),
        b=B, x0=X0, rtol=opts.rtol, atol=opts.atol, maxiter=opts.maxiter,
        callback=callback, check_every=opts.check_every, divtol=opts.divtol, batched=batched,
        options=dict(opts.method_options), dtype=dtype, real_dtype=_b.real_dtype(xp, dtype),
        device=_b.device_of(b), compile=opts.compile, reduction=opts.reduction,
    )
    mv0, rmv0 = A.matvec_count, A.rmatvec_count
    out = run_scaled(solver, prob)
    if work is not None:
        out.x = xp.astype(out.x, b.dtype)
        if prob.reduction is None:
            _recheck_rounded(out, prob, b.dtype)
        else:  # the residual's norm over all ranks
            with using_reduction(prob.reduction):
                _recheck_rounded(out, prob, b.dtype)
    result = _to_result(out, prob, opts.method, A.matvec_count - mv0, A.rmatvec_count - rmv0)
    if red is not None:
        result.info["allreduces"] = red.allreduces - red_before
    _apply_policy(result, opts.on_failure, stacklevel=stacklevel)  # the line that called solve()
    return result


def _recheck_rounded(out, prob: Problem, low) -> None:
    """In half precision the claims were checked on the float32 iterate; the ``x`` returned
    is rounded to ``low``. Check the claims again on that ``x`` (one product) and withdraw
    those its residual does not back."""
    if prob.fixed_budget:
        return
    codes = _host(out.codes).astype(int)
    claimed = codes == Status.CONVERGED.code
    if not claimed.any():
        return
    from .solvers._base import safe_norm

    xp = prob.xp
    rtrue = _host(safe_norm(xp, prob.b - prob.mv(xp.astype(out.x, prob.dtype)))).astype(float)
    thr = _host(prob.thresholds()).astype(float)
    false = claimed & ~(rtrue <= thr)
    rn = _host(out.residual_norm).astype(float)
    out.residual_norm = np.where(claimed, rtrue, rn)
    if false.any():
        out.codes = np.where(false, Status.MAX_ITERATIONS.code, codes)
        extra = (
            f"x rounded to {low} misses the tolerance that its float32 iterate met; ask a "
            "tolerance above the precision of the dtype"
        )
        out.note = f"{out.note}; {extra}" if out.note else extra


def _host(a):
    return np.asarray(_b.to_numpy(a))


def _history(hist, nsys: int) -> np.ndarray:
    """The residual history ``(iterations + 1, nsys)`` as floats on the host. A list of device
    arrays of one kind, shape and dtype is stacked first and copied once (one transfer, not
    one per iteration)."""
    if not hist:
        return np.zeros((0, nsys))
    first = hist[0]
    if type(first) is np.ndarray:
        shape = first.shape
        if all(type(h) is np.ndarray and h.shape == shape for h in hist):
            return np.array(hist, dtype=float)  # one conversion, not one per iteration
    elif _b.is_array(first):
        kind, shape, dtype = type(first), first.shape, first.dtype
        if all(type(h) is kind and h.shape == shape and h.dtype == dtype for h in hist):
            return _host(_b.array_namespace(first).stack(hist)).astype(float)
    return np.stack([_host(h).astype(float) for h in hist])


def _to_result(out, prob: Problem, method: str, matvecs: int, rmatvecs: int) -> SolveResult:
    codes = _host(out.codes).astype(int)
    statuses = tuple(Status.from_code(c) for c in codes)
    worst = Status.from_code(int(codes.max()))
    rnorm = _host(out.residual_norm).astype(float)
    history = _history(out.history, len(codes))
    converged = codes == Status.CONVERGED.code
    ok_ls = getattr(out, "accept_least_squares", False)
    success = bool(all(s.success or (ok_ls and s is Status.LEAST_SQUARES) for s in statuses))
    x = out.x if prob.batched else out.x[0, ...]
    note = f"; {out.note}" if getattr(out, "note", "") else ""
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
        message += note
        return SolveResult(
            x=x, status=worst, converged=converged, success=success, iterations=out.iterations,
            matvecs=matvecs, rmatvecs=rmatvecs, residual_norm=rnorm, residual_history=history,
            message=message, method=method, statuses=statuses, info=out.info,
        )
    thr = prob.thresholds()
    thr_txt = "" if thr is None else f", threshold {float(_host(thr)[0]):.3e}"
    message = (
        f"{method}: {worst.value} (after {out.iterations} iterations, residual norm "
        f"{rnorm[0]:.3e}{thr_txt}){note}"
    )
    return SolveResult(
        x=x, status=worst, converged=bool(converged[0]), success=success,
        iterations=out.iterations, matvecs=matvecs, rmatvecs=rmatvecs,
        residual_norm=float(rnorm[0]), residual_history=history[:, 0], message=message,
        method=method, statuses=None, info=out.info,
    )
