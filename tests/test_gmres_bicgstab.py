"""gmres and bicgstab: what is their own (the contract of solve() for every method is in
test_solve_registry.py).

GMRES's orthogonality in float32 (CGS2), its restarts and their cost against scipy, lucky
breakdown, the breakdowns of both, and the recursive residual estimate that must not be
passed off as convergence.
"""

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import linsolve_rbp as lr
from linsolve_rbp.problems import convection_diffusion

METHODS = ["gmres", "bicgstab"]


def nonsymmetric(n, seed=0, dtype=np.float64):
    """A well-conditioned nonsymmetric matrix (eigenvalues clustered around 3)."""
    rng = np.random.default_rng(seed)
    return (3.0 * np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n)).astype(dtype)


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


# -- the paths of the lean iterations ---------------------------------------------------------

def _paths_problem(n=60, seed=5):
    rng = np.random.default_rng(seed)
    M = np.eye(n) - 0.9 * rng.standard_normal((n, n)) / np.sqrt(n)
    return M, rng.standard_normal(n)


@pytest.mark.parametrize("opts", [
    dict(rtol=1e-10, restart=7), dict(rtol=None, atol=None, maxiter=25, restart=6),
    dict(rtol=1e-9, restart=10, check_every=4), dict(rtol=1e-9, restart=9, callback=lambda k, x, r: None),
])
def test_gmres_host_and_device_paths_agree(monkeypatch, opts):
    # The host path (small dense algebra in numpy, one system on 1-D views) and the device
    # path (everything in the data's namespace, what a GPU runs) are the same iteration.
    M, b = _paths_problem()
    _host_and_device(monkeypatch, M, b, np.stack([b, 2 * b[::-1], b + 1]), opts, rtol=1e-10, history=True)


def _host_and_device(monkeypatch, A, b, B, opts, rtol, history=False):
    """Solve ``b`` and the batch ``B`` on the host path, then on the device path (forced), and
    compare statuses, counts, x (to ``rtol``) and, with ``history``, the residual histories."""
    import linsolve_rbp.solvers.gmres as g

    host1 = lr.solve(A, b, method="gmres", **opts)
    hostB = lr.solve(A, B, method="gmres", batch_dims=1, **opts)
    monkeypatch.setattr(g, "_on_host", lambda prob: False)
    dev1 = lr.solve(A, b, method="gmres", **opts)
    devB = lr.solve(A, B, method="gmres", batch_dims=1, **opts)
    for h, d in ((host1, dev1), (hostB, devB)):
        assert np.all(np.asarray(h.status) == np.asarray(d.status))
        assert (h.iterations, h.matvecs, h.info) == (d.iterations, d.matvecs, d.info)
        assert np.allclose(h.x, d.x, rtol=rtol, atol=1e-12)
        if history:
            assert np.allclose(h.residual_history, d.residual_history, rtol=1e-8, atol=1e-14)
    assert np.allclose(hostB.x[0], host1.x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opts", [
    dict(rtol=1e-10), dict(rtol=None, atol=None, maxiter=25), dict(rtol=1e-9, check_every=3),
])
def test_bicgstab_single_and_batched_paths_agree(monkeypatch, opts):
    # One system on the host runs its scalars as numpy scalars; the batched path (what a GPU
    # and batches run) runs them as (B,) arrays with masks. Same iteration.
    import linsolve_rbp.solvers.bicgstab as bg

    M, b = _paths_problem(seed=6)
    one = lr.solve(M, b, method="bicgstab", **opts)
    monkeypatch.setattr(bg, "_on_host", lambda prob: False)
    ref = lr.solve(M, b, method="bicgstab", **opts)
    assert one.status == ref.status
    assert (one.iterations, one.matvecs) == (ref.iterations, ref.matvecs)
    assert np.allclose(one.x, ref.x, rtol=1e-10, atol=1e-12)
    assert np.allclose(one.residual_history, ref.residual_history, rtol=1e-8, atol=1e-14)
    both = lr.solve(M, np.stack([b, b]), method="bicgstab", batch_dims=1, **opts)
    assert np.all(np.asarray(both.status) == one.status) and both.iterations == one.iterations


def _small_inputs(rng, t):
    # A cycle's small problem (see GMRES._small): Hessenberg H, rotation rows Qh (with signed
    # zeros), c, s >= 0, live columns (some systems stopped mid-cycle or never started), and
    # the corner cases: a zero pivot, s NaN, an infinite entry; float64, float32, complex128.
    B, m = int(rng.integers(1, 7)), int(rng.integers(1, 10))
    k = int(rng.integers(1, m + 1))
    dt = (np.float64, np.float32, np.complex128)[t % 3]
    H = (np.triu(rng.standard_normal((B, m + 1, m)), -1) + 2 * np.eye(m + 1, m)).astype(dt)
    Qh = rng.standard_normal((B, m, m + 1)).astype(dt)
    Qh[:, :, ::3] *= -0.0
    C = rng.standard_normal((B, m)).astype(dt)
    S = np.abs(rng.standard_normal((B, m))).astype(dt)
    L = rng.random((B, m)) < 0.8
    if t % 5 == 0:
        L[:] = True
    if t % 7 == 0:
        L[0] = False
    if t % 11 == 0 and m > 1:
        H[0, 1, 1] = 0
    if t % 13 == 0:
        S[-1, 0] = np.nan
    if t % 17 == 0:
        H[-1, 0, 0] = np.inf
    beta = np.abs(rng.standard_normal(B)).astype(np.float32 if dt == np.float32 else np.float64)
    return H, Qh, C[:, :k], S[:, :k], L[:, :k], beta


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def test_gmres_host_small_solves_match_the_general_one_bit_for_bit():
    # The host path's small least-squares solves (_small_host for batches, _small1 for one
    # system: fewer temporaries, LAPACK's triangular solve in float64) give GMRES._small's
    # values exactly, or raise where it raises.
    import linsolve_rbp.solvers.gmres as g

    rng = np.random.default_rng(3)
    for t in range(150):
        H, Qh, C, S, L, beta = _small_inputs(rng, t)
        with np.errstate(all="ignore"):
            try:
                y0, u0 = g.GMRES._small(np, "cpu", H, Qh, C, S, L, beta)
            except np.linalg.LinAlgError:
                with pytest.raises(np.linalg.LinAlgError):
                    g._small_host(np, H, Qh, C, S, L, beta, {})
                continue
            y1, u1 = g._small_host(np, H, Qh, C, S, L, beta, {})
            assert np.array_equal(u0, u1) and y0.shape == y1.shape
            assert np.array_equal(_bits(y0), _bits(y1)), t
            if H.shape[0] == 1:
                y2, u2 = g._small1(np, H[0], Qh[0], C[0], S[0], L[0], beta)
                assert np.array_equal(u0[0], u2) and np.array_equal(_bits(y0[0, :, 0]), _bits(y2)), t


@pytest.mark.parametrize("opts", [dict(rtol=1e-13, restart=20), dict(rtol=1e-15, restart=60, maxiter=200)])
def test_gmres_host_and_device_paths_agree_when_claims_are_reopened(monkeypatch, opts):
    # Tolerances near rounding, where estimates pass and true residuals do not: the host path's
    # cycle ends on host floats (one float64 system) and the batched one agree with the device
    # path (the adaptive inner tolerance, the reopened claims).
    A = np.asarray(convection_diffusion(16, peclet=50.0).toarray())
    b = np.ones(A.shape[0])
    _host_and_device(monkeypatch, A, b, np.stack([b, np.arange(b.size, dtype=float), 0 * b]), opts, rtol=1e-9)


def test_gmres_torch_cpu_matches_numpy():
    torch = pytest.importorskip("torch")
    M, b = _paths_problem(seed=7)
    ref = lr.solve(M, b, method="gmres", rtol=1e-10, restart=8)
    for Mt, bt in ((torch.from_numpy(M), torch.from_numpy(b)),
                   (torch.from_numpy(M).float(), torch.from_numpy(b).float())):
        res = lr.solve(Mt, bt, method="gmres", rtol=1e-10 if Mt.dtype == torch.float64 else 1e-5, restart=8)
        assert res.status is lr.Status.CONVERGED and res.x.dtype == bt.dtype
        if Mt.dtype == torch.float64:
            assert (res.iterations, res.matvecs) == (ref.iterations, ref.matvecs)
            assert np.allclose(res.x.numpy(), ref.x, rtol=1e-10, atol=1e-12)


def test_lean_benchmark_runs_quick(capsys):
    # asv_benchmarks/lean_gmres.py stays runnable (toy sizes; its figures mean nothing here).
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, root)
    try:
        bench = importlib.import_module("asv_benchmarks.lean_gmres")
        assert bench.main(["--quick"]) == 0
    finally:
        sys.path.remove(root)
    out = capsys.readouterr().out
    assert "gmres dense" in out and "bicgstab per product" in out and "overhead" in out
