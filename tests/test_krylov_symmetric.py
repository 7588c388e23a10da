"""cg and minres: the Krylov methods for Hermitian operators.

Checked against numpy.linalg.solve on dense, scipy.sparse / torch sparse and closure
operators, in float32 and float64, on numpy, torch and array_api_strict; batched solves;
preconditioning; failure modes; and iteration counts against scipy.sparse.linalg.
"""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

import linsolve_rbp as lr
from _backends import CASES, RTOL, make_operator, rel_residual, to_backend
from linsolve_rbp.backend import to_numpy
from linsolve_rbp.problems import convection_diffusion

torch = pytest.importorskip("torch")
# torch warns once that its sparse CSR tensors are in beta; our sparse cases use them on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
xps = pytest.importorskip("array_api_strict")

METHODS = ["cg", "minres"]


def spd(n, lo, hi, seed=0, dtype=np.float64):
    """A symmetric matrix with eigenvalues evenly spread over [lo, hi], and its eigenvectors."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.linspace(lo, hi, n)
    A = (Q * eig) @ Q.T
    return ((A + A.T) / 2).astype(dtype), Q


def indefinite(n, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.concatenate([-np.linspace(1, 10, n // 2), np.linspace(1, 20, n - n // 2)])
    A = (Q * eig) @ Q.T
    return (A + A.T) / 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend,kind", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_matches_dense_solve(method, backend, kind, dtype):
    n = 30
    A, _ = spd(n, 1.0, 20.0, seed=1, dtype=dtype)
    b = np.random.default_rng(2).standard_normal(n).astype(dtype)
    rtol = RTOL[dtype]
    bb = to_backend(b, backend)
    res = lr.solve(make_operator(kind, A, backend), bb, method=method, rtol=rtol)
    assert res.status is lr.Status.CONVERGED and res.converged and res.success
    assert type(res.x) is type(bb) and res.x.dtype == bb.dtype
    x = to_numpy(res.x)
    ref = np.linalg.solve(A.astype(np.float64), b.astype(np.float64))
    cond = np.linalg.cond(A.astype(np.float64))
    assert rel_residual(A, x, b) <= 2 * rtol
    assert np.linalg.norm(x - ref) <= 2 * cond * rtol * np.linalg.norm(ref)
    # The reported residual is that of the returned x.
    assert res.residual_norm <= rtol * np.linalg.norm(b.astype(np.float64)) * (1 + 1e-6)
    true_rnorm = rel_residual(A, x, b) * np.linalg.norm(b.astype(np.float64))
    assert res.residual_norm == pytest.approx(true_rnorm, rel=0.1, abs=1e-6)


def test_minres_solves_indefinite_system():
    A = indefinite(40, seed=3)
    b = np.random.default_rng(4).standard_normal(40)
    res = lr.solve(A, b, method="minres", rtol=1e-10)
    assert res.converged
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
    # The residual of MINRES never grows.
    assert np.all(np.diff(res.residual_history) <= 1e-12 * res.residual_history[0])


@pytest.mark.parametrize("method", METHODS)
def test_complex_hermitian(method):
    n = 25
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)))
    A = (Q * np.linspace(1, 10, n)) @ Q.conj().T
    A = (A + A.conj().T) / 2
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    res = lr.solve(A, b, method=method, rtol=1e-10)
    assert res.converged and res.x.dtype == np.complex128
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-8, atol=1e-10)


def _first_converged(history, threshold):
    return int(np.argmax(history <= threshold))


@pytest.mark.parametrize("backend", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_systems_are_independent(method, backend):
    n = 30
    A, Q = spd(n, 1.0, 20.0, seed=6)
    rng = np.random.default_rng(7)
    # Right-hand sides in 3, 8 and 15 eigendirections: CG and MINRES then converge in that
    # many iterations (an abrupt drop of the residual), so at different iterations.
    B = np.stack([Q[:, :3] @ rng.standard_normal(3), Q[:, :8] @ rng.standard_normal(8),
                  Q[:, :15] @ rng.standard_normal(15)])
    rtol = 1e-8
    snaps = []
    res = lr.solve(to_backend(A, backend), to_backend(B, backend), method=method, rtol=rtol,
                   batch_dims=1, callback=lambda k, x, r: snaps.append(np.array(to_numpy(x))))
    assert res.statuses == (lr.Status.CONVERGED,) * 3 and res.converged.all()
    thr = rtol * np.linalg.norm(B, axis=1)
    iters = [_first_converged(res.residual_history[:, i], thr[i]) for i in range(3)]
    assert len(set(iters)) == 3
    assert res.iterations == max(iters) == len(snaps)
    x = to_numpy(res.x)
    for i in range(3):
        single = lr.solve(A, B[i], method=method, rtol=rtol)
        # Each system takes as many iterations as it does alone and then stops changing.
        assert single.iterations == iters[i]
        np.testing.assert_allclose(x[i], single.x, rtol=1e-7)
        for snap in snaps[iters[i]:]:
            assert np.array_equal(snap[i], snaps[iters[i] - 1][i])
        np.testing.assert_allclose(x[i], np.linalg.solve(A, B[i]), rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_jacobi_preconditioner_needs_fewer_iterations(method):
    n = 60
    S, _ = spd(n, 1.0, 4.0, seed=8)
    d = np.logspace(0, 2, n)
    A = d[:, None] * S * d[None, :]           # badly scaled, still SPD
    b = np.random.default_rng(9).standard_normal(n)
    M = sp.diags(1.0 / np.diag(A))
    plain = lr.solve(A, b, method=method, rtol=1e-8)
    prec = lr.solve(A, b, method=method, rtol=1e-8, M=M)
    assert plain.converged and prec.converged
    assert prec.iterations < plain.iterations / 2
    # The stopping test is on the user's residual, also when preconditioned.
    assert rel_residual(A, prec.x, b) <= 2e-8
    np.testing.assert_allclose(prec.x, np.linalg.solve(A, b), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_maxiter_one_reports_non_convergence(method):
    A, _ = spd(20, 1.0, 20.0, seed=10)
    b = np.ones(20)
    calls = []
    res = lr.solve(A, b, method=method, rtol=1e-10, maxiter=1,
                   callback=lambda k, x, r: calls.append((k, x.copy(), r)))
    assert res.status is lr.Status.MAX_ITERATIONS
    assert not res.converged and not res.success
    assert res.iterations == 1 and len(calls) == 1 and calls[0][0] == 1
    assert calls[0][1].shape == (20,)
    with pytest.raises(lr.SolveError):
        lr.solve(A, b, method=method, rtol=1e-10, maxiter=1, throw=True)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("method", METHODS)
def test_inputs_unchanged_and_x0_used(method, backend):
    A, _ = spd(20, 1.0, 20.0, seed=11)
    rng = np.random.default_rng(12)
    b_np, x0_np = rng.standard_normal(20), rng.standard_normal(20)
    b, x0 = to_backend(b_np, backend), to_backend(x0_np, backend)
    res = lr.solve(to_backend(A, backend), b, method=method, x0=x0, rtol=1e-10)
    assert res.converged
    np.testing.assert_array_equal(to_numpy(b), b_np)
    np.testing.assert_array_equal(to_numpy(x0), x0_np)
    np.testing.assert_allclose(to_numpy(res.x), np.linalg.solve(A, b_np), rtol=1e-8)
    # Starting at the solution costs one product and no iteration.
    exact = to_backend(np.linalg.solve(A, b_np), backend)
    res = lr.solve(to_backend(A, backend), b, method=method, x0=exact, rtol=1e-8)
    assert res.converged and res.iterations == 0 and res.matvecs == 1


@pytest.mark.parametrize("method", METHODS)
def test_fixed_budget_runs_exactly_maxiter(method):
    A, _ = spd(30, 1.0, 20.0, seed=13)
    b = np.ones(30)
    calls = []
    res = lr.solve(A, b, method=method, rtol=None, atol=None, maxiter=5,
                   callback=lambda k, x, r: calls.append(k))
    assert res.status is lr.Status.COMPLETED and res.success and not res.converged
    assert res.iterations == 5 and res.matvecs == 5 and calls == [1, 2, 3, 4, 5]
    assert res.residual_norm < np.linalg.norm(b)


@pytest.mark.parametrize("method", METHODS)
def test_breakdown_of_one_system_leaves_the_others_intact(method):
    # A singular: the first right-hand side is in its range, the second is not.
    A = np.diag([1.0, 2.0, 0.0])
    B = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    res = lr.solve(A, B, method=method, rtol=1e-10, batch_dims=1)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.BREAKDOWN)
    assert not res.success and res.status is lr.Status.BREAKDOWN
    assert np.all(np.isfinite(res.x))
    np.testing.assert_allclose(res.x[0], [1.0, 0.5, 0.0], atol=1e-12)


def test_minres_rejects_indefinite_preconditioner():
    A, _ = spd(10, 1.0, 5.0, seed=14)
    res = lr.solve(A, np.ones(10), method="minres", rtol=1e-8, M=-np.eye(10))
    assert res.status is lr.Status.BREAKDOWN and not res.success
    assert np.all(np.isfinite(res.x))


def _scipy_count(solver, A, b, target, **kw):
    """Iterations after which scipy's iterates first meet ||b - A x|| <= rtol ||b||."""
    bnorm = np.linalg.norm(b)
    resid = []
    solver(A, b, callback=lambda xk: resid.append(np.linalg.norm(b - A @ xk)), **kw)
    hits = np.nonzero(np.array(resid) <= target * bnorm)[0]
    assert hits.size, "scipy never reached the tolerance"
    return int(hits[0]) + 1


@pytest.mark.parametrize("method", METHODS)
def test_iteration_counts_match_scipy(method):
    """On the SPD 2-D Laplacian, our counts are within 5% of scipy's.

    scipy's cg stops on the same test as ours (the recursive residual against
    max(rtol ||b||, atol)); its minres stops on rnorm <= rtol (||A|| ||x|| + ||b||), a looser
    test, so for minres we run scipy to a far tighter rtol and count the iterations its
    iterates take to meet our test on the true residual.
    """
    A = convection_diffusion(16, peclet=0.0)
    b = np.random.default_rng(15).standard_normal(A.shape[0])
    rtol = 1e-8
    ours = lr.solve(A, b, method=method, rtol=rtol)
    assert ours.converged
    if method == "cg":
        theirs = _scipy_count(sla.cg, A, b, rtol, rtol=rtol, atol=0.0, maxiter=2000)
    else:
        theirs = _scipy_count(sla.minres, A, b, rtol, rtol=1e-14, maxiter=2 * ours.iterations)
    assert abs(ours.iterations - theirs) <= max(1, math.ceil(0.05 * theirs))


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_tensors_stay_on_the_device(method):
    A, _ = spd(50, 1.0, 20.0, seed=16)
    B = np.random.default_rng(17).standard_normal((3, 50))
    At, Bt = torch.from_numpy(A).cuda(), torch.from_numpy(B).cuda()
    M = torch.eye(50, dtype=At.dtype, device="cuda")
    res = lr.solve(At, Bt, method=method, rtol=1e-8, batch_dims=1, M=M)
    assert res.converged.all() and res.x.device == Bt.device
    np.testing.assert_allclose(res.x.cpu().numpy(), np.linalg.solve(A, B.T).T, rtol=1e-6)
