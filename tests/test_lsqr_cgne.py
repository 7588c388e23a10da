"""cgne (CG-RBP) and lsqr: what is their own (the contract of solve() for every method is in
test_solve_registry.py; lsqr's counts on consistent systems are its scipy-twin test there).

lsqr's least-squares solutions (over- and underdetermined, damped, per system of a batch,
against scipy's with matching stopping tests); cgne as CG on the normal equations of the RBP
adjoint system, with its damping eta; singular inconsistent systems.
"""

import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import linsolve_rbp as lr
from linsolve_rbp.backend import to_numpy
from linsolve_rbp.problems import random_contractive
from registry import RTOL, backend_params, make_operator, operator_params, to_backend

# torch warns once that its sparse CSR tensors are in beta; our sparse cases use them on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


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
@pytest.mark.parametrize("backend,kind", operator_params())
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


@pytest.mark.parametrize("backend", backend_params())
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


def test_lsqr_batched_least_squares_flag_is_per_system():
    A, b = least_squares_problem(40, 25, seed=12)
    B = np.stack([A @ np.ones(25), b])           # consistent, then inconsistent
    res = lr.solve(A, B, method="lsqr", rtol=1e-8, batch_dims=1, least_squares=True)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.LEAST_SQUARES) and res.success
    assert res.converged.tolist() == [True, False]
    assert to_numpy(res.info["least_squares"]).tolist() == [False, True]
    np.testing.assert_allclose(res.x[0], np.ones(25), rtol=1e-6)
    np.testing.assert_allclose(res.x[1], np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-5)


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


def test_lsqr_least_squares_iteration_counts_match_scipy():
    """Within 5% of scipy.sparse.linalg.lsqr's count with matching tests: conlim=0 switches
    scipy's condition-number stop off (we have none), atol = btol = rtol makes scipy's test 2,
    ||A^T r|| <= atol ||A||_F ||r||, our least-squares test, and its test 1 (which gains a term
    atol ||A|| ||x||) cannot fire since the residual stays far above it."""
    rtol = 1e-8
    A, b = least_squares_problem(200, 60, seed=20)
    ours = lr.solve(A, b, method="lsqr", rtol=rtol, maxiter=5000, least_squares=True)
    theirs = sla.lsqr(A, b, atol=rtol, btol=rtol, conlim=0, iter_lim=5000)
    assert ours.success and theirs[1] == 2
    assert ours.converged is False and ours.info["least_squares"] is True
    assert abs(ours.iterations - theirs[2]) <= max(1, math.ceil(0.05 * theirs[2]))
    np.testing.assert_allclose(ours.x, theirs[0], rtol=1e-5, atol=1e-8)
