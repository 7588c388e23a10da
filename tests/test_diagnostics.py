import numpy as np
import pytest

import linsolve_rbp as lr
from linsolve_rbp import diagnostics as dg


def _contractive(n, rho, seed):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    return M * (rho / np.abs(np.linalg.eigvals(M)).max())


def test_dot_test_passes_for_adjoint_pair_and_fails_for_wrong_one():
    M = np.random.default_rng(0).standard_normal((5, 7))
    assert dg.dot_test(M).passed
    wrong = lr.LinearOperator((5, 5), matvec=lambda x: M[:, :5] @ x, rmatvec=lambda y: M[:, :5] @ y,
                              like=np.zeros(5))
    res = dg.dot_test(wrong)
    assert not res.passed and res.relative_error > 1e-3


def test_dot_test_needs_rmatvec():
    A = lr.LinearOperator((3, 3), matvec=lambda x: x, like=np.zeros(3))
    with pytest.raises(lr.MissingRmatvecError):
        dg.dot_test(A)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_norm_matches_dense_svd(seed):
    M = np.random.default_rng(seed).standard_normal((30, 30)) / 10
    est = dg.spectral_norm(M, maxiter=2000, rtol=1e-12)
    assert est == pytest.approx(np.linalg.norm(M, 2), rel=1e-4)
    assert est <= np.linalg.norm(M, 2) * (1 + 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_radius_arnoldi_matches_dense_eigenvalues(seed):
    M = np.random.default_rng(seed).standard_normal((25, 25))
    rho = np.abs(np.linalg.eigvals(M)).max()
    assert dg.spectral_radius(M, maxiter=25) == pytest.approx(rho, rel=1e-8)


def test_spectral_radius_power_for_dominant_real_eigenvalue():
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    M = Q @ np.diag(np.linspace(0.1, 0.95, 20)) @ Q.T
    assert dg.spectral_radius(M, method="power", maxiter=3000, rtol=1e-10) == pytest.approx(0.95, rel=1e-2)
    with pytest.raises(ValueError, match="method"):
        dg.spectral_radius(M, method="qr")


def test_spectral_radius_torch_operator_needs_start_vector():
    torch = pytest.importorskip("torch")
    M = torch.tensor(_contractive(6, 0.7, 0))
    with pytest.raises(TypeError, match="v0"):
        dg.spectral_radius(M)
    assert dg.spectral_radius(M, v0=torch.ones(6, dtype=torch.float64)) == pytest.approx(0.7, rel=1e-8)


@pytest.mark.parametrize("K", [1, 3, 10, 30])
def test_neumann_error_bound_holds(K):
    J = _contractive(15, 0.6, 4)
    J = J / (1.25 * np.linalg.norm(J, 2))  # ||J|| = 0.8
    g = np.random.default_rng(5).standard_normal(15)
    A = np.eye(15) - J.T
    exact = np.linalg.solve(A, g)
    res = lr.solve(A, g, method="neumann", rtol=None, atol=None, maxiter=K)
    err = np.linalg.norm(res.x - exact)
    bound = dg.neumann_error_bound(K, np.linalg.norm(J, 2), np.linalg.norm(g))
    assert err <= bound * (1 + 1e-10)
    assert bound < 10 * np.linalg.norm(g)


def test_neumann_error_bound_rejects_non_contraction():
    with pytest.raises(ValueError, match="norm_J"):
        dg.neumann_error_bound(5, 1.0)
    with pytest.raises(ValueError, match="K"):
        dg.neumann_error_bound(-1, 0.5)


def test_arguments_are_checked_by_the_shared_validators():
    M = np.eye(3) * 0.5
    with pytest.raises(TypeError, match="K must be a non-negative integer"):
        dg.neumann_error_bound(2.5, 0.5)
    with pytest.raises(ValueError, match="norm_J"):
        dg.neumann_error_bound(2, -0.1)
    with pytest.raises(ValueError, match="g_norm"):
        dg.neumann_error_bound(2, 0.5, -1.0)
    with pytest.raises(ValueError, match="maxiter must be a positive integer"):
        dg.spectral_norm(M, maxiter=0)
    with pytest.raises(ValueError, match="rtol"):
        dg.spectral_radius(M, rtol=-1.0)
    with pytest.raises(ValueError, match="did you mean 'power'"):
        dg.spectral_radius(M, method="powr")
    with pytest.raises(ValueError, match="rtol"):
        dg.dot_test(M, rtol=float("nan"))
