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
from _backends import CASES, RTOL, make_operator, to_backend
from linsolve_rbp.backend import to_numpy
from linsolve_rbp.problems import convection_diffusion
from linsolve_rbp.solvers import scipy as bridges

torch = pytest.importorskip("torch")
xps = pytest.importorskip("array_api_strict")
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
@pytest.mark.parametrize("backend,kind", CASES)
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
