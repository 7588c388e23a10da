"""cgne (CG-RBP) and lsqr: the methods that use products with both A and A^H.

Checked against numpy.linalg.solve / lstsq on dense, scipy.sparse / torch sparse and closure
operators, in float32 and float64, on numpy, torch and array_api_strict; the RBP adjoint
system I - J^T; batched solves; damping; failure modes; and lsqr's iteration counts against
scipy.sparse.linalg.lsqr.
"""

import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import linsolve_rbp as lr
from _backends import CASES, RTOL, make_operator, rel_residual, to_backend
from linsolve_rbp.backend import to_numpy
from linsolve_rbp.problems import convection_diffusion, random_contractive

torch = pytest.importorskip("torch")
xps = pytest.importorskip("array_api_strict")
# torch warns once that its sparse CSR tensors are in beta; our sparse cases use them on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

METHODS = ["cgne", "lsqr"]


def adjoint_matrix(n, rho=0.8, seed=0, dtype=np.float64):
    """``I - J^T`` for a random nonsymmetric ``J`` of spectral radius ``rho``, and ``J``."""
    J = random_contractive(n, rho=rho, seed=seed)
    return (np.eye(n) - J.T).astype(dtype), J


def least_squares_problem(m, n, seed=0, dtype=np.float64):
    """A full-rank ``m x n`` matrix and a right-hand side outside its range."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, n))
    b = rng.standard_normal(m)
    return A.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend,kind", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_square_system_matches_dense_solve(method, backend, kind, dtype):
    n = 30
    A, _ = adjoint_matrix(n, seed=1, dtype=dtype)
    b = np.random.default_rng(2).standard_normal(n).astype(dtype)
    rtol = RTOL[dtype]
    bb = to_backend(b, backend)
    res = lr.solve(make_operator(kind, A, backend), bb, method=method, rtol=rtol)
    assert res.status is lr.Status.CONVERGED and res.converged and res.success
    assert type(res.x) is type(bb) and res.x.dtype == bb.dtype
    x = to_numpy(res.x)
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    ref = np.linalg.solve(A64, b64)
    assert rel_residual(A, x, b) <= 2 * rtol
    assert np.linalg.norm(x - ref) <= 2 * np.linalg.cond(A64) * rtol * np.linalg.norm(ref)
    if method == "lsqr":
        assert res.info["least_squares"] is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend,kind", CASES)
def test_lsqr_overdetermined_matches_lstsq(backend, kind, dtype):
    A, b = least_squares_problem(40, 25, seed=3, dtype=dtype)
    rtol = RTOL[dtype]
    bb = to_backend(b, backend)
    op = make_operator(kind, A, backend)
    res = lr.solve(op, bb, method="lsqr", rtol=rtol, least_squares=True)
    # Inconsistent: only the least-squares test can stop it, and the result says so; it is
    # a success because a least-squares solution was asked for.
    assert res.status is lr.Status.LEAST_SQUARES and res.info["least_squares"] is True
    assert res.success and not res.converged
    # Not asked for: the same x is no success.
    plain = lr.solve(op, bb, method="lsqr", rtol=rtol)
    assert plain.status is lr.Status.LEAST_SQUARES and not plain.success
    assert res.x.shape == (25,) and type(res.x) is type(bb) and res.x.dtype == bb.dtype
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    x = to_numpy(res.x).astype(np.float64)
    ref = np.linalg.lstsq(A64, b64, rcond=None)[0]
    cond = np.linalg.cond(A64)
    assert np.linalg.norm(x - ref) <= 2 * cond**2 * rtol * np.linalg.norm(ref)
    # The normal equations hold to the requested relative accuracy.
    r = b64 - A64 @ x
    assert np.linalg.norm(A64.T @ r) <= 2 * rtol * np.linalg.norm(A64) * np.linalg.norm(r)
    assert res.residual_norm == pytest.approx(np.linalg.norm(r), rel=1e-3)


def test_lsqr_underdetermined_gives_minimum_norm_solution():
    A, b = least_squares_problem(15, 40, seed=4)
    res = lr.solve(A, b, method="lsqr", rtol=1e-10)
    assert res.converged and res.info["least_squares"] is False
    assert res.x.shape == (40,)
    np.testing.assert_allclose(res.x, np.linalg.pinv(A) @ b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
def test_lsqr_damp_matches_augmented_lstsq(shape):
    A, b = least_squares_problem(*shape, seed=5)
    damp = 0.7
    res = lr.solve(A, b, method="lsqr", rtol=1e-10, damp=damp, least_squares=True)
    # The damped solution does not solve A x = b.
    assert res.status is lr.Status.LEAST_SQUARES and res.success
    n = shape[1]
    augmented = np.vstack([A, damp * np.eye(n)])
    ref = np.linalg.lstsq(augmented, np.concatenate([b, np.zeros(n)]), rcond=None)[0]
    np.testing.assert_allclose(res.x, ref, rtol=1e-7, atol=1e-10)
    # The reported residual is that of the user's system, not the damped one.
    assert res.residual_norm == pytest.approx(np.linalg.norm(b - A @ res.x), rel=1e-6)


def test_cgne_eta_solves_the_damped_normal_equations():
    A, _ = adjoint_matrix(20, seed=6)
    b = np.random.default_rng(7).standard_normal(20)
    eta = 0.1
    res = lr.solve(A, b, method="cgne", rtol=None, atol=None, maxiter=60, eta=eta)
    assert res.status is lr.Status.COMPLETED
    ref = np.linalg.solve(A.T @ A + eta * np.eye(20), A.T @ b)
    np.testing.assert_allclose(res.x, ref, rtol=1e-8)
    # ... which is not the solution of A x = b, and the reported residual shows it.
    assert res.residual_norm == pytest.approx(np.linalg.norm(b - A @ res.x), rel=1e-6)
    assert res.residual_norm > 1e-3 * np.linalg.norm(b)


@pytest.mark.parametrize("backend", ["numpy", "torch", "array_api_strict"])
def test_cgne_is_cg_rbp_on_the_adjoint_operator(backend):
    """CG-RBP: the adjoint system (I - J^T) z = b with one VJP and one JVP per iteration."""
    n = 40
    J = random_contractive(n, rho=0.9, seed=8)
    b_np = np.random.default_rng(9).standard_normal(n)
    b = to_backend(b_np, backend)
    A = lr.IdentityOperator(n, like=b) - lr.aslinearoperator(to_backend(J, backend)).T
    res = lr.solve(A, b, method="cgne", rtol=1e-8)
    assert res.converged
    np.testing.assert_allclose(to_numpy(res.x), np.linalg.solve(np.eye(n) - J.T, b_np), rtol=1e-6)
    # One VJP and one JVP per iteration, and one more product to check the claim.
    assert res.rmatvecs == res.iterations > 0 and res.matvecs == res.iterations + 1


@pytest.mark.parametrize("method", METHODS)
def test_batched_systems_are_independent(method):
    n = 30
    A, _ = adjoint_matrix(n, seed=10)
    U, _, _ = np.linalg.svd(A)
    rng = np.random.default_rng(11)
    # Right-hand sides in 3, 8 and 15 left singular directions: CGNE and LSQR then
    # converge in that many iterations (an abrupt drop of the residual), so at different ones.
    B = np.stack([U[:, :3] @ rng.standard_normal(3), U[:, :8] @ rng.standard_normal(8),
                  U[:, :15] @ rng.standard_normal(15)])
    rtol = 1e-8
    snaps = []
    res = lr.solve(A, B, method=method, rtol=rtol, batch_dims=1,
                   callback=lambda k, x, r: snaps.append(x.copy()))
    assert res.statuses == (lr.Status.CONVERGED,) * 3
    thr = rtol * np.linalg.norm(B, axis=1)
    iters = [int(np.argmax(res.residual_history[:, i] <= thr[i])) for i in range(3)]
    assert len(set(iters)) == 3 and res.iterations == max(iters) == len(snaps)
    for i in range(3):
        single = lr.solve(A, B[i], method=method, rtol=rtol)
        assert single.iterations == iters[i]
        np.testing.assert_allclose(res.x[i], single.x, rtol=1e-7)
        for snap in snaps[iters[i]:]:
            assert np.array_equal(snap[i], snaps[iters[i] - 1][i])
        np.testing.assert_allclose(res.x[i], np.linalg.solve(A, B[i]), rtol=1e-6)


def test_lsqr_batched_least_squares_flag_is_per_system():
    A, b = least_squares_problem(40, 25, seed=12)
    B = np.stack([A @ np.ones(25), b])           # consistent, then inconsistent
    res = lr.solve(A, B, method="lsqr", rtol=1e-8, batch_dims=1, least_squares=True)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.LEAST_SQUARES) and res.success
    assert res.converged.tolist() == [True, False]
    assert to_numpy(res.info["least_squares"]).tolist() == [False, True]
    np.testing.assert_allclose(res.x[0], np.ones(25), rtol=1e-6)
    np.testing.assert_allclose(res.x[1], np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_maxiter_one_reports_non_convergence(method):
    A, _ = adjoint_matrix(20, seed=13)
    calls = []
    res = lr.solve(A, np.ones(20), method=method, rtol=1e-10, maxiter=1,
                   callback=lambda k, x, r: calls.append((k, x.copy())))
    assert res.status is lr.Status.MAX_ITERATIONS and not res.converged and not res.success
    assert res.iterations == 1 and len(calls) == 1 and calls[0][0] == 1
    assert calls[0][1].shape == (20,)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("method", METHODS)
def test_inputs_unchanged_and_x0_used(method, backend):
    A, _ = adjoint_matrix(20, seed=14)
    rng = np.random.default_rng(15)
    b_np, x0_np = rng.standard_normal(20), rng.standard_normal(20)
    b, x0 = to_backend(b_np, backend), to_backend(x0_np, backend)
    res = lr.solve(to_backend(A, backend), b, method=method, x0=x0, rtol=1e-10)
    assert res.converged
    np.testing.assert_array_equal(to_numpy(b), b_np)
    np.testing.assert_array_equal(to_numpy(x0), x0_np)
    np.testing.assert_allclose(to_numpy(res.x), np.linalg.solve(A, b_np), rtol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_fixed_budget_runs_exactly_maxiter(method):
    A, _ = adjoint_matrix(30, seed=16)
    b = np.ones(30)
    calls = []
    res = lr.solve(A, b, method=method, rtol=None, atol=None, maxiter=5,
                   callback=lambda k, x, r: calls.append(k))
    assert res.status is lr.Status.COMPLETED and res.success
    assert res.iterations == 5 and calls == [1, 2, 3, 4, 5] and res.matvecs == 5
    # lsqr applies A^H once more, to start the bidiagonalisation.
    assert res.rmatvecs == (6 if method == "lsqr" else 5)
    assert res.residual_norm < np.linalg.norm(b)


def test_singular_inconsistent_system_cgne_breaks_down_lsqr_finds_least_squares():
    A = np.diag([1.0, 2.0, 0.0])
    B = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])   # in the range of A, then not
    res = lr.solve(A, B, method="cgne", rtol=1e-10, batch_dims=1)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.BREAKDOWN)
    assert np.all(np.isfinite(res.x))
    np.testing.assert_allclose(res.x[0], [1.0, 0.5, 0.0], atol=1e-12)
    res = lr.solve(A, B, method="lsqr", rtol=1e-10, batch_dims=1)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.LEAST_SQUARES) and not res.success
    assert res.info["least_squares"].tolist() == [False, True]
    np.testing.assert_allclose(res.x, [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("method,option", [("cgne", "eta"), ("lsqr", "damp")])
def test_bad_options_are_named(method, option):
    A = np.eye(3)
    with pytest.raises(ValueError, match=option):
        lr.solve(A, np.ones(3), method=method, **{option: -1.0})
    with pytest.raises(ValueError, match=option):
        lr.solve(A, np.ones(3), method=method, **{option: "large"})
    with pytest.raises(TypeError, match="unknown option"):
        lr.solve(A, np.ones(3), method=method, tol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_operator_without_rmatvec_is_rejected(method):
    A = lr.LinearOperator((3, 3), matvec=lambda x: 2.0 * x, like=np.zeros(3))
    with pytest.raises(ValueError, match="rmatvec"):
        lr.solve(A, np.ones(3), method=method)


def test_cgne_rejects_rectangular_operator_lsqr_does_not():
    A, b = least_squares_problem(6, 4, seed=17)
    with pytest.raises(ValueError, match="square"):
        lr.solve(A, b, method="cgne")
    assert lr.solve(A, b, method="lsqr", least_squares=True).success


@pytest.mark.parametrize("method", METHODS)
def test_complex_nonsymmetric(method):
    n = 20
    rng = np.random.default_rng(18)
    G = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    A = np.eye(n) + 0.3 * G / np.sqrt(n)
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    res = lr.solve(A, b, method=method, rtol=1e-10)
    assert res.converged and res.x.dtype == np.complex128
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-8)


@pytest.mark.parametrize("case", ["consistent square", "overdetermined least squares"])
def test_lsqr_iteration_counts_match_scipy(case):
    """Our lsqr's count is within 5% of scipy.sparse.linalg.lsqr's with matching tests.

    Parity settings: conlim=0 switches scipy's condition-number stop off (we have none). For
    the consistent system atol=0, btol=rtol: scipy's test 1 is then ||r|| <= rtol ||b||, ours.
    For the least-squares system atol=rtol as well: scipy's test 2,
    ||A^T r|| <= atol ||A||_F ||r||, is then our least-squares test, and its test 1 (which
    gains a term atol ||A|| ||x||) cannot fire since the residual stays far above it.
    """
    rtol = 1e-8
    if case == "consistent square":
        A = convection_diffusion(10, peclet=10.0)
        b = np.random.default_rng(19).standard_normal(A.shape[0])
        atol = 0.0
    else:
        A, b = least_squares_problem(200, 60, seed=20)
        atol = rtol
    ours = lr.solve(A, b, method="lsqr", rtol=rtol, maxiter=5000, least_squares=atol > 0)
    theirs = sla.lsqr(A, b, atol=atol, btol=rtol, conlim=0, iter_lim=5000)
    assert ours.success and theirs[1] == (1 if atol == 0 else 2)
    assert ours.converged is (atol == 0)
    assert ours.info["least_squares"] is (atol > 0)
    assert abs(ours.iterations - theirs[2]) <= max(1, math.ceil(0.05 * theirs[2]))
    np.testing.assert_allclose(ours.x, theirs[0], rtol=1e-5, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_tensors_stay_on_the_device(method):
    A, _ = adjoint_matrix(50, seed=21)
    B = np.random.default_rng(22).standard_normal((3, 50))
    At, Bt = torch.from_numpy(A).cuda(), torch.from_numpy(B).cuda()
    res = lr.solve(At, Bt, method=method, rtol=1e-8, batch_dims=1)
    assert res.converged.all() and res.x.device == Bt.device
    np.testing.assert_allclose(res.x.cpu().numpy(), np.linalg.solve(A, B.T).T, rtol=1e-6)
