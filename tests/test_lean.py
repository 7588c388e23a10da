"""The lean iteration paths of cg, cgne, minres and lsqr and of the Monitor (issue 12):
the single-system host path, the batched path, the functional path on immutable arrays
and the device path give the same statuses, iteration counts and solutions; the monitor's
host-float update is the array update; no per-iteration host synchronisation with
``check_every=k``. Behaviour only, no timings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import linsolve_rbp as lr
from linsolve_rbp.solvers import _base
from linsolve_rbp.solvers._base import Monitor, Problem

from registry import optional

import importlib

lsolve = importlib.import_module("linsolve_rbp.solve")

torch = optional("torch")
xs = optional("array_api_strict")

METHODS = ("cg", "cgne", "minres", "lsqr")


def _spd(n=40, seed=0, spread=0.9):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.linspace(1 - spread, 1 + spread, n)) @ Q.T
    return A, rng.standard_normal(n)


def _close(r1, r2, rtol=1e-8, check_every=1):
    """Same status and products to within one check, x to rounding: the paths round
    differently (BLAS inner products and axpy against array expressions), which can move a
    stop that falls on the tolerance by one iteration, and so the check that sees it by
    ``check_every`` iterations, never more."""
    assert r1.status == r2.status
    assert abs(r1.iterations - r2.iterations) <= check_every
    assert abs((r1.matvecs + r1.rmatvecs) - (r2.matvecs + r2.rmatvecs)) <= 2 * check_every
    x1, x2 = np.asarray(r1.x, dtype=float), np.asarray(r2.x, dtype=float)
    assert np.allclose(x1, x2, rtol=rtol, atol=rtol * np.abs(x1).max())


def _hist(res, row=0):
    return np.asarray([float(np.asarray(h).reshape(-1)[row]) for h in res.residual_history])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("check_every", [1, 3])
def test_single_system_matches_generic_path(monkeypatch, method, check_every):
    """The host single-system path (no masks, host scalars, BLAS updates) and the generic
    array path (forced by declaring numpy not a host namespace) agree."""
    A, b = _spd()
    kw = dict(method=method, rtol=1e-10, check_every=check_every)
    lean = lr.solve(A, b, **kw)
    import linsolve_rbp.solvers.cg as C

    monkeypatch.setattr(_base, "is_host", lambda xp: False)
    monkeypatch.setattr(C, "is_host", lambda xp: False)
    generic = lr.solve(A, b, **kw)
    assert lean.converged
    _close(lean, generic, check_every=check_every)
    # The histories agree until rounding differences grow (late in the normal-equation
    # methods, whose recurrences amplify them as kappa^2): compare the first half.
    n = min(len(_hist(lean)), len(_hist(generic))) // 2
    assert np.allclose(_hist(lean)[:n], _hist(generic)[:n], rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_single_system_matches_batched(method):
    """One system alone (host path) and the same system in a batch of two (masks) reach
    the same x; the batch may run on to the next check."""
    A, b = _spd()
    one = lr.solve(A, b, method=method, rtol=1e-10)
    two = lr.solve(A, np.stack([b, b]), batch_dims=1, method=method, rtol=1e-10)
    assert one.converged and np.all(two.converged)
    assert abs(one.iterations - two.iterations) <= 1
    for row in (0, 1):
        assert np.allclose(one.x, two.x[row], rtol=1e-9, atol=1e-11)
    n = min(len(_hist(one)), len(_hist(two))) // 2
    assert np.allclose(_hist(one)[:n], _hist(two)[:n], rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_fixed_budget_single_matches_batched(method):
    A, b = _spd(seed=1)
    one = lr.solve(A, b, method=method, rtol=None, atol=None, maxiter=7)
    two = lr.solve(A, np.stack([b, 2 * b]), method=method, rtol=None, atol=None, maxiter=7, batch_dims=1)
    assert one.status.name == "COMPLETED" and one.iterations == 7
    assert np.allclose(one.x, two.x[0], rtol=1e-10, atol=1e-13)
    assert np.allclose(2 * one.x, two.x[1], rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(xs is None, reason="needs array_api_strict")
@pytest.mark.parametrize("method", METHODS)
def test_host_path_matches_generic_namespace(method):
    """numpy (host path) and array_api_strict (generic array path) agree."""
    A, b = _spd(seed=2)
    r_np = lr.solve(A, b, method=method, rtol=1e-10)
    r_xs = lr.solve(xs.asarray(A), xs.asarray(b), method=method, rtol=1e-10)
    _close(r_np, r_xs)


@pytest.fixture
def immutable_strict(monkeypatch):
    """array_api_strict arrays made immutable as JAX's are: no item assignment, and
    augmented assignment rebinds (``x += y`` is ``x = x + y``)."""
    if xs is None:
        pytest.skip("needs array_api_strict")
    Array = type(xs.asarray([1.0]))

    def refuse(self, key, value):
        raise TypeError("immutable arrays do not support in-place item assignment")

    monkeypatch.setattr(Array, "__setitem__", refuse)
    for name in ("__iadd__", "__isub__", "__imul__", "__itruediv__"):
        if name in Array.__dict__:
            monkeypatch.delattr(Array, name)
    return xs


@pytest.mark.parametrize("method", METHODS)
def test_functional_path_on_immutable_arrays(immutable_strict, method):
    A, b = _spd(seed=3)
    x = immutable_strict.asarray(np.zeros(3))
    with pytest.raises(TypeError):
        x[0] = 1.0
    y = x
    y += 1.0
    assert float(x[0]) == 0.0  # rebinding, not mutation
    r_im = lr.solve(immutable_strict.asarray(A), immutable_strict.asarray(b), method=method, rtol=1e-10)
    r_np = lr.solve(A, b, method=method, rtol=1e-10)
    assert r_im.converged
    _close(r_np, r_im)
    # batched too
    B = np.stack([b, -b])
    r_b = lr.solve(immutable_strict.asarray(A), immutable_strict.asarray(B), method=method, rtol=1e-10, batch_dims=1)
    assert np.all(np.asarray(r_b.converged))


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("method", METHODS)
def test_torch_matches_numpy(method):
    A, b = _spd(seed=4)
    r_np = lr.solve(A, b, method=method, rtol=1e-10)
    for ce in (1, 4):
        r_t = lr.solve(torch.from_numpy(A), torch.from_numpy(b), method=method, rtol=1e-10, check_every=ce)
        assert r_t.converged
        assert np.allclose(r_t.x.numpy(), r_np.x, rtol=1e-9, atol=1e-11)
        if ce == 1:
            _close(r_np, r_t)


class _SyncCounter:
    """Counts the ways a torch tensor reaches the host (``bool``, ``float``, ``int``,
    ``item``, ``tolist``, ``numpy``): on a CPU this is the synchronisation count that
    ``torch.cuda.set_sync_debug_mode`` reports on a GPU."""

    NAMES = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrap(self_, *a, _orig=orig, **k):
                self.n += 1
                return _orig(self_, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrap)


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batched", [False, True])
def test_no_per_iteration_sync_with_check_every(monkeypatch, method, batched):
    """With ``check_every=k`` the loop reads the device only every k iterations (plus a
    bounded number of reads to set up and to finish)."""
    A, b = _spd(n=60, seed=5, spread=0.99)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    if batched:
        bt = torch.stack([bt, 0.5 * bt])
    kw = dict(method=method, rtol=1e-12, maxiter=200, batch_dims=int(batched))
    # The torch iteration itself (CPU data would otherwise run on numpy views).
    monkeypatch.setattr(lsolve, "_host_views", lambda opts, b: False)
    lr.solve(At, bt, check_every=10, **kw)  # warm (first-product checks, caches)
    counts = {}
    for k in (10, 50):
        c = _SyncCounter(monkeypatch)
        res = lr.solve(At, bt, check_every=k, **kw)
        counts[k] = (c.n, res.iterations)
        monkeypatch.undo()
        monkeypatch.setattr(lsolve, "_host_views", lambda opts, b: False)
    (n10, it10), (n50, _) = counts[10], counts[50]
    assert it10 >= 30, "the problem must take enough iterations for the count to mean something"
    # A read per iteration would give at least it10 reads.
    assert n10 < it10 // 2
    assert n50 <= n10


def _prob(xp_b, *, rtol=1e-3, divtol=1e5, check_every=1, fixed=False):
    xp = _base._b.array_namespace(xp_b)
    B = xp_b if xp_b.ndim == 2 else xp_b[None, :]
    return Problem(
        xp=xp, A=None, mv=lambda v: v, rmv=None, psolve=None, b=B, x0=None,
        rtol=None if fixed else rtol, atol=None if fixed else 0.0, maxiter=100, callback=None,
        check_every=check_every, divtol=divtol, batched=False, options={},
        dtype=B.dtype, real_dtype=B.dtype, device=None,
    )


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("divtol", [1e5, None])
def test_monitor_host_update_is_the_array_update(fixed, divtol):
    """The monitor's host-float update of a single system and its array update agree on
    every test: convergence, divergence, NaN, best iterate, history, codes, callback."""
    b = np.ones((1, 3))
    seqs = [
        [0.5, 0.7, 0.2, 0.1, 1e-4, 1e-5],          # converges (rtol 1e-3 of ||b|| = 1.73)
        [0.5, 2.0, 1e3, 1e6, 1e9],                  # grows past divtol
        [0.5, float("nan"), 0.1],                   # NaN
        [0.5, float("inf")],
        [0.9, 0.8, 0.85, 0.3],
    ]
    for seq in seqs:
        mons = []
        for host in (True, False):
            prob = _prob(b, divtol=divtol, fixed=fixed)
            seen = []
            prob = dataclasses.replace(prob, callback=lambda k, x, r, seen=seen: seen.append((k, float(r))))
            mon = Monitor(prob, np.array([1.0]), x0=np.zeros((1, 3)))
            mon.host_single = host
            for i, v in enumerate(seq):
                x = np.full((1, 3), float(i))
                stop = mon.update(np.array([v]), x, fresh=bool(i % 2))
                if stop:
                    break
            mons.append((mon, seen, stop))
        (m1, s1, st1), (m2, s2, st2) = mons
        assert st1 == st2 and m1.k == m2.k
        assert np.array_equal(m1.codes, m2.codes)
        assert np.array_equal(m1.active, m2.active)
        assert np.array_equal(m1.best_r, m2.best_r, equal_nan=True)
        assert np.array_equal(m1.best_x, m2.best_x)
        assert np.array_equal(np.array(m1.history), np.array(m2.history), equal_nan=True)
        assert s1 == s2 or (np.allclose(np.array(s1), np.array(s2), equal_nan=True))
        o1, o2 = m1.finish(np.full((1, 3), 9.0)), m2.finish(np.full((1, 3), 9.0))
        assert np.array_equal(o1.codes, o2.codes) and np.array_equal(o1.x, o2.x)


def test_monitor_fresh_keeps_a_reference_and_default_copies():
    b = np.ones((1, 3))
    for host in (True, False):
        mon = Monitor(_prob(b), np.array([1.0]), x0=None)
        mon.host_single = host
        x = np.full((1, 3), 2.0)
        mon.update(np.array([0.5]), x, fresh=True)
        assert mon.best_x is x
        y = np.full((1, 3), 3.0)
        mon.update(np.array([0.25]), y)
        assert mon.best_x is not y and np.array_equal(mon.best_x, y)
        y[...] = 7.0  # the solver writes into its iterate: the copy is unaffected
        assert np.all(mon.best_x == 3.0)


def test_threshold_change_is_seen_by_the_host_update():
    """tighten() between rounds changes the threshold the host update tests against."""
    b = np.ones((1, 3))
    mon = Monitor(_prob(b, rtol=0.1), np.array([1.0]), x0=np.zeros((1, 3)))
    assert mon.host_single
    assert not mon.update(np.array([0.5]), np.zeros((1, 3)))
    mon.threshold = np.array([1e-6])
    assert not mon.update(np.array([0.1]), np.zeros((1, 3)))  # would have met 0.173
    assert bool(mon.active[0])
    assert mon.update(np.array([1e-7]), np.zeros((1, 3)))


def test_lean_benchmark_runs_at_toy_size(capsys):
    """asv_benchmarks/lean.py (the committed benchmark of these paths) runs end to end."""
    lean = pytest.importorskip("asv_benchmarks.lean")
    rows = lean.cg_poisson(8, repeat=1)
    rows += lean.overhead(methods=lean.OWN_METHODS, n=16, product_s=1e-5, repeat=1)
    assert len(rows) >= 1 + len(lean.OWN_METHODS)
    for name, ours, peer, p_ours, p_peer in rows:
        assert ours > 0 and peer > 0 and p_ours > 0 and p_peer > 0
    lean._print(rows)
    assert "overhead 1ms cg" in capsys.readouterr().out


# -- CPU torch data on numpy views; matrix products without layers --------------------------
@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("method", ["cg", "gmres", "bicgstab", "minres", "lsqr", "cgne", "neumann", "fixed_point"])
@pytest.mark.parametrize("kind", ["dense", "sparse", "closure"])
def test_torch_cpu_on_numpy_views_matches_torch_iteration(monkeypatch, method, kind):
    """CPU torch data runs the numpy iteration on views of its memory: the same result as
    the torch iteration (statuses, products to within one iteration, x to rounding), with
    tensors in the result and in the callback."""
    A, b = _spd(n=30, seed=7, spread=0.8)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    if kind == "sparse":
        op = At.to_sparse_csr()
    elif kind == "closure":
        op = lr.LinearOperator((30, 30), matvec=lambda v: v @ At.T, rmatvec=lambda v: v @ At, like=bt,
                               symmetric=True)
    else:
        op = At
    seen = []
    kw = dict(method=method, rtol=1e-10, callback=lambda k, x, r: seen.append((type(x), type(r))))
    views = lr.solve(op, bt, **kw)
    assert isinstance(views.x, torch.Tensor) and views.x.dtype == torch.float64
    assert seen and all(tx in (torch.Tensor, type(None)) and tr is torch.Tensor for tx, tr in seen)
    monkeypatch.setattr(lsolve, "_host_views", lambda opts, b: False)
    direct = lr.solve(op, bt, **kw)
    assert views.converged and direct.converged
    _close(views, direct, rtol=1e-7)
    assert np.allclose(views.x.numpy(), np.linalg.solve(A, b), rtol=1e-6)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_views_fall_back_when_products_need_a_graph():
    """An operator whose products autograd tracks: the solve runs on the tensors (x carries
    autograd's record, as it did before numpy views), and the products are counted once."""
    A, b = _spd(n=20, seed=8)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    op = lr.LinearOperator((20, 20), matvec=lambda v: w * (v @ At.T), like=bt, symmetric=True)
    res = lr.solve(op, bt, method="cg", rtol=1e-10)
    assert res.converged and res.x.requires_grad and res.matvecs == op.matvec_count


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_inputs_are_not_written_by_the_views():
    A, b = _spd(n=25, seed=9)
    At, bt, x0 = torch.from_numpy(A.copy()), torch.from_numpy(b.copy()), torch.ones(25, dtype=torch.float64)
    for method in ("cg", "gmres", "bicgstab", "minres", "lsqr", "neumann"):
        lr.solve(At, bt, method=method, x0=x0, rtol=1e-8, maxiter=3)
        assert np.array_equal(bt.numpy(), b) and np.array_equal(At.numpy(), A)
        assert torch.equal(x0, torch.ones(25, dtype=torch.float64))


def test_sparse_symmetry_tag_is_kept_per_matrix_and_renewed_on_change():
    sp = pytest.importorskip("scipy.sparse")
    A, _ = _spd(n=12, seed=10)
    S = sp.csr_matrix(A)
    assert lr.aslinearoperator(S).symmetric is True
    ident = id(S)
    assert ident in lsolve.aslinearoperator.__globals__["_SYMMETRY_TAGS"]
    S.data[0] += 1.0  # S[0, 0]: still symmetric
    assert lr.aslinearoperator(S).symmetric is True
    S[0, 1] = S[0, 1] + 5.0  # no longer symmetric: the checksum changed
    assert lr.aslinearoperator(S).symmetric is False
    with pytest.raises(ValueError, match="symmetric"):
        lr.solve(S, np.ones(12), method="cg")
    if torch is not None:
        T = torch.from_numpy(A).to_sparse_csr()
        assert lr.aslinearoperator(T).symmetric is True
        T.values()[1] += 3.0  # in place: the version counter moves
        assert lr.aslinearoperator(T).symmetric is False


def test_sparse_transpose_is_formed_on_first_use():
    sp = pytest.importorskip("scipy.sparse")
    M = sp.random(15, 15, density=0.3, random_state=1, format="csr") + sp.eye(15)
    op = lr.aslinearoperator(M)
    assert "_SH_" not in op.__dict__
    x = np.arange(15.0)
    assert np.allclose(op.matvec(x), M @ x) and "_SH_" not in op.__dict__
    assert np.allclose(op.rmatvec(x), M.T @ x)
    res = lr.solve(M, np.ones(15), method="lsqr", rtol=1e-10)
    assert res.converged and np.allclose(M @ res.x, np.ones(15), atol=1e-8)


# -- the fixed-budget series of the DEQ backward -------------------------------------------
@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_series_is_the_full_path_result(method, batch_dims):
    """PreparedSolve.series on T's products gives what the full path gives on I - T: status,
    iterations, products, residual history and x (to rounding: one subtraction fewer)."""
    rng = np.random.default_rng(11)
    T = torch.from_numpy(0.5 * rng.standard_normal((16, 16)) / 4)
    b = torch.from_numpy(rng.standard_normal((3, 16) if batch_dims else 16))
    prep = lsolve.PreparedSolve(method, {"rtol": None, "atol": None, "maxiter": 9, "batch_dims": batch_dims})
    assert prep.can_series
    lean = prep.series(lambda v: v @ T, b)
    A = lr.IdentityOperator(16, like=b[0] if batch_dims else b) - lr.aslinearoperator(T.T)
    full = prep(A, b)
    assert lean is not None and lean.status is full.status is lr.Status.COMPLETED
    assert (lean.iterations, lean.matvecs, lean.rmatvecs) == (full.iterations, full.matvecs, full.rmatvecs)
    assert np.allclose(lean.residual_history, full.residual_history, rtol=1e-10)
    assert np.allclose(lean.residual_norm, full.residual_norm, rtol=1e-10)
    assert torch.allclose(lean.x, full.x, rtol=1e-12, atol=1e-12)
    assert type(lean.converged) is type(full.converged) and lean.message.split("(")[0] == full.message.split("(")[0]


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_series_leaves_unusual_terms_to_the_full_path():
    b = torch.ones(8, dtype=torch.float64)
    prep = lsolve.PreparedSolve("neumann", {"rtol": None, "atol": None, "maxiter": 5})
    assert prep.series(lambda v: 2.0 * v, b) is None  # terms grow: the full path notes it
    assert prep.series(lambda v: v * float("nan"), b) is None
    assert prep.series(lambda v: 0.5 * v, 1e-30 * b) is None  # scaled by the full path
    assert prep.series(lambda v: 0.5 * v, b.float()) is not None
    assert prep.series(lambda v: 0.5 * v, b.half()) is None
    for opts in ({"rtol": 1e-6}, {"rtol": None, "atol": None, "maxiter": 5, "callback": print},
                 {"rtol": None, "atol": None, "maxiter": 5, "check_every": 2}):
        assert not lsolve.PreparedSolve("neumann", opts).can_series
    assert not lsolve.PreparedSolve("gmres", {"rtol": None, "atol": None, "maxiter": 5}).can_series


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_layer_backward_series_matches_full_solve(method, batch_dims):
    """fixed_point's fixed-budget backward on the VJPs themselves (the series) gives the
    gradients and the result of the full solve (forced here by check_every=2, which the
    series does not take)."""
    from linsolve_rbp.adapters import torch as lrt

    gen = torch.Generator().manual_seed(3)
    W = (0.3 * torch.randn(6, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 6, generator=gen, dtype=torch.float64)

    def run(check_every):
        W.grad = None
        backward = {"method": method, "rtol": None, "atol": None, "maxiter": 7, "check_every": check_every}
        h, info = lrt.fixed_point(lambda h: torch.tanh(h @ W.T + x), torch.zeros(4, 6, dtype=torch.float64),
                                  backward=backward, batch_dims=batch_dims, return_info=True)
        (h * g).sum().backward()
        return W.grad.clone(), info.backward

    (g1, r1), (g2, r2) = run(1), run(2)
    assert r1.status is r2.status is lr.Status.COMPLETED
    assert (r1.iterations, r1.matvecs) == (r2.iterations, r2.matvecs)
    assert np.allclose(r1.residual_history, r2.residual_history, rtol=1e-10)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_rerun_on_tensors_counts_each_product_once_in_composite_operators():
    """A CPU torch solve whose product autograd tracks starts on numpy views and runs again
    on the tensors: every operator, the parts of a composite ones included, counts the
    products of the solve that returned, not those of the abandoned start as well."""
    A, b = _spd(n=12, seed=3)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    w = torch.ones(12, dtype=torch.float64, requires_grad=True)

    class Tracked(lr.LinearOperator):
        def __init__(self):
            self._setup((12, 12), dtype=At.dtype, xp=lr.backend.array_namespace(At), device=At.device, backend="torch")

        def _matvec(self, x):
            return 0.5 * (At @ x) * w

    tracked, dense = Tracked(), lr.aslinearoperator(0.5 * At)
    res = lr.solve(tracked + dense, bt, method="cg", rtol=1e-10)
    assert res.x.requires_grad
    assert tracked.matvec_count == dense.matvec_count == res.matvecs


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_host_view_info_holds_tensors_as_the_torch_iteration_does(monkeypatch):
    """Batched lsqr on CPU tensors: ``info`` holds the same kinds (bool tensors included)
    whether the iteration ran on numpy views or on the tensors."""
    rng = np.random.default_rng(4)
    At = torch.from_numpy(rng.standard_normal((8, 5)))
    bt = torch.from_numpy(rng.standard_normal((2, 8)))
    views = lr.solve(At, bt, method="lsqr", batch_dims=1).info
    monkeypatch.setattr(lsolve, "_host_views", lambda opts, b: False)
    tensors = lr.solve(At, bt, method="lsqr", batch_dims=1).info
    assert views.keys() == tensors.keys()
    for k in views:
        assert type(views[k]) is type(tensors[k]), k
        if isinstance(tensors[k], torch.Tensor):
            assert views[k].dtype == tensors[k].dtype, k
