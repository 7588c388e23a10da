"""The scipy.* methods: scipy.sparse.linalg (cupyx on GPU data) behind the package's interface.

Each bridge must solve what its scipy function solves, on numpy, torch and array_api_strict
data, with products counted exactly as scipy applies them, a residual history, a status from
scipy's info and the true residual, and no copies of torch CPU data.
"""

import math
import types

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

import linsolve_rbp as lr
from linsolve_rbp.backend import to_numpy
from linsolve_rbp.problems import convection_diffusion
from linsolve_rbp.solvers import scipy as bridges
from registry import RTOL, make_operator, needs_torch, operator_params, to_backend, torch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
    # scipy's lsmr initialises a condition estimate with 1e100, which overflows float32.
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

METHODS = ["scipy.cg", "scipy.gmres", "scipy.lgmres", "scipy.gcrotmk", "scipy.bicgstab",
           "scipy.lsqr", "scipy.lsmr"]


def system(method, n=30, dtype=np.float64, seed=0):
    """An SPD matrix for scipy.cg, a nonsymmetric well-conditioned one otherwise."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n)) / np.sqrt(n)
    M = 3.0 * np.eye(n) + G
    if method == "scipy.cg":
        M = M @ M.T
    return M.astype(dtype), rng.standard_normal(n).astype(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend,kind", operator_params())
def test_solves_and_reports(method, dtype, backend, kind):
    M, b = system(method, dtype=dtype)
    rtol = RTOL[dtype]
    bb = to_backend(b, backend)
    res = lr.solve(make_operator(kind, M, backend), bb, method=method, rtol=rtol)
    assert res.status is lr.Status.CONVERGED and res.success
    assert type(res.x) is type(bb) and res.x.dtype == bb.dtype and tuple(res.x.shape) == (30,)
    x = np.asarray(to_numpy(res.x), dtype=np.float64)
    M64, b64 = M.astype(np.float64), b.astype(np.float64)
    r_true = np.linalg.norm(b64 - M64 @ x)
    assert r_true <= 1.01 * rtol * np.linalg.norm(b64)
    assert res.residual_norm == pytest.approx(r_true, rel=0.05, abs=float(10 * np.finfo(dtype).eps * np.linalg.norm(b64)))
    x_ref = np.linalg.solve(M64, b64)
    assert np.linalg.norm(x - x_ref) <= 20 * rtol * np.linalg.norm(x_ref)
    assert res.matvecs >= 1
    assert res.rmatvecs >= 1 if method in ("scipy.lsqr", "scipy.lsmr") else res.rmatvecs == 0
    hist = res.residual_history
    assert hist[0] == pytest.approx(np.linalg.norm(b64), rel=1e-5)
    assert hist.shape == (res.iterations + 1,)
    if method in ("scipy.lsqr", "scipy.lsmr"):
        assert np.all(np.isnan(hist[1:-1]))
    else:
        assert np.all(np.isfinite(hist))
    assert hist[-1] <= 1.5 * rtol * np.linalg.norm(b64)


def _scipy_reference(method, A, b, rtol, maxiter, restart=20):
    """Run scipy itself with the arguments the bridge documents; count its products."""
    count = {"mv": 0, "rmv": 0}

    def mv(v):
        count["mv"] += 1
        return A @ v

    def rmv(v):
        count["rmv"] += 1
        return A.T @ v

    L = sla.LinearOperator(A.shape, matvec=mv, rmatvec=rmv, dtype=A.dtype)
    name = method.split(".")[1]
    fn = getattr(sla, name)
    if name in ("lsqr", "lsmr"):
        lim = {"lsqr": "iter_lim", "lsmr": "maxiter"}[name]
        out = fn(L, b, atol=0.0, btol=rtol, **{lim: maxiter})
    elif name == "gmres":
        out = fn(L, b, rtol=rtol, atol=0.0, restart=restart, maxiter=math.ceil(maxiter / restart))
    else:
        out = fn(L, b, rtol=rtol, atol=0.0, maxiter=maxiter)
    return out, count


@pytest.mark.parametrize("method", METHODS)
def test_products_counted_as_scipy_applies_them(method):
    M, b = system(method, n=40)
    out, count = _scipy_reference(method, M, b, 1e-8, 400)
    res = lr.solve(M, b, method=method, rtol=1e-8, maxiter=400)
    # The extra products for the history and the final residual are not counted.
    assert (res.matvecs, res.rmatvecs) == (count["mv"], count["rmv"])
    assert np.allclose(res.x, out[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_iteration_limit_is_max_iterations(method):
    A = convection_diffusion(12)
    if method == "scipy.cg":
        A = convection_diffusion(12, peclet=0.0)
    b = np.ones(A.shape[0])
    (x_s, info, *_), _ = _scipy_reference(method, A, b, 1e-10, 1)
    assert info > 0  # scipy itself says: iteration limit
    res = lr.solve(A, b, method=method, rtol=1e-10, maxiter=1)
    assert res.status is lr.Status.MAX_ITERATIONS and not res.success and not res.converged
    assert res.residual_norm == pytest.approx(np.linalg.norm(b - A @ res.x))


def test_gmres_maxiter_counts_inner_steps():
    """maxiter=25 with restart=10 is 25 steps (callbacks): two cycles, then a cycle of 5."""
    A = convection_diffusion(12)
    b = np.ones(A.shape[0])
    seen = []
    res = lr.solve(A, b, method="scipy.gmres", rtol=1e-12, restart=10, maxiter=25,
                   callback=lambda k, x, r: seen.append(k))
    assert res.status is lr.Status.MAX_ITERATIONS and res.iterations == 25
    assert seen == list(range(1, 26)) and res.residual_history.shape == (26,)
    # Each full cycle: 10 steps and its end residual; the last one also the residual of its
    # start (x is not zero there).
    assert res.matvecs == 2 * (10 + 1) + (1 + 5 + 1)
    # Where maxiter does not bind, scipy's own products and x (maxiter=995: 99 cycles and a
    # cycle of 5 steps, vs scipy with 100 cycles).
    (x_s, info), count = _scipy_reference("scipy.gmres", A, b, 1e-8, 995, restart=10)
    assert info == 0
    res = lr.solve(A, b, method="scipy.gmres", rtol=1e-8, restart=10, maxiter=995)
    assert res.converged and res.matvecs == count["mv"]
    np.testing.assert_array_equal(res.x, x_s)


def test_scipy_breakdown_is_breakdown():
    P = np.array([[0.0, 1.0], [1.0, 0.0]])
    _, info = sla.bicgstab(P, np.array([1.0, 0.0]))
    assert info < 0
    res = lr.solve(P, np.array([1.0, 0.0]), method="scipy.bicgstab")
    assert res.status is lr.Status.BREAKDOWN and not res.success


def test_gmres_callback_and_history_from_pr_norm():
    A = convection_diffusion(8)
    b = np.ones(64)
    seen = []
    res = lr.solve(A, b, method="scipy.gmres", rtol=1e-8, restart=10,
                   callback=lambda k, x, r: seen.append((k, x, float(r))))
    assert res.status is lr.Status.CONVERGED
    assert [k for k, _, _ in seen] == list(range(1, res.iterations + 1))
    assert all(x is None for _, x, _ in seen)
    assert np.allclose([r for _, _, r in seen], res.residual_history[1:])
    # restart passes through: more than one cycle of 10 steps.
    assert res.matvecs > res.iterations + 1


def test_callback_sees_copies_of_iterates():
    M, b = system("scipy.cg")
    xs = []
    res = lr.solve(M, b, method="scipy.cg", rtol=1e-10, callback=lambda k, x, r: xs.append(x))
    assert len(xs) == res.iterations and len({id(x) for x in xs}) == len(xs)
    assert not np.allclose(xs[0], xs[-1])
    # The callback's residual is ||b - A x_k|| of the x_k it receives.
    assert np.linalg.norm(b - M @ xs[-1]) == pytest.approx(res.residual_history[-1])


def test_batched_solves_each_system():
    M, _ = system("scipy.gmres")
    rng = np.random.default_rng(7)
    Bm = np.stack([rng.standard_normal(30), M @ np.ones(30), 1e-3 * rng.standard_normal(30)])
    seen = []
    res = lr.solve(M, Bm, method="scipy.gmres", rtol=1e-10, batch_dims=1,
                   callback=lambda k, x, r: seen.append((k, x, np.asarray(r))))
    assert res.statuses == (lr.Status.CONVERGED,) * 3
    assert np.allclose(res.x, np.linalg.solve(M, Bm.T).T, rtol=1e-8)
    assert res.residual_history.shape == (res.iterations + 1, 3)
    assert [k for k, _, _ in seen] == list(range(1, res.iterations + 1))
    assert all(x is None and r.shape == (3,) for _, x, r in seen)


@needs_torch
@pytest.mark.parametrize("method", ["scipy.gmres", "scipy.cg", "scipy.lsqr"])
def test_torch_cpu_data_is_not_copied(method, monkeypatch):
    M, b = system(method)
    bt = torch.from_numpy(b.copy())
    x0 = torch.zeros(30, dtype=torch.float64)
    name = method.split(".")[1]
    original = getattr(sla, name)
    shared = []

    def spy(A, b_arg, *args, **kwargs):
        shared.append(np.shares_memory(b_arg, bt.numpy()))
        shared.append(np.shares_memory(kwargs["x0"], x0.numpy()))
        return original(A, b_arg, *args, **kwargs)

    monkeypatch.setattr(sla, name, spy)
    res = lr.solve(torch.from_numpy(M), bt, method=method, x0=x0, rtol=1e-8)
    assert shared == [True, True]
    assert isinstance(res.x, torch.Tensor) and res.x.dtype == torch.float64
    assert res.converged
    assert torch.equal(bt, torch.from_numpy(b)) and torch.equal(x0, torch.zeros(30, dtype=torch.float64))


def test_zero_rhs_result_does_not_alias_b():
    b = np.zeros(5)
    res = lr.solve(np.eye(5) * 2.0, b, method="scipy.gmres")
    assert res.converged and np.array_equal(res.x, b)
    assert not np.shares_memory(res.x, b)


@needs_torch
def test_float32_torch_keeps_dtype():
    M, b = system("scipy.bicgstab", dtype=np.float32)
    res = lr.solve(torch.from_numpy(M), torch.from_numpy(b), method="scipy.bicgstab", rtol=1e-4)
    assert res.x.dtype == torch.float32 and res.converged


def test_bad_requests_are_rejected():
    M, b = system("scipy.gmres")
    with pytest.raises(ValueError, match="fixed budget"):
        lr.solve(M, b, method="scipy.gmres", rtol=None, atol=None, maxiter=5)
    with pytest.raises(ValueError, match="callback"):
        lr.solve(M, b, method="scipy.lsqr", callback=lambda k, x, r: None)
    with pytest.raises(TypeError, match="inner_m"):
        lr.solve(M, b, method="scipy.gmres", inner_m=5)
    with pytest.raises(ValueError, match="rmatvec"):
        A = lr.LinearOperator((30, 30), matvec=lambda x: x @ M.T, like=b)
        lr.solve(A, b, method="scipy.lsmr")
    with pytest.raises(ValueError, match="preconditioner"):
        lr.solve(M, b, method="scipy.lsqr", M=np.eye(30))


def test_preconditioner_passes_through():
    A = convection_diffusion(8)
    D = sp.diags(np.logspace(0, 4, 64))
    As = (D @ A).tocsr()
    b = As @ np.ones(64)
    Minv = sp.diags(1.0 / As.diagonal())
    plain = lr.solve(As, b, method="scipy.bicgstab", rtol=1e-8, maxiter=3000)
    pre = lr.solve(As, b, method="scipy.bicgstab", rtol=1e-8, M=Minv, maxiter=3000)
    assert pre.status is lr.Status.CONVERGED and np.allclose(pre.x, 1.0, rtol=1e-5)
    assert pre.iterations < plain.iterations


def _fake_cupyx(monkeypatch, calls):
    """A stand-in for cupyx.scipy.sparse.linalg with the older ``tol`` keyword and no
    bicgstab, running on numpy: exercises the GPU code path without a GPU."""

    def cg(A, b, x0=None, tol=1e-5, maxiter=None, M=None, callback=None, atol=None):
        calls.append({"tol": tol, "atol": atol, "maxiter": maxiter})
        return sla.cg(A, b, x0=x0, rtol=tol, atol=atol, maxiter=maxiter, M=M, callback=callback)

    fake = types.SimpleNamespace(__name__="cupyx.scipy.sparse.linalg", cg=cg,
                                 LinearOperator=sla.LinearOperator)
    monkeypatch.setattr(bridges, "_import_cupyx", lambda: fake)
    monkeypatch.setattr(bridges, "_on_gpu", lambda b: True)


def test_gpu_path_uses_cupyx(monkeypatch):
    calls = []
    _fake_cupyx(monkeypatch, calls)
    M, b = system("scipy.cg")
    res = lr.solve(M, b, method="scipy.cg", rtol=1e-8, maxiter=77)
    assert calls == [{"tol": 1e-8, "atol": 0.0, "maxiter": 77}]
    assert res.info["backend"] == "cupyx" and res.converged
    assert np.allclose(res.x, np.linalg.solve(M, b), rtol=1e-6)
    with pytest.raises(ValueError, match="scipy.bicgstab.*cupyx"):
        lr.solve(M, b, method="scipy.bicgstab")


@needs_torch
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["scipy.cg", "scipy.gmres"])
def test_cuda_torch_through_cupyx(method):
    pytest.importorskip("cupy")
    M, b = system(method)
    Mt = torch.from_numpy(M).cuda()
    bt = torch.from_numpy(b).cuda()
    res = lr.solve(Mt, bt, method=method, rtol=1e-8)
    assert res.converged and res.info["backend"] == "cupyx"
    assert res.x.is_cuda and res.x.dtype == torch.float64
    assert np.allclose(res.x.cpu().numpy(), np.linalg.solve(M, b), rtol=1e-6)


# -------------------------------------------------------------------------------------------
# Honest results (issue 10): the bridges run on the package's Monitor; statuses are judged
# against the true residual ||b - A x||, computed here independently in float64.

def true_residual(A, b, x, scale=1.0):
    """||b - A x|| in float64 (divided by ``scale`` first, so that extreme scales neither
    overflow nor underflow here)."""
    A = A.toarray() if sp.issparse(A) else np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64) / scale
    x = np.asarray(to_numpy(x), dtype=np.float64) / scale
    return float(np.linalg.norm(b - A @ x)) * scale


def assert_honest(res, A, b, rtol, atol=0.0, scale=1.0):
    """What a user relies on: x finite, CONVERGED only when the true residual meets
    max(rtol ||b||, atol), and residual_norm the true residual of the x returned (as
    computed in ``x``'s precision)."""
    x = np.asarray(to_numpy(res.x))
    rel = 1e-6 if x.dtype == np.float64 else 1e-2
    x = x.astype(np.float64)
    assert np.all(np.isfinite(x)), f"x must be finite ({res.status})"
    r = true_residual(A, b, x, scale)
    thr = max(rtol * np.linalg.norm(np.asarray(b, dtype=np.float64) / scale) * scale, atol)
    if res.converged or res.status is lr.Status.CONVERGED:
        assert r <= thr * (1 + 1e-12), f"{res.status}: true residual {r:.3e} > {thr:.3e}"
    assert res.residual_norm == pytest.approx(r, rel=rel, abs=1e-300)
    return r, thr


def _indefinite(tiny=1e-13, n=40, seed=3):
    """Symmetric indefinite with one eigenvalue ``tiny``: CG's residual grows past 1e5 ||b||
    (from iteration 29 on for the defaults) before scipy's own test stops it."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ev = np.r_[np.linspace(1, 2, n // 2), -np.linspace(1, 2, n // 2)]
    ev[0] = tiny
    return (Q * ev) @ Q.T, rng.standard_normal(n)


def test_cg_divergence_past_divtol_is_diverged_with_the_best_iterate():
    A, b = _indefinite()
    free = lr.solve(A, b, method="scipy.cg", rtol=1e-10, divtol=None, maxiter=300)
    grew = free.residual_history / np.linalg.norm(b)
    first = int(np.argmax(grew > 1e5))
    assert first > 1 and grew[first] > 1e5  # the case does what it is built for
    assert free.status is not lr.Status.DIVERGED and not free.converged
    calls = []
    res = lr.solve(A, b, method="scipy.cg", rtol=1e-10, divtol=1e5, maxiter=300,
                   callback=lambda k, x, r: calls.append(k))
    assert res.status is lr.Status.DIVERGED and not res.success and not res.converged
    # stopped at the iteration the Monitor saw the divergence, the callback up to there
    assert res.iterations == first and calls == list(range(1, first + 1))
    assert res.residual_history.shape == (first + 1,)
    r, _ = assert_honest(res, A, b, 1e-10)
    # x is the best iterate seen, not the divergent one
    assert r == pytest.approx(np.min(res.residual_history), rel=1e-9)
    assert r <= np.linalg.norm(b)


@pytest.mark.parametrize("check_every", [4, 7])
def test_divergence_is_checked_every_check_every_iterations(check_every):
    A, b = _indefinite()
    first = int(np.argmax(lr.solve(A, b, method="scipy.cg", rtol=1e-10, divtol=None,
                                   maxiter=300).residual_history > 1e5 * np.linalg.norm(b)))
    res = lr.solve(A, b, method="scipy.cg", rtol=1e-10, divtol=1e5, maxiter=300,
                   check_every=check_every)
    assert res.status is lr.Status.DIVERGED
    # the first check at or after the divergence
    assert res.iterations == -(-first // check_every) * check_every
    assert_honest(res, A, b, 1e-10)


def test_bicgstab_divergence_is_diverged():
    """A residual that grows past divtol times the initial one ends the solve DIVERGED."""
    A, b = _indefinite()
    free = lr.solve(A, b, method="scipy.bicgstab", rtol=1e-10, divtol=None, maxiter=300)
    peak = float(np.max(free.residual_history) / np.linalg.norm(b))
    assert peak > 1.5
    res = lr.solve(A, b, method="scipy.bicgstab", rtol=1e-10, divtol=1.5, maxiter=300)
    assert res.status is lr.Status.DIVERGED and not res.success
    r, _ = assert_honest(res, A, b, 1e-10)
    assert r <= np.linalg.norm(b) * (1 + 1e-12)


def test_gmres_final_true_residual_past_divtol_is_diverged(monkeypatch):
    """GMRES's estimates never grow; its true residual can (here a stand-in for scipy's
    gmres whose estimates look fine and whose x is far off): DIVERGED, x the best known
    iterate (x0), never scipy's bad x."""
    M, b = system("scipy.gmres")

    def bad_gmres(A, b_arg, x0=None, callback=None, callback_type=None, **kw):
        for k in range(3):
            A.matvec(np.ones_like(b_arg))
            callback(0.5 ** (k + 1))
        return 1e8 * np.ones_like(b_arg), 0

    monkeypatch.setattr(sla, "gmres", bad_gmres)
    x0 = 0.1 * np.ones(30)
    res = lr.solve(M, b, method="scipy.gmres", x0=x0, rtol=1e-8, divtol=1e5)
    assert res.status is lr.Status.DIVERGED and not res.success
    np.testing.assert_array_equal(res.x, x0)
    assert_honest(res, M, b, 1e-8)
    # with divtol=None it is an honest MAX_ITERATIONS; x is still the best known iterate
    res = lr.solve(M, b, method="scipy.gmres", x0=x0, rtol=1e-8, divtol=None)
    assert res.status is lr.Status.MAX_ITERATIONS and not res.success
    np.testing.assert_array_equal(res.x, x0)
    assert_honest(res, M, b, 1e-8)
    assert "true residual" in res.message


def _nan_operator(A, b, first_bad, always=False):
    """``A`` whose products number ``first_bad`` (and, with ``always``, every later one)
    return NaN."""
    count = [0]

    def prod(x, W):
        count[0] += 1
        y = x @ W
        bad = count[0] >= first_bad if always else count[0] == first_bad
        return y * np.nan if bad else y

    return lr.LinearOperator(A.shape, matvec=lambda x: prod(x, A.T), rmatvec=lambda y: prod(y, A),
                             like=b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("always", [False, True])
def test_nan_products_give_nonfinite_with_finite_x(method, always):
    """A one-time NaN product made lgmres / gcrotmk say MAX_ITERATIONS after 0 iterations."""
    M, b = system(method, n=16)
    x0 = 0.01 * np.ones(16)
    res = lr.solve(_nan_operator(M, b, 3, always), b, method=method, x0=x0, rtol=1e-12,
                   maxiter=300)
    assert res.status is lr.Status.NONFINITE and not res.success and not res.converged
    x = np.asarray(res.x)
    assert np.all(np.isfinite(x))
    r, _ = assert_honest(res, M, b, 1e-12)
    # x0 or a better iterate
    assert r <= np.linalg.norm(b - M @ x0) * (1 + 1e-12)
    assert np.all(np.isfinite(res.residual_history[0]))


def test_gmres_nan_operator_stops_at_the_nan():
    M, b = system("scipy.gmres", n=16)
    res = lr.solve(_nan_operator(M, b, 3, always=True), b, method="scipy.gmres", rtol=1e-12,
                   maxiter=300, restart=10)
    assert res.status is lr.Status.NONFINITE
    assert res.iterations <= 3 and res.matvecs <= 4  # stopped there, not after 300 steps
    np.testing.assert_array_equal(res.x, np.zeros(16))  # gmres forms no iterate: x0 = 0
    assert res.residual_norm == pytest.approx(np.linalg.norm(b))


@pytest.mark.parametrize("scale", [1e8, 1e-8])
def test_gmres_divergence_test_uses_the_preconditioned_initial_residual(scale):
    """scipy's gmres estimates ||M r||: a preconditioner scaled by 1e8 is no divergence."""
    A = convection_diffusion(8)
    b = np.ones(64)
    Minv = sp.diags(scale / A.diagonal())
    res = lr.solve(A, b, method="scipy.gmres", rtol=1e-8, M=Minv, divtol=10.0)
    assert res.status is lr.Status.CONVERGED, res.message
    assert_honest(res, A, b, 1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_x0_residual_is_nonfinite(method):
    M, b = system(method, n=16)
    x0 = np.ones(16)
    res = lr.solve(_nan_operator(M, b, 1), b, method=method, x0=x0, rtol=1e-8)
    assert res.status is lr.Status.NONFINITE and np.all(np.isfinite(res.x))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_extreme_scales_solve_like_norm_one(method, scale):
    M, b = system(method)
    res1 = lr.solve(M, b, method=method, rtol=1e-8)
    res = lr.solve(M, b * scale, method=method, rtol=1e-8)
    assert res.status is lr.Status.CONVERGED, res.message
    assert res.iterations == res1.iterations
    assert_honest(res, M, b * scale, 1e-8, scale=scale)
    np.testing.assert_allclose(np.asarray(res.x) / scale, res1.x, rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_atol_at_extreme_scales(method, scale):
    """atol is an absolute threshold whatever the scale of b (the facade divides b by a power
    of two: atol goes to scipy divided by the same)."""
    M, b = system(method)
    atol = 1e-9 * np.linalg.norm(b) * scale
    res = lr.solve(M, b * scale, method=method, rtol=0.0, atol=atol, maxiter=1000)
    assert res.status is lr.Status.CONVERGED, res.message
    r, thr = assert_honest(res, M, b * scale, 0.0, atol=atol, scale=scale)
    assert r <= atol


def test_float32_extreme_scales():
    M, b = system("scipy.gmres", dtype=np.float32)
    for scale in (1e-30, 1e30):
        bs = (b.astype(np.float64) * scale).astype(np.float32)
        res = lr.solve(M, bs, method="scipy.gmres", rtol=1e-4)
        assert res.status is lr.Status.CONVERGED, res.message
        assert_honest(res, M, bs, 1e-4 * 1.01, scale=scale)


# -- lsqr / lsmr: least-squares stops ------------------------------------------------------------

LSQ = ["scipy.lsqr", "scipy.lsmr"]


def _poisson(n=100):
    return sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n)).toarray()


def _inconsistent(m=30, n=20, seed=6):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), rng.standard_normal(m)


@pytest.mark.parametrize("method", LSQ)
def test_least_squares_option_solves_inconsistent_problems(method):
    A, b = _inconsistent()
    x_ls = np.linalg.lstsq(A, b, rcond=None)[0]
    res = lr.solve(A, b, method=method, rtol=1e-8, least_squares=True, maxiter=150)
    assert res.status is lr.Status.LEAST_SQUARES
    assert res.success and not res.converged  # asked for; the system is not solved
    r, thr = assert_honest(res, A, b, 1e-8)
    assert r > thr
    np.testing.assert_allclose(res.x, x_ls, rtol=1e-6)
    assert np.linalg.norm(A.T @ (b - A @ res.x)) <= 1e-6 * np.linalg.norm(A) * r
    hist = res.residual_history
    assert hist.shape == (res.iterations + 1,) and np.all(np.isnan(hist[1:-1]))
    assert hist[-1] == pytest.approx(r) and hist[0] == pytest.approx(np.linalg.norm(b))


@pytest.mark.parametrize("method", LSQ)
def test_least_squares_stop_without_the_option_is_not_a_success(method):
    """atol=0 to scipy keeps its least-squares test off, but its eps test (istop 5) still
    stops on an inconsistent problem: LEAST_SQUARES, which the user did not ask for."""
    A, b = _inconsistent()
    (x_s, istop, *_), _ = _scipy_reference(method, A, b, 1e-8, 150)
    res = lr.solve(A, b, method=method, rtol=1e-8, maxiter=150)
    assert not res.success and not res.converged
    assert res.status is (lr.Status.LEAST_SQUARES if istop in (2, 5) else lr.Status.MAX_ITERATIONS)
    assert istop in (2, 5)  # what scipy 1.17 does here
    r, thr = assert_honest(res, A, b, 1e-8)
    assert r > thr
    np.testing.assert_allclose(res.x, x_s, rtol=1e-12)
    assert "least_squares=True" in res.message


@pytest.mark.parametrize("method", LSQ)
def test_ill_conditioned_square_system_is_not_converged(method):
    """The issue's repro for lsqr: P(100), rtol=1e-4; the ||A^H r|| test fires at a true
    relative residual of about 0.9. With least_squares=True that is LEAST_SQUARES (a
    success, as asked), never CONVERGED; without it the bridge solves the system."""
    P, b = _poisson(), np.ones(100)
    res = lr.solve(P, b, method=method, rtol=1e-4, least_squares=True)
    r, thr = assert_honest(res, P, b, 1e-4)
    assert r > thr and res.status is lr.Status.LEAST_SQUARES and res.success
    assert not res.converged
    res = lr.solve(P, b, method=method, rtol=1e-4)
    assert res.status is lr.Status.CONVERGED
    assert_honest(res, P, b, 1e-4)


@pytest.mark.parametrize("method", LSQ)
@pytest.mark.parametrize("least_squares", [False, True])
def test_least_squares_option_is_scipy_atol(method, least_squares, monkeypatch):
    name = method.split(".")[1]
    original = getattr(sla, name)
    seen = []

    def spy(A, b_arg, *args, **kwargs):
        seen.append(dict(kwargs))
        return original(A, b_arg, *args, **kwargs)

    monkeypatch.setattr(sla, name, spy)
    M, b = system(method)
    res = lr.solve(M, b, method=method, rtol=1e-6, least_squares=least_squares)
    assert res.status in (lr.Status.CONVERGED, lr.Status.LEAST_SQUARES) and res.success
    assert_honest(res, M, b, 1e-6 if res.converged else 1.0)
    kw = seen[0]
    assert all("least_squares" not in k for k in seen)
    assert kw["atol"] == (1e-6 if least_squares else 0.0)
    assert kw["btol"] == pytest.approx(1e-6)
    # A stop on scipy's residual test widened by atol ||A|| ||x|| that the true residual does
    # not back goes on from x with atol=0 (the package's test).
    assert len(seen) == (2 if least_squares else 1)
    if least_squares:
        assert seen[1]["atol"] == 0.0 and seen[1]["btol"] == kw["btol"]
        assert seen[1]["x0"] is not None


@pytest.mark.parametrize("method", LSQ)
def test_consistent_system_with_least_squares_option(method):
    """A consistent system with least_squares=True is solved: CONVERGED, backed by the true
    residual (scipy's widened residual test stops it early; the bridge goes on from there)."""
    M, b = system(method)
    res = lr.solve(M, b, method=method, rtol=1e-8, least_squares=True)
    assert res.status is lr.Status.CONVERGED and res.success
    assert_honest(res, M, b, 1e-8)
    hist = res.residual_history
    assert hist.shape == (res.iterations + 1,) and np.all(np.isnan(hist[1:-1]))


@pytest.mark.parametrize("method", LSQ)
def test_batched_least_squares_statuses_are_per_system(method):
    A, b = _inconsistent()
    Bm = np.stack([A @ np.ones(20), b])  # consistent, inconsistent
    res = lr.solve(A, Bm, method=method, rtol=1e-8, batch_dims=1, least_squares=True, maxiter=150)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.LEAST_SQUARES)
    assert res.success
    np.testing.assert_array_equal(res.converged, [True, False])
    res = lr.solve(A, Bm, method=method, rtol=1e-8, batch_dims=1, maxiter=150)
    assert res.statuses[0] is lr.Status.CONVERGED and not res.success


# -- options validated by kind --------------------------------------------------------------------

BAD_OPTIONS = [
    ("scipy.gmres", {"restart": 0}, "restart"),
    ("scipy.gmres", {"restart": -3}, "restart"),
    ("scipy.gmres", {"restart": 2.5}, "restart"),
    ("scipy.lgmres", {"inner_m": 0}, "inner_m"),
    ("scipy.lgmres", {"outer_k": -1}, "outer_k"),
    ("scipy.lgmres", {"outer_k": 1.5}, "outer_k"),
    ("scipy.gcrotmk", {"m": 0}, "m"),
    ("scipy.gcrotmk", {"k": 0}, "k"),
    ("scipy.gcrotmk", {"truncate": "x"}, "truncate"),
    ("scipy.gcrotmk", {"discard_C": "yes"}, "discard_C"),
    ("scipy.lsqr", {"damp": -1.0}, "damp"),
    ("scipy.lsqr", {"conlim": -1.0}, "conlim"),
    ("scipy.lsqr", {"least_squares": "yes"}, "least_squares"),
    ("scipy.lsmr", {"damp": -1.0}, "damp"),
    ("scipy.lsmr", {"least_squares": 1}, "least_squares"),
]


@pytest.mark.parametrize("method, options, name", BAD_OPTIONS,
                         ids=[f"{m}-{n}={next(iter(o.values()))!r}" for m, o, n in BAD_OPTIONS])
def test_bad_options_name_the_option(method, options, name):
    """Before: ZeroDivisionError (restart=0), numpy's negative dimensions (restart=-3),
    UnboundLocalError (inner_m=0, m=0), IndexError (outer_k=-1)."""
    M, b = system(method)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        lr.solve(M, b, method=method, rtol=1e-8, **options)


GOOD_OPTIONS = [
    ("scipy.lgmres", {"outer_k": 0}),
    ("scipy.gcrotmk", {"k": None, "truncate": "smallest", "discard_C": True}),
    ("scipy.gcrotmk", {"m": 5, "k": 3}),
    ("scipy.lsqr", {"least_squares": True, "conlim": 0.0}),
]


@pytest.mark.parametrize("method, options", GOOD_OPTIONS)
def test_valid_options_pass(method, options):
    M, b = system(method)
    res = lr.solve(M, b, method=method, rtol=1e-8, **options)
    assert res.success
    assert_honest(res, M, b, 1e-8)


def test_option_kinds_declared():
    assert bridges.ScipyGMRES.option_kinds == {"restart": "positive_int"}
    assert bridges.ScipyLGMRES.option_kinds == {"inner_m": "positive_int", "outer_k": "nonnegative_int"}
    assert bridges.ScipyGCROTMK.option_kinds == {
        "m": "positive_int", "k": "positive_int_or_none", "truncate": ("oldest", "smallest"),
        "discard_C": "bool"}
    for cls in (bridges.ScipyLSQR, bridges.ScipyLSMR):
        assert cls.option_kinds == {"damp": "nonnegative", "conlim": "nonnegative_or_inf", "least_squares": "bool"}
        assert cls.options["least_squares"] is False


@needs_torch
def test_monitor_verdicts_on_torch_data():
    """The Monitor runs in b's backend: divergence and NaN products on torch CPU tensors."""
    A, b = _indefinite()
    res = lr.solve(torch.from_numpy(A), torch.from_numpy(b), method="scipy.cg", rtol=1e-10,
                   divtol=1e5, maxiter=300)
    assert res.status is lr.Status.DIVERGED and isinstance(res.x, torch.Tensor)
    assert_honest(res, A, b, 1e-10)
    M, b = system("scipy.lgmres", n=16)
    Mt, bt = torch.from_numpy(M), torch.from_numpy(b)
    count = [0]

    def mv(x):
        count[0] += 1
        y = x @ Mt.T
        return y * float("nan") if count[0] == 3 else y

    op = lr.LinearOperator((16, 16), matvec=mv, rmatvec=lambda y: y @ Mt, like=bt)
    res = lr.solve(op, bt, method="scipy.lgmres", rtol=1e-12, maxiter=300)
    assert res.status is lr.Status.NONFINITE and bool(torch.isfinite(res.x).all())
    assert_honest(res, M, b, 1e-12)


@pytest.mark.parametrize("method", ["scipy.cg", "scipy.bicgstab", "scipy.gmres"])
def test_failed_solve_returns_no_worse_than_its_best_iterate(method):
    """MAX_ITERATIONS with divergence detection off: x is the best iterate seen (x0 for
    gmres, whose iterates are not formed), never a worse one scipy happened to end on."""
    A, b = _indefinite()
    res = lr.solve(A, b, method=method, rtol=1e-10, divtol=None, maxiter=31)
    assert res.status in (lr.Status.MAX_ITERATIONS, lr.Status.BREAKDOWN) and not res.success
    r, _ = assert_honest(res, A, b, 1e-10)
    assert r <= np.linalg.norm(b) * (1 + 1e-12)
    if method != "scipy.gmres":
        assert r == pytest.approx(np.min(res.residual_history), rel=1e-9)
