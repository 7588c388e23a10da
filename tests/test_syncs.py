"""Host synchronisation of the own methods: inside its loop a method reads device values on
the host only every ``check_every`` iterations (the monitor's test whether any system is still
running), whatever the number of iterations; a compiled fixed budget (``compile=True``) reads
none until it ends.

On a CPU the reads are counted by a shim on the ways a torch tensor reaches the host
(``bool``, ``float``, ``int``, ``item``, ``tolist``, ``numpy``, ``cpu``, ``__array__``), with
the paths that host data may take (the small dense algebra of gmres on the CPU) switched to
the ones a GPU takes. On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` makes every
synchronisation an error, and the loop runs between two checks without one.

The count is measured as a slope: the reads of the same solve with two iteration budgets,
divided by the iterations between them, so the fixed cost of starting and finishing a solve
(checks of the first product, the scale of ``b``, the statuses) does not enter it.
"""

from __future__ import annotations

import numpy as np
import pytest

import linsolve_rbp as lr

from registry import optional

torch = optional("torch")

pytestmark = pytest.mark.skipif(torch is None, reason="needs torch")

OWN = ("fixed_point", "neumann", "cg", "cgne", "gmres", "bicgstab", "lsqr", "minres")
CHECK_EVERY = 8


class HostReads:
    """Counts the ways a torch tensor reaches the host while installed (a context manager)."""

    NAMES = ("__bool__", "__float__", "__int__", "__index__", "__array__", "item", "tolist",
             "numpy", "cpu")

    def __init__(self):
        # A patch of its own: undoing it leaves the test's other patches in place.
        self.mp = pytest.MonkeyPatch()
        self.n = 0

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrap(t, *a, _orig=orig, _name=name, **k):
                self.n += 1
                return _orig(t, *a, **k)

            self.mp.setattr(torch.Tensor, name, wrap)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


@pytest.fixture
def device_path(monkeypatch):
    """The paths a GPU takes, on CPU tensors: no host shortcut for CPU data."""
    import importlib

    from linsolve_rbp.solvers import bicgstab, gmres

    # Both modules' names (bicgstab imports gmres's function at its own import).
    monkeypatch.setattr(gmres, "_on_host", lambda prob: False)
    monkeypatch.setattr(bicgstab, "_on_host", lambda prob: False)
    # The torch iteration itself (CPU tensors would otherwise run on numpy views).
    monkeypatch.setattr(importlib.import_module("linsolve_rbp.solve"), "_host_views", lambda opts, b: False)
    return monkeypatch


def _problem(method, n=200, seed=0, batched=False):
    """A system the method converges on slowly (it must not stop inside the budgets), as
    torch float64: contracting (spectral radius of I - A 0.97) and, for the symmetric methods,
    symmetric positive definite."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.linspace(0.03, 1.97, n)
    A = Q @ np.diag(ev) @ Q.T
    b = rng.standard_normal(n)
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    if batched:
        bt = torch.stack([bt, 0.5 * bt, -bt])
    return At, bt


def _reads(monkeypatch, A, b, **kw):
    lr.solve(A, b, **kw)  # warm: first-product checks, caches, imports
    with HostReads() as c:
        res = lr.solve(A, b, **kw)
    return c.n, res


def _slope(monkeypatch, method, budgets, batched, **kw):
    A, b = _problem(method, batched=batched)
    kw = dict(method=method, batch_dims=int(batched), check_every=CHECK_EVERY, **kw)
    if method == "gmres":
        kw["restart"] = max(budgets)  # one cycle: the inner loop is what is measured
    out = []
    for maxiter in budgets:
        n, res = _reads(monkeypatch, A, b, maxiter=maxiter, **kw)
        out.append((n, res.iterations, res))
    (n1, it1, r1), (n2, it2, r2) = out
    assert it2 - it1 >= 2 * CHECK_EVERY, (it1, it2, r1.message, r2.message)
    return (n2 - n1) / (it2 - it1), out


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("method", OWN)
def test_tolerance_mode_reads_every_check_every(device_path, method, batched):
    """A tolerance too tight to meet within the budgets: the loop runs to ``maxiter`` and
    reads the host once per ``check_every`` iterations, not once per iteration."""
    slope, out = _slope(device_path, method, (16, 48), batched, rtol=1e-14, divtol=None)
    assert slope <= 1.0 / CHECK_EVERY + 1e-9, (method, slope, [o[:2] for o in out])


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("method", OWN)
def test_fixed_budget_reads_every_check_every(device_path, method, batched):
    slope, out = _slope(device_path, method, (16, 48), batched, rtol=None, atol=None, divtol=None)
    assert all(o[2].status is lr.Status.COMPLETED for o in out)
    assert slope <= 1.0 / CHECK_EVERY + 1e-9, (method, slope, [o[:2] for o in out])


@pytest.fixture
def fast_compile(monkeypatch):
    """Compile with dynamo's tracing and autograd but no code generation (seconds, not tens
    of seconds): the graph breaks and host reads are the same as with inductor."""
    pytest.importorskip("torch._dynamo")
    from linsolve_rbp.solvers import _compile

    monkeypatch.setattr(_compile, "BACKEND", "aot_eager")
    return monkeypatch


@pytest.mark.slow
@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_compiled_fixed_budget_reads_nothing_in_the_loop(fast_compile, method):
    """``compile=True``: the host is read a fixed number of times per solve, whatever the
    budget (the loop runs as compiled graphs with no host read between them)."""
    A, b = _problem(method, n=12)
    counts = []
    for maxiter in (6, 16):
        kw = dict(method=method, rtol=None, atol=None, maxiter=maxiter, compile=True)
        n, res = _reads(fast_compile, A, b, **kw)
        counts.append(n)
        ref = lr.solve(A, b, method=method, rtol=None, atol=None, maxiter=maxiter)
        assert res.status is ref.status and res.iterations == ref.iterations == maxiter
        assert torch.allclose(res.x, ref.x, rtol=1e-12, atol=1e-14)
    assert counts[1] == counts[0], counts


@pytest.mark.gpu
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("method", OWN)
def test_cuda_loop_synchronises_only_every_check_every(method, batched):
    """On a GPU, with ``torch.cuda.set_sync_debug_mode("warn")`` (a warning per
    synchronisation) switched on by the callback after the first iteration and off after the
    last: the loop synchronises at most once per ``check_every`` iterations."""
    import warnings

    A, b = _problem(method, batched=batched)
    A, b = A.cuda(), b.cuda()
    maxiter = 5 * CHECK_EVERY
    seen = {}

    def callback(k, x, r):
        if k == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            seen["start"] = len(caught)
        elif k == maxiter:
            torch.cuda.set_sync_debug_mode(0)
            seen["end"] = len(caught)

    kw = dict(method=method, rtol=1e-14, divtol=None, maxiter=maxiter, check_every=CHECK_EVERY,
              batch_dims=int(batched), callback=callback)
    if method == "gmres":
        kw["restart"] = maxiter
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = lr.solve(A, b, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if "end" not in seen:
        pytest.skip(f"{method} stopped after {res.iterations} iterations, before the budget")
    syncs = [str(w.message) for w in caught[seen["start"]:seen["end"]]]
    assert len(syncs) <= (maxiter - 1) // CHECK_EVERY, (method, syncs[:3])
