"""Compare every method of :func:`linsolve_rbp.methods` on one linear system.

This is the engine of ``linsolve-rbp compare``: :func:`build_case` builds the system (the
Hopfield adjoint system of Liao et al. 2018 by default, from :mod:`linsolve_rbp.problems`),
:func:`run_compare` solves it with each method and measures what each solve cost and how
accurate it is; :mod:`linsolve_rbp.cli.report` prints, saves and plots the results.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from .. import backend as _b
from .._validate import choice, nonnegative_real, positive_int
from ..experiments.progress import progress_bar
from ..operators import IdentityOperator, LinearOperator, aslinearoperator
from ..problems import (
    HopfieldNetwork,
    convection_diffusion,
    corrupt,
    gnn_adjoint,
    hopfield_weights,
    load_digits,
    random_contractive,
)
from ..solve import get_method, methods, solve

__all__ = [
    "PROBLEMS",
    "UsageError",
    "Case",
    "build_case",
    "run_method",
    "run_compare",
    "applicability",
    "load_matrix",
]

PROBLEMS = ("hopfield", "gnn", "convdiff", "contractive")
DENSE_LIMIT = 3000  # largest n for which a dense direct reference solve is run


class UsageError(ValueError):
    """A request that cannot be served (bad file, option that does not apply, missing backend);
    the command line turns it into a one-line error."""


@dataclass
class Case:
    """A linear system ``A x = b`` to compare methods on.

    Attributes
    ----------
    name : str
    description : str
    A : LinearOperator
    b : array, shape (n,) or (B, n)
    batched : bool
        ``b`` holds ``B`` independent systems (solved with ``batch_dims=1``).
    symmetric : bool
        Whether ``A`` is symmetric (cg and minres apply only then).
    reference : callable or None
        Returns the exact solutions as a float64 numpy array of ``b``'s shape (a direct solve),
        or None where that is not affordable.
    adjoint : bool
        ``A = I - J^T``: products with ``A`` are VJPs and products with ``A^T`` are JVPs.
    info : dict
        Facts about the system (size, forward iterations, recall, ...), reported in the JSON.
    """

    name: str
    description: str
    A: LinearOperator
    b: Any
    batched: bool
    symmetric: bool
    reference: Callable | None
    adjoint: bool = True
    info: dict = field(default_factory=dict)
    split: Callable | None = None
    """For batches whose systems each have their own operator (per-sample Jacobians): returns
    ``[(A_i, b_i)]``, one unbatched system each, for methods that solve a batch one system at
    a time (the scipy bridges) and so cannot use the batched operator."""


# -- systems ------------------------------------------------------------------------------------

def _rhs(n, batch, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, n))


def _is_symmetric(M) -> bool:
    if sp.issparse(M):
        diff = abs(M - M.T)
        return bool(diff.nnz == 0 or diff.max() <= 1e-12 * abs(M).max())
    return bool(np.allclose(M, M.T, rtol=0, atol=1e-12 * np.abs(M).max()))


def _dense_reference(Mfun, b2d):
    """Direct solutions of ``M x = b_i`` (``Mfun`` returns the numpy/scipy matrix)."""
    def ref():
        M = Mfun()
        if sp.issparse(M):
            from scipy.sparse.linalg import splu

            lu = splu(M.tocsc().astype(np.float64))
            return np.stack([lu.solve(row) for row in b2d])
        return np.linalg.solve(np.asarray(M, dtype=np.float64), b2d.T).T
    return ref


def _finish_case(name, desc, A, b2d, conv, batch, symmetric, reference, adjoint, info):
    b = conv(b2d) if batch > 1 else conv(b2d[0])
    return Case(name=name, description=desc, A=A, b=b, batched=batch > 1, symmetric=symmetric,
                reference=reference, adjoint=adjoint, info=info)


# -- problems -----------------------------------------------------------------------------------

def _hopfield(backend, xp, dt, dev, conv, batch, seed):
    if batch is None:
        batch = 10
    if not 1 <= batch <= 10:
        raise UsageError(f"--batch must be between 1 and 10 for --problem hopfield (one system per digit), got {batch}")
    images = load_digits()[0][:batch].astype(np.float64)
    W = hopfield_weights()
    net = HopfieldNetwork(W, inputs=corrupt(images, 0.5, seed=1234 + seed), targets=images)
    h, iters = net.fixed_point(tol=1e-10)
    g = net.loss_grad(h)
    recall = np.mean((net.outputs(h) > 0.5) == (images > 0.5), axis=1)
    if backend == "torch":
        import torch

        from ..adapters.torch import JacobianOperator

        Wt, clamp, free = conv(W), conv(net.clamp), conv(net.free)

        def f(s):
            c = clamp if s.ndim == 2 else clamp[0, ...]
            return c + free * (torch.sigmoid(0.5 * s) @ Wt)

        hs = conv(h) if batch > 1 else conv(h[0])
        J = JacobianOperator(f, hs, batch_dims=1 if batch > 1 else 0)
    else:
        J = net.adjoint_operator(h, backend, dtype=dt, device=dev)
    like = conv(np.zeros(1))
    A = IdentityOperator(net.n, like=like) - J.T

    def split():
        out = []
        for k in range(batch):
            if backend == "torch":
                c, hk = clamp[k, ...], conv(h[k])
                Jk = JacobianOperator(lambda s, c=c: c + free * (torch.sigmoid(0.5 * s) @ Wt), hk)
            else:
                Jk = net.adjoint_operator(h[k:k + 1], backend, dtype=dt, device=dev)
            out.append((IdentityOperator(net.n, like=like) - Jk.T, conv(g[k])))
        return out

    def reference():
        # J^T has zero columns at the clamped units, so z on the free units solves a smaller
        # dense system and z on the clamped units follows from it.
        free = net.free > 0
        out = np.empty_like(g)
        for k in range(batch):
            JT = net.jacobian(h, k).T
            zf = np.linalg.solve(np.eye(int(free.sum())) - JT[np.ix_(free, free)], g[k, free])
            out[k, free] = zf
            out[k, ~free] = g[k, ~free] + JT[np.ix_(~free, free)] @ zf
        return out

    info = dict(n=net.n, digits=batch, forward_iterations=iters, loss=net.loss(h).tolist(),
                recall=recall.tolist(),
                weights="hopfield_weights(): Hebbian hidden layer + pseudo-inverse read-in/read-out")
    desc = (f"Hopfield associative memory (Liao et al. 2018): (I - J^T) z = dL/dh*, n = {net.n}, "
            f"{batch} digit(s) with half their lit pixels off; forward fixed point in {iters} updates, "
            f"recall {100 * recall.min():.1f}% or better")
    case = _finish_case("hopfield", desc, A, g, conv, batch, False, reference, True, info)
    case.split = split if batch > 1 else None
    return case


def _gnn(backend, xp, dt, dev, conv, batch, seed, size):
    if backend != "torch":
        raise UsageError("--problem gnn is a PyTorch model: use --backend torch")
    from ..adapters.torch import JacobianOperator

    batch = 1 if batch is None else batch
    nodes = 100 if size is None else size
    sysm = gnn_adjoint(nodes=nodes, batch=batch, seed=seed, dtype=dt, device=dev)
    n = sysm.h_star.numel()
    J = JacobianOperator(sysm.f, sysm.h_star)
    A = IdentityOperator(n, like=sysm.h_star) - J.T
    b2d = _b.to_numpy(sysm.b).reshape(batch, n).astype(np.float64)
    reference = None
    if n <= DENSE_LIMIT:
        reference = _dense_reference(lambda: np.eye(n) - sysm.dense_jacobian().T, b2d)
    desc = (f"GRU graph network on a random graph ({nodes} nodes, 16 states each): "
            f"(I - J^T) z = dL/dh*, n = {n}; forward fixed point in {sysm.forward_iterations} updates")
    case = Case("gnn", desc, A, sysm.b, batch > 1, False, reference, True,
                dict(n=n, nodes=nodes, forward_iterations=sysm.forward_iterations))
    return case


def _contractive(backend, xp, dt, dev, conv, batch, seed, size, rho):
    n = 500 if size is None else size
    rho = 0.9 if rho is None else rho
    batch = 1 if batch is None else batch
    Jm = random_contractive(n, rho=rho, seed=seed)
    J = aslinearoperator(conv(Jm))
    A = IdentityOperator(n, like=conv(np.zeros(1))) - J.T
    b2d = _rhs(n, batch, seed)
    reference = _dense_reference(lambda: np.eye(n) - Jm.T, b2d) if n <= DENSE_LIMIT else None
    desc = f"random contractive map: (I - J^T) z = b, n = {n}, spectral radius of J = {rho}"
    return _finish_case("contractive", desc, A, b2d, conv, batch, False, reference, True,
                        dict(n=n, rho=rho))


def _convdiff(backend, xp, dt, dev, conv, batch, seed, size):
    grid = 32 if size is None else size
    batch = 1 if batch is None else batch
    M = convection_diffusion(grid)
    n = M.shape[0]
    b2d = _rhs(n, batch, seed)
    desc = f"2-D convection-diffusion (Peclet 10, upwind), {grid} x {grid} grid: M x = b, n = {n}"
    return _finish_case("convdiff", desc, aslinearoperator(conv(M)), b2d, conv, batch,
                        _is_symmetric(M), _dense_reference(lambda: M, b2d), False, dict(n=n, grid=grid))


def load_matrix(path):
    """Read a square matrix (and maybe a right-hand side) from ``.mtx`` or ``.npz``.

    A ``.npz`` file is either a scipy sparse matrix saved by :func:`scipy.sparse.save_npz`, or
    arrays: the matrix under ``A`` (or ``M``, or the only 2-D array) and optionally ``b``.

    Returns
    -------
    M : numpy.ndarray or scipy.sparse.csr_matrix
    b : numpy.ndarray or None
    """
    if not os.path.isfile(path):
        raise UsageError(f"--problem {path}: no such file (give hopfield, gnn, convdiff, contractive or a .mtx/.npz file)")
    low = path.lower()
    b = None
    try:
        if low.endswith(".mtx") or low.endswith(".mtx.gz"):
            import scipy.io

            M = scipy.io.mmread(path)
        elif low.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                keys = set(data.files)
                if {"format", "shape", "data"} <= keys:
                    M = sp.load_npz(path)
                else:
                    two_d = [k for k in data.files if data[k].ndim == 2]
                    key = "A" if "A" in keys else "M" if "M" in keys else (two_d[0] if len(two_d) == 1 else None)
                    if key is None:
                        raise UsageError(f"--problem {path}: the npz holds no array named A or M and not exactly one 2-D array")
                    M = data[key]
                    if "b" in keys:
                        b = np.asarray(data["b"])
        else:
            raise UsageError(f"--problem {path}: unknown file type (use .mtx or .npz)")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise UsageError(f"--problem {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if sp.issparse(M):
        M = M.tocsr()
    else:
        M = np.asarray(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise UsageError(f"--problem {path}: the matrix must be square, got shape {M.shape}")
    if not np.issubdtype(M.dtype, np.number) or np.issubdtype(M.dtype, np.complexfloating):
        raise UsageError(f"--problem {path}: the matrix must be real, got dtype {M.dtype}")
    return M.astype(np.float64), b


def _file(path, backend, xp, dt, dev, conv, batch, seed):
    M, b = load_matrix(path)
    n = M.shape[0]
    if b is not None:
        b2d = np.asarray(b, dtype=np.float64).reshape(-1, n) if b.size % n == 0 else None
        if b2d is None or b.ndim > 2:
            raise UsageError(f"--problem {path}: b must have shape ({n},) or (B, {n}), got {b.shape}")
        if batch is not None and batch != b2d.shape[0]:
            raise UsageError(f"--batch {batch} disagrees with the {b2d.shape[0]} right-hand side(s) stored in {path}")
        batch = b2d.shape[0]
    else:
        batch = 1 if batch is None else batch
        b2d = _rhs(n, batch, seed)
    reference = None
    if sp.issparse(M) or n <= DENSE_LIMIT:
        reference = _dense_reference(lambda: M, b2d)
    desc = f"{os.path.basename(path)}: M x = b, n = {n}" + (f", {M.nnz} nonzeros" if sp.issparse(M) else ", dense")
    return _finish_case(os.path.basename(path), desc, aslinearoperator(conv(M)), b2d, conv,
                        batch, _is_symmetric(M), reference, False, dict(n=n, file=path))


def build_case(problem: str = "hopfield", *, backend: str | None = None, device=None,
               dtype: str = "float64", batch: int | None = None, seed: int = 0,
               size: int | None = None, rho: float | None = None) -> Case:
    """Build the system that :func:`run_compare` solves.

    Parameters
    ----------
    problem : str
        ``hopfield`` (default), ``gnn``, ``convdiff``, ``contractive``, or the path of a
        ``.mtx`` / ``.npz`` file holding a square matrix.
    backend : {"numpy", "torch", "cupy"}, optional
        Default numpy (torch for ``gnn``).
    device : str, optional
        A torch device (``cuda:0``) or a cupy device number.
    dtype : {"float32", "float64"}
    batch : int, optional
        Number of right-hand sides. Default: one per shipped digit (10) for ``hopfield``, 1
        otherwise.
    seed : int
        Seeds the right-hand sides, random matrices and graphs (and, for ``hopfield``, the
        corruption of the digits).
    size : int, optional
        ``contractive``: n (default 500); ``convdiff``: grid points per side (default 32);
        ``gnn``: nodes (default 100).
    rho : float, optional
        Spectral radius of ``J`` for ``contractive`` (default 0.9).

    Returns
    -------
    Case

    Raises
    ------
    UsageError
        For options that do not apply, unreadable files or missing backends.

    Examples
    --------
    >>> from linsolve_rbp.cli.compare import build_case
    >>> case = build_case("contractive", size=50, rho=0.5)
    >>> case.A.shape, case.symmetric
    ((50, 50), False)
    """
    try:
        dtype = choice(dtype, "--dtype", ("float32", "float64"))
        batch = positive_int(batch, "--batch", allow_none=True)
        size = positive_int(size, "--size", allow_none=True)
        rho = nonnegative_real(rho, "--rho", allow_none=True, allow_inf=False)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if rho is not None and problem != "contractive":
        raise UsageError("--rho applies only to --problem contractive")
    if size is not None and problem not in ("contractive", "convdiff", "gnn"):
        raise UsageError(f"--size does not apply to --problem {problem} (it applies to contractive, convdiff, gnn)")
    if backend is None:
        backend = "torch" if problem == "gnn" else "numpy"
    try:
        xp, dt, dev, conv = _b.namespace(backend, device, dtype, names=("--backend", "--device"))
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    if problem == "hopfield":
        return _hopfield(backend, xp, dt, dev, conv, batch, seed)
    if problem == "gnn":
        return _gnn(backend, xp, dt, dev, conv, batch, seed, size)
    if problem == "contractive":
        return _contractive(backend, xp, dt, dev, conv, batch, seed, size, rho)
    if problem == "convdiff":
        return _convdiff(backend, xp, dt, dev, conv, batch, seed, size)
    return _file(problem, backend, xp, dt, dev, conv, batch, seed)


# -- running ------------------------------------------------------------------------------------

def _rows_np(x, batched):
    a = np.asarray(_b.to_numpy(x), dtype=np.float64)
    return a if batched else a[None, :]


def applicability(case: Case, name: str) -> str | None:
    """Why method ``name`` does not apply to ``case``, or None when it does."""
    solver = get_method(name)
    if solver.needs_symmetric and not case.symmetric:
        return "n/a: needs symmetric A"
    if solver.needs_rmatvec and not case.A.has_rmatvec:
        return "n/a: needs JVPs (products with A^T), which this operator lacks"
    return None


def _solve_split(case: Case, name, rtol, maxiter):
    """Solve the systems of a per-sample batch one by one, each with its own operator, and
    merge the results as a batched solve would report them."""
    from types import SimpleNamespace

    parts = case.split()
    results = [solve(Ai, bi, method=name, rtol=rtol, maxiter=maxiter) for Ai, bi in parts]
    worst = max((r.status for r in results), key=lambda s: s.code)
    k = max(len(r.residual_history) for r in results)
    hist = np.stack([np.pad(r.residual_history, (0, k - len(r.residual_history)), mode="edge")
                     for r in results], axis=1)
    xs = [r.x for r in results]
    xp = _b.array_namespace(xs[0])
    return SimpleNamespace(
        x=xp.stack(xs), status=worst, success=all(r.success for r in results),
        # A batched product counts once for all B systems; dividing the total by B keeps the
        # columns comparable with the batched methods.
        iterations=max(r.iterations for r in results),
        matvecs=math.ceil(sum(r.matvecs for r in results) / len(results)),
        rmatvecs=math.ceil(sum(r.rmatvecs for r in results) / len(results)), residual_history=hist,
        statuses=tuple(r.status for r in results),
        message="; ".join([f"{name}: solved the {len(results)} systems one at a time, each with its own operator"]
                          + [r.message for r in results if not r.success]),
    )


def run_method(case: Case, name: str, rtol: float = 1e-6, maxiter: int | None = 1000,
               x_ref=None) -> dict:
    """Solve ``case`` with method ``name`` and measure the solve.

    Returns
    -------
    dict
        ``method``, ``status`` (a Status name in lower case, ``"n/a: ..."`` or
        ``"error: ..."``), ``success``, ``iterations``, ``vjps`` and ``jvps`` (products with
        ``A`` and ``A^T``; for an adjoint system ``A = I - J^T`` these are the vector-Jacobian
        and Jacobian-vector products), ``time_s``, ``rel_residual`` (the largest
        ``||b - A x|| / ||b||`` over the systems, computed with one extra product that is not
        counted), ``rel_error`` (against ``x_ref``, or None), ``message``, ``statuses`` and
        ``history`` (products and relative residuals as the method reported them).
    """
    row = dict(method=name, status=None, success=False, iterations=None, vjps=None, jvps=None,
               time_s=None, rel_residual=None, rel_error=None, message="", statuses=None,
               history=None)
    try:
        why = applicability(case, name)
    except Exception as exc:  # noqa: BLE001 - a method that cannot even load is shown, not fatal
        row.update(status=f"error: {type(exc).__name__}", message=str(exc))
        return row
    if why is not None:
        row.update(status=why, message=why)
        return row
    A, b = case.A, case.b
    try:
        _b.synchronize(b)
        t0 = time.perf_counter()
        # A method that cannot batch products (the scipy bridges) solves per-sample systems one
        # at a time, each with its own operator.
        if case.split is not None and not get_method(name).batched_products:
            res = _solve_split(case, name, rtol, maxiter)
        else:
            res = solve(A, b, method=name, rtol=rtol, maxiter=maxiter, batch_dims=1 if case.batched else 0)
        _b.synchronize(res.x)
        elapsed = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - per-method failures go into the table
        row.update(status=f"error: {type(exc).__name__}", message=f"{type(exc).__name__}: {exc}")
        return row
    bnp = _rows_np(b, case.batched)
    xnp = _rows_np(res.x, case.batched)
    bnorm = np.linalg.norm(bnp, axis=1)
    bnorm = np.where(bnorm > 0, bnorm, 1.0)
    r = bnp - _rows_np(A.matvec(res.x), case.batched)
    relres = float(np.max(np.linalg.norm(r, axis=1) / bnorm))
    relerr = None
    if x_ref is not None:
        xn = np.linalg.norm(x_ref, axis=1)
        relerr = float(np.max(np.linalg.norm(xnp - x_ref, axis=1) / np.where(xn > 0, xn, 1.0)))
    hist = np.asarray(res.residual_history, dtype=np.float64)
    hist = (hist.reshape(len(hist), -1) / bnorm[None, :]).max(axis=1)
    products = res.matvecs + res.rmatvecs
    steps = np.arange(len(hist)) * (products / max(res.iterations, 1))
    row.update(
        status=res.status.name.lower(), success=bool(res.success), iterations=int(res.iterations),
        vjps=int(res.matvecs), jvps=int(res.rmatvecs), time_s=elapsed, rel_residual=relres,
        rel_error=relerr, message=res.message,
        statuses=None if res.statuses is None else [s.name.lower() for s in res.statuses],
        history=dict(products=[float(s) for s in steps], rel_residual=[float(v) for v in hist]),
    )
    return row


def _warm_up(case: Case) -> None:
    """One product with ``A`` and one with ``A^H`` before any timing, so that one-off costs
    (library initialisation, the forward-mode set-up of a Jacobian) are not charged to the
    method that happens to run first. Solves count products themselves, so these do not
    appear in any row."""
    try:
        A, b = case.A, case.b
        _b.synchronize(A.matvec(b))
        if A.has_rmatvec:
            _b.synchronize(A.rmatvec(b))
    except Exception:  # noqa: BLE001 - a failing product is reported by the solves themselves
        pass


def run_compare(case: Case, method_names=None, rtol: float = 1e-6, maxiter: int | None = 1000,
                progress: bool = False) -> list[dict]:
    """Run :func:`run_method` for each method (default all of :func:`methods`).

    The direct reference solve runs first, once, where ``case.reference`` is set.
    ``progress`` shows a tqdm bar (the ``cli`` extra).
    """
    names = list(methods()) if method_names is None else list(method_names)
    x_ref = case.reference() if case.reference is not None else None
    _warm_up(case)
    rows = []
    bar = progress_bar(names, enabled=progress, desc="compare", unit="method")
    for name in bar:
        bar.set_postfix_str(name)
        rows.append(run_method(case, name, rtol=rtol, maxiter=maxiter, x_ref=x_ref))
    bar.close()
    return rows
