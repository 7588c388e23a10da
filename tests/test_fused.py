"""Fused collectives (issue 14, item 3): the single-reduction variants of cg and cgne, gmres's
Arnoldi step with its inner products in one collective (or two with reorthogonalisation),
batched systems reduced in the same call, and ``res.info["allreduces"]``; checked with
in-process simulated ranks (``linsolve_rbp.distributed.Simulated``): a sharded solve makes the
iterations of the single-process solve and reaches its x. Also ``compile=True`` for the
iterations of cg and gmres."""

from __future__ import annotations

import numpy as np
import pytest

import linsolve_rbp as lr
from linsolve_rbp import distributed as lrd

from registry import optional

torch = optional("torch")
xs = optional("array_api_strict")

SIZES = (13, 20, 7)  # uneven shards over three ranks, n = 40
N = sum(SIZES)
CG_VARIANTS = ("hestenes-stiefel", "chronopoulos-gear")
ORTHO = ("cgs2", "cgs")


def _spd(n=N, seed=0, lo=0.05, hi=2.0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.linspace(lo, hi, n)) @ Q.T
    # A varying diagonal, so that a Jacobi preconditioner changes the iteration.
    A = A + np.diag(np.linspace(0.0, 3.0, n))
    return A, rng.standard_normal(n), rng.standard_normal((3, n))


def _nonsym(n=N, seed=1, cplx=False):
    rng = np.random.default_rng(seed)
    A = 2.0 * np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n) + np.diag(np.linspace(0, 2, n))
    b, B = rng.standard_normal(n), rng.standard_normal((3, n))
    if cplx:
        A = A + 1j * rng.standard_normal((n, n)) / (2 * np.sqrt(n))
        b, B = b + 1j * rng.standard_normal(n), B + 1j * rng.standard_normal((3, n))
    return A, b, B


def _rows(rank):
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _convert(a, backend):
    if backend == "numpy":
        return a
    if backend == "torch":
        return torch.asarray(a)
    return xs.asarray(a)


def _host(a):
    return np.asarray(a) if not hasattr(a, "numpy") else a.numpy()


def sharded(method, A, b, *, M=None, backend="numpy", **kw):
    """``solve`` on the three ranks of a simulated group, each holding ``SIZES[r]`` rows of
    ``A`` (a row-sharded operator), of ``b`` (the last axis) and of a diagonal ``M``."""
    sim = lrd.Simulated(len(SIZES), timeout=30.0)
    symmetric = True if method == "cg" else None

    def rank(red):
        rows = _rows(red.rank)
        A_loc = lrd.row_sharded(_convert(A[rows], backend), red, sizes=SIZES, symmetric=symmetric)
        extra = {}
        if M is not None:
            extra["M"] = _convert(np.diag(M[rows]), backend)
        return lr.solve(A_loc, _convert(np.ascontiguousarray(b[..., rows]), backend), method=method,
                        reduction=red, **extra, **kw)

    outs = sim.run(rank)
    x = np.concatenate([_host(o.x) for o in outs], axis=-1)
    return outs, x


def single(method, A, b, *, M=None, backend="numpy", **kw):
    extra = {} if M is None else {"M": _convert(np.diag(M), backend)}
    return lr.solve(_convert(A, backend), _convert(b, backend), method=method, **extra, **kw)


def _agree(outs, x, ref, tol=1e-12):
    """Every rank: the single-process solve's status, iterations and products; x to
    ``tol`` relative."""
    for o in outs:
        assert o.iterations == ref.iterations
        assert o.matvecs == ref.matvecs
        assert o.status == ref.status
        assert np.array_equal(np.asarray(o.converged), np.asarray(ref.converged))
        assert o.info["allreduces"] == outs[0].info["allreduces"]
    xr = _host(ref.x)
    assert np.abs(x - xr).max() <= tol * max(1.0, np.abs(xr).max())


def _backends():
    out = [pytest.param("numpy")]
    out.append(pytest.param("torch", marks=pytest.mark.skipif(torch is None, reason="needs torch")))
    return out


# -- sharded solves equal single-process solves ---------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("variant", CG_VARIANTS)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("precondition", [False, True])
def test_cg_sharded_equals_single(backend, variant, batched, precondition):
    A, b, B = _spd()
    M = 1.0 / np.diag(A) if precondition else None
    rhs = B if batched else b
    kw = dict(rtol=1e-10, variant=variant, M=M, backend=backend)
    if batched:
        kw["batch_dims"] = 1
    ref = single("cg", A, rhs, **kw)
    assert np.all(ref.converged)
    outs, x = sharded("cg", A, rhs, **kw)
    _agree(outs, x, ref)


@pytest.mark.parametrize("variant", CG_VARIANTS)
@pytest.mark.parametrize("eta", [0.0, 1e-3])
def test_cgne_sharded_equals_single(variant, eta):
    A, b, B = _nonsym()
    kw = dict(rtol=1e-10 if eta == 0 else 1e-3, variant=variant, eta=eta, batch_dims=1)
    ref = single("cgne", A, B, **kw)
    assert np.all(ref.converged)
    outs, x = sharded("cgne", A, B, **kw)
    _agree(outs, x, ref)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("ortho", ORTHO)
@pytest.mark.parametrize("batched", [False, True])
def test_gmres_sharded_equals_single(backend, ortho, batched):
    A, b, B = _nonsym()
    rhs = B if batched else b
    kw = dict(rtol=1e-10, restart=8, orthogonalization=ortho, backend=backend)
    if batched:
        kw["batch_dims"] = 1
    ref = single("gmres", A, rhs, reduction=lrd.Local(), **kw)
    assert np.all(ref.converged) and ref.info["cycles"] > 1
    outs, x = sharded("gmres", A, rhs, **kw)
    _agree(outs, x, ref)
    # Without a reduction (the default path, with its own cgs2 arithmetic) the same solve.
    plain = single("gmres", A, rhs, **kw)
    assert plain.iterations == ref.iterations
    assert np.allclose(_host(plain.x), _host(ref.x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ortho", ORTHO)
def test_gmres_sharded_complex_and_preconditioned(ortho):
    A, b, B = _nonsym(cplx=True)
    M = 1.0 / np.diag(A)
    kw = dict(rtol=1e-10, restart=8, orthogonalization=ortho, M=M, batch_dims=1)
    ref = single("gmres", A, B, reduction=lrd.Local(), **kw)
    assert np.all(ref.converged)
    outs, x = sharded("gmres", A, B, **kw)
    _agree(outs, x, ref)


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("ortho", ORTHO)
def test_gmres_device_path_sharded(monkeypatch, ortho):
    """The device path (taken on CUDA; forced here on the CPU) reduces the same way."""
    import linsolve_rbp.solvers.gmres as G

    monkeypatch.setattr(G, "_on_host", lambda prob: False)
    A, b, B = _nonsym()
    kw = dict(rtol=1e-10, restart=8, orthogonalization=ortho, batch_dims=1, backend="torch")
    ref = single("gmres", A, B, reduction=lrd.Local(), **kw)
    assert np.all(ref.converged)
    outs, x = sharded("gmres", A, B, **kw)
    _agree(outs, x, ref)


@pytest.mark.skipif(xs is None, reason="needs array_api_strict")
def test_gmres_sharded_generic_namespace():
    A, b, _ = _nonsym()
    kw = dict(rtol=1e-10, restart=8, orthogonalization="cgs", backend="strict")
    ref = single("gmres", A, b, reduction=lrd.Local(), **kw)
    outs, x = sharded("gmres", A, b, **kw)
    _agree(outs, x, ref)


@pytest.mark.parametrize("method, opts", [("cg", {"variant": "chronopoulos-gear"}),
                                          ("gmres", {"orthogonalization": "cgs", "restart": 30})])
def test_fixed_budget_sharded(method, opts):
    A, b, B = _spd() if method == "cg" else _nonsym()
    kw = dict(rtol=None, atol=None, maxiter=12, batch_dims=1, **opts)
    ref = single(method, A, B, **kw)
    assert ref.status is lr.Status.COMPLETED and ref.iterations == 12
    outs, x = sharded(method, A, B, **kw)
    _agree(outs, x, ref)


# -- collectives counted ----------------------------------------------------------------------------
def _allreduces(method, A, rhs, maxiter, **kw):
    outs, _ = sharded(method, A, rhs, rtol=None, atol=None, maxiter=maxiter, **kw)
    assert all(o.iterations == maxiter for o in outs)
    return outs[0].info["allreduces"]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("precondition", [False, True])
def test_single_reduction_cg_makes_one_collective_per_iteration(batched, precondition):
    """Chronopoulos-Gear: each iteration's inner products (three with M) are one collective,
    for all the systems of a batch; the textbook form makes two (three with M)."""
    A, b, B = _spd()
    rhs = B if batched else b
    kw = dict(M=1.0 / np.diag(A) if precondition else None)
    if batched:
        kw["batch_dims"] = 1
    per_iter = {}
    for variant in CG_VARIANTS:
        k5 = _allreduces("cg", A, rhs, 5, variant=variant, **kw)
        k12 = _allreduces("cg", A, rhs, 12, variant=variant, **kw)
        per_iter[variant] = (k12 - k5) / 7
    assert per_iter["chronopoulos-gear"] == 1
    assert per_iter["hestenes-stiefel"] == (3 if precondition else 2)


@pytest.mark.parametrize("eta, textbook", [(0.0, 3), (1e-3, 4)])
def test_single_reduction_cgne_makes_one_collective_per_iteration(eta, textbook):
    A, b, B = _nonsym()
    per_iter = {}
    for variant in CG_VARIANTS:
        k5 = _allreduces("cgne", A, B, 5, variant=variant, eta=eta, batch_dims=1)
        k12 = _allreduces("cgne", A, B, 12, variant=variant, eta=eta, batch_dims=1)
        per_iter[variant] = (k12 - k5) / 7
    assert per_iter == {"chronopoulos-gear": 1, "hestenes-stiefel": textbook}


def test_single_reduction_cgne_matches_cgls():
    A, b, B = _nonsym()
    ls = lr.solve(A, B, method="cgne", rtol=1e-10, batch_dims=1)
    one = lr.solve(A, B, method="cgne", rtol=1e-10, batch_dims=1, variant="chronopoulos-gear")
    assert np.all(one.converged) and one.iterations == ls.iterations
    assert (one.matvecs, one.rmatvecs) == (ls.matvecs + 1, ls.rmatvecs + 1)
    assert np.allclose(one.x, ls.x, rtol=1e-8, atol=1e-10)
    # A singular system with b outside the range: A^H r = 0 with r != 0 is a breakdown.
    res = lr.solve(np.diag([1.0, 0.0]), np.ones(2), method="cgne", rtol=1e-8,
                   variant="chronopoulos-gear")
    assert res.status is lr.Status.BREAKDOWN and np.all(np.isfinite(res.x))


def test_single_reduction_cg_collectives_in_tolerance_mode():
    """A solve to a tolerance: one collective per iteration, plus a few per round (the start
    of the recurrence, the true residual's scale-safe norm) and per solve."""
    A, b, B = _spd()
    outs, _ = sharded("cg", A, B, rtol=1e-10, variant="chronopoulos-gear", batch_dims=1)
    o = outs[0]
    assert np.all(o.converged)
    assert o.iterations <= o.info["allreduces"] <= o.iterations + 10


@pytest.mark.parametrize("ortho, per_step", [("cgs", 1), ("cgs2", 2)])
@pytest.mark.parametrize("batched", [False, True])
def test_gmres_collectives_per_arnoldi_step(ortho, per_step, batched):
    """One collective per Arnoldi step for classical Gram-Schmidt (all the coefficients and
    the norm, all the systems), two with reorthogonalisation (CGS2)."""
    A, b, B = _nonsym()
    rhs = B if batched else b
    kw = dict(orthogonalization=ortho, restart=40)
    if batched:
        kw["batch_dims"] = 1
    k4 = _allreduces("gmres", A, rhs, 4, **kw)
    k11 = _allreduces("gmres", A, rhs, 11, **kw)
    assert (k11 - k4) == 7 * per_step


def test_local_reduction_counts_what_a_sharded_solve_makes():
    """``reduction=Local()`` runs the sharded arithmetic on one process: same iterations as
    three ranks, and the same count of collectives."""
    A, b, B = _spd()
    kw = dict(rtol=1e-10, variant="chronopoulos-gear", batch_dims=1)
    loc = single("cg", A, B, reduction=lrd.Local(), **kw)
    outs, x = sharded("cg", A, B, **kw)
    assert loc.info["allreduces"] == outs[0].info["allreduces"]
    assert np.allclose(x, loc.x, rtol=1e-12, atol=1e-12)


# -- the options on one process ---------------------------------------------------------------------
@pytest.mark.parametrize("precondition", [False, True])
def test_single_reduction_cg_matches_textbook_cg(precondition):
    """On a well-conditioned system both recurrences make the same iterations and reach the
    same x (one more product for the single-reduction form: A (M r) after the last step)."""
    A, b, B = _spd()
    M = np.diag(1.0 / np.diag(A)) if precondition else None
    hs = lr.solve(A, B, method="cg", rtol=1e-10, M=M, batch_dims=1)
    cg1 = lr.solve(A, B, method="cg", rtol=1e-10, M=M, batch_dims=1, variant="chronopoulos-gear")
    assert np.all(hs.converged) and np.all(cg1.converged)
    assert cg1.iterations == hs.iterations
    assert cg1.matvecs == hs.matvecs + 1
    assert np.allclose(cg1.x, hs.x, rtol=1e-8, atol=1e-10)
    assert np.all(np.linalg.norm(B - cg1.x @ A.T, axis=-1) <= 1e-10 * np.linalg.norm(B, axis=-1))


def test_single_reduction_cg_stays_honest_when_ill_conditioned():
    """The stability caveat: in float32 on the 1-D Poisson matrix of order 100 the
    single-reduction recurrence drifts further from the true residual and needs more
    iterations than the textbook one, but what it reports is true."""
    n = 100
    A = (2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)).astype(np.float32)
    b = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    hs = lr.solve(A, b, method="cg", rtol=1e-5)
    cg1 = lr.solve(A, b, method="cg", rtol=1e-5, variant="chronopoulos-gear")
    for res in (hs, cg1):
        assert res.converged
        true = np.linalg.norm(b - A.astype(np.float64) @ res.x.astype(np.float64))
        assert true <= 1e-5 * np.linalg.norm(b.astype(np.float64)) * (1 + 1e-3)
        assert float(res.residual_norm) == pytest.approx(true, rel=2e-2)  # float32 rounding
    assert cg1.iterations >= hs.iterations


@pytest.mark.parametrize("A, b", [
    (np.diag([1.0, -1.0]), np.array([1.0, 1.0])),   # indefinite: <p, A p> = 0
    (np.zeros((3, 3)), np.ones(3)),                 # singular, b outside the range
])
def test_single_reduction_cg_breakdown(A, b):
    res = lr.solve(A, b, method="cg", rtol=1e-8, variant="chronopoulos-gear")
    assert not res.success and res.status is lr.Status.BREAKDOWN
    assert np.all(np.isfinite(res.x))


def test_single_reduction_cg_zero_rhs_and_x0():
    A, b, _ = _spd()
    res = lr.solve(A, np.zeros(N), method="cg", rtol=1e-8, variant="chronopoulos-gear")
    assert res.converged and res.iterations == 0 and np.all(res.x == 0)
    x0 = np.linalg.solve(A, b) + 1e-3
    res = lr.solve(A, b, x0=x0, method="cg", rtol=1e-10, variant="chronopoulos-gear")
    assert res.converged and np.allclose(A @ res.x, b, atol=1e-8)


@pytest.mark.parametrize("ortho", ORTHO)
def test_gmres_options_agree_and_find_invariant_spaces(ortho):
    A, b, B = _nonsym()
    res = lr.solve(A, B, method="gmres", rtol=1e-10, restart=10, orthogonalization=ortho, batch_dims=1)
    assert np.all(res.converged)
    assert np.all(np.linalg.norm(B - res.x @ A.T, axis=-1) <= 1e-10 * np.linalg.norm(B, axis=-1))
    # An invariant space of dimension 2 (A = I + a rank-one term): exact in two steps.
    u = np.linspace(1.0, 2.0, 12)
    A2 = np.eye(12) + np.outer(u, u) / 10
    res = lr.solve(A2, np.ones(12), method="gmres", rtol=1e-12, orthogonalization=ortho)
    assert res.converged and res.iterations <= 2
    assert np.allclose(A2 @ res.x, np.ones(12), atol=1e-12)


def test_gmres_cgs_loses_orthogonality_but_not_honesty():
    """The caveat of one pass: on an ill-conditioned Krylov basis classical Gram-Schmidt
    without reorthogonalisation may need more steps than CGS2, never a false claim."""
    n = 60
    rng = np.random.default_rng(3)
    A = np.diag(np.logspace(0, 6, n)) + np.triu(rng.standard_normal((n, n)), 1) * 0.1
    b = rng.standard_normal(n)
    one = lr.solve(A, b, method="gmres", rtol=1e-10, restart=60, maxiter=600, orthogonalization="cgs")
    two = lr.solve(A, b, method="gmres", rtol=1e-10, restart=60, maxiter=600)
    assert two.converged
    for res in (one, two):
        true = np.linalg.norm(b - A @ res.x)
        assert res.converged == bool(true <= 1e-10 * np.linalg.norm(b))
        assert float(res.residual_norm) == pytest.approx(true, rel=1e-6, abs=1e-300)


@pytest.mark.parametrize("method, name", [("cg", "variant"), ("cgne", "variant"),
                                          ("gmres", "orthogonalization")])
def test_bad_choice_names_the_option(method, name):
    with pytest.raises(ValueError, match=name):
        lr.solve(np.eye(3), np.ones(3), method=method, **{name: "mgs"})


# -- compiled steps (compile=True) -------------------------------------------------------------------
@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile with dynamo's tracing and fullgraph checks but no code generation, to
    keep compile times short."""
    if torch is None:
        pytest.skip("needs torch")
    from linsolve_rbp.solvers import _compile

    if not _compile.available():  # pragma: no cover - torch without compile
        pytest.skip("needs torch.compile")
    monkeypatch.setattr(_compile, "BACKEND", "aot_eager")
    return torch


@pytest.mark.parametrize("method, opts", [
    ("cg", {"variant": "hestenes-stiefel"}),
    ("cg", {"variant": "chronopoulos-gear"}),
    ("gmres", {"orthogonalization": "cgs", "restart": 6}),
])
def test_compiled_step_matches_eager(quick_compile, monkeypatch, method, opts):
    """compile=True runs the same iteration: same statuses and iterations, x to rounding
    (gmres against its device path, which compile=True takes)."""
    import linsolve_rbp.solvers.gmres as G

    n = 16
    A, _, B = _spd(n) if method == "cg" else _nonsym(n)
    At, Bt = torch.asarray(A), torch.asarray(B[:2])
    comp = lr.solve(At, Bt, method=method, rtol=1e-10, batch_dims=1, compile=True, **opts)
    monkeypatch.setattr(G, "_on_host", lambda prob: False)
    eager = lr.solve(At, Bt, method=method, rtol=1e-10, batch_dims=1, **opts)
    assert np.all(comp.converged) and comp.iterations == eager.iterations
    # (compiled gmres applies all the steps of a cycle: those past the stop are reported)
    assert comp.matvecs == eager.matvecs + comp.info.get("discarded_steps", 0)
    assert torch.allclose(comp.x, eager.x, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["cg", "gmres"])
def test_compile_with_a_reduction_is_refused(method):
    if torch is None:
        pytest.skip("needs torch")
    A = lr.aslinearoperator(torch.eye(4, dtype=torch.float64) * 2)
    with pytest.raises(ValueError, match="compile=True.*reduction"):
        lr.solve(A, torch.ones(4, dtype=torch.float64), method=method, compile=True,
                 reduction=lrd.Local())
    assert A.matvec_count == 0


@pytest.mark.parametrize("method, opts", [("cg", {"variant": "chronopoulos-gear"}),
                                          ("cgne", {"variant": "chronopoulos-gear"}),
                                          ("gmres", {"orthogonalization": "cgs", "restart": 8})])
def test_sharded_with_check_every_and_callback(method, opts):
    """Checks every third iteration and a callback on every rank: the ranks still agree."""
    A, b, B = _spd() if method == "cg" else _nonsym()
    seen = []
    kw = dict(rtol=1e-10, batch_dims=1, check_every=3, **opts)
    ref = single(method, A, B, reduction=lrd.Local(), **kw)
    outs, x = sharded(method, A, B, callback=lambda k, x, r: seen.append(k), **kw)
    _agree(outs, x, ref)
    assert len(seen) == len(SIZES) * ref.iterations


@pytest.mark.parametrize("method, opts", [("cg", {}), ("gmres", {"restart": 16})])
def test_compiled_step_reads_the_host_only_every_check_every(quick_compile, monkeypatch, method,
                                                             opts):
    """The compiled steps read nothing on the host: a solve reads it once per ``check_every``
    iterations (the monitor's test), counted by a shim on the ways a tensor reaches it."""
    n_reads = [0]

    def count(name):
        orig = getattr(torch.Tensor, name)

        def wrap(t, *a, **k):
            n_reads[0] += 1
            return orig(t, *a, **k)
        return wrap

    # (gmres, compiled a cycle at a time, reads the host twice a cycle of 16 steps: the
    # cycle's length and whether any system runs)
    A, _, B = _spd(24) if method == "cg" else _nonsym(60)
    At, bt = torch.asarray(A), torch.asarray(B[0])
    reads = []
    for maxiter in (16, 48):
        kw = dict(method=method, rtol=None, atol=None, maxiter=maxiter, check_every=8, compile=True,
                  **opts)
        lr.solve(At, bt, **kw)  # compiles
        with monkeypatch.context() as mp:
            for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy",
                         "cpu"):
                mp.setattr(torch.Tensor, name, count(name))
            n_reads[0] = 0
            res = lr.solve(At, bt, **kw)
        assert res.iterations == maxiter
        reads.append(n_reads[0])
    assert (reads[1] - reads[0]) / 32 <= 1 / 8, reads
