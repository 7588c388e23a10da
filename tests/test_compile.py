"""``compile=True`` (torch.compile of the own methods' iterations) and ``fixed_point`` inside
``torch.compile(model, fullgraph=True)``: the compiled paths give the uncompiled results
(statuses, iterations, products, x, gradients), and bad requests get errors naming the
option.

Compiling costs seconds, so these tests use dynamo's tracing with the ``aot_eager`` backend
(the same graphs, graph breaks and autograd as inductor, without code generation) on tiny
problems, and one slow test runs inductor itself.
"""

from __future__ import annotations

import numpy as np
import pytest

import linsolve_rbp as lr

from registry import optional

torch = optional("torch")

pytestmark = pytest.mark.skipif(torch is None or not hasattr(torch, "compile"), reason="needs torch.compile")


@pytest.fixture
def fast_compile(monkeypatch):
    from linsolve_rbp.solvers import _compile

    monkeypatch.setattr(_compile, "BACKEND", "aot_eager")
    monkeypatch.setattr(_compile, "UNROLL", 4)  # budgets of a few terms run several graphs
    return _compile


@pytest.fixture
def fresh_dynamo():
    """Torch's compiled code dropped after the test: tests that compile many kinds of problem
    (dtypes, batch sizes) would otherwise fill torch's recompile limit for the later ones."""
    yield
    import torch._dynamo

    torch._dynamo.reset()


def _system(n=12, rho=0.6, seed=0):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((n, n)) / np.sqrt(n) * rho
    A = torch.from_numpy(np.eye(n) - J.T)
    b = torch.from_numpy(rng.standard_normal(n))
    return A, b


def _same(r1, r0):
    assert r1.status is r0.status
    assert r1.iterations == r0.iterations and r1.matvecs == r0.matvecs
    # The same arithmetic; the kernels of a graph may round differently, which shows in the
    # small residuals b - A x (cancellation): compare to rounding of the first.
    assert torch.allclose(r1.x, r0.x, rtol=1e-10, atol=1e-13)
    h1, h0 = np.asarray(r1.residual_history), np.asarray(r0.residual_history)
    assert np.allclose(h1, h0, rtol=1e-8, atol=1e-12 * np.max(np.abs(h0)))
    if r1.statuses is not None:
        assert r1.statuses == r0.statuses


# -- validation (nothing compiled) ---------------------------------------------------------
def test_compile_is_off_by_default_and_validated():
    A, b = _system()
    assert lr.solve(A, b, method="neumann").success
    with pytest.raises(ValueError, match="compile"):
        lr.solve(A, b, method="neumann", compile="yes")
    with pytest.raises(TypeError, match="compile=True .* torch tensors"):
        lr.solve(A.numpy(), b.numpy(), method="neumann", compile=True)
    with pytest.raises(ValueError, match=r"method 'scipy.gmres' has no compiled iteration.*neumann"):
        lr.solve(A, b, method="scipy.gmres", compile=True)
    from linsolve_rbp.solve import check_options

    assert check_options("fixed_point", {"compile": True}) == {"compile": True}


# -- compiled solver loops ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_compiled_fixed_budget_is_the_uncompiled_one(fast_compile, method):
    """One system and a batch; a budget of several graphs (UNROLL = 4 here)."""
    A, b = _system()
    B = torch.stack([b, -2.0 * b])
    for rhs, bd in ((b, 0), (B, 1)):
        kw = dict(method=method, rtol=None, atol=None, maxiter=10, batch_dims=bd)
        _same(lr.solve(A, rhs, compile=True, **kw), lr.solve(A, rhs, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_compiled_fixed_budget_failures(fast_compile, method):
    """Diverging systems: DIVERGED with the best iterate, as uncompiled (the compiled loop runs
    the whole budget, so it reports maxiter iterations); without divtol the K-term sum,
    COMPLETED, with the note that the residual grew."""
    A, b = _system(rho=1.8, seed=1)
    B = torch.stack([b, 3.0 * b])
    kw = dict(method=method, rtol=None, atol=None, maxiter=40, batch_dims=1, divtol=10.0)
    r1, r0 = lr.solve(A, B, compile=True, **kw), lr.solve(A, B, **kw)
    assert r1.status is r0.status is lr.Status.DIVERGED and r1.statuses == r0.statuses
    assert torch.allclose(r1.x, r0.x, rtol=1e-12) and r1.iterations == 40 > r0.iterations
    kw.update(divtol=None, maxiter=9)
    r1, r0 = lr.solve(A, B, compile=True, **kw), lr.solve(A, B, **kw)
    _same(r1, r0)
    assert "grew" in r1.message


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_compiled_step_in_tolerance_mode(fast_compile, method):
    A, b = _system()
    for ce in (1, 3):
        kw = dict(method=method, rtol=1e-9, maxiter=200, check_every=ce)
        r1, r0 = lr.solve(A, b, compile=True, **kw), lr.solve(A, b, **kw)
        assert r1.converged
        _same(r1, r0)
    seen = []
    r1 = lr.solve(A, b, method=method, rtol=None, atol=None, maxiter=5, compile=True,
                  callback=lambda k, x, r: seen.append(k))
    assert seen == [1, 2, 3, 4, 5] and r1.status is lr.Status.COMPLETED


# -- half precision -----------------------------------------------------------------------------
_HALF_CASES = [
    ("neumann", dict(rtol=None, atol=None, maxiter=10), (0, 1)),
    ("neumann", dict(rtol=1e-2), (0,)),
    ("fixed_point", dict(rtol=1e-2, check_every=3), (0, 1)),
    ("cg", dict(rtol=1e-2), (0, 1)),
    ("gmres", dict(rtol=1e-2, restart=5), (1,)),
]


def _half_pair(monkeypatch, method, dtype, batch_dims, kw, n=12):
    """A half-precision system (cg: symmetric positive definite): the compiled solve and the
    uncompiled one it replaces (gmres: the device path)."""
    import linsolve_rbp.solvers.gmres as G

    A, b = _system(n=n)
    if method == "cg":
        A = A @ A.T + torch.eye(n, dtype=torch.float64)
    A = A.to(dtype)
    rhs = (torch.stack([b, torch.linspace(-1.0, 1.0, n, dtype=torch.float64)]) if batch_dims else b).to(dtype)
    kw = dict(kw, method=method, batch_dims=batch_dims)
    r1 = lr.solve(A, rhs, compile=True, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(G, "_on_host", lambda prob: False)
        r0 = lr.solve(A, rhs, **kw)
    return r1, r0


def _same_half(r1, r0, dtype, ulps=0):
    """The same statuses, iterations, products (gmres: besides the discarded steps) and,
    in the dtype, the same x (to ``ulps`` units of its last place)."""
    assert r1.status is r0.status and r1.statuses == r0.statuses
    assert r1.iterations == r0.iterations
    assert r1.matvecs == r0.matvecs + r1.info.get("discarded_steps", 0)
    assert r1.x.dtype == r0.x.dtype == dtype
    tol = ulps * torch.finfo(dtype).eps * float(r0.x.abs().max())
    assert float((r1.x.double() - r0.x.double()).abs().max()) <= tol
    h1, h0 = np.asarray(r1.residual_history, float), np.asarray(r0.residual_history, float)
    assert h1.shape == h0.shape
    assert np.allclose(h1, h0, rtol=(ulps + 1e-3) * float(torch.finfo(dtype).eps), atol=0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method, kw, batch_dims", _HALF_CASES)
def test_compiled_half_precision_is_the_uncompiled_solve(fast_compile, fresh_dynamo, monkeypatch,
                                                         method, kw, batch_dims, dtype):
    """float16 and bfloat16: iterated in float32 with the products in the dtype, compiled as
    uncompiled; the same statuses, iterations and x."""
    dtype = getattr(torch, dtype)
    for bd in batch_dims:
        r1, r0 = _half_pair(monkeypatch, method, dtype, bd, kw)
        assert r1.success
        _same_half(r1, r0, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_inductor_half_precision(fresh_dynamo, monkeypatch, dtype):
    """Inductor's code for half precision (one system and a batch): the uncompiled statuses
    and iterations, x to one unit in the last place of the dtype (a graph's kernels may round
    an inner product of the float32 iteration differently)."""
    dtype = getattr(torch, dtype)
    for method, kw in (("neumann", dict(rtol=None, atol=None, maxiter=10)),
                       ("gmres", dict(rtol=1e-2, restart=5))):
        for bd in (0, 1):
            _same_half(*_half_pair(monkeypatch, method, dtype, bd, kw), dtype, ulps=1)


# -- fixed_point inside torch.compile(model, fullgraph=True) ---------------------------------
class _DEQ(torch.nn.Module if torch is not None else object):
    def __init__(self, d, backward, forward_tol=None, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(d, d).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.4)
        self.backward, self.forward_tol, self.kw = backward, forward_tol, kw

    def forward(self, x):
        from linsolve_rbp.adapters import torch as lrt

        h = lrt.fixed_point(lambda h: torch.tanh(self.lin(h) + x), torch.zeros_like(x),
                            forward_tol=self.forward_tol, forward_maxiter=12,
                            backward=self.backward, batch_dims=1, **self.kw)
        return (h ** 2).sum()


@pytest.mark.parametrize("backward", [
    {"method": "neumann", "rtol": None, "atol": None, "maxiter": 6},
    {"method": "fixed_point", "rtol": None, "atol": None, "maxiter": 6, "divtol": None},
    {"method": "phantom", "steps": 3, "damping": 0.5},
])
def test_deq_compiles_fullgraph_forward_and_backward(backward):
    """The same loss and gradients as the uncompiled layer with the same budgets."""
    model = _DEQ(5, backward)
    x = torch.randn(3, 5, dtype=torch.float64)
    loss0 = model(x)
    loss0.backward()
    g0 = model.lin.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss1 = compiled(x)
    loss1.backward()
    assert torch.allclose(loss1, loss0, rtol=1e-13)
    assert torch.allclose(model.lin.weight.grad, g0, rtol=1e-10, atol=1e-13)


def test_deq_compiled_gives_h0_a_zero_gradient_as_uncompiled():
    """An ``h0`` that requires grad gets a zero gradient (not None) inside torch.compile, as
    uncompiled: one tensor, a structured state, and an f without parameters."""
    from linsolve_rbp.adapters import torch as lrt

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 5).double()
    with torch.no_grad():
        lin.weight.mul_(0.4)
    x = torch.randn(3, 5, dtype=torch.float64)
    bw = {"method": "neumann", "rtol": None, "atol": None, "maxiter": 4}
    kw = dict(forward_tol=None, forward_maxiter=8, backward=bw, batch_dims=1)

    def one(h0):
        return (lrt.fixed_point(lambda h: torch.tanh(lin(h) + x), h0, **kw) ** 2).sum()

    def two(h0, s0):
        a, c = lrt.fixed_point(
            lambda s: (torch.tanh(lin(s[0]) + x), 0.5 * s[1] + s[0].sum(-1, keepdim=True)),
            (h0, s0), **kw)
        return (a ** 2).sum() + c.sum()

    def free(h0):
        return lrt.fixed_point(lambda h: 0.5 * h + 1.0, h0, **kw).sum()

    for fn, shapes in ((one, [(3, 5)]), (two, [(3, 5), (3, 1)]), (free, [(3, 5)])):
        grads = []
        for g in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            lin.zero_grad()
            states = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
            g(*states).backward()
            assert all(h.grad is not None and torch.equal(h.grad, torch.zeros_like(h)) for h in states)
            grads.append(None if lin.weight.grad is None else lin.weight.grad.clone())
        if grads[0] is not None:
            assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_deq_compiled_half_precision(dtype):
    """A half-precision layer inside torch.compile: the uncompiled loss, and its gradients to
    the rounding of the dtype (the series of the backward summed in float32, as the
    uncompiled solvers do; phantom by the uncompiled recursion, in the dtype)."""
    from linsolve_rbp.adapters import torch as lrt

    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 5).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(0.4)
    x = torch.randn(3, 5).to(dtype)
    for bw in ({"method": "neumann", "rtol": None, "atol": None, "maxiter": 6},
               {"method": "fixed_point", "rtol": None, "atol": None, "maxiter": 6, "divtol": None},
               {"method": "phantom", "steps": 3, "damping": 0.5}):
        def loss(x, bw=bw):
            h = lrt.fixed_point(lambda h: torch.tanh(lin(h) + x), torch.zeros_like(x),
                                forward_tol=None, forward_maxiter=12, backward=bw, batch_dims=1)
            return (h.float() ** 2).sum()

        out = []
        for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
            lin.zero_grad()
            value = fn(x)
            value.backward()
            out.append((value, lin.weight.grad.clone(), lin.bias.grad.clone()))
        (l0, *g0), (l1, *g1) = out
        assert torch.equal(l1, l0)
        for a, b in zip(g1, g0):
            assert a.dtype == dtype
            tol = 2 * torch.finfo(dtype).eps * float(b.float().abs().max())
            assert float((a.float() - b.float()).abs().max()) <= tol


def test_deq_under_compile_refuses_host_reads_by_name():
    """A tolerance inside torch.compile: torch's error quotes the package's message."""
    x = torch.randn(2, 4, dtype=torch.float64)
    fixed = {"method": "neumann", "rtol": None, "atol": None, "maxiter": 3}
    for model, what in ((_DEQ(4, fixed, forward_tol=1e-6), "forward_tol=None"),
                        (_DEQ(4, {"method": "gmres", "rtol": 1e-6}), "fixed-budget backward"),
                        (_DEQ(4, fixed, return_info=True), "return_info")):
        with pytest.raises(Exception, match=what):
            torch.compile(model, fullgraph=True, backend="aot_eager")(x)


@pytest.mark.slow
def test_inductor_neumann_and_deq():
    """The default backend (inductor, a C compiler on CPU): a compiled fixed budget and a DEQ."""
    A, b = _system()
    kw = dict(method="neumann", rtol=None, atol=None, maxiter=8)
    _same(lr.solve(A, b, compile=True, **kw), lr.solve(A, b, **kw))
    model = _DEQ(5, {"method": "neumann", "rtol": None, "atol": None, "maxiter": 6})
    x = torch.randn(3, 5, dtype=torch.float64)
    model(x).backward()
    g0 = model.lin.weight.grad.clone()
    model.zero_grad()
    torch.compile(model, fullgraph=True)(x).backward()
    assert torch.allclose(model.lin.weight.grad, g0, rtol=1e-10, atol=1e-13)


def test_untraceable_products_run_uncompiled_with_a_warning(fast_compile):
    """The eager layer's adjoint operator (vector-Jacobian products by torch.autograd.grad on
    a graph recorded outside the compiled region) cannot be traced: ``backward={"compile":
    True}`` then runs uncompiled, says why once, and gives the same gradient and counts."""
    from linsolve_rbp.adapters import torch as lrt

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(3, 6, dtype=torch.float64)
    grads, results = [], []
    for c in (False, True):
        lin.zero_grad()
        h, info = lrt.fixed_point(
            lambda h: torch.tanh(lin(h) + x), torch.zeros_like(x), batch_dims=1, return_info=True,
            backward={"method": "neumann", "rtol": None, "atol": None, "maxiter": 8, "compile": c},
        )
        if c:
            with pytest.warns(RuntimeWarning, match="cannot trace the products"):
                h.sum().backward()
        else:
            h.sum().backward()
        grads.append(lin.weight.grad.clone())
        results.append(info.backward)
    assert torch.allclose(grads[0], grads[1], rtol=1e-12)
    assert results[0].matvecs == results[1].matvecs == 8


# -- gmres: one compiled graph per restart cycle -------------------------------------------------
def _gmres_pair(monkeypatch, A, rhs, **kw):
    """The compiled solve and the uncompiled device path (which compile=True replaces)."""
    import linsolve_rbp.solvers.gmres as G

    r1 = lr.solve(A, rhs, method="gmres", compile=True, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(G, "_on_host", lambda prob: False)
        r0 = lr.solve(A, rhs, method="gmres", **kw)
    return r1, r0


def test_gmres_compiled_cycles_are_the_uncompiled_solve(fast_compile, monkeypatch):
    """Two systems that converge at different steps, checks every step and every third: the
    same statuses, iterations, estimates and x; the products counted as applied, those of
    the steps past the stop reported."""
    A, b = _system(n=12)
    B = torch.stack([b, torch.linspace(-1.0, 1.0, 12, dtype=torch.float64)])
    for ce in (1, 3):
        r1, r0 = _gmres_pair(monkeypatch, A, B, rtol=1e-10, restart=5, batch_dims=1, check_every=ce)
        assert np.all(r1.converged)
        _same_but_products(r1, r0)


def _same_but_products(r1, r0):
    assert r1.statuses == r0.statuses and r1.iterations == r0.iterations
    assert torch.allclose(r1.x, r0.x, rtol=1e-10, atol=1e-13)
    h1, h0 = np.asarray(r1.residual_history), np.asarray(r0.residual_history)
    assert np.allclose(h1, h0, rtol=1e-8, atol=1e-12 * np.max(np.abs(h0)))
    assert r1.info["cycles"] == r0.info["cycles"]
    assert r1.matvecs == r0.matvecs + r1.info["discarded_steps"]


def test_gmres_compiled_budget_ends_inside_a_cycle(fast_compile, monkeypatch):
    """A fixed budget that ends inside a cycle: that cycle runs a shorter graph of its own."""
    A, b = _system(n=10)
    r1, r0 = _gmres_pair(monkeypatch, A, b, rtol=None, atol=None, maxiter=7, restart=4)
    assert r1.status is lr.Status.COMPLETED and r1.iterations == 7
    _same_but_products(r1, r0)
    assert r1.info["discarded_steps"] == 0


@pytest.mark.slow
def test_gmres_compiled_callback_and_breakdown(fast_compile, monkeypatch):
    """A callback sees every step's iterate, as uncompiled; a singular system ends
    BREAKDOWN with the uncompiled x."""
    A, b = _system(n=10)
    calls = []  # the compiled solve's, then the uncompiled one's
    r = _gmres_pair(monkeypatch, A, b, rtol=1e-10, restart=4,
                    callback=lambda k, x, r: calls.append((k, x.clone())))
    _same_but_products(*r)
    half = len(calls) // 2
    assert len(calls) == 2 * r[0].iterations and [k for k, _ in calls[:half]] == list(range(1, half + 1))
    assert [k for k, _ in calls[half:]] == list(range(1, half + 1))
    assert all(torch.allclose(x1, x0, rtol=1e-9, atol=1e-12) for (_, x1), (_, x0) in zip(calls[:half], calls[half:]))
    S = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64))
    rhs = torch.ones(4, dtype=torch.float64)
    r1, r0 = _gmres_pair(monkeypatch, S, rhs, rtol=1e-10, restart=4)
    assert r1.status is r0.status is lr.Status.BREAKDOWN
    assert torch.allclose(r1.x, r0.x, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method, opts", [("cg", {}), ("gmres", {"restart": 4})])
def test_compiled_solves_compile_once(fast_compile, method, opts):
    """A second solve of the same kind reuses the graphs (the product counts are kept out of
    their guards) and counts its products as the first did."""
    import torch._dynamo

    A, b = _system(n=10)
    if method == "cg":
        A = A @ A.T + torch.eye(10, dtype=torch.float64)
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    kw = dict(method=method, rtol=1e-10, compile=True, **opts)
    before = stats["unique_graphs"]
    r1 = lr.solve(A, b, **kw)
    assert stats["unique_graphs"] == before + 1  # one graph, compiled once
    r2 = lr.solve(A, b, **kw)
    assert stats["unique_graphs"] == before + 1
    assert r1.converged and r2.matvecs == r1.matvecs and r2.iterations == r1.iterations
