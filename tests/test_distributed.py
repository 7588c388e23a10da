"""Solves whose vectors are sharded over ranks (``solve(..., reduction=...)``), on ranks
simulated in one process (:class:`linsolve_rbp.distributed.Simulated`): the algebra and the
agreement of the ranks, in milliseconds. The same solves over real processes (gloo, MPI) are
in test_distributed_multiprocess.py.

What users rely on: a sharded solve is the single-process solve (same status, same
iterations, x to 1e-12 in float64) for every own method; all ranks take every decision
together (a NaN, a huge entry, a converged system on one rank only); the result counts the
collectives; the scipy bridges refuse sharded input; the local path is untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

import linsolve_rbp as lr
from linsolve_rbp import distributed as lrd
from linsolve_rbp.solvers import _base

OWN = ("cg", "gmres", "bicgstab", "minres", "lsqr", "cgne", "neumann", "fixed_point")
N = 24


def _system(method, n=N, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, n))
    if np.dtype(dtype).kind == "c":
        Q = Q + 1j * rng.standard_normal((n, n))
    if method in ("neumann", "fixed_point"):
        A = np.eye(n) - 0.4 * Q / np.linalg.norm(Q, 2)
    elif method in ("cg", "minres"):
        A = Q @ Q.conj().T / n + np.eye(n)
    else:
        A = np.eye(n) + 0.3 * Q / np.linalg.norm(Q, 2)
    b = rng.standard_normal(n) + (1j * rng.standard_normal(n) if np.dtype(dtype).kind == "c" else 0)
    return A.astype(dtype), b.astype(dtype)


def _offsets(sizes):
    return np.cumsum([0, *sizes])


def _sharded(A, b, method, sizes, like=np.asarray, **kw):
    """Solve A x = b split over len(sizes) simulated ranks; the results of all ranks."""
    off = _offsets(sizes)
    sym = True if method in ("cg", "minres") else None

    def rank(red):
        s = slice(off[red.rank], off[red.rank + 1])
        op = lrd.row_sharded(like(A[s]), red, sizes=sizes, symmetric=sym)
        return lr.solve(op, like(b[..., s]), method=method, reduction=red, **kw)

    return lrd.Simulated(len(sizes)).run(rank)


def _assert_same(ref, results, tol=1e-12, to_np=np.asarray):
    x = np.concatenate([to_np(r.x) for r in results], axis=-1)
    assert [r.iterations for r in results] == [ref.iterations] * len(results)
    assert {r.status for r in results} == {ref.status}
    assert np.max(np.abs(x - to_np(ref.x))) <= tol * max(1.0, float(np.max(np.abs(to_np(ref.x)))))
    counts = {r.info["allreduces"] for r in results}
    assert len(counts) == 1 and counts.pop() > 0


@pytest.mark.parametrize("method", OWN)
@pytest.mark.parametrize("sizes", [(11, 13), (7, 9, 8)])
def test_sharded_solve_is_the_single_process_solve(method, sizes):
    A, b = _system(method)
    ref = lr.solve(A, b, method=method, rtol=1e-11)
    assert ref.converged
    _assert_same(ref, _sharded(A, b, method, sizes, rtol=1e-11))


@pytest.mark.parametrize("method", OWN)
def test_a_rank_holding_no_rows(method):
    """A rank whose shard is empty (first or last) takes part in every collective: the
    solve is the single-process one; with no rows anywhere every rank returns at once."""
    A, b = _system(method)
    ref = lr.solve(A, b, method=method, rtol=1e-11)
    for sizes in ((0, 11, 13), (11, 13, 0)):
        _assert_same(ref, _sharded(A, b, method, sizes, rtol=1e-11))
    empty = _sharded(np.zeros((0, 0)), np.zeros(0), method, (0, 0), rtol=1e-11)
    assert [(r.iterations, r.x.shape, r.info["allreduces"]) for r in empty] == [(0, (0,), 1)] * 2


@pytest.mark.parametrize("method", OWN)
def test_sharded_batched_and_fixed_budget(method):
    A, b = _system(method)
    B = np.stack([b, 3.0 * b + 1.0, np.zeros_like(b)])
    ref = lr.solve(A, B, method=method, rtol=1e-11, batch_dims=1)
    _assert_same(ref, _sharded(A, B, method, (10, 14), rtol=1e-11, batch_dims=1))
    if lr.get_method(method).accepts_fixed_budget:
        kw = dict(rtol=None, atol=None, maxiter=5)
        _assert_same(lr.solve(A, b, method=method, **kw), _sharded(A, b, method, (10, 14), **kw))


@pytest.mark.parametrize("method", ["cg", "gmres", "bicgstab", "minres"])
def test_sharded_complex(method):
    A, b = _system(method, dtype=np.complex128)
    ref = lr.solve(A, b, method=method, rtol=1e-11)
    _assert_same(ref, _sharded(A, b, method, (12, 12), rtol=1e-11))


@pytest.mark.parametrize("method", OWN)
def test_sharded_torch(method):
    torch = pytest.importorskip("torch")
    A, b = _system(method)
    ref = lr.solve(torch.from_numpy(A), torch.from_numpy(b), method=method, rtol=1e-11)
    got = _sharded(A, b, method, (11, 13), like=lambda a: torch.from_numpy(np.ascontiguousarray(a)), rtol=1e-11)
    _assert_same(ref, got, to_np=lambda t: t.numpy() if hasattr(t, "numpy") else np.asarray(t))


@pytest.mark.parametrize("method", ("auto",) + OWN)
def test_collectives_are_made_on_the_data_device(method):
    """Every collective of a solve on torch tensors is handed torch tensors on b's device,
    never numpy arrays: an NCCL group reduces only CUDA tensors."""
    torch = pytest.importorskip("torch")

    class Recording(lrd.Local):
        kinds: set = set()

        def _allreduce(self, xp, flat, op):
            self.kinds.add((type(flat).__module__.split(".")[0], str(getattr(flat, "device", None))))
            return flat

    A, b = _system("cg" if method == "auto" else method)
    red = Recording()
    res = lr.solve(torch.from_numpy(A), torch.from_numpy(b), method=method, rtol=1e-10, reduction=red)
    assert res.info["allreduces"] == red.allreduces > 0
    assert red.kinds == {("torch", "cpu")}


def test_local_reduction_counts_and_changes_nothing():
    A, b = _system("cg")
    plain = lr.solve(A, b, method="cg", rtol=1e-11)
    assert "allreduces" not in plain.info
    red = lrd.Local()
    counted = lr.solve(A, b, method="cg", rtol=1e-11, reduction=red)
    assert counted.iterations == plain.iterations and counted.status == plain.status
    np.testing.assert_allclose(counted.x, plain.x, rtol=0, atol=1e-13)
    assert counted.info["allreduces"] == red.allreduces > counted.iterations
    # Without a reduction, nothing is left switched on.
    assert _base._GIVEN == 0 and _base.current_reduction() is lrd.LOCAL


def test_interface_functions_are_local_without_a_reduction():
    from linsolve_rbp.solvers import allreduce_sum, current_reduction, dot, local_dot, norm, safe_norm

    u = np.arange(6.0).reshape(2, 3)
    u0 = u[0]
    out = allreduce_sum(np, u, u0)
    assert isinstance(out, tuple) and out[0] is u and out[1] is u0
    np.testing.assert_array_equal(dot(np, u, u), local_dot(np, u, u))
    np.testing.assert_array_equal(norm(np, u), np.linalg.norm(u, axis=-1))
    np.testing.assert_allclose(safe_norm(np, u), np.linalg.norm(u, axis=-1))
    assert current_reduction() is lrd.LOCAL


def test_interface_functions_reduce_on_simulated_ranks():
    from linsolve_rbp.solvers import allreduce_sum, current_reduction, dot, local_dot, norm, safe_norm, using_reduction

    full = np.array([[3.0, 4.0, 1e300, 12.0], [1e-300, 0.0, 2e-300, 0.0]])
    parts = (full[:, :2], full[:, 2:])

    def rank(red):
        v = parts[red.rank]
        with using_reduction(red):
            assert current_reduction() is red
            before = red.allreduces
            ones = v * 0 + 1.0
            s, d = allreduce_sum(np, v[:, :1], local_dot(np, ones, ones))
            fused = red.allreduces - before
            np.testing.assert_array_equal(d, [4.0, 4.0])
            np.testing.assert_array_equal(dot(np, ones, ones), [4.0, 4.0])
            return s, safe_norm(np, v), norm(np, ones[:, :1]), fused

    (s0, n0, m0, f0), (s1, n1, m1, f1) = lrd.Simulated(2).run(rank)
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(s0[:, 0], full[:, 0] + full[:, 2])
    # Scale-safe over the ranks: neither 1e300 squared nor 1e-300 squared is formed.
    np.testing.assert_allclose(n0, [1e300, np.sqrt(5.0) * 1e-300], rtol=1e-15)
    np.testing.assert_array_equal(n0, n1)
    np.testing.assert_allclose(m0, np.sqrt(2.0))
    assert f0 == f1 == 1  # the pair in one collective


def test_decisions_are_taken_together():
    """A non-finite entry, or a right-hand side of 1e300, on one rank only: every rank
    reports what the single-process solve reports, from the same iterations."""
    A, b = _system("gmres")
    for bad in (np.nan, 1e300):
        bb = b.copy()
        bb[3] = bad
        ref = lr.solve(A, bb, method="bicgstab", rtol=1e-10)
        got = _sharded(A, bb, "bicgstab", (12, 12), rtol=1e-10)
        assert {r.status for r in got} == {ref.status}
        assert [r.iterations for r in got] == [ref.iterations] * 2
        if np.isfinite(bad):
            x = np.concatenate([r.x for r in got])
            np.testing.assert_allclose(x, ref.x, rtol=1e-12)
        else:
            assert all(np.all(np.isfinite(r.x)) for r in got)


def test_auto_picks_its_method_from_the_global_shape():
    """``method="auto"`` on a rectangular system whose shards are square on one rank only:
    every rank picks lsqr, as one process does, and the solve is the single-process one."""
    rng = np.random.default_rng(4)
    A = rng.standard_normal((200, 100)) + 3.0 * np.eye(200, 100)
    b = rng.standard_normal(200)
    ref = lr.solve(A, b, rtol=1e-10)
    m_r, n_r = (60, 140), (60, 40)  # rank 0 holds a square (60, 60) shard

    def rank(red):
        rows = slice(sum(m_r[: red.rank]), sum(m_r[: red.rank + 1]))
        cols = slice(sum(n_r[: red.rank]), sum(n_r[: red.rank + 1]))
        A_r = A[rows]

        def rmatvec(y):
            (w,) = red.allreduce_sum(np, (A_r.T @ y,))
            return w[..., cols]

        op = lr.LinearOperator((m_r[red.rank], n_r[red.rank]), like=b,
                               matvec=lambda x: A_r @ red.allgather(np, x, sizes=n_r), rmatvec=rmatvec)
        res = lr.solve(op, b[rows], rtol=1e-10, reduction=red)
        return res.method, res.iterations, res.status, res.x

    got = lrd.Simulated(2).run(rank)
    assert [g[:3] for g in got] == [("lsqr", ref.iterations, ref.status)] * 2
    np.testing.assert_allclose(np.concatenate([g[3] for g in got]), ref.x, rtol=0, atol=1e-12)


def test_zero_right_hand_side_on_one_rank_only():
    A, b = _system("cg")
    bb = b.copy()
    bb[:12] = 0.0
    ref = lr.solve(A, bb, method="cg", rtol=1e-11, x0=np.ones(N))
    off = _offsets((12, 12))

    def rank(red):
        s = slice(off[red.rank], off[red.rank + 1])
        op = lrd.row_sharded(A[s], red, sizes=(12, 12), symmetric=True)
        return lr.solve(op, bb[s], method="cg", rtol=1e-11, x0=np.ones(12), reduction=red)

    _assert_same(ref, lrd.Simulated(2).run(rank))


def _kinds():
    import scipy.sparse as sp

    kinds = {"numpy": (np.asarray, np.asarray), "scipy.sparse": (sp.csr_matrix, np.asarray)}
    try:
        import torch
    except ImportError:  # pragma: no cover
        return kinds
    kinds["torch"] = (torch.from_numpy, torch.from_numpy)
    kinds["torch CSR"] = (lambda a: torch.from_numpy(a).to_sparse_csr(), torch.from_numpy)
    return kinds


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", list(_kinds()))
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_row_sharded_finds_its_sizes_and_has_an_adjoint(kind, dtype):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((10, 10)).astype(dtype)
    if dtype == np.complex128:
        A = A + 1j * rng.standard_normal((10, 10))
    A[rng.random((10, 10)) < 0.5] = 0
    x, y = rng.standard_normal(10).astype(dtype), rng.standard_normal(10).astype(dtype)
    off = _offsets((4, 6))
    mat, vec = _kinds()[kind]

    def rank(red):
        s = slice(off[red.rank], off[red.rank + 1])
        op = lrd.row_sharded(mat(np.ascontiguousarray(A[s])), red)  # sizes: one all-gather
        return np.asarray(op @ vec(x[s].copy())), np.asarray(op.H @ vec(y[s].copy()))

    (a0, t0), (a1, t1) = lrd.Simulated(2).run(rank)
    np.testing.assert_allclose(np.concatenate([a0, a1]), A @ x, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.concatenate([t0, t1]), A.conj().T @ y, rtol=0, atol=1e-14)


def test_row_sharded_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="sizes"):
        lrd.row_sharded(np.eye(3, 5), lrd.Local(), sizes=[4])
    with pytest.raises(TypeError, match="reduction must be a reduction"):
        lrd.row_sharded(np.eye(3), lrd.Simulated(2))  # the group, not one of its ranks
    with pytest.raises(ValueError, match="A_local must be a 2-D"):
        lrd.row_sharded(np.ones(3), lrd.Local())


def test_allreduce_max_refuses_complex_on_every_engine():
    """The maximum of complex values is not defined: every engine says so (not only those
    whose collective would fail), so code tested with Local or Simulated fails alike."""
    z = np.ones(2) + 1j
    with pytest.raises(ValueError, match="real arrays"):
        lrd.Local().allreduce_max(np, [np.ones(1), z])

    def rank(red):
        with pytest.raises(ValueError, match="real arrays"):
            red.allreduce_max(np, [z])
        return red.allreduces

    assert lrd.Simulated(2, timeout=5).run(rank) == [0, 0]


@pytest.mark.parametrize("method", ["scipy.cg", "scipy.gmres", "scipy.lsqr"])
def test_scipy_bridges_refuse_sharded_input(method):
    A, b = _system("cg")
    op = lr.aslinearoperator(A[:12, :12])

    def rank(red):
        with pytest.raises(ValueError, match="sharded over 2 ranks"):
            lr.solve(op, b[:12], method=method, reduction=red)
        return op.matvec_count

    assert lrd.Simulated(2).run(rank) == [0, 0]
    # One rank: nothing is sharded, and the bridge runs.
    assert lr.solve(A, b, method=method, rtol=1e-8, reduction=lrd.Local()).converged


def test_a_sharded_backward_through_a_scipy_bridge_is_refused_when_called():
    """fixed_point validates its backward options when it is called: a scipy bridge with a
    reduction over two ranks is refused there, naming ``backward``, before f runs (not in the
    middle of the backward pass, after the forward's collectives)."""
    torch = pytest.importorskip("torch")
    from linsolve_rbp.adapters import torch as lrt

    calls = []

    def rank(red):
        W = (0.3 * torch.eye(3, dtype=torch.float64)).requires_grad_()

        def f(h):
            calls.append(red.rank)
            return W @ h + 1.0

        with pytest.raises(ValueError, match="backward: method 'scipy.gmres' cannot solve a system sharded"):
            lrt.fixed_point(f, torch.zeros(3, dtype=torch.float64), forward_tol=None, forward_maxiter=3,
                            backward={"method": "scipy.gmres", "reduction": red})

    lrd.Simulated(2, timeout=5).run(rank)
    assert calls == []
    with pytest.raises(ValueError, match="sharded over 2 ranks"):
        lr.solve(np.eye(2), np.ones(2), method="scipy.cg", reduction=lrd.Simulated(2)[0])


def test_reduction_argument_is_validated():
    with pytest.raises(TypeError, match="reduction"):
        lr.solve(np.eye(2), np.ones(2), reduction="mpi")
    with pytest.raises(TypeError, match="reduction"):
        lr.solve(np.eye(2), np.ones(2), reduction=object())


def test_simulated_ranks_that_disagree_raise_instead_of_hanging():
    def rank(red):
        from linsolve_rbp.solvers import allreduce_sum, using_reduction

        with using_reduction(red):
            if red.rank == 0:
                allreduce_sum(np, np.ones(2))
            else:
                allreduce_sum(np, np.ones(3))

    with pytest.raises(RuntimeError, match="disagree"):
        lrd.Simulated(2).run(rank)

    def one_more(red):
        from linsolve_rbp.solvers import allreduce_sum, using_reduction

        with using_reduction(red):
            for _ in range(1 + red.rank):
                allreduce_sum(np, np.ones(2))

    with pytest.raises(RuntimeError, match="disagree"):
        lrd.Simulated(2).run(one_more)


def test_simulated_raises_the_rank_error():
    def rank(red):
        if red.rank == 1:
            raise KeyError("boom")
        red.allreduce_sum(np, [np.ones(1)])

    with pytest.raises(KeyError, match="boom"):
        lrd.Simulated(2, timeout=5).run(rank)


def test_engines_need_their_setup():
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            lrd.TorchDistributed()
    with pytest.raises(ValueError, match="size"):
        lrd.Simulated(0)
    with pytest.raises(TypeError, match="comm must be None or an mpi4py communicator"):
        lrd.MPI("world")  # refused before mpi4py is imported


@pytest.mark.parametrize("method", ["gmres", "bicgstab"])
def test_fixed_point_backward_on_a_sharded_state(method):
    """A DEQ whose state is split over two ranks (f all-gathers it): the backward solve runs
    with backward={"reduction": red}; h and the gradients are the single-process ones."""
    torch = pytest.importorskip("torch")
    from linsolve_rbp.adapters import torch as lrt

    torch.manual_seed(0)
    n, sizes = 12, (5, 7)
    off = _offsets(sizes)
    W = 0.4 * torch.randn(n, n, dtype=torch.float64) / n**0.5
    x = torch.randn(n, dtype=torch.float64)
    opts = dict(forward_maxiter=60, forward_tol=None)
    back = {"method": method, "rtol": 1e-12}

    Wp = W.clone().requires_grad_()
    h = lrt.fixed_point(lambda h: torch.tanh(Wp @ h + x), torch.zeros(n, dtype=torch.float64), backward=back, **opts)
    (h**2).sum().backward()

    def rank(red):
        s = slice(off[red.rank], off[red.rank + 1])
        Wl = W[s].clone().requires_grad_()

        def f(hl):
            return torch.tanh(Wl @ red.allgather(torch, hl, sizes=sizes) + x[s])

        hl, info = lrt.fixed_point(f, torch.zeros(sizes[red.rank], dtype=torch.float64),
                                   backward=dict(back, reduction=red), return_info=True, **opts)
        (hl**2).sum().backward()
        return hl.detach(), Wl.grad, info.backward

    got = lrd.Simulated(2).run(rank)
    torch.testing.assert_close(torch.cat([g[0] for g in got]), h.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.cat([g[1] for g in got]), Wp.grad, rtol=0, atol=1e-12)
    assert got[0][2].iterations == got[1][2].iterations and got[0][2].info["allreduces"] > 0


@pytest.mark.parametrize("method, per_iteration", [("bicgstab", 4), ("minres", 3), ("neumann", 1), ("fixed_point", 1)])
@pytest.mark.parametrize("batch", [False, True])
def test_collectives_per_iteration(method, per_iteration, batch):
    """The fused inner products: each further iteration costs this many collectives, for
    one system or a batch (the systems of a batch share them)."""
    A, b = _system(method, n=60)
    if batch:
        b = np.stack([b, -b, 2 * b])
    kw = dict(rtol=None, atol=None, batch_dims=int(batch))
    counts = [lr.solve(A, b, method=method, maxiter=k, reduction=lrd.Local(), **kw).info["allreduces"]
              for k in (10, 20)]
    assert counts[1] - counts[0] == 10 * per_iteration


def test_compile_with_a_sharded_solve_is_refused():
    torch = pytest.importorskip("torch")
    A = 0.5 * torch.eye(4, dtype=torch.float64)

    def rank(red):
        with pytest.raises(ValueError, match="compile=True"):
            lr.solve(A, torch.ones(4, dtype=torch.float64), method="neumann", rtol=None, atol=None,
                     maxiter=3, compile=True, reduction=red)

    lrd.Simulated(2).run(rank)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sharded_low_precision(dtype):
    """float32 and float16 (iterated in float32, its x rounded and checked again over all
    ranks): the single-process status and iterations, x to the dtype's rounding."""
    torch = pytest.importorskip("torch")
    A, b = _system("gmres", n=16)
    dt = getattr(torch, dtype)
    At, bt = torch.from_numpy(A).to(dt), torch.from_numpy(b).to(dt)
    ref = lr.solve(At, bt, method="gmres", rtol=1e-3)

    def rank(red):
        s = slice(8 * red.rank, 8 * red.rank + 8)
        return lr.solve(lrd.row_sharded(At[s], red, sizes=[8, 8]), bt[s], method="gmres",
                        rtol=1e-3, reduction=red)

    got = lrd.Simulated(2).run(rank)
    assert [r.iterations for r in got] == [ref.iterations] * 2 and {r.status for r in got} == {ref.status}
    x = torch.cat([r.x for r in got]).double()
    assert float((x - ref.x.double()).abs().max()) <= 4 * float(torch.finfo(dt).eps) * float(ref.x.double().abs().max())


def test_a_local_solve_inside_a_sharded_one_stays_local():
    """A preconditioner that solves a local system with solve() (no reduction) inside a
    sharded solve: its inner products are not reduced."""
    A, b = _system("gmres")
    ref = lr.solve(A, b, method="gmres", rtol=1e-11)
    off = _offsets((12, 12))

    def rank(red):
        s = slice(off[red.rank], off[red.rank + 1])
        D = np.diag(np.diag(A)[s])

        def M(v):  # the block-diagonal inverse, by a local solve
            return lr.solve(D, v, method="cg", rtol=1e-14).x

        op = lrd.row_sharded(A[s], red, sizes=(12, 12))
        return lr.solve(op, b[s], method="gmres", rtol=1e-11, reduction=red,
                        M=lr.LinearOperator((12, 12), matvec=M, like=b[s]))

    got = lrd.Simulated(2).run(rank)
    x = np.concatenate([r.x for r in got])
    assert all(r.converged for r in got)
    np.testing.assert_allclose(x, ref.x, rtol=1e-9, atol=1e-12)


def test_default_maxiter_follows_the_global_size():
    """Without maxiter the budget is the method's default for the global n, the same on every
    rank: uneven shards (3 and 9 rows) at a tolerance cg cannot meet run in step and stop
    together, with the single-process iteration count."""
    A, b = _system("cg", n=12)
    ref = lr.solve(A, b, method="cg", rtol=1e-17)
    assert ref.status is lr.Status.MAX_ITERATIONS and ref.iterations == 120
    results = _sharded(A, b, "cg", [3, 9], rtol=1e-17)
    assert [r.iterations for r in results] == [ref.iterations] * 2
    assert {r.status for r in results} == {ref.status}
