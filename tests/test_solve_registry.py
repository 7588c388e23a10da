"""Every method of :func:`linsolve_rbp.solve`, tested from one registry: the contract of solve().

The registry crosses the methods with operator factories (dense, scipy sparse, closures with
and without ``rmatvec``, the RBP operator ``I - J^T``, SPD matrices, convection-diffusion, a
rectangular least-squares problem), dtypes (float32, float64) and backends (numpy, torch,
array_api_strict; the ``scipy.*`` bridges on numpy and torch CPU; CUDA on GPU runs). What a
method must do on a case follows from its capabilities, read from its solver class
(``needs_symmetric``, ``needs_contraction``, ``needs_rmatvec``, ``needs_square``,
``accepts_preconditioner``, ``accepts_callback``, ``outer_iterations``, ``batched_products``):
refuse it with a ValueError naming the method and the reason, report a non-success status, or
match ``numpy.linalg.solve`` / ``lstsq`` to a tolerance derived from ``rtol`` and the
condition number. The other contract tests (inputs unchanged, x0, fixed budget, maxiter=1,
callbacks, histories, non-finite products, batches, complex data, preconditioning,
check_every) run for every method too; the per-method files hold only each method's own
mathematics.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings, strategies as st

import linsolve_rbp as lr
from linsolve_rbp import backend as lb
from linsolve_rbp.problems import convection_diffusion, random_contractive
from linsolve_rbp.solve import _REGISTRY
from registry import (EPS, KINDS, METHODS, OWN, RTOL, assert_like, backend_params,
                      backends_of, make_operator, method_params, methods_where, needs_torch,
                      nonsymmetric, param, rectangular, solver, spd, to_backend, to_np, torch)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
    # scipy's lsmr initialises a condition estimate with 1e100, which overflows float32.
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

CONTRACTIVE = methods_where(needs_contraction=True)


def sparse_contractive(n, seed):
    """``I - S`` with ``S`` sparse, nonsymmetric, of 2-norm 0.6."""
    S = sp.random(n, n, density=0.2, random_state=seed, data_rvs=np.random.default_rng(seed).standard_normal)
    S = S.toarray()
    S = S - 1.5 * S.T  # make it far from symmetric
    S *= 0.6 / np.linalg.norm(S, 2)
    return np.eye(n) - S


def _spd_1_20(n, seed):
    """SPD with eigenvalues in [1, 20]: ``I - A`` has spectral radius 19."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (Q * np.geomspace(1.0, 20.0, n)) @ Q.T


# -------------------------------------------------------------------------------------------
# the registry of cases


@dataclass(frozen=True)
class Case:
    """A linear system, described by what the capabilities of a method depend on."""

    name: str
    matrix: object  # callable () -> float64 numpy matrix
    kind: str  # an operator factory of registry.KINDS
    symmetric: bool = False
    contractive: bool = False  # spectral radius of I - A below one
    least_squares: bool = False  # rectangular and inconsistent
    # Enough for every converging method here (n <= 30); bounds the cost of the failing ones.
    maxiter: int | None = 150
    slow: bool = False


CASES = [
    Case("dense_nonsymmetric", lambda: nonsymmetric(24, 0, shift=3.0), "dense"),
    Case("scipy_sparse_contractive", lambda: sparse_contractive(30, 1), "sparse", contractive=True),
    Case("closure_spd_contractive", lambda: spd(20, seed=2)[0], "closure", symmetric=True, contractive=True),
    Case("closure_no_rmatvec", lambda: nonsymmetric(20, 3, shift=1.0), "closure_no_rmatvec"),
    Case("rbp_I_minus_JT", lambda: np.eye(24) - random_contractive(24, rho=0.7, seed=4).T, "rbp", contractive=True),
    Case("spd", lambda: _spd_1_20(24, 5), "dense", symmetric=True),
    Case("sparse_laplacian", lambda: convection_diffusion(5, peclet=0.0).toarray(), "sparse", symmetric=True),
    Case("convection_diffusion", lambda: convection_diffusion(5, peclet=10.0).toarray(), "sparse"),
    Case("rectangular_least_squares", lambda: rectangular(30, 20, 6), "dense", least_squares=True),
    # Bigger versions of the same structures.
    Case("convection_diffusion_256", lambda: convection_diffusion(16, peclet=10.0).toarray(), "sparse",
         maxiter=2000, slow=True),
    Case("laplacian_256", lambda: convection_diffusion(16, peclet=0.0).toarray(), "sparse", symmetric=True,
         maxiter=2000, slow=True),
    Case("rbp_I_minus_JT_200_rho_0.95", lambda: np.eye(200) - random_contractive(200, rho=0.95, seed=7).T,
         "rbp", contractive=True, maxiter=2000, slow=True),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def expectation(case, method):
    """``("refuses", reason)``, ``("fails", None)`` or ``("converges", None)``, from the
    capabilities of the method's solver class."""
    s = solver(method)
    if s.needs_rmatvec and case.kind == "closure_no_rmatvec":
        return "refuses", "rmatvec"
    if s.needs_square and case.least_squares:
        return "refuses", "square"
    if (s.needs_symmetric and not case.symmetric or s.needs_contraction and not case.contractive
            or case.least_squares and "least_squares" not in s.options):
        return "fails", None
    return "converges", None


@functools.lru_cache(maxsize=None)
def reference(case_name, dtype):
    """(matrix cast to dtype, b, reference solution in float64, condition number)."""
    case = CASES_BY_NAME[case_name]
    A = np.asarray(case.matrix(), dtype=np.float64).astype(dtype)
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))
    b = rng.standard_normal(A.shape[0]).astype(dtype)
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    if case.least_squares:
        x = np.linalg.lstsq(A64, b64, rcond=None)[0]
    else:
        x = np.linalg.solve(A64, b64)
    return A, b, x, float(np.linalg.cond(A64))


def registry_params():
    for case in CASES:
        for method in METHODS:
            for dtype in (np.float32, np.float64):
                for be in backends_of(method, cuda=not case.slow):
                    if be in KINDS[case.kind][1]:
                        yield param(case.name, method, dtype, be, backend=be,
                                    marks=[pytest.mark.slow] if case.slow else [],
                                    id=f"{case.name}-{method}-{np.dtype(dtype).name}-{be}")


@pytest.mark.parametrize("case_name, method, dtype, be", list(registry_params()))
def test_registry(case_name, method, dtype, be):
    case = CASES_BY_NAME[case_name]
    A, b_np, x_ref, cond = reference(case_name, dtype)
    b = to_backend(b_np, be)
    op = make_operator(case.kind, A, be, like=b)
    s, (expect, reason) = solver(method), expectation(case, method)
    rtol = RTOL[dtype]
    if expect == "refuses":
        with pytest.raises(ValueError, match=f"method '{method}' needs .*{reason}"):
            lr.solve(op, b, method=method, rtol=rtol, maxiter=case.maxiter)
        return
    if s.needs_symmetric and op.symmetric is False:
        # The operator's structure tag says it is not symmetric: refused up front (issue 10).
        with pytest.raises(ValueError, match=f"method '{method}' needs a symmetric"):
            lr.solve(op, b, method=method, rtol=rtol, maxiter=case.maxiter)
        assert op.matvec_count == 0
        return
    # A least-squares solution is what the inconsistent case asks for.
    opts = {"least_squares": True} if case.least_squares and "least_squares" in s.options else {}
    res = lr.solve(op, b, method=method, rtol=rtol, maxiter=case.maxiter, **opts)
    assert res.method == method
    assert_like(res.x, b, op.shape[1])
    x = to_np(res.x)
    assert np.all(np.isfinite(x)), "x must never hold NaN or inf"
    np.testing.assert_array_equal(to_np(b), b_np)  # b untouched
    assert isinstance(res.status, lr.Status) and res.message
    if expect == "fails":
        assert not res.success, f"{method} cannot converge on {case_name} but reported {res.status}"
        assert res.status is not lr.Status.CONVERGED and res.converged is False
        return
    A64, x64, b64 = A.astype(np.float64), x.astype(np.float64), b_np.astype(np.float64)
    resid = np.linalg.norm(b64 - A64 @ x64)
    # The rounding of one product in the working dtype.
    slack = op.shape[0] * EPS[dtype] * np.linalg.norm(A64, 2) * np.linalg.norm(x64)
    if opts:
        # x minimises the residual without solving the system: a success only because the
        # least-squares solution was asked for, and never called converged.
        assert res.status is lr.Status.LEAST_SQUARES, res.message
        assert res.success and res.converged is False
    else:
        assert res.status is lr.Status.CONVERGED, res.message
        assert res.success and res.converged is True
        # CONVERGED is a claim about the x returned: its true residual meets the tolerance.
        assert resid <= rtol * np.linalg.norm(b64) + slack, res.message
    # The reported residual is the true one of the x returned.
    assert abs(res.residual_norm - resid) <= 0.05 * resid + slack + 10 * EPS[dtype] * np.linalg.norm(b64)
    assert res.residual_history.shape == (res.iterations + 1,)
    assert res.iterations >= 1 and res.matvecs + res.rmatvecs >= 1
    if not s.needs_rmatvec:
        assert res.rmatvecs == 0, "a method that needs no rmatvec applied A^H"
    # ||x - x*|| / ||x*|| <= kappa ||b - A x|| / ||b||; then the roundoff of the dtype.
    bound = 10.0 * (cond**2 * np.sqrt(op.shape[1]) if case.least_squares else cond)
    err = np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref)
    assert err <= bound * (rtol + 50 * op.shape[0] * EPS[dtype]), (
        f"{method} on {case_name}: relative error {err:.2e} (cond {cond:.1f}); {res.message}"
    )


def test_registry_covers_every_method():
    """Each registered method has a case where it must converge, on each backend it serves."""
    params = list(registry_params())
    assert {p.values[1] for p in params} == set(_REGISTRY)
    for method in _REGISTRY:
        good = [c for c in CASES if expectation(c, method)[0] == "converges" and not c.slow]
        assert good, f"no case where {method} must converge"


TWINS = [(m, f"scipy.{m}") for m in OWN if f"scipy.{m}" in METHODS]
TWIN_CASES = ("closure_spd_contractive", "spd", "convection_diffusion", "rbp_I_minus_JT",
              "convection_diffusion_256", "laplacian_256")


@pytest.mark.parametrize("own, twin, case_name", [
    pytest.param(own, twin, c, id=f"{own}-{c}")
    for own, twin in TWINS for c in TWIN_CASES
    if expectation(CASES_BY_NAME[c], own)[0] == "converges"
])
def test_own_method_matches_its_scipy_twin(own, twin, case_name):
    """The same algorithm takes the same number of iterations (+-1: scipy's BiCGStab may stop
    at a half step; +-2% on the big systems, where rounding accumulates) and products as
    scipy's implementation, and gives the same x."""
    A, b, x_ref, cond = reference(case_name, np.float64)
    r1 = lr.solve(A, b, method=own, rtol=1e-8, maxiter=3000)
    r2 = lr.solve(A, b, method=twin, rtol=1e-8, maxiter=3000)
    assert r1.status is r2.status is lr.Status.CONVERGED
    slack = max(1, int(0.02 * r2.iterations))
    assert abs(r1.iterations - r2.iterations) <= slack
    assert abs(r1.matvecs + r1.rmatvecs - r2.matvecs - r2.rmatvecs) <= 2 * slack
    np.testing.assert_allclose(r1.x, r2.x, rtol=0, atol=20 * cond * 1e-8 * np.linalg.norm(x_ref))


# -------------------------------------------------------------------------------------------
# the contract, for every method


def small_system(be, dtype=np.float64, n=12, seed=10):
    """SPD with eigenvalues in [0.3, 1.7], as a closure: every method converges on it."""
    A = spd(n, seed=seed)[0].astype(dtype)
    b_np = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    b = to_backend(b_np, be)
    return A, b_np, b, make_operator("closure", A, be, like=b)


def _callback(method, seen, record=lambda k, x, r: (k, x, r)):
    """A callback appending to ``seen``, or None (checked to be refused) for a method that
    takes none."""
    if solver(method).accepts_callback:
        return lambda k, x, r: seen.append(record(k, x, r))
    with pytest.raises(ValueError, match="takes no callback"):
        lr.solve(np.eye(2), np.ones(2), method=method, callback=lambda *a: None)
    return None


# Methods whose history entry of iteration k is the residual of iterate k - 1 (the newest
# Neumann term, the last fixed-point step), free of products; the residual norm they report
# is that of the x returned, checked with one product (not in fixed-budget mode).
STALE_HISTORY = {"neumann", "fixed_point"}


@pytest.mark.parametrize("method, be", method_params())
def test_residual_history_has_one_entry_per_iteration(method, be):
    A, b_np, b, op = small_system(be)
    res = lr.solve(op, b, method=method, rtol=1e-8)
    assert res.status is lr.Status.CONVERGED, res.message
    assert res.residual_history.shape == (res.iterations + 1,)
    np.testing.assert_allclose(res.residual_history[0], np.linalg.norm(b_np), rtol=1e-12)
    # The reported residual norm is the true one of the x returned.
    true = np.linalg.norm(b_np - A @ to_np(res.x))
    assert res.residual_norm == pytest.approx(true, rel=1e-6, abs=1e-15 * np.linalg.norm(b_np))
    if method not in STALE_HISTORY:
        assert res.residual_history[-1] == pytest.approx(res.residual_norm, rel=1e-12)
    assert res.residual_norm <= 1e-8 * np.linalg.norm(b_np)
    # A system solved in two steps: the last entry is the final residual.
    A, B_np, Bb, op = _two_systems(be)
    res = lr.solve(op, Bb[0, ...], method=method, rtol=RTOL_BATCH)
    assert res.status is lr.Status.CONVERGED, res.message
    assert res.residual_history.shape == (res.iterations + 1,)
    if method not in STALE_HISTORY:
        assert res.residual_history[-1] == pytest.approx(res.residual_norm, rel=1e-6, abs=1e-14)
    assert res.residual_history[-1] <= RTOL_BATCH * np.linalg.norm(B_np[0])


@pytest.mark.parametrize("method, be", method_params())
def test_callback_sees_every_iteration_up_to_the_last(method, be):
    A, B_np, Bb, op = _two_systems(be)
    seen = []
    callback = _callback(method, seen, lambda k, x, r: (k, None if x is None else to_np(x), float(r)))
    if callback is None:
        return
    res = lr.solve(op, Bb[0, ...], method=method, rtol=RTOL_BATCH, callback=callback)
    assert res.status is lr.Status.CONVERGED, res.message
    assert [k for k, _, _ in seen] == list(range(1, res.iterations + 1))
    assert seen[-1][2] == pytest.approx(res.residual_history[-1], rel=1e-12)
    assert seen[-1][2] <= RTOL_BATCH * np.linalg.norm(B_np[0])
    if seen[-1][1] is not None:
        np.testing.assert_array_equal(seen[-1][1], to_np(res.x))


@pytest.mark.parametrize("method, be", method_params())
def test_maxiter_one_reports_max_iterations_with_one_callback(method, be):
    A, b_np, b, op = small_system(be)
    calls = []
    kw = dict(rtol=1e-10, maxiter=1, **solver(method).outer_iterations)
    res = lr.solve(op, b, method=method, callback=_callback(method, calls), **kw)
    assert res.status is lr.Status.MAX_ITERATIONS, res.message
    assert not res.success and res.converged is False
    assert res.iterations == 1
    assert "maxiter" in res.message
    assert np.all(np.isfinite(to_np(res.x)))
    if solver(method).accepts_callback:
        assert len(calls) == 1 and calls[0][0] == 1
        assert calls[0][1] is None or tuple(calls[0][1].shape) == (A.shape[1],)
    with pytest.raises(lr.SolveError):
        lr.solve(op, b, method=method, throw=True, **kw)


@pytest.mark.parametrize("method, be", method_params([m for m in METHODS if solver(m).outer_iterations]))
def test_maxiter_one_is_one_outer_iteration(method, be):
    """maxiter=1 runs one outer iteration, seen by one callback; with the default inner basis,
    larger than n, that iteration solves the system exactly, which is CONVERGED."""
    A, b_np, b, op = small_system(be)
    calls = []
    res = lr.solve(op, b, method=method, rtol=1e-10, maxiter=1, callback=lambda *a: calls.append(a))
    assert res.status is lr.Status.CONVERGED, res.message
    assert len(calls) == 1 and calls[0][0] == 1 and res.iterations == 1
    assert res.matvecs >= A.shape[0]  # one outer iteration holds a whole inner solve
    assert float(calls[0][2]) == pytest.approx(res.residual_norm, rel=1e-12)
    np.testing.assert_allclose(to_np(res.x), np.linalg.solve(A, b_np), rtol=1e-7)


@pytest.mark.parametrize("method, be", method_params())
def test_inputs_unchanged_and_x0_used(method, be):
    A, b_np, b, op = small_system(be)
    x_ref = np.linalg.solve(A, b_np)
    x0_np = x_ref + 1e-3 * np.random.default_rng(0).standard_normal(b_np.shape)
    x0 = to_backend(x0_np, be)
    res = lr.solve(op, b, method=method, x0=x0, rtol=1e-9)
    np.testing.assert_array_equal(to_np(b), b_np)
    np.testing.assert_array_equal(to_np(x0), x0_np)
    assert res.status is lr.Status.CONVERGED, res.message
    assert_like(res.x, b, A.shape[1])
    np.testing.assert_allclose(to_np(res.x), x_ref, rtol=1e-6)
    # Starting near the solution has to help: the initial residual is that of x0.
    np.testing.assert_allclose(res.residual_history[0], np.linalg.norm(b_np - A @ x0_np), rtol=1e-6)
    # Changing the result must not change b or x0 (no aliasing).
    if be == "numpy":
        res.x[...] = 7.0
    elif be in ("torch", "cuda"):
        res.x.fill_(7.0)
    np.testing.assert_array_equal(to_np(b), b_np)
    np.testing.assert_array_equal(to_np(x0), x0_np)
    # Starting at the solution: converged at once; a Krylov method of the package's own
    # checks x0's residual (one product) and takes no iteration.
    res = lr.solve(op, b, method=method, x0=to_backend(x_ref, be), rtol=1e-8)
    assert res.status is lr.Status.CONVERGED and res.iterations <= 1, res.message
    if method in OWN and method not in CONTRACTIVE:
        assert res.iterations == 0 and res.matvecs == 1 and res.rmatvecs == 0


# Products of a fixed budget of K iterations from x0 = 0, per method: the cost of one
# iteration, and what starting and finishing cost.
FIXED_BUDGET_PRODUCTS = {
    "fixed_point": lambda K: (K - 1, 0),  # the first iterate, b, is free
    "neumann": lambda K: (K, 0),
    "cg": lambda K: (K, 0),
    "minres": lambda K: (K, 0),
    "cgne": lambda K: (K, K),  # one JVP and one VJP
    "gmres": lambda K: (K + 1, 0),  # one per Arnoldi step, one for the cycle's residual
    "bicgstab": lambda K: (2 * K + 1, 0),  # two per iteration, one for the final residual
    "lsqr": lambda K: (K, K + 1),  # A^H once more, to start the bidiagonalisation
}


@pytest.mark.parametrize("method, be", method_params(cuda=True))
def test_fixed_budget_runs_exactly_maxiter(method, be):
    A, b_np, b, op = small_system(be)
    K = 5
    if not solver(method).accepts_fixed_budget:
        with pytest.raises(ValueError, match="fixed budget"):
            lr.solve(op, b, method=method, rtol=None, atol=None, maxiter=K)
        return
    calls = []
    res = lr.solve(op, b, method=method, rtol=None, atol=None, maxiter=K, callback=lambda k, x, r: calls.append(k))
    assert res.status is lr.Status.COMPLETED and res.success and res.converged is False, res.message
    assert res.iterations == K and calls == list(range(1, K + 1))
    assert res.residual_history.shape == (K + 1,)
    assert res.residual_history[-1] < res.residual_history[0]
    assert (res.matvecs, res.rmatvecs) == FIXED_BUDGET_PRODUCTS[method](K)
    true = np.linalg.norm(b_np - A @ to_np(res.x))
    assert true < np.linalg.norm(b_np)
    if method not in STALE_HISTORY:  # theirs is that of the last iterate but one (free)
        assert res.residual_norm == pytest.approx(true, rel=1e-8)
    with pytest.raises(ValueError, match="maxiter"):
        lr.solve(op, b, method=method, rtol=None, atol=None)


@pytest.mark.parametrize("method", METHODS)
def test_complex_systems(method):
    """Complex data: a Hermitian matrix for the methods that need one, else a non-Hermitian
    one; both are contractions, so every method converges."""
    n = 20
    rng = np.random.default_rng(18)
    if solver(method).needs_symmetric:
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)))
        A = (Q * np.linspace(0.3, 1.7, n)) @ Q.conj().T
        A = (A + A.conj().T) / 2
    else:
        A = np.eye(n) + 0.15 * (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) / np.sqrt(n)
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    res = lr.solve(A, b, method=method, rtol=1e-10, maxiter=2000)
    assert res.status is lr.Status.CONVERGED and res.x.dtype == np.complex128, res.message
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-7)


@pytest.mark.parametrize("method, be", [p for p in method_params(cuda=True) if p.values[1] != "strict"])
def test_jacobi_preconditioner_needs_fewer_iterations(method, be):
    """A badly scaled SPD matrix, and the Jacobi preconditioner that undoes the scaling; the
    stopping test is on the user's residual ``b - A x``, also when preconditioned. A method
    that takes no preconditioner refuses one."""
    n = 60
    S, _ = spd(n, 1.0, 4.0, seed=8)
    d = np.logspace(0, 2, n)
    A_np = d[:, None] * S * d[None, :]
    b_np = np.random.default_rng(9).standard_normal(n)
    A, b, M = to_backend(A_np, be), to_backend(b_np, be), to_backend(np.diag(1.0 / np.diag(A_np)), be)
    if not solver(method).accepts_preconditioner:
        with pytest.raises(ValueError, match="preconditioner M"):
            lr.solve(A, b, method=method, M=M)
        return
    plain = lr.solve(A, b, method=method, rtol=1e-8, maxiter=3000)
    prec = lr.solve(A, b, method=method, rtol=1e-8, maxiter=3000, M=M)
    assert prec.status is lr.Status.CONVERGED, prec.message
    assert prec.iterations < plain.iterations / 2
    assert lb.same_device(prec.x, b)
    assert np.linalg.norm(b_np - A_np @ to_np(prec.x)) <= 1e-8 * np.linalg.norm(b_np)
    np.testing.assert_allclose(to_np(prec.x), np.linalg.solve(A_np, b_np), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_check_every(method):
    """Testing the residual every fifth iteration still stops at the tolerance, honestly."""
    A, b_np, b, op = small_system("numpy")
    res = lr.solve(op, b, method=method, rtol=1e-8, check_every=5)
    assert res.status is lr.Status.CONVERGED, res.message
    assert np.linalg.norm(b_np - A @ res.x) <= 1e-8 * np.linalg.norm(b_np)


def nan_after(A, be, b, k):
    """An operator whose products return NaN from the ``k+1``-th product on (counting
    products with ``A`` and ``A^H`` together)."""
    M = to_backend(A, be)
    xp = lb.array_namespace(M)
    MT = xp.matrix_transpose(M)
    count = [0]

    def prod(x, W):
        count[0] += 1
        y = x @ W
        return y if count[0] <= k else y * float("nan")

    return lr.LinearOperator(A.shape, matvec=lambda x: prod(x, MT), rmatvec=lambda y: prod(y, M), like=b)


@pytest.mark.parametrize("method, be", method_params())
def test_nonfinite_products_give_nonfinite_and_finite_x(method, be):
    A, b_np, b, _ = small_system(be, n=16)
    op = nan_after(A, be, b, 3)
    res = lr.solve(op, b, method=method, rtol=1e-12)
    assert res.status is lr.Status.NONFINITE, res.message
    assert not res.success
    assert np.all(np.isfinite(to_np(res.x)))
    assert_like(res.x, b, A.shape[1])


def _rbp_operator(J, be, b):
    return lr.IdentityOperator(J.shape[0], like=b) - lr.aslinearoperator(to_backend(J, be)).T


@pytest.mark.parametrize("method, be", method_params(CONTRACTIVE))
def test_spectral_radius_two_is_not_a_success(method, be):
    n = 16
    J = random_contractive(n, rho=2.0, seed=11)
    b = to_backend(np.random.default_rng(11).standard_normal(n), be)
    op = _rbp_operator(J, be, b)
    res = lr.solve(op, b, method=method, rtol=1e-6, maxiter=500)
    assert not res.success and res.status in (lr.Status.DIVERGED, lr.Status.MAX_ITERATIONS)
    assert np.all(np.isfinite(to_np(res.x)))
    assert "spectral radius" in res.message or "maxiter" in res.message
    # Fixed-budget mode does not turn a divergent iteration into a success either.
    res = lr.solve(op, b, method=method, rtol=None, atol=None, maxiter=60)
    assert res.status is lr.Status.DIVERGED and not res.success
    assert np.all(np.isfinite(to_np(res.x)))


@pytest.mark.parametrize("K", [1, 4, 20])
@pytest.mark.parametrize("be", backend_params())
@pytest.mark.parametrize("batched", [False, True])
def test_proposition_3_fixed_point_equals_neumann(K, be, batched):
    """Liao et al. (2018), Proposition 3: K+1 RBP iterations from zero equal K-term
    Neumann-RBP, at the same number of products."""
    n = 20
    J = random_contractive(n, rho=0.8, seed=13)
    shape = (3, n) if batched else (n,)
    b = to_backend(np.random.default_rng(13).standard_normal(shape), be)
    JT = lr.aslinearoperator(to_backend(J, be)).T
    op = lr.IdentityOperator(n, like=b) - JT
    kw = dict(rtol=None, atol=None, batch_dims=int(batched))
    fp = lr.solve(op, b, method="fixed_point", maxiter=K + 1, **kw)
    ne = lr.solve(op, b, method="neumann", maxiter=K, **kw)
    np.testing.assert_allclose(to_np(fp.x), to_np(ne.x), rtol=1e-12, atol=1e-12)
    assert fp.matvecs == ne.matvecs == K and fp.rmatvecs == ne.rmatvecs == 0
    # ... and both are the truncated series sum_{k<=K} (J^T)^k b, counted on J as VJPs.
    series, term = np.zeros(shape), to_np(b)
    for _ in range(K + 1):
        series, term = series + term, term @ J
    np.testing.assert_allclose(to_np(ne.x), series, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------
# the facade


def _bad_solve_calls():
    n = 6
    A = np.eye(n) * 2.0
    b = np.ones(n)
    t64 = lambda: torch.ones(n, dtype=torch.float64)  # noqa: E731
    return {
        "unknown method": (lambda: lr.solve(A, b, method="nope"), ValueError, "method must be one of"),
        "method not a string": (lambda: lr.solve(A, b, method=3), TypeError, "method must be a string"),
        "negative rtol": (lambda: lr.solve(A, b, rtol=-1.0), ValueError, "rtol"),
        "rtol not a number": (lambda: lr.solve(A, b, rtol="1e-5"), ValueError, "rtol"),
        "negative atol": (lambda: lr.solve(A, b, atol=-1.0), ValueError, "atol"),
        "maxiter zero": (lambda: lr.solve(A, b, method="neumann", maxiter=0), ValueError, "maxiter"),
        "maxiter float": (lambda: lr.solve(A, b, method="neumann", maxiter=2.5), ValueError, "maxiter"),
        "callback not callable": (lambda: lr.solve(A, b, method="neumann", callback=1), TypeError, "callback"),
        "x0 wrong shape": (lambda: lr.solve(A, b, method="neumann", x0=np.ones(n + 1)), ValueError, "x0"),
        "x0 wrong dtype": (lambda: lr.solve(A, b, method="neumann", x0=np.ones(n, np.float32)), TypeError, "x0"),
        "x0 wrong backend": (lambda: lr.solve(A, b, method="neumann", x0=t64()), TypeError, "x0"),
        "x0 not an array": (lambda: lr.solve(A, b, method="neumann", x0=[0.0] * n), TypeError, "x0"),
        "b wrong shape": (lambda: lr.solve(A, np.ones(n + 1), method="neumann"), ValueError, "b must have shape"),
        "b batched without batch_dims": (lambda: lr.solve(A, np.ones((2, n)), method="neumann"), ValueError, "b must have shape"),
        "b integer": (lambda: lr.solve(lr.IdentityOperator(n), np.ones(n, dtype=int), method="neumann"), TypeError, "b must have a floating dtype"),
        "b wrong backend": (lambda: lr.solve(A, t64(), method="neumann"), TypeError, "b is a torch array"),
        "b not an array": (lambda: lr.solve(A, [1.0] * n, method="neumann"), TypeError, "b must be an array"),
        "A not an operator": (lambda: lr.solve("A", b, method="neumann"), TypeError, "A must be"),
        "unknown option": (lambda: lr.solve(A, b, method="neumann", tolerance=1e-3), TypeError, "unknown option"),
        "batch_dims": (lambda: lr.solve(A, b, method="neumann", batch_dims=2), ValueError, "batch_dims"),
        "check_every": (lambda: lr.solve(A, b, method="neumann", check_every=0), ValueError, "check_every"),
        "divtol": (lambda: lr.solve(A, b, method="neumann", divtol=-1.0), ValueError, "divtol"),
    }


@pytest.mark.parametrize("name", [pytest.param(k, marks=[needs_torch] if "backend" in k else [])
                                  for k in _bad_solve_calls()])
def test_solve_bad_input_names_the_argument(name):
    fn, exc, pattern = _bad_solve_calls()[name]
    with pytest.raises(exc, match=pattern):
        fn()


def test_throw_raises_solve_error_with_the_result():
    n = 12
    J = random_contractive(n, rho=0.95, seed=14)
    b = np.ones(n)
    op = lr.IdentityOperator(n, like=b) - lr.aslinearoperator(J).T
    with pytest.raises(lr.SolveError) as info:
        lr.solve(op, b, method="fixed_point", rtol=1e-12, maxiter=3, throw=True)
    res = info.value.result
    assert isinstance(res, lr.SolveResult) and res.status is lr.Status.MAX_ITERATIONS
    assert res.message in str(info.value) and "fixed_point" in str(info.value)
    # throw=True on a successful solve returns normally.
    assert lr.solve(op, b, method="fixed_point", rtol=1e-6, maxiter=1000, throw=True).success
    assert lr.solve(op, b, method="neumann", rtol=None, atol=None, maxiter=3, throw=True).success


def test_auto_picks_gmres_without_rmatvec():
    n = 10
    A = nonsymmetric(n, 15, shift=3.0)
    b = np.ones(n)
    op = lr.LinearOperator((n, n), matvec=lambda x: x @ A.T, like=b)
    res = lr.solve(op, b, rtol=1e-8)
    assert res.method == "gmres" and res.status is lr.Status.CONVERGED
    assert res.rmatvecs == 0
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-6)


def test_auto_picks_lsqr_for_rectangular():
    A = rectangular(9, 5, 16)
    b = np.ones(9)
    res = lr.solve(A, b, rtol=1e-10)
    # b is not in the range of A: the least-squares solution, not a solve.
    assert res.method == "lsqr" and res.status is lr.Status.LEAST_SQUARES and not res.success
    np.testing.assert_allclose(res.x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-6)
    res = lr.solve(A, b, rtol=1e-10, least_squares=True)
    assert res.method == "lsqr" and res.success
    np.testing.assert_allclose(res.x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-6)


# -------------------------------------------------------------------------------------------
# batched solves


def _two_systems(be):
    """Row 0 of ``b`` lies in the span of two eigenvectors of ``A`` (eigenvalues 1 and 0.95):
    Krylov methods solve it in two steps and fixed-point iteration contracts it by 0.05 a
    step, so every method converges on it within 10 iterations, with a small but nonzero
    residual, so that an unfrozen system would keep changing. Row 1 needs more than 10."""
    n = 20
    d = np.linspace(0.3, 1.7, n)
    d[0], d[1] = 1.0, 0.95
    Q, _ = np.linalg.qr(np.random.default_rng(17).standard_normal((n, n)))
    A = (Q * d) @ Q.T
    B_np = np.stack([Q[:, 0] + Q[:, 1], np.random.default_rng(18).standard_normal(n)])
    Bb = to_backend(B_np, be)
    return A, B_np, Bb, make_operator("closure", A, be, like=Bb[0, ...])


RTOL_BATCH, MAXITER_BATCH = 1e-10, 10


def _batchable(method, A, Bb, op, be):
    """``op``, or for a method that solves a batch one system at a time (a scipy bridge)
    the matrix ``A`` as an operator: such methods refuse closures, which may act per system,
    with batch_dims=1 (checked here), and serve operators known to act row by row."""
    if solver(method).batched_products:
        return op
    with pytest.raises(ValueError, match="row by row"):
        lr.solve(op, Bb, method=method, batch_dims=1)
    assert op.matvec_count == 0
    return make_operator("dense", A, be)


@pytest.mark.parametrize("method, be", method_params())
def test_batched_solve_has_per_system_statuses(method, be):
    A, B_np, Bb, op = _two_systems(be)
    op = _batchable(method, A, Bb, op, be)
    n = A.shape[0]
    res = lr.solve(op, Bb, method=method, rtol=RTOL_BATCH, maxiter=MAXITER_BATCH, batch_dims=1,
                   **solver(method).outer_iterations)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.MAX_ITERATIONS), res.message
    assert res.status is lr.Status.MAX_ITERATIONS and not res.success
    assert "1 CONVERGED" in res.message and "1 MAX_ITERATIONS" in res.message
    np.testing.assert_array_equal(res.converged, [True, False])
    assert np.shape(res.residual_norm) == (2,)
    assert res.residual_history.shape[1:] == (2,)
    assert_like(res.x, Bb, n)
    np.testing.assert_allclose(to_np(res.x)[0], np.linalg.solve(A, B_np[0]), rtol=1e-8)
    np.testing.assert_array_equal(to_np(Bb), B_np)


@pytest.mark.parametrize("method, be", method_params())
def test_batched_converged_systems_stop_changing(method, be):
    A, B_np, Bb, op = _two_systems(be)
    seen = []
    callback = _callback(method, seen, lambda k, x, r: (k, None if x is None else to_np(x), to_np(r)))
    if callback is None:
        return
    op = _batchable(method, A, Bb, op, be)
    res = lr.solve(op, Bb, method=method, rtol=RTOL_BATCH, maxiter=MAXITER_BATCH, batch_dims=1,
                   callback=callback, **solver(method).outer_iterations)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.MAX_ITERATIONS), res.message
    assert [k for k, _, _ in seen] == list(range(1, res.iterations + 1))
    assert all(r.shape == (2,) for _, _, r in seen)
    # the iteration at which system 0 met its tolerance
    thr = RTOL_BATCH * np.linalg.norm(B_np[0])
    first = next(i for i, (_, _, r) in enumerate(seen) if r[0] <= thr)
    assert first < len(seen) - 1, "system 0 should converge before the last iteration"
    for _, xk, r in seen[first:]:
        assert r[0] == seen[first][2][0]
        if xk is not None:  # methods that form x every iteration: row 0 is frozen
            np.testing.assert_array_equal(xk[0], seen[first][1][0])
    if seen[-1][1] is not None:
        np.testing.assert_array_equal(to_np(res.x)[0], seen[first][1][0])
        assert not np.array_equal(seen[-1][1][1], seen[-2][1][1])  # system 1 still moves


@pytest.mark.parametrize("method, be", method_params(cuda=True))
def test_batched_systems_are_independent(method, be):
    """Right-hand sides in 3, 8 and 15 eigendirections: Krylov methods converge in about that
    many iterations, so at different ones. In the batch each system meets its tolerance at
    the iteration it does alone (+-1 for the rounding of batched products) and gets the x it
    gets alone."""
    n, rtol = 30, 1e-8
    A, Q = spd(n, seed=6)
    rng = np.random.default_rng(7)
    B = np.stack([Q[:, :k] @ rng.standard_normal(k) for k in (3, 8, 15)])
    Bb = to_backend(B, be)
    res = lr.solve(make_operator("dense", A, be), Bb, method=method, rtol=rtol, batch_dims=1, maxiter=300)
    assert res.statuses == (lr.Status.CONVERGED,) * 3, res.message
    assert_like(res.x, Bb, n)
    x = to_np(res.x)
    thr = rtol * np.linalg.norm(B, axis=1)
    for i in range(3):
        single = lr.solve(A, B[i], method=method, rtol=rtol, maxiter=300)
        first = int(np.argmax(res.residual_history[:, i] <= thr[i]))
        assert abs(first - single.iterations) <= 1, (i, first, single.iterations)
        np.testing.assert_allclose(x[i], single.x, rtol=1e-6)
        np.testing.assert_allclose(x[i], np.linalg.solve(A, B[i]), rtol=1e-6)


# -------------------------------------------------------------------------------------------
# property tests


def _random_system(seed, n, symmetric):
    """Well conditioned: singular values in [0.5, 1.5], ``I - A`` of norm <= 0.5."""
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((n, n))
    if symmetric:
        R = R + R.T
    A = np.eye(n) + 0.5 * R / np.linalg.norm(R, 2)
    return A, rng.standard_normal(n)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10))
def test_property_random_well_conditioned_systems(method, seed, n):
    A, b = _random_system(seed, n, symmetric=solver(method).needs_symmetric)
    res = lr.solve(A, b, method=method, rtol=1e-10, maxiter=500)
    assert res.status is lr.Status.CONVERGED, res.message
    x = np.linalg.solve(A, b)
    np.testing.assert_allclose(res.x, x, rtol=0, atol=1e-7 * np.linalg.norm(x))
    assert np.linalg.norm(b - A @ res.x) <= 1e-10 * np.linalg.norm(b) * 3


@pytest.mark.parametrize("method", OWN)
def test_zero_rhs_with_nonzero_x0_converges_to_zero(method):
    """A zero right-hand side is solved by x = 0 whatever x0 is (scipy returns zeros too)."""
    n = 6
    A = 3.0 * np.eye(n) + np.diag(np.ones(n - 1), 1) * 0.1
    A = (A + A.T) / 2
    if solver(method).needs_contraction:
        A = np.eye(n) - 0.3 * (A - 3.0 * np.eye(n))
    b = np.zeros((2, n))
    b[1, 0] = 1.0
    x0 = np.ones((2, n))
    res = lr.solve(A, b, method=method, x0=x0, rtol=1e-10, batch_dims=1)
    assert res.statuses[0] == lr.Status.CONVERGED
    assert np.all(res.x[0] == 0)
    assert res.success
    assert np.allclose(A @ res.x[1], b[1], atol=1e-8)
    assert np.all(x0 == 1)
