"""gmres and bicgstab: the package's Krylov methods for nonsymmetric operators.

Checked against numpy.linalg.solve on dense, scipy.sparse / torch sparse and closure operators,
in float32 and float64, on numpy, torch and array_api_strict; batched solves whose systems
converge at different steps; restarts; preconditioning; breakdowns; failure modes; and product
and iteration counts against scipy.sparse.linalg.
"""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

import linsolve_rbp as lr
from _backends import CASES, RTOL, to_backend
from _backends import make_operator as _make_operator
from linsolve_rbp.backend import to_numpy
from linsolve_rbp.problems import convection_diffusion

torch = pytest.importorskip("torch")
xps = pytest.importorskip("array_api_strict")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

METHODS = ["gmres", "bicgstab"]


def make_operator(kind, M, backend):
    """The operator without rmatvec: gmres and bicgstab need products with A only."""
    return _make_operator(kind, M, backend, rmatvec=False)


def nonsymmetric(n, seed=0, dtype=np.float64):
    """A well-conditioned nonsymmetric matrix (eigenvalues clustered around 3)."""
    rng = np.random.default_rng(seed)
    return (3.0 * np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n)).astype(dtype)


def diagonalisable(eigs, seed=0):
    """A nonsymmetric ``V diag(eigs) V^-1`` and its eigenvectors ``V``."""
    n = len(eigs)
    rng = np.random.default_rng(seed)
    V = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / np.sqrt(n)
    return V @ np.diag(eigs) @ np.linalg.inv(V), V


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend,kind", CASES)
def test_matches_dense_solve(method, dtype, backend, kind):
    n = 40
    M = nonsymmetric(n, dtype=dtype)
    b = np.random.default_rng(1).standard_normal(n).astype(dtype)
    rtol = RTOL[dtype]
    res = lr.solve(make_operator(kind, M, backend), to_backend(b, backend), method=method, rtol=rtol)
    assert res.status is lr.Status.CONVERGED and res.success and res.converged
    assert type(res.x) is type(to_backend(b, backend)) and res.x.dtype == to_backend(b, backend).dtype
    x = np.asarray(to_numpy(res.x), dtype=np.float64)
    x_ref = np.linalg.solve(M.astype(np.float64), b.astype(np.float64))
    r_true = np.linalg.norm(b - M.astype(np.float64) @ x)
    # The reported residual is the true one, and it meets the tolerance.
    assert r_true <= 1.01 * rtol * np.linalg.norm(b)
    assert res.residual_norm == pytest.approx(r_true, rel=0.05, abs=float(10 * np.finfo(dtype).eps * np.linalg.norm(b)))
    assert np.linalg.norm(x - x_ref) <= 10 * rtol * np.linalg.norm(x_ref)
    assert res.matvecs >= res.iterations >= 1 and res.rmatvecs == 0
    assert res.residual_history.shape == (res.iterations + 1,)


@pytest.mark.parametrize("method", METHODS)
def test_complex(method):
    n = 30
    rng = np.random.default_rng(2)
    M = nonsymmetric(n) + 1j * rng.standard_normal((n, n)) / np.sqrt(n)
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    res = lr.solve(M, b, method=method, rtol=1e-10)
    assert res.status is lr.Status.CONVERGED
    assert np.allclose(res.x, np.linalg.solve(M, b), rtol=1e-8, atol=0)


def test_gmres_float32_reaches_1e_5_on_200():
    n = 200
    M = nonsymmetric(n, seed=3, dtype=np.float32)
    b = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    res = lr.solve(M, b, method="gmres", rtol=1e-5)
    assert res.status is lr.Status.CONVERGED
    assert res.x.dtype == np.float32
    r = np.linalg.norm(b.astype(np.float64) - M.astype(np.float64) @ res.x.astype(np.float64))
    assert r <= 1e-5 * np.linalg.norm(b)


def test_gmres_float32_orthogonality_long_cycle():
    # One cycle of 150 steps on a slowly converging system: CGS2 keeps the basis orthogonal,
    # so float32 still reaches a tolerance close to its precision without restarting.
    A = convection_diffusion(14, dtype=np.float32)
    b = np.ones(A.shape[0], dtype=np.float32)
    res = lr.solve(A, b, method="gmres", rtol=1e-5, restart=150)
    assert res.status is lr.Status.CONVERGED and res.info["cycles"] <= 2
    assert np.linalg.norm(b - A @ res.x) <= 1e-5 * np.linalg.norm(b)


def test_gmres_restart_smaller_than_needed_converges():
    A = convection_diffusion(8)
    b = np.ones(64)
    res = lr.solve(A, b, method="gmres", rtol=1e-8, restart=5, maxiter=2000)
    assert res.status is lr.Status.CONVERGED
    assert res.info["cycles"] > 1 and res.info["restart"] == 5
    # One product per Arnoldi step plus one per cycle for the restart residual.
    assert res.matvecs == res.iterations + res.info["cycles"]
    assert np.allclose(res.x, sla.spsolve(A.tocsc(), b), rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_batched_systems_converge_at_their_own_step(method):
    eigs = np.linspace(1.0, 4.0, 12)
    A, V = diagonalisable(eigs)
    rng = np.random.default_rng(4)
    Bm = np.stack([
        rng.standard_normal(12),          # all 12 eigen-directions: the slowest
        V[:, 0] + V[:, 5],                # two: an invariant Krylov space of dimension 2
        V[:, 3],                          # one: exact after a single step
    ])
    seen = []
    res = lr.solve(A, Bm, method=method, rtol=1e-10, batch_dims=1,
                   callback=lambda k, x, r: seen.append(np.array(x)))
    assert res.status is lr.Status.CONVERGED and all(s is lr.Status.CONVERGED for s in res.statuses)
    assert np.allclose(res.x, np.linalg.solve(A, Bm.T).T, rtol=1e-8, atol=1e-10)
    hist = res.residual_history
    assert hist.shape == (res.iterations + 1, 3)
    for i in (1, 2):
        single = lr.solve(A, Bm[i], method=method, rtol=1e-10)
        k = single.iterations
        assert k < res.iterations
        # The system stopped at its own step: same history, and its x never changed after.
        assert np.allclose(hist[: k + 1, i], single.residual_history, rtol=1e-6, atol=1e-14)
        assert np.all(hist[k:, i] == hist[k, i])
        assert all(np.array_equal(seen[j][i], seen[-1][i]) for j in range(k - 1, len(seen)))
        assert np.allclose(res.x[i], single.x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_maxiter_one_reports_max_iterations_with_one_callback(method):
    A = convection_diffusion(6)
    calls = []
    res = lr.solve(A, np.ones(36), method=method, maxiter=1, callback=lambda k, x, r: calls.append((k, x.shape, float(r))))
    assert res.status is lr.Status.MAX_ITERATIONS and not res.success and not res.converged
    assert len(calls) == 1 and calls[0][:2] == (1, (36,))
    assert res.iterations == 1
    assert "maxiter" in res.message
    with pytest.raises(lr.SolveError):
        lr.solve(A, np.ones(36), method=method, maxiter=1, throw=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_b_and_x0_unchanged(method, backend):
    M = nonsymmetric(20)
    b_np = np.random.default_rng(5).standard_normal(20)
    x0_np = np.random.default_rng(6).standard_normal(20)
    b, x0 = to_backend(b_np.copy(), backend), to_backend(x0_np.copy(), backend)
    res = lr.solve(to_backend(M, backend), b, method=method, x0=x0, rtol=1e-10)
    assert res.converged
    assert np.array_equal(to_numpy(b), b_np) and np.array_equal(to_numpy(x0), x0_np)
    assert np.allclose(to_numpy(res.x), np.linalg.solve(M, b_np), rtol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_fixed_budget_runs_exactly_maxiter(method):
    A = convection_diffusion(8)
    b = np.ones(64)
    res = lr.solve(A, b, method=method, rtol=None, atol=None, maxiter=7)
    assert res.status is lr.Status.COMPLETED and res.success
    assert res.iterations == 7 and res.residual_history.shape == (8,)
    assert res.residual_norm == pytest.approx(np.linalg.norm(b - A @ res.x), rel=1e-10)
    assert res.residual_norm < np.linalg.norm(b)


def test_gmres_products_no_more_than_scipy_parity():
    # Same restart and tolerance: GMRES's products must match scipy's within 5%.
    for n, restart in [(16, 20), (20, 20), (24, 20), (16, 50), (24, 50)]:
        A = convection_diffusion(n)
        b = np.random.default_rng(n).standard_normal(A.shape[0])
        count = [0]

        def mv(v):
            count[0] += 1
            return A @ v

        L = sla.LinearOperator(A.shape, matvec=mv, dtype=A.dtype)
        _, info = sla.gmres(L, b, rtol=1e-8, restart=restart, maxiter=10_000)
        assert info == 0
        res = lr.solve(A, b, method="gmres", rtol=1e-8, restart=restart, maxiter=100_000)
        assert res.status is lr.Status.CONVERGED
        assert res.matvecs <= 1.05 * count[0], (n, restart, res.matvecs, count[0])


def test_bicgstab_iterations_close_to_scipy():
    for n in (12, 16, 24):
        A = convection_diffusion(n)
        b = np.random.default_rng(n).standard_normal(A.shape[0])
        its = [0]
        _, info = sla.bicgstab(A, b, rtol=1e-8, maxiter=10_000, callback=lambda xk: its.__setitem__(0, its[0] + 1))
        assert info == 0
        res = lr.solve(A, b, method="bicgstab", rtol=1e-8)
        assert res.status is lr.Status.CONVERGED
        # scipy skips its callback when it stops after a half step; allow that and rounding.
        assert abs(res.iterations - its[0]) <= 2, (n, res.iterations, its[0])


@pytest.mark.parametrize("method", METHODS)
def test_right_preconditioning(method):
    # Rows scaled over four orders of magnitude; Jacobi undoes the scaling.
    A = convection_diffusion(8)
    D = sp.diags(np.logspace(0, 4, 64))
    As = (D @ A).tocsr()
    b = As @ np.ones(64)
    Minv = sp.diags(1.0 / As.diagonal())
    plain = lr.solve(As, b, method=method, rtol=1e-8, maxiter=3000)
    pre = lr.solve(As, b, method=method, rtol=1e-8, M=Minv, maxiter=3000)
    assert pre.status is lr.Status.CONVERGED
    # The tested residual is the unpreconditioned b - A x.
    assert np.linalg.norm(b - As @ pre.x) <= 1e-8 * np.linalg.norm(b)
    assert np.allclose(pre.x, 1.0, rtol=1e-5)
    assert pre.iterations < plain.iterations


def test_gmres_lucky_breakdown_converges():
    A = np.diag(np.arange(1.0, 7.0))
    b = np.zeros(6)
    b[[1, 4]] = 1.0
    res = lr.solve(A, b, method="gmres", rtol=1e-12)
    assert res.status is lr.Status.CONVERGED and res.iterations == 2
    assert np.allclose(res.x, b / np.arange(1.0, 7.0))
    # Fixed budget: the exact solution stays put for the rest of the budget.
    res = lr.solve(A, b, method="gmres", rtol=None, atol=None, maxiter=10)
    assert res.status is lr.Status.COMPLETED and np.allclose(res.x, b / np.arange(1.0, 7.0))


def test_breakdowns_are_reported():
    # Singular A with b outside its range: GMRES cannot reduce the residual below 1.
    S = np.diag(np.r_[np.ones(5), 0.0])
    res = lr.solve(S, np.ones(6), method="gmres")
    assert res.status is lr.Status.BREAKDOWN and not res.success
    assert res.residual_norm == pytest.approx(1.0)
    # The permutation: <r_hat, A p> = 0 at the first step of BiCGStab.
    P = np.array([[0.0, 1.0], [1.0, 0.0]])
    res = lr.solve(P, np.array([1.0, 0.0]), method="bicgstab")
    assert res.status is lr.Status.BREAKDOWN and not res.success
    assert np.all(np.isfinite(res.x))


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_operator(method):
    M = nonsymmetric(10)

    def mv(x):
        y = x @ M.T
        return y * np.nan if mv.calls >= 3 else (setattr(mv, "calls", mv.calls + 1) or y)

    mv.calls = 0
    A = lr.LinearOperator((10, 10), matvec=mv, like=np.zeros(10))
    res = lr.solve(A, np.ones(10), method=method, rtol=1e-12)
    assert res.status is lr.Status.NONFINITE
    assert np.all(np.isfinite(res.x))


@pytest.mark.parametrize("method", METHODS)
def test_check_every(method):
    A = convection_diffusion(8)
    b = np.ones(64)
    res = lr.solve(A, b, method=method, rtol=1e-8, check_every=5)
    assert res.status is lr.Status.CONVERGED
    assert np.linalg.norm(b - A @ res.x) <= 1e-8 * np.linalg.norm(b)


def test_gmres_options_are_checked():
    with pytest.raises(ValueError, match="restart"):
        lr.solve(np.eye(3), np.ones(3), method="gmres", restart=0)
    with pytest.raises(TypeError, match="restart"):
        lr.solve(np.eye(3), np.ones(3), method="bicgstab", restart=5)


@pytest.mark.parametrize("method", METHODS)
def test_estimate_below_tolerance_is_not_passed_off_as_converged(method):
    # In float32 the residual that GMRES carries (or BiCGStab updates) falls far below 1e-7,
    # while the true residual stalls near 1e-6: the solve must say it did not converge, and
    # report the true residual.
    A = convection_diffusion(16, peclet=50.0, dtype=np.float32)
    b = np.ones(A.shape[0], dtype=np.float32)
    # restart=60: the first cycle's estimate meets the tolerance, so the true-residual check
    # (not only the adaptive inner tolerance of later cycles) must catch it.
    opts = {"restart": 60} if method == "gmres" else {}
    res = lr.solve(A, b, method=method, rtol=1e-7, maxiter=300, **opts)
    bnorm = np.linalg.norm(b)
    assert res.residual_history.min() <= 1e-7 * bnorm
    assert res.status is lr.Status.MAX_ITERATIONS and not res.converged
    r_true = np.linalg.norm(b.astype(np.float64) - A.astype(np.float64) @ res.x.astype(np.float64))
    assert r_true > 1e-7 * bnorm
    assert res.residual_norm == pytest.approx(r_true, rel=0.3)
