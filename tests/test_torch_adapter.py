"""The torch adapter: Jacobian operators, implicit gradients, the fixed-point layer, baselines.

Gradients are checked against an independent route: the dense formula
``(df/dw)^T (I - J^T)^{-1} g`` with ``J`` and ``df/dw`` built by
``torch.autograd.functional.jacobian``, TBPTT at a converged fixed point (Proposition 1 of Liao
et al., 2018), and ``torch.autograd.gradcheck``.
"""

import importlib
import importlib.util
import sys
import warnings

import numpy as np

import pytest

torch = pytest.importorskip("torch")

import linsolve_rbp as lr  # noqa: E402
from linsolve_rbp.adapters import torch as lrt  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_warning_counts():
    """Convergence warnings are deduplicated per call site: each test starts with fresh
    counts (a parametrised test calls from one line) and the default setting."""
    lr.reset_convergence_warnings()
    previous = lr.show_all_convergence_warnings(False)
    yield
    lr.show_all_convergence_warnings(previous)
    lr.reset_convergence_warnings()


def _has_solver(name):
    return importlib.util.find_spec(f"linsolve_rbp.solvers.{name}") is not None


def _method(name, module=None):
    module = module or name
    return pytest.param(
        name, marks=pytest.mark.skipif(not _has_solver(module), reason=f"solver {name} not available")
    )


# -- models ---------------------------------------------------------------------------------
class TanhRNN:
    """``h <- tanh(W h + U x + b)`` with ``||W||_2 = 0.6`` (contracting)."""

    def __init__(self, n=6, d=3, batch=None, seed=0, dtype=F64):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=dtype)
        W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
        U = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
        b = 0.1 * torch.randn(n, generator=g, dtype=dtype)
        xshape = (d,) if batch is None else (batch, d)
        self.x = torch.randn(*xshape, generator=g, dtype=dtype)
        self.params = [W.requires_grad_(), U.requires_grad_(), b.requires_grad_()]
        self.hshape = (n,) if batch is None else (batch, n)
        self.dtype = dtype

    @staticmethod
    def step(h, x, W, U, b):
        return torch.tanh(h @ W.T + x @ U.T + b)

    def f(self, h):
        return self.step(h, self.x, *self.params)

    def f_of_params(self, h):
        return lambda *ps: self.step(h, self.x, *ps)


class Hopfield:
    """``h <- W sigmoid(0.5 h) + clamp`` with ``W`` symmetric, zero diagonal, ``||W||_2 = 4``,
    so that ``||J|| <= 4 * 0.5 * 0.25 = 0.5``."""

    def __init__(self, n=8, seed=1, dtype=F64):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=dtype)
        W = W + W.T
        W.fill_diagonal_(0.0)
        W = 4.0 * W / torch.linalg.matrix_norm(W, 2)
        clamp = torch.randn(n, generator=g, dtype=dtype)
        self.params = [W.requires_grad_(), clamp.requires_grad_()]
        self.hshape = (n,)
        self.dtype = dtype
        self.x = None

    @staticmethod
    def step(h, W, clamp):
        return torch.sigmoid(0.5 * h) @ W.T + clamp

    def f(self, h):
        return self.step(h, *self.params)

    def f_of_params(self, h):
        return lambda *ps: self.step(h, *ps)


def _fixed_point(model, iters=400):
    h = torch.zeros(model.hshape, dtype=model.dtype)
    with torch.no_grad():
        for _ in range(iters):
            h = model.f(h)
    return h


def _exact_grads(model, h, g):
    """``(df/dw)^T (I - J^T)^{-1} g`` from dense Jacobians."""
    n = h.numel()
    J = torch.autograd.functional.jacobian(model.f, h).reshape(n, n)
    z = torch.linalg.solve(torch.eye(n, dtype=h.dtype) - J.T, g.reshape(n))
    jac = torch.autograd.functional.jacobian(model.f_of_params(h), tuple(p.detach() for p in model.params))
    return [torch.tensordot(z, jp.reshape(n, *p.shape), dims=1) for jp, p in zip(jac, model.params)]


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


MODELS = {"tanh_rnn": TanhRNN, "hopfield": Hopfield}
ACCURATE = {
    "gmres": dict(rtol=1e-12),
    "bicgstab": dict(rtol=1e-12),
    "cgne": dict(rtol=1e-12),
    "lsqr": dict(rtol=1e-12, maxiter=1000),
    "neumann": dict(rtol=1e-13, maxiter=500),
    "fixed_point": dict(rtol=1e-13, maxiter=500),
}


# -- implicit gradients against the dense formula ------------------------------------------
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize(
    "method",
    [_method("gmres"), _method("bicgstab"), _method("cgne"), _method("lsqr"), "neumann", "fixed_point"],
)
def test_implicit_grad_matches_dense_formula(model_name, method):
    model = MODELS[model_name]()
    h = _fixed_point(model)
    g = torch.randn(model.hshape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads, res = lrt.implicit_grad(model.f, h, g, model.params, method=method, on_failure="raise", **ACCURATE[method])
    assert res.success
    assert len(grads) == len(model.params)
    for got, want, p in zip(grads, _exact_grads(model, h, g), model.params):
        assert got.shape == p.shape and got.dtype == p.dtype
        assert _rel(got, want) < 1e-9
    for p in model.params:
        assert p.grad is None  # implicit_grad returns gradients; it does not accumulate them


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", [_method("gmres"), _method("cgne"), "neumann"])
def test_fixed_point_layer_matches_dense_formula(model_name, method):
    model = MODELS[model_name]()
    g = torch.randn(model.hshape, generator=torch.Generator().manual_seed(5), dtype=F64)
    backward = dict(ACCURATE[method], method=method)
    h, info = lrt.fixed_point(
        model.f, torch.zeros(model.hshape, dtype=F64), forward_maxiter=500, forward_tol=1e-14,
        backward=backward, on_failure="raise", return_info=True,
    )
    assert info.forward.converged and info.backward is None
    (h * g).sum().backward()
    assert info.backward.success and info.backward.method == method
    assert info.backward_results == [info.backward]
    for p, want in zip(model.params, _exact_grads(model, h.detach(), g)):
        assert _rel(p.grad, want) < 1e-9


def test_unused_parameter_gets_zero_gradient():
    model = TanhRNN()
    extra = torch.ones(3, dtype=F64, requires_grad=True)
    h = _fixed_point(model)
    grads, _ = lrt.implicit_grad(model.f, h, torch.ones_like(h), model.params + [extra], method="neumann", rtol=1e-10)
    assert torch.equal(grads[-1], torch.zeros(3, dtype=F64))


def test_implicit_grad_batched_equals_per_sample():
    model = TanhRNN(batch=4)
    h = _fixed_point(model)
    g = torch.randn(model.hshape, generator=torch.Generator().manual_seed(2), dtype=F64)
    grads, res = lrt.implicit_grad(model.f, h, g, model.params, method="neumann", batch_dims=1, rtol=1e-13, maxiter=500)
    assert res.statuses is not None and len(res.statuses) == 4 and res.success
    want = [torch.zeros_like(p) for p in model.params]
    for i in range(4):
        single = TanhRNN()
        single.params = model.params
        single.x = model.x[i, ...]
        for w, e in zip(want, _exact_grads(single, h[i, ...], g[i, ...])):
            w += e
    for got, w in zip(grads, want):
        assert _rel(got, w) < 1e-9


def test_fixed_point_batched_and_any_state_shape():
    g = torch.Generator().manual_seed(3)
    W = (0.3 * torch.randn(2, 2, dtype=F64, generator=g)).requires_grad_()
    x = torch.randn(5, 3, 2, dtype=F64, generator=g)

    def f(h):  # state of shape (5, 3, 2): a batch of 5 samples of shape (3, 2)
        return torch.tanh(h @ W.T + x)

    h, info = lrt.fixed_point(
        f, torch.zeros(5, 3, 2, dtype=F64), batch_dims=1, forward_maxiter=300, forward_tol=1e-14,
        backward={"method": "neumann", "rtol": 1e-13, "maxiter": 500}, return_info=True,
    )
    assert info.forward.residual_norm.shape == (5,)
    h.square().sum().backward()
    assert len(info.backward.statuses) == 5
    grad_batched = W.grad.clone()
    W.grad = None
    h2 = lrt.fixed_point(f, torch.zeros(5, 3, 2, dtype=F64), forward_maxiter=300, forward_tol=1e-14,
                         backward={"method": "neumann", "rtol": 1e-13, "maxiter": 500})
    h2.square().sum().backward()
    assert _rel(grad_batched, W.grad) < 1e-9


# -- Proposition 1: Neumann-RBP with K terms equals TBPTT with truncation K -------------------
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("K", [2, 5, 10])
def test_neumann_rbp_equals_tbptt_at_fixed_point(model_name, K):
    model = MODELS[model_name]()
    g = torch.randn(model.hshape, generator=torch.Generator().manual_seed(7), dtype=F64)
    hT = lrt.unroll(model.f, torch.zeros(model.hshape, dtype=F64), steps=400, truncate=K)
    tbptt = torch.autograd.grad((hT * g).sum(), model.params)
    # K terms z = sum_{k<K} (J^T)^k g: neumann adds maxiter terms after the first.
    rbp, res = lrt.implicit_grad(model.f, hT.detach(), g, model.params, method="neumann",
                                 rtol=None, atol=None, maxiter=K - 1)
    assert res.status is lr.Status.COMPLETED and res.iterations == K - 1
    for a, b in zip(rbp, tbptt):
        assert _rel(a, b) < 1e-11


def test_fixed_budget_fixed_point_rbp_equals_neumann_rbp():
    # Proposition 3 of the paper: K + 1 RBP iterations from zero equal K Neumann-RBP terms.
    model = TanhRNN()
    h = _fixed_point(model)
    g = torch.ones_like(h)
    a, _ = lrt.implicit_grad(model.f, h, g, model.params, method="neumann", rtol=None, atol=None, maxiter=4)
    b, _ = lrt.implicit_grad(model.f, h, g, model.params, method="fixed_point", rtol=None, atol=None, maxiter=5)
    for x, y in zip(a, b):
        assert _rel(x, y) < 1e-12


# -- gradcheck ------------------------------------------------------------------------------
def test_gradcheck_through_fixed_point():
    g = torch.Generator().manual_seed(4)
    W = (0.4 * torch.randn(3, 3, dtype=F64, generator=g)).requires_grad_()
    x = torch.randn(3, dtype=F64, generator=g).requires_grad_()

    def layer(W, x):
        return lrt.fixed_point(
            lambda h: torch.tanh(h @ W.T + x), torch.zeros(3, dtype=F64), forward_maxiter=1000,
            forward_tol=1e-15, backward={"method": "neumann", "rtol": 1e-14, "maxiter": 1000},
            on_failure="raise",
        )

    assert torch.autograd.gradcheck(layer, (W, x), eps=1e-6, atol=1e-7, rtol=1e-5)


# -- failure policy -------------------------------------------------------------------------
def _repelling_linear_map():
    """``f(h) = A h + c`` with spectral radius of ``A`` 1.5: ``h*`` exists but fixed-point and
    Neumann iterations on ``J^T = A^T`` diverge."""
    g = torch.Generator().manual_seed(9)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=g))
    A = (Q @ torch.diag(torch.tensor([1.5, 0.5, -0.3, 0.2], dtype=F64)) @ Q.T).requires_grad_()
    c = torch.randn(4, dtype=F64, generator=g).requires_grad_()
    with torch.no_grad():
        h_star = torch.linalg.solve(torch.eye(4, dtype=F64) - A, c)
    return (lambda h: A @ h + c), h_star, [A, c]


BAD_BACKWARD = {"method": "neumann", "rtol": 1e-10, "maxiter": 500}


def test_failure_policy_warn():
    f, h_star, params = _repelling_linear_map()
    h, info = lrt.fixed_point(f, h_star, forward_tol=1e-8, backward=BAD_BACKWARD, on_failure="warn",
                              return_info=True)
    with pytest.warns(lr.ConvergenceWarning, match="diverged"):
        h.sum().backward()
    assert info.backward.status is lr.Status.DIVERGED
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    with pytest.warns(lr.ConvergenceWarning):
        grads, res = lrt.implicit_grad(f, h_star, torch.ones(4, dtype=F64), params, **BAD_BACKWARD)
    assert not res.success and all(torch.isfinite(gr).all() for gr in grads)


def test_failure_policy_raise():
    f, h_star, params = _repelling_linear_map()
    ws = lrt.WarmStart()
    h, info = lrt.fixed_point(f, h_star, forward_tol=1e-8, backward=BAD_BACKWARD, on_failure="raise",
                              warm_start=ws, return_info=True)
    with pytest.raises(lr.SolveError) as err:
        h.sum().backward()
    assert err.value.result.status is lr.Status.DIVERGED
    # The call's info and the layer's store hold the failed result; the store keeps no x.
    assert info.backward is err.value.result and ws.last_result is err.value.result and ws.x is None
    assert all(p.grad is None for p in params)
    with pytest.raises(lr.SolveError):
        lrt.implicit_grad(f, h_star, torch.ones(4, dtype=F64), params, on_failure="raise", **BAD_BACKWARD)


def test_failure_policy_ignore():
    f, h_star, params = _repelling_linear_map()
    h, info = lrt.fixed_point(f, h_star, forward_tol=1e-8, backward=BAD_BACKWARD, on_failure="ignore",
                              return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h.sum().backward()
    assert not info.backward.success
    for p in params:
        assert torch.isfinite(p.grad).all()


def test_forward_failure_policy():
    model = TanhRNN()
    h0 = torch.zeros(model.hshape, dtype=F64)
    with pytest.warns(lr.ConvergenceWarning, match="forward"):
        _, info = lrt.fixed_point(model.f, h0, forward_maxiter=2, forward_tol=1e-12, return_info=True)
    assert info.forward.status is lr.Status.MAX_ITERATIONS and info.forward.iterations == 2
    with pytest.raises(lr.SolveError):
        lrt.fixed_point(model.f, h0, forward_maxiter=2, forward_tol=1e-12, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = lrt.fixed_point(model.f, h0, forward_maxiter=2, forward_tol=None, return_info=True)
    assert info.forward.status is lr.Status.COMPLETED
    with pytest.warns(lr.ConvergenceWarning, match="non-finite|nonfinite"):
        lrt.fixed_point(lambda h: 10.0 * h + 1e300, h0, forward_maxiter=50)


# -- deduplicated warnings -------------------------------------------------------------------
def _convergence_warnings(record):
    return [w for w in record if issubclass(w.category, lr.ConvergenceWarning)]


def test_warn_failure_first_in_full_then_periodic_counts():
    from linsolve_rbp._warnings import warn_failure

    failed = lr.SolveResult(
        x=None, status=lr.Status.MAX_ITERATIONS, converged=False, success=False, iterations=3,
        matvecs=3, rmatvecs=0, residual_norm=1.0, residual_history=None, message="it failed",
        method="gmres",
    )
    ok = lr.SolveResult(
        x=None, status=lr.Status.CONVERGED, converged=True, success=True, iterations=3,
        matvecs=3, rmatvecs=0, residual_norm=0.0, residual_history=None, message="fine",
        method="gmres",
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        shown = [warn_failure(failed, "my solve", stacklevel=1) for _ in range(1000)]
        assert not warn_failure(ok, "my solve", stacklevel=1)
    got = _convergence_warnings(record)
    assert [i + 1 for i, s in enumerate(shown) if s] == [1, 10, 100, 1000]
    assert len(got) == 4
    assert all(w.filename == __file__ for w in got)  # attributed to the calling line
    assert str(got[0].message).startswith("my solve: it failed")
    assert "show_all_convergence_warnings(True)" in str(got[0].message)
    assert "8 similar warnings suppressed" in str(got[1].message)
    assert "89 similar warnings suppressed" in str(got[2].message)
    assert "899 similar warnings suppressed" in str(got[3].message)
    # Another context (or another line) is another key; reset starts over; show_all shows all.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn_failure(failed, "other solve", stacklevel=1)
        for _ in range(2):
            warn_failure(failed, "my solve", stacklevel=1)  # a new line: shown once
        lr.reset_convergence_warnings()
        warn_failure(failed, "my solve", stacklevel=1)
        assert lr.show_all_convergence_warnings(True) is False
        for _ in range(5):
            warn_failure(failed, "my solve", stacklevel=1)
    texts = [str(w.message) for w in _convergence_warnings(record)]
    assert len(texts) == 1 + 1 + 1 + 5 and texts[0].startswith("other solve: it failed")
    assert texts[-1] == "my solve: it failed"  # in full, no count line
    with pytest.raises(TypeError, match="enable"):
        lr.show_all_convergence_warnings("yes")


def test_training_loop_warnings_are_deduplicated():
    """The repro: a DEQ whose backward fails at every step warned 39 times in 40 steps."""
    f, h_star, params = _repelling_linear_map()
    opt = torch.optim.SGD(params, lr=0.0)  # the weights stay where the solve fails

    def train(steps):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(steps):
                h = lrt.fixed_point(f, h_star, forward_tol=1e-8, backward=BAD_BACKWARD)
                opt.zero_grad()
                h.sum().backward()
                opt.step()
        return _convergence_warnings(record)

    got = train(40)
    assert len(got) == 2  # the first, and the 10th with the count of the 8 suppressed
    assert "diverged" in str(got[0].message) and "8 similar warnings suppressed" in str(got[1].message)
    assert all(w.filename == __file__ for w in got)  # they point at the fixed_point call
    assert all(torch.isfinite(p.grad).all() for p in params)
    lr.show_all_convergence_warnings(True)
    assert len(train(40)) == 40
    # implicit_grad in a loop: deduplicated the same way.
    lr.show_all_convergence_warnings(False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(40):
            lrt.implicit_grad(f, h_star, torch.ones(4, dtype=F64), params, **BAD_BACKWARD)
    assert len(_convergence_warnings(record)) == 2


# -- non-finite gradients of fixed_point --------------------------------------------------------
def _sqrt_at_zero():
    """``f(h) = 0.5 h + sqrt(p)`` at ``p = 0``: the fixed point is fine, ``df/dp`` is inf."""
    p = torch.zeros(3, dtype=F64, requires_grad=True)
    return (lambda h: 0.5 * h + torch.sqrt(p)), p


def _no_hooks_left(*tensors):
    return all(not t._backward_hooks for t in tensors)


def test_fixed_point_nonfinite_gradient_warns_and_zeroes_like_implicit_grad():
    for policy in ("warn", "ignore"):  # implicit_grad warns about non-finite gradients even with "ignore"
        lr.reset_convergence_warnings()
        f, p = _sqrt_at_zero()
        h = lrt.fixed_point(f, torch.zeros(3, dtype=F64), on_failure=policy)
        with pytest.warns(lr.ConvergenceWarning, match="non-finite") as record:
            h.sum().backward()
        assert len(_convergence_warnings(record)) == 1
        assert torch.equal(p.grad, torch.zeros(3, dtype=F64))
        assert _no_hooks_left(p)
        with pytest.warns(lr.ConvergenceWarning, match="non-finite"):
            (want,), _ = lrt.implicit_grad(f, h.detach(), torch.ones(3, dtype=F64), [p], on_failure=policy)
        assert torch.equal(want, p.grad)
    # The parameter may sit upstream of f (an encoder's output): its gradient is checked too.
    q = torch.zeros(3, dtype=F64, requires_grad=True)
    W = torch.full((3,), 0.5, dtype=F64, requires_grad=True)
    u = torch.sqrt(q)
    h = lrt.fixed_point(lambda h: W * h + u, torch.zeros(3, dtype=F64))
    with pytest.warns(lr.ConvergenceWarning, match="non-finite"):
        torch.autograd.grad(h.sum(), [q, W])  # autograd.grad as well as backward()
    assert _no_hooks_left(q, W)


def test_fixed_point_nonfinite_gradient_raises():
    f, p = _sqrt_at_zero()
    h = lrt.fixed_point(f, torch.zeros(3, dtype=F64), on_failure="raise")
    with pytest.raises(lr.SolveError, match="non-finite") as err:
        h.sum().backward()
    assert err.value.result.success  # the solve was fine; the gradient is not
    assert p.grad is None and _no_hooks_left(p)
    with pytest.raises(lr.SolveError, match="non-finite"):
        lrt.implicit_grad(f, h.detach(), torch.ones(3, dtype=F64), [p], on_failure="raise")


def test_fixed_point_finite_gradient_check_changes_nothing_and_leaves_no_hook():
    model = TanhRNN()
    h = lrt.fixed_point(model.f, torch.zeros(model.hshape, dtype=F64), forward_maxiter=500,
                        forward_tol=1e-14, backward=dict(ACCURATE["neumann"], method="neumann"))
    g = torch.ones(model.hshape, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (h * g).sum().backward(retain_graph=True)
        (h * g).sum().backward()  # a second pass through the same call
    for p, want in zip(model.params, _exact_grads(model, h.detach(), g)):
        assert _rel(p.grad, 2 * want) < 1e-9
    assert _no_hooks_left(*model.params)
    # A pass that ends in an exception leaves no hook that acts on a later pass.
    h = lrt.fixed_point(model.f, torch.zeros(model.hshape, dtype=F64), backward={"method": "neumann"})

    def boom(grad):
        raise KeyError("boom")

    model.params[0].register_hook(boom)
    with pytest.raises(KeyError):
        h.sum().backward()
    model.params[0]._backward_hooks.clear()
    for p in model.params:
        p.grad = None
    before = model.params[1].grad
    (model.params[1] * float("inf")).sum().backward()  # not through fixed_point: left alone
    assert before is None and torch.isinf(model.params[1].grad).all()
    assert _no_hooks_left(*model.params)


# -- released Jacobians and structure ---------------------------------------------------------
@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_released_jacobian_raises_on_every_product(jvp):
    model = TanhRNN()
    h = _fixed_point(model)
    J = lrt.JacobianOperator(model.f, h, jvp=jvp)
    v = torch.ones(6, dtype=F64)
    J @ v, J.T @ v  # noqa: B018 - products work before release
    J.release()
    assert J.released
    for product in (lambda: J @ v, lambda: J.T @ v, lambda: J.matvec(v), lambda: J.rmatvec(v),
                    lambda: J.vjp_params(v, model.params)):
        with pytest.raises(RuntimeError, match="released"):
            product()
    # The solve that used to report CONVERGED with z = v now fails loudly.
    A = lr.IdentityOperator(6, like=v) - J.T
    with pytest.raises(RuntimeError, match="released"):
        lr.solve(A, v, method="gmres")
    J.release()  # releasing twice is harmless


def test_jacobian_operator_is_tagged_non_symmetric():
    model = Hopfield()  # even where J happens to be close to symmetric, it is not known to be
    h = _fixed_point(model)
    J = lrt.JacobianOperator(model.f, h)
    assert J.symmetric is False
    A = lr.IdentityOperator(J.shape[0], like=h) - J.T
    assert A.symmetric is False
    for method in ("cg", "minres"):
        with pytest.raises(ValueError, match="symmetric"):
            lr.solve(A, torch.ones_like(h), method=method)
    assert J.rmatvec_count == 0  # refused up front, before any product


# -- options validated at the call ------------------------------------------------------------
def test_backward_options_validated_at_the_fixed_point_call():
    model = TanhRNN()
    h0 = torch.zeros(model.hshape, dtype=F64)
    calls = [0]

    def f(h):
        calls[0] += 1
        return model.f(h)

    with pytest.raises(TypeError, match=r"restrat.*did you mean 'restart'"):
        lrt.fixed_point(f, h0, backward={"rtol": -1, "restrat": 5})
    with pytest.raises(ValueError, match="rtol"):
        lrt.fixed_point(f, h0, backward={"rtol": -1})
    with pytest.raises(TypeError, match="tol") as err:
        lrt.fixed_point(f, h0, backward={"method": "gmres", "tol": 1e-5})
    for name in ("rtol", "atol", "maxiter", "check_every", "restart"):
        assert name in str(err.value)  # every accepted option is listed, not only restart
    assert "did you mean 'rtol'" in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'gmres'"):
        lrt.fixed_point(f, h0, backward={"method": "gmers"})
    with pytest.raises(ValueError, match="restart"):
        lrt.fixed_point(f, h0, backward={"method": "gmres", "restart": 0})
    with pytest.raises(ValueError, match="jvp"):
        lrt.fixed_point(f, h0, backward={"jvp": "sideways"})
    for key in ("throw", "on_failure"):
        with pytest.raises(ValueError, match=key):
            lrt.fixed_point(f, h0, backward={key: "raise"})
    assert calls[0] == 0  # refused before any work
    # implicit_grad validates method and options before evaluating f.
    h = _fixed_point(model)
    with pytest.raises(ValueError, match="did you mean 'gmres'"):
        lrt.implicit_grad(f, h, torch.ones_like(h), model.params, method="gmers")
    with pytest.raises(TypeError, match=r"'tol'.*did you mean 'rtol'.*check_every"):
        lrt.implicit_grad(f, h, torch.ones_like(h), model.params, tol=1e-5)
    with pytest.raises(ValueError, match="maxiter"):
        lrt.implicit_grad(f, h, torch.ones_like(h), model.params, rtol=None, atol=None)
    assert calls[0] == 0
    # The backward pass still honours on_failure with valid options.
    h = lrt.fixed_point(model.f, h0, backward={"method": "gmres", "rtol": 1e-10, "maxiter": 1},
                        on_failure="raise")
    with pytest.raises(lr.SolveError):
        h.sum().backward()


# -- half precision and autocast ---------------------------------------------------------------
def _small_deq(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 8, generator=g)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).to(dtype).requires_grad_()
    x = torch.randn(4, 8, generator=g).to(dtype)
    return W, x


def test_fixed_point_under_autocast_trains_like_float32():
    W, x = _small_deq()
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    backward = {"method": "gmres", "rtol": 1e-2}  # bfloat16 products: ~1e-3 relative rounding

    def step(autocast):
        W.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h, info = lrt.fixed_point(f, torch.zeros(4, 8), forward_tol=1e-3, backward=backward,
                                      on_failure="raise", return_info=True)
            assert h.dtype == torch.float32  # the state's dtype, not bfloat16
            loss = h.square().sum()
        loss.backward()
        assert info.backward.success and info.backward.x.dtype == torch.float32
        return W.grad.clone()

    g32 = step(False)
    gbf = step(True)
    assert torch.isfinite(gbf).all()
    assert _rel(gbf, g32) < 3e-2
    # f really ran in bfloat16: the gradient is not the float32 one to float32 rounding.
    assert _rel(gbf, g32) > 1e-6
    # One optimiser step under autocast moves W like the float32 step.
    opt = torch.optim.SGD([W], lr=0.1)
    with torch.no_grad():
        before = W.clone()
    opt.step()
    assert _rel(W.detach() - before, -0.1 * gbf) < 1e-6
    # The Jacobian operator itself, built under autocast, keeps the state's dtype.
    h = torch.zeros(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        J = lrt.JacobianOperator(f, h, jvp="forward")
    v = torch.ones(32)
    assert J.dtype == torch.float32 and (J @ v).dtype == torch.float32 and (J.T @ v).dtype == torch.float32


def test_dtype_mismatch_outside_autocast_still_rejected():
    h = torch.zeros(3)
    with pytest.raises(TypeError, match="dtype"):
        lrt.fixed_point(lambda h: h.to(torch.bfloat16), h)
    with pytest.raises(TypeError, match="dtype"):
        lrt.JacobianOperator(lambda h: h.double(), h)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="dtype"):
        lrt.JacobianOperator(lambda h: h.double(), h)  # higher precision is not autocast's doing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states(dtype):
    W, x = _small_deq(dtype)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    W32, x32 = _small_deq(torch.float32)
    f32 = lambda h: torch.tanh(h @ W32.T + x32)  # noqa: E731
    h32 = lrt.fixed_point(f32, torch.zeros(4, 8), forward_tol=1e-6)
    h32.sum().backward()
    h, info = lrt.fixed_point(f, torch.zeros(4, 8, dtype=dtype), forward_tol=1e-2,
                              backward={"method": "gmres", "rtol": 1e-2}, on_failure="raise",
                              return_info=True)
    assert h.dtype == dtype
    h.float().sum().backward()
    assert W.grad.dtype == dtype and torch.isfinite(W.grad).all()
    assert _rel(W.grad.float(), W32.grad) < 5e-2
    hs = h.detach()
    (gW,), res = lrt.implicit_grad(f, hs, torch.ones_like(hs), [W], rtol=1e-2, on_failure="raise")
    assert res.success and res.x.dtype == dtype and gW.dtype == dtype
    assert _rel(gW.float(), W32.grad) < 5e-2


# -- nn.Module inside a larger graph --------------------------------------------------------
def test_module_grads_filled_by_backward_inside_larger_graph():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 4).double()
    cell = torch.nn.GRUCell(4, 5).double()
    readout = torch.nn.Linear(5, 2).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(0.5)
    x = torch.randn(2, 3, dtype=F64)
    modules = [encoder, cell, readout]

    def loss_with(solver):
        u = encoder(x)  # f closes over a non-leaf input
        h = solver(lambda h: cell(u, h), torch.zeros(2, 5, dtype=F64))
        return readout(h).square().sum()

    loss = loss_with(lambda f, h0: lrt.fixed_point(
        f, h0, forward_maxiter=500, forward_tol=1e-14, backward={"method": "neumann", "rtol": 1e-13, "maxiter": 1000}))
    loss.backward()
    rbp = [p.grad.clone() for m in modules for p in m.parameters()]
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss_with(lambda f, h0: lrt.unroll(f, h0, steps=300)).backward()  # BPTT, converged
    bptt = [p.grad for m in modules for p in m.parameters()]
    assert all(torch.count_nonzero(r) > 0 for r in rbp)
    for a, b in zip(rbp, bptt):
        assert _rel(a, b) < 1e-8


def test_h0_gets_zero_gradient():
    model = TanhRNN()
    h0 = torch.randn(model.hshape, dtype=F64, requires_grad=True)
    h = lrt.fixed_point(model.f, h0, forward_maxiter=200, backward={"method": "neumann", "rtol": 1e-8})
    h.sum().backward()
    assert torch.equal(h0.grad, torch.zeros_like(h0))


def test_no_graph_without_grad_mode():
    model = TanhRNN()
    with torch.no_grad():
        h = lrt.fixed_point(model.f, torch.zeros(model.hshape, dtype=F64))
    assert not h.requires_grad


# -- memory ---------------------------------------------------------------------------------
def _saved_bytes(run):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total[0]


def test_saved_memory_does_not_grow_with_forward_iterations():
    model = TanhRNN(n=32)
    h0 = torch.zeros(model.hshape, dtype=F64)
    fp = [_saved_bytes(lambda: lrt.fixed_point(model.f, h0, forward_maxiter=k, forward_tol=None)) for k in (10, 100)]
    bptt = [_saved_bytes(lambda: lrt.unroll(model.f, h0, steps=k)) for k in (10, 100)]
    assert fp[0] == fp[1] > 0
    assert bptt[1] > 5 * bptt[0]  # the measurement sees growth where there is some


@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_jacobian_products_do_not_grow_memory(jvp):
    model = TanhRNN(n=16)
    h = _fixed_point(model)
    u = torch.ones(16, dtype=F64, requires_grad=True)

    def products(k):
        J = lrt.JacobianOperator(model.f, h, jvp=jvp)
        for _ in range(k):
            J @ u
            J.T @ u

    assert _saved_bytes(lambda: products(1)) == _saved_bytes(lambda: products(50)) > 0


# -- warm start -----------------------------------------------------------------------------
def test_warm_start_reuses_previous_solution():
    model = TanhRNN()
    ws = lrt.WarmStart()
    backward = {"method": "neumann", "rtol": 1e-10, "maxiter": 500}
    iters = []
    for _ in range(2):
        h, info = lrt.fixed_point(model.f, torch.zeros(model.hshape, dtype=F64), forward_tol=1e-12,
                                  forward_maxiter=300, backward=backward, warm_start=ws, return_info=True)
        h.sum().backward()
        iters.append(info.backward.iterations)
    assert (ws.misses, ws.hits) == (1, 1)
    assert iters[1] < iters[0]
    # A state of another shape does not use the stored solution.
    other = TanhRNN(batch=2)
    lrt.fixed_point(other.f, torch.zeros(other.hshape, dtype=F64), backward=backward, warm_start=ws).sum().backward()
    assert ws.misses == 2


def test_warm_start_stores_belong_to_their_layer():
    """Two layers of the same state shape, each with its own store: neither starts from the
    other's solution; a call without a store always starts cold."""
    backward = {"method": "neumann", "rtol": 1e-10, "maxiter": 500}
    a, b = TanhRNN(seed=0), TanhRNN(seed=1)
    ws_a, ws_b = lrt.WarmStart(), lrt.WarmStart()

    def layer(model, ws):
        h, info = lrt.fixed_point(model.f, torch.zeros(model.hshape, dtype=F64), forward_tol=1e-12,
                                  forward_maxiter=300, backward=backward, warm_start=ws, return_info=True)
        h.sum().backward()
        return info

    layer(a, ws_a)
    layer(a, ws_a)
    info_b = layer(b, ws_b)
    assert (ws_a.misses, ws_a.hits) == (1, 1) and (ws_b.misses, ws_b.hits) == (1, 0)
    assert ws_b.last_result is info_b.backward and ws_a.last_result is not info_b.backward
    assert not torch.equal(ws_a.x, ws_b.x)
    cold = [layer(a, None).backward.iterations for _ in range(2)]
    assert cold[0] == cold[1]
    assert (ws_a.misses, ws_a.hits) == (1, 1)  # untouched by calls without it
    ws_a.clear()
    assert ws_a.x is None and ws_a.last_result is None
    layer(a, ws_a)
    assert (ws_a.misses, ws_a.hits) == (2, 1)


def test_warm_start_true_is_refused_with_a_way_out():
    model = TanhRNN()
    calls = [0]

    def f(h):
        calls[0] += 1
        return model.f(h)

    h0 = torch.zeros(model.hshape, dtype=F64)
    for error in (TypeError, ValueError):  # either except clause catches it
        with pytest.raises(error, match=r"warm_start=True .*lrt\.WarmStart\(\).*warm_start=ws"):
            lrt.fixed_point(f, h0, warm_start=True)
    with pytest.raises(TypeError, match=r"warm_start must be a WarmStart.*got str"):
        lrt.fixed_point(f, h0, warm_start="yes")
    assert calls[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrt.fixed_point(model.f, h0, warm_start=False, forward_maxiter=200).sum().backward()  # cold


def test_backward_result_belongs_to_the_call():
    model = TanhRNN()
    h0 = torch.zeros(model.hshape, dtype=F64)
    backward = {"method": "gmres", "rtol": 1e-10}
    h1, info1 = lrt.fixed_point(model.f, h0, forward_maxiter=300, backward=backward, return_info=True)
    h2, info2 = lrt.fixed_point(model.f, h0, forward_maxiter=300, backward={"method": "neumann", "rtol": 1e-10},
                                return_info=True)
    assert info1.backward is None and info1.backward_results == []
    h1.sum().backward(retain_graph=True)
    assert isinstance(info1.backward, lr.SolveResult) and info1.backward.method == "gmres"
    assert info1.backward.success and info2.backward is None  # the other call saw nothing
    first = info1.backward
    h1.sum().backward()  # a second pass through the same call
    assert info1.backward_results[0] is first and info1.backward is info1.backward_results[1]
    h2.sum().backward()
    assert info2.backward.method == "neumann" and len(info1.backward_results) == 2


def test_backward_results_do_not_cross_threads():
    import threading

    results = {}

    def run(name, method):
        model = TanhRNN()
        h, info = lrt.fixed_point(model.f, torch.zeros(model.hshape, dtype=F64), forward_maxiter=300,
                                  backward={"method": method, "rtol": 1e-10}, return_info=True)
        h.sum().backward()
        results[name] = info.backward

    threads = [threading.Thread(target=run, args=(m, m)) for m in ("gmres", "neumann", "bicgstab")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name: r.method for name, r in results.items()} == {m: m for m in ("gmres", "neumann", "bicgstab")}


def test_adapter_modules_hold_no_mutable_state():
    """No warm-start store, result, cache or registry at module level in the adapter package:
    everything a call or a layer needs belongs to that call or layer."""
    import collections.abc
    import importlib
    import pkgutil
    import threading
    import types

    mutable = (collections.abc.MutableMapping, collections.abc.MutableSequence, collections.abc.MutableSet,
               bytearray, threading.local, types.SimpleNamespace, lrt.WarmStart, lrt.FixedPointInfo,
               lr.SolveResult)
    modules = [lrt] + [importlib.import_module(f"{lrt.__name__}.{m.name}") for m in pkgutil.iter_modules(lrt.__path__)]
    assert {m.__name__.rsplit(".", 1)[-1] for m in modules} >= {
        "_checks", "jacobian", "implicit", "layer", "baselines", "penalties"}
    found = []
    for mod in modules:
        for name, value in vars(mod).items():
            if name.startswith("__") and name.endswith("__"):
                continue
            if isinstance(value, mutable):
                found.append(f"{mod.__name__}.{name}: {type(value).__name__}")
            if isinstance(value, type) and value.__module__ == mod.__name__:
                for attr, v in vars(value).items():  # class-level state shared by instances
                    if not attr.startswith("__") and isinstance(v, mutable):
                        found.append(f"{mod.__name__}.{name}.{attr}: {type(v).__name__}")
    assert not found, found
    assert not hasattr(lrt, "last_backward_result")


def test_adapter_imports_point_downward_only():
    """The package imports downward (_checks <- jacobian <- implicit <- layer; baselines and
    penalties alone) and never the command line, the experiments or the test problems."""
    import ast
    import pathlib

    order = {"_checks": 0, "jacobian": 1, "implicit": 2, "layer": 3}
    alone = {"baselines", "penalties"}
    forbidden = ("cli", "compare", "problems", "experiments")
    for path in pathlib.Path(lrt.__file__).parent.glob("*.py"):
        name = path.stem
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] if node.level else []
                absolute = [] if node.level else [node.module or ""]
                if node.level == 1:  # inside the package
                    target = (node.module or "").split(".")[0]
                    if name == "__init__":
                        continue
                    # the stand-alone modules use only the state layout (_tree)
                    assert name not in alone or target in ("", "_tree"), f"{name} imports .{target}"
                    assert order.get(target, -1) < order.get(name, 99), f"{name} imports .{target}"
                for t in targets + absolute:
                    assert not any(part in forbidden for part in t.split(".")), f"{name} imports {t}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("linsolve_rbp."), f"{name} imports {alias.name}"


def test_implicit_grad_x0_warm_start():
    model = TanhRNN()
    h = _fixed_point(model)
    g = torch.ones_like(h)
    _, cold = lrt.implicit_grad(model.f, h, g, model.params, method="neumann", rtol=1e-10)
    _, warm = lrt.implicit_grad(model.f, h, g, model.params, method="neumann", rtol=1e-10, x0=cold.x)
    assert warm.iterations < cold.iterations


# -- JacobianOperator -----------------------------------------------------------------------
def _dense_J(f, h):
    n = h.numel()
    return torch.autograd.functional.jacobian(f, h).reshape(n, n)


@pytest.mark.parametrize("jvp", ["auto", "forward", "double_backward"])
def test_jacobian_operator_products_and_dot_test(jvp):
    model = TanhRNN()
    h = torch.randn(model.hshape, dtype=F64, generator=torch.Generator().manual_seed(1))
    J = lrt.JacobianOperator(model.f, h, jvp=jvp)
    Jd = _dense_J(model.f, h)
    gen = torch.Generator().manual_seed(2)
    v, u = torch.randn(6, dtype=F64, generator=gen), torch.randn(6, dtype=F64, generator=gen)
    Jv, JTu = J @ v, J.T @ u
    assert _rel(Jv, Jd @ v) < 1e-13 and _rel(JTu, Jd.T @ u) < 1e-13
    assert abs(float(torch.dot(Jv, u) - torch.dot(v, JTu))) < 1e-13 * float(Jv.norm() * u.norm())
    assert (J.matvec_count, J.rmatvec_count) == (1, 1)
    V = torch.randn(3, 6, dtype=F64, generator=gen)
    assert _rel(J.matvec(V), V @ Jd.T) < 1e-13 and _rel(J.rmatvec(V), V @ Jd) < 1e-13
    assert (J.matvec_count, J.rmatvec_count) == (2, 2)
    assert J.jvp_mode in ("forward", "double_backward")


def test_jacobian_operator_forward_and_double_backward_agree_any_shape():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 4, dtype=F64, generator=g, requires_grad=True)

    def f(h):  # a state of shape (2, 3, 4)
        return torch.sin(h @ W) * h

    h = torch.randn(2, 3, 4, dtype=F64, generator=g)
    v = torch.randn(24, dtype=F64, generator=g)
    a = lrt.JacobianOperator(f, h, jvp="forward") @ v
    b = lrt.JacobianOperator(f, h, jvp="double_backward") @ v
    assert a.shape == (24,) and _rel(a, b) < 1e-13 and _rel(a, _dense_J(f, h) @ v) < 1e-13


def test_jacobian_operator_records_f_once_for_many_vjps():
    model = TanhRNN()
    calls = [0]

    def f(h):
        calls[0] += 1
        return model.f(h)

    h = _fixed_point(model)
    J = lrt.JacobianOperator(f, h, jvp="double_backward")
    u = torch.ones(6, dtype=F64)
    for _ in range(20):
        u = J.T @ u
    for _ in range(5):
        J @ u
    assert calls[0] == 1 and J.f_evals == 1 and J.rmatvec_count == 20 and J.matvec_count == 5


def test_jacobian_products_are_detached():
    model = TanhRNN()
    h = torch.randn(model.hshape, dtype=F64, requires_grad=True)
    J = lrt.JacobianOperator(model.f, h)
    u = torch.ones(6, dtype=F64, requires_grad=True)
    assert not (J.T @ u).requires_grad and not (J @ u).requires_grad
    assert h.grad is None and all(p.grad is None for p in model.params)


def test_jacobian_operator_batched_blocks_equal_per_sample():
    model = TanhRNN(batch=3)
    h = torch.randn(model.hshape, dtype=F64, generator=torch.Generator().manual_seed(1))
    J = lrt.JacobianOperator(model.f, h, batch_dims=1)
    assert J.shape == (6, 6)
    V = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    JV, JTV = J.matvec(V), J.rmatvec(V)
    for i in range(3):
        fi = (lambda i: lambda hi: TanhRNN.step(hi, model.x[i, ...], *model.params))(i)
        Ji = lrt.JacobianOperator(fi, h[i, ...])
        assert _rel(JV[i, ...], Ji @ V[i, ...]) < 1e-13
        assert _rel(JTV[i, ...], Ji.T @ V[i, ...]) < 1e-13
    with pytest.raises(lr.OperatorMismatchError, match="batch"):
        J.matvec(V[0, ...])


class _NoForwardMode(torch.autograd.Function):
    """``tanh`` with a backward formula only, as many custom operations are written."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


@pytest.mark.parametrize("case", ["gru_cell", "in_place", "no_forward_mode"])
def test_auto_jvp_works_where_forward_mode_does_or_does_not(case):
    torch.manual_seed(0)
    if case == "gru_cell":
        cell = torch.nn.GRUCell(3, 4).double()
        x = torch.randn(2, 3, dtype=F64)
        f, h = (lambda h: cell(x, h)), torch.randn(2, 4, dtype=F64)
    else:
        W = torch.randn(4, 4, dtype=F64, requires_grad=True)
        h = torch.randn(4, dtype=F64)
        if case == "in_place":
            def f(h):
                y = h @ W.T
                y.mul_(0.5)
                y.tanh_()
                return y
        else:
            def f(h):
                return _NoForwardMode.apply(h @ W.T)
    J = lrt.JacobianOperator(f, h, jvp="auto")
    v = torch.randn(h.numel(), dtype=F64)
    assert _rel(J @ v, _dense_J(f, h) @ v) < 1e-13
    if case == "no_forward_mode":
        assert J.jvp_mode == "double_backward"
        with pytest.raises(Exception):
            lrt.JacobianOperator(f, h, jvp="forward") @ v


def test_jacobian_operator_float32_solve():
    model = TanhRNN(dtype=torch.float32)
    h = _fixed_point(model, 100)
    grads, res = lrt.implicit_grad(model.f, h, torch.ones_like(h), model.params, method="neumann", rtol=1e-5)
    assert res.success and res.x.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)
    with pytest.raises(TypeError, match="dtype"):
        lrt.JacobianOperator(model.f, h).matvec(torch.ones(6, dtype=F64))


def test_bad_input_messages():
    model = TanhRNN()
    h = torch.zeros(model.hshape, dtype=F64)
    with pytest.raises(TypeError, match="h must"):
        lrt.JacobianOperator(model.f, h.numpy())
    with pytest.raises(TypeError, match="floating"):
        lrt.JacobianOperator(model.f, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        lrt.JacobianOperator(lambda h: h[:3], h)
    with pytest.raises(ValueError, match="jvp"):
        lrt.JacobianOperator(model.f, h, jvp="reverse")
    with pytest.raises(ValueError, match="batch_dims"):
        lrt.JacobianOperator(model.f, h, batch_dims=2)
    with pytest.raises(ValueError, match="grad_h"):
        lrt.implicit_grad(model.f, h, torch.ones(5, dtype=F64), model.params)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        lrt.implicit_grad(model.f, h, torch.ones_like(h), [torch.ones(2, dtype=F64)])
    with pytest.raises(ValueError, match="on_failure"):
        lrt.fixed_point(model.f, h, on_failure="loud")
    with pytest.raises(ValueError, match="method"):
        lrt.fixed_point(model.f, h, backward={"method": "nope"})
    with pytest.raises(ValueError, match="forward_maxiter"):
        lrt.fixed_point(model.f, h, forward_maxiter=-1)
    with pytest.raises(ValueError, match="x0"):
        lrt.fixed_point(model.f, h, backward={"method": "neumann", "x0": h})
    with pytest.raises(TypeError, match="warm_start"):
        lrt.fixed_point(model.f, h, warm_start="yes")
    # Generic values are judged by the shared validators, which name the argument.
    with pytest.raises(TypeError, match="forward_maxiter must be a non-negative integer"):
        lrt.fixed_point(model.f, h, forward_maxiter=2.5)
    for bad in (-1.0, float("nan"), "1e-6"):
        with pytest.raises(ValueError, match="forward_tol"):
            lrt.fixed_point(model.f, h, forward_tol=bad)
    with pytest.raises(TypeError, match="return_info"):
        lrt.fixed_point(model.f, h, return_info=1)
    with pytest.raises(ValueError, match="batch_dims"):
        lrt.fixed_point(model.f, h, batch_dims=True)
    with pytest.raises(ValueError, match="on_failure.*did you mean 'warn'"):
        lrt.implicit_grad(model.f, h, torch.ones_like(h), model.params, on_failure="warm")
    with pytest.raises(ValueError, match="jvp"):
        lrt.implicit_grad(model.f, h, torch.ones_like(h), model.params, jvp="reverse")
    with pytest.raises(TypeError, match="release"):
        lrt.JacobianOperator(model.f, h).vjp_params(h, model.params, release=1)


# -- unroll ---------------------------------------------------------------------------------
def test_unroll_bptt_and_tbptt():
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    h0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    f = lambda h: w * h + 1.0  # noqa: E731
    h = lrt.unroll(f, h0, steps=3)
    (dh0, dw) = torch.autograd.grad(h, (h0, w))
    # h3 = w^3 h0 + w^2 + w + 1: d/dh0 = w^3, d/dw = 3 w^2 h0 + 2 w + 1
    assert dh0.item() == pytest.approx(0.125) and dw.item() == pytest.approx(2.75)
    h = lrt.unroll(f, h0, steps=3, truncate=1)
    # Only the last step is recorded: d h3 / dw = h2 = w^2 h0 + w + 1.
    (dw,) = torch.autograd.grad(h, (w,))
    assert dw.item() == pytest.approx(1.75)
    assert not lrt.unroll(f, h0, steps=3, truncate=0).requires_grad
    with pytest.raises(ValueError, match="truncate"):
        lrt.unroll(f, h0, steps=3, truncate=4)
    with pytest.raises(ValueError, match="steps"):
        lrt.unroll(f, h0, steps=-1)
    with pytest.raises(TypeError, match="steps must be a non-negative integer"):
        lrt.unroll(f, h0, steps=2.0)
    with pytest.raises(ValueError, match="truncate must be a non-negative integer"):
        lrt.unroll(f, h0, steps=3, truncate=-1)


# -- penalties --------------------------------------------------------------------------------
def test_penalties_match_formulas_and_have_gradients():
    import numpy as np

    rng = np.random.default_rng(6)
    Jn = rng.standard_normal((6, 6)) * 0.5
    J = torch.tensor(Jn, requires_grad=True)
    col = np.abs(Jn).sum(0)
    assert float(lrt.column_norm_penalty(J, mu=0.9).detach()) == pytest.approx((np.maximum(col - 0.9, 0) ** 2).sum())
    lower = 1 - np.diag(Jn) - (np.abs(Jn).sum(1) - np.abs(np.diag(Jn)))
    assert float(lrt.gershgorin_penalty(J, margin=0.1).detach()) == pytest.approx(
        (np.maximum(0.1 - lower, 0) ** 2).sum())
    (lrt.column_norm_penalty(J) + lrt.gershgorin_penalty(J)).backward()
    assert torch.count_nonzero(J.grad) > 0
    small = torch.full((4, 4), 0.01)
    assert float(lrt.column_norm_penalty(small)) == 0.0
    assert float(lrt.gershgorin_penalty(small)) == 0.0
    with pytest.raises(ValueError, match="square"):
        lrt.gershgorin_penalty(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="J must be a torch.Tensor"):
        lrt.column_norm_penalty(Jn)


# -- CUDA -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cuda_fixed_point_and_jacobian(dtype):
    ref = TanhRNN(batch=4)
    x = ref.x.to(device="cuda", dtype=dtype)
    params = [p.detach().to(device="cuda", dtype=dtype).requires_grad_() for p in ref.params]

    def f(h):
        return TanhRNN.step(h, x, *params)

    h0 = torch.zeros(ref.hshape, dtype=dtype, device="cuda")
    J = lrt.JacobianOperator(f, h0, batch_dims=1)
    assert J.device.type == "cuda" and J.dtype == dtype
    V = torch.ones(4, 6, dtype=dtype, device="cuda")
    assert J.matvec(V).device.type == "cuda" and J.rmatvec(V).device.type == "cuda"
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    h, info = lrt.fixed_point(f, h0, batch_dims=1, forward_maxiter=300, forward_tol=tol,
                              backward={"method": "gmres", "rtol": tol}, return_info=True)
    h.sum().backward()
    assert info.forward.success and info.backward.success
    want, _ = lrt.implicit_grad(ref.f, _fixed_point(ref), torch.ones(ref.hshape, dtype=F64), ref.params,
                                method="neumann", batch_dims=1, rtol=1e-13, maxiter=500)
    for p, w in zip(params, want):
        assert p.grad.device.type == "cuda"
        assert _rel(p.grad.cpu().double(), w) < (1e-3 if dtype == torch.float32 else 1e-9)


# -- the lean fixed-budget path (issue 12) ----------------------------------------------------
def _budget_system(kind, n=12, dtype=F64):

    """An ``I - J^T`` whose Neumann / fixed-point iteration contracts, diverges, grows at the
    end, or meets NaN, as a torch operator, and a right-hand side."""
    g = torch.Generator().manual_seed(3)
    J = torch.randn(n, n, generator=g, dtype=dtype)
    J = J / torch.linalg.matrix_norm(J, 2)
    scale = {"contracting": 0.6, "diverging": 3.0, "growing": 1.05, "nan": 0.6}[kind]
    J = scale * J
    b = torch.randn(n, generator=g, dtype=dtype) * 3.0  # a power-of-two scaling applies
    calls = [0]

    def mv(x):
        calls[0] += 1
        y = x - x @ J
        if kind == "nan" and calls[0] == 4:
            y = y * float("nan")
        return y

    return lr.LinearOperator((n, n), matvec=mv, like=b), b, calls


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
@pytest.mark.parametrize("kind", ["contracting", "diverging", "growing", "nan"])
@pytest.mark.parametrize("divtol", [1e5, 2.0, None])
@pytest.mark.parametrize("warm", [False, True])
def test_lean_fixed_budget_equals_monitor_path(method, kind, divtol, warm):
    """A fixed budget of one system without a callback runs the lean loop (host floats, no
    masks, no monitor unless a test fails); with a callback it runs the monitor's loop. Both
    give the very same result: status, iterations, x bit for bit, residuals, history, message
    and product counts, also where the monitor stops early, marks DIVERGED or falls back to
    its best iterate (the lean loop then replays into a monitor)."""
    results = []
    for callback in (None, lambda k, x, r: None):
        A, b, calls = _budget_system(kind)
        x0 = 0.1 * torch.ones_like(b) if warm else None
        res = lr.solve(A, b, method=method, x0=x0, rtol=None, atol=None, maxiter=12,
                       divtol=divtol, callback=callback)
        results.append((res, calls[0]))
    (lean, n_lean), (mon, n_mon) = results
    assert (lean.status, lean.iterations, lean.matvecs, n_lean) == (mon.status, mon.iterations, mon.matvecs, n_mon)
    assert torch.equal(lean.x, mon.x)
    assert np.array_equal(lean.residual_norm, mon.residual_norm, equal_nan=True)
    assert np.array_equal(lean.residual_history, mon.residual_history, equal_nan=True)
    assert lean.message == mon.message
    assert lean.success == mon.success and lean.converged == mon.converged
    assert torch.isfinite(lean.x).all()


def test_lean_fixed_budget_reaches_the_monitor_path_only_on_failure(monkeypatch):
    """In the DEQ backward (neumann, fixed budget) no Monitor is built when nothing fails."""
    from linsolve_rbp.solvers import neumann as nm

    built = []
    real = nm.Monitor

    class Spy(real):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(nm, "Monitor", Spy)
    m = TanhRNN(n=8, d=3)
    f = m.f
    h0 = torch.zeros(8, dtype=F64)
    h, info = lrt.fixed_point(f, h0, forward_maxiter=100, backward={"method": "neumann", "rtol": None,
                              "atol": None, "maxiter": 10}, return_info=True)
    h.sum().backward()
    assert info.backward.status is lr.Status.COMPLETED and info.backward.iterations == 10
    assert info.backward.matvecs == 10 and not built
    A, b, _ = _budget_system("diverging")
    lr.solve(A, b, method="neumann", rtol=None, atol=None, maxiter=12)
    assert built  # the diverging series is closed by a monitor


def test_fixed_point_backward_validates_options_once(monkeypatch):
    """The backward pass of fixed_point solves with the options checked when the layer was
    called (a PreparedSolve): check_options runs at the call, not again in backward()."""
    lsolve = importlib.import_module("linsolve_rbp.solve")

    m = TanhRNN(n=8, d=3)
    h = lrt.fixed_point(m.f, torch.zeros(8, dtype=F64), backward={"method": "neumann", "rtol": None,
                        "atol": None, "maxiter": 10})
    calls = []
    real = lsolve.check_options
    monkeypatch.setattr(lsolve, "check_options", lambda *a, **k: calls.append(a) or real(*a, **k))
    h.sum().backward()
    assert not calls
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.params)


def test_all_finite_matches_isfinite():
    from linsolve_rbp.adapters.torch._checks import all_finite

    t = torch.randn(64, 64)
    assert all_finite(t)
    t[1, 2] = 3e38
    t[1, 3] = 3e38  # the sum overflows, the entries are finite
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[5, 5] = bad
        assert not all_finite(u)
    assert all_finite(torch.zeros(0))
    assert not all_finite(torch.tensor([1.0, float("inf")], dtype=torch.bfloat16))


def test_lean_deq_benchmark_runs(capsys):
    """asv_benchmarks.lean_deq is importable and its --quick run prints both tables."""
    pytest.importorskip("asv_benchmarks.lean_deq")
    from asv_benchmarks.lean_deq import main

    assert main(["--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "Neumann-RBP" in out and "BPTT" in out and "gmres vs fixed_point" in out
    assert "hand-written torch.autograd.grad loop" in out


def test_deq_layers_warn_at_the_users_line_each_their_own():
    """A layer module's forward failures are attributed to the line that called the layer (not
    to the module's own call of fixed_point), so two layers of one model warn separately."""
    import warnings

    torch.manual_seed(0)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Linear(4, 4)

        def forward(self, h, x):
            return torch.tanh(self.W(h) + x)

    first = lrt.DEQ(Cell(), forward_maxiter=2, forward_tol=1e-12)
    second = lrt.DEQ(Cell(), forward_maxiter=2, forward_tol=1e-12)
    x = torch.randn(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first(torch.zeros(4), x); line_first = sys._getframe().f_lineno  # noqa: E702
        second(torch.zeros(4), x); line_second = sys._getframe().f_lineno  # noqa: E702
    mine = [w for w in caught if issubclass(w.category, lr.ConvergenceWarning)]
    assert [(w.filename, w.lineno) for w in mine] == [(__file__, line_first), (__file__, line_second)]


# -- one evaluation of f serves the output and the adjoint ---------------------------------------
class _Counted:
    """``model.f`` counting its evaluations with a graph (grad mode on)."""

    def __init__(self, model):
        self.model, self.graphs = model, 0

    def __call__(self, h):
        if torch.is_grad_enabled():
            self.graphs += 1
        return self.model.f(h)


@pytest.mark.parametrize("method", ["gmres", "neumann", "fixed_point"])
@pytest.mark.parametrize("batch", [None, 3])
def test_exact_backward_uses_the_forward_record_and_matches_dense(method, batch):
    model = TanhRNN(batch=batch)
    h = _fixed_point(model)
    g = torch.randn(model.hshape, dtype=F64, generator=torch.Generator().manual_seed(3))
    f = _Counted(model)
    out, info = lrt.fixed_point(f, h, backward={"method": method, **ACCURATE[method]},
                                batch_dims=0 if batch is None else 1, return_info=True)
    out.backward(g)
    # The recorded evaluation of the forward pass is the only one with a graph: the backward
    # pass ran its products on it and records nothing more.
    assert f.graphs == 1
    assert info.backward.converged if batch is None else bool(np.all(info.backward.converged))
    if batch is None:
        for p, e in zip(model.params, _exact_grads(model, h, g)):
            assert _rel(p.grad, e) < 1e-9
        return
    # Samples are independent: the batched gradient is the sum of the per-sample ones, each
    # checked against the dense formula.
    exact = [torch.zeros_like(p) for p in model.params]
    for i in range(batch):
        single = TanhRNN()
        single.x, single.params = model.x[i], model.params
        for t, e in zip(exact, _exact_grads(single, h[i], g[i])):
            t += e
    for p, e in zip(model.params, exact):
        assert _rel(p.grad, e) < 1e-9


def test_output_without_parameters_needs_no_gradient():
    # f closes over nothing that requires grad: the output requires none either (the record's
    # input requiring grad is internal).
    W = 0.5 * torch.eye(3, dtype=F64)
    out = lrt.fixed_point(lambda h: torch.tanh(h @ W.T + 1.0), torch.zeros(3, dtype=F64))
    assert not out.requires_grad and out.grad_fn is None


def test_layer_graph_is_freed_after_backward():
    # The adjoint node holds the record as a saved tensor, not through a tensor hook on it
    # (a reference cycle autograd's graph would keep alive).
    import gc
    import weakref

    model = TanhRNN(n=16, batch=4)
    h = _fixed_point(model)
    refs = []
    for _ in range(3):
        out = lrt.fixed_point(model.f, h, batch_dims=1)
        loss = (out ** 2).sum()
        refs.append(weakref.ref(out))
        loss.backward()
        del out, loss
    gc.collect()
    assert all(r() is None for r in refs)
    for keep in (True, False):
        out = lrt.fixed_point(model.f, h, batch_dims=1)
        ref = weakref.ref(out)
        if keep:  # no backward at all
            del out
        else:
            (out.sum() * 2).backward()
            del out
        gc.collect()
        assert ref() is None


def test_forward_maxiter_zero_takes_h0_as_the_fixed_point():
    model = TanhRNN(batch=3)
    h = _fixed_point(model)
    g = torch.ones(model.hshape, dtype=F64)
    f = _Counted(model)
    out, info = lrt.fixed_point(f, h, forward_maxiter=0, forward_tol=1e-10, batch_dims=1, return_info=True)
    fwd = info.forward
    assert fwd.iterations == 0 and fwd.status is lr.Status.CONVERGED and f.graphs == 1
    # Its residual is measured on the recorded evaluation: ||f(h0) - h0|| per sample.
    with torch.no_grad():
        r = torch.linalg.vector_norm(model.f(h) - h, dim=1).numpy()
    np.testing.assert_allclose(fwd.residual_norm, r, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(out.detach(), model.f(h).detach())
    out.backward(g)
    grads = [p.grad.clone() for p in model.params]
    for p in model.params:
        p.grad = None
    lrt.fixed_point(model.f, h, forward_tol=1e-12, forward_maxiter=100, batch_dims=1).backward(g)
    for a, p in zip(grads, model.params):
        assert _rel(a, p.grad) < 1e-10
    # A state that is not a fixed point fails its tolerance, and says so.
    with pytest.warns(lr.ConvergenceWarning, match="3 max_iterations of 3 samples after 0 iterations"):
        _, info = lrt.fixed_point(model.f, torch.zeros(model.hshape, dtype=F64), forward_maxiter=0,
                                  forward_tol=1e-10, batch_dims=1, return_info=True)
    assert info.forward.status is lr.Status.MAX_ITERATIONS
    # Without a tolerance: COMPLETED, the residual reported; without grad mode f runs once.
    with torch.no_grad():
        out, info = lrt.fixed_point(model.f, h, forward_maxiter=0, forward_tol=None, return_info=True,
                                    batch_dims=1)
    assert info.forward.status is lr.Status.COMPLETED and info.forward.info["f_evals"] == 1
    assert out is not None and not out.requires_grad
    # A non-finite residual is reported as such.
    bad = h.clone()
    bad[1, 0] = float("nan")
    _, info = lrt.fixed_point(model.f, bad, forward_maxiter=0, forward_tol=None, batch_dims=1,
                              return_info=True, on_failure="ignore")
    assert info.forward.statuses[1] is lr.Status.NONFINITE
    assert info.forward.statuses[0] is lr.Status.COMPLETED
