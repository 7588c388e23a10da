"""torch.func over the fixed-point layer: ``vmap`` with fixed budgets, ``grad`` through it,
per-sample gradients with ``vmap(grad(...))``; and, where a transform cannot work, an error
that names the option that does.

What users rely on: per-sample gradients from ``torch.func.vmap(torch.func.grad(loss))`` equal
a loop over the samples with the ordinary ``loss.backward()`` path and the same budgets.
"""

import pytest

torch = pytest.importorskip("torch")
func = pytest.importorskip("torch.func")

import linsolve_rbp as lr  # noqa: E402
from linsolve_rbp.adapters import torch as lrt  # noqa: E402

F64 = torch.float64
N, D, B = 5, 3, 4
FIXED = dict(forward_tol=None, forward_maxiter=60)
BACKWARDS = [
    {"method": "neumann", "rtol": None, "atol": None, "maxiter": 25},
    {"method": "fixed_point", "rtol": None, "atol": None, "maxiter": 25},
    {"method": "phantom", "steps": 6, "damping": 0.5},
    {"method": "jfb"},
]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=g, dtype=F64)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(N, D, generator=g, dtype=F64) / D ** 0.5
    xs = torch.randn(B, D, generator=g, dtype=F64)
    ys = torch.randn(B, N, generator=g, dtype=F64)
    return {"W": W, "U": U}, xs, ys


def _cell(params, x):
    return lambda h: torch.tanh(h @ params["W"].T + x @ params["U"].T)


def _loss(params, x, y, backward):
    h = lrt.fixed_point(_cell(params, x), torch.zeros(N, dtype=F64), backward=backward, **FIXED)
    return ((h - y) ** 2).sum()


def _loop_grads(params, xs, ys, backward):
    """Per-sample gradients the ordinary way: one fixed_point and loss.backward() per sample."""
    out = {k: [] for k in params}
    for x, y in zip(xs, ys):
        ps = {k: v.clone().requires_grad_() for k, v in params.items()}
        _loss(ps, x, y, backward).backward()
        for k in ps:
            out[k].append(ps[k].grad)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda b: b["method"])
def test_vmap_grad_per_sample_gradients_equal_a_loop(backward):
    params, xs, ys = _data()
    per_sample = func.vmap(func.grad(_loss), in_dims=(None, 0, 0, None))(params, xs, ys, backward)
    loop = _loop_grads(params, xs, ys, backward)
    for k in params:
        assert per_sample[k].shape == (B,) + params[k].shape
        assert torch.allclose(per_sample[k], loop[k], rtol=1e-12, atol=1e-14), k


@pytest.mark.parametrize("backward", BACKWARDS[:1] + BACKWARDS[2:3], ids=lambda b: b["method"])
def test_grad_equals_backward(backward):
    params, xs, ys = _data()
    g = func.grad(_loss)(params, xs[0], ys[0], backward)
    loop = _loop_grads(params, xs[:1], ys[:1], backward)
    for k in params:
        assert torch.allclose(g[k], loop[k][0], rtol=1e-12, atol=1e-14)


def test_neumann_budget_under_grad_is_the_implicit_gradient():
    """With budgets large enough, the per-sample gradient is the exact implicit one."""
    params, xs, ys = _data()
    backward = {"method": "neumann", "rtol": None, "atol": None, "maxiter": 150}
    old = FIXED["forward_maxiter"]
    FIXED["forward_maxiter"] = 200
    try:
        g = func.grad(_loss)(params, xs[0], ys[0], backward)
        exact = _loop_grads(params, xs[:1], ys[:1], {"method": "gmres", "rtol": 1e-13})
    finally:
        FIXED["forward_maxiter"] = old
    for k in params:
        assert torch.allclose(g[k], exact[k][0], rtol=1e-10, atol=1e-13)


def test_vmap_forward_equals_per_sample_and_batch_dims():
    params, xs, _ = _data()
    hs = func.vmap(lambda x: lrt.fixed_point(_cell(params, x), torch.zeros(N, dtype=F64), **FIXED))(xs)
    for i, x in enumerate(xs):
        h = lrt.fixed_point(_cell(params, x), torch.zeros(N, dtype=F64), **FIXED)
        assert torch.allclose(hs[i], h, rtol=0, atol=1e-15)
    batched = lrt.fixed_point(_cell(params, xs), torch.zeros(B, N, dtype=F64), batch_dims=1, **FIXED)
    assert torch.allclose(hs, batched, atol=1e-14)


def test_autograd_through_vmap_equals_summed_loop():
    """vmap over the layer inside an ordinary autograd graph: loss.backward() outside."""
    params, xs, ys = _data()
    backward = BACKWARDS[0]
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    hs = func.vmap(lambda x: lrt.fixed_point(_cell(ps, x), torch.zeros(N, dtype=F64), backward=backward,
                                             **FIXED))(xs)
    ((hs - ys) ** 2).sum().backward()
    loop = _loop_grads(params, xs, ys, backward)
    for k in params:
        assert torch.allclose(ps[k].grad, loop[k].sum(0), rtol=1e-12, atol=1e-14)


def test_structured_state_under_vmap_grad():
    params, xs, ys = _data()

    def loss(params, x, y):
        f = lambda s: {"h": _cell(params, x)(s["h"]), "m": 0.5 * s["m"] + s["h"].sum()}  # noqa: E731
        out = lrt.fixed_point(f, {"h": torch.zeros(N, dtype=F64), "m": torch.zeros(1, dtype=F64)},
                              backward=BACKWARDS[0], **FIXED)
        return ((out["h"] - y) ** 2).sum() + out["m"].sum()

    per_sample = func.vmap(func.grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(B):
        ps = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss(ps, xs[i], ys[i]).backward()
        for k in params:
            assert torch.allclose(per_sample[k][i], ps[k].grad, rtol=1e-12, atol=1e-14)


def test_info_under_a_transform_says_nothing_was_measured():
    params, xs, _ = _data()
    infos = []

    def run(x):
        h, info = lrt.fixed_point(_cell(params, x), torch.zeros(N, dtype=F64), return_info=True, **FIXED)
        infos.append(info)
        return h

    func.vmap(run)(xs)
    fwd = infos[0].forward
    assert fwd.status is lr.Status.COMPLETED and fwd.iterations == FIXED["forward_maxiter"]
    assert "not measured" in fwd.message and infos[0].backward is None


def test_transforms_fail_with_the_option_that_works():
    params, xs, ys = _data()
    h0 = torch.zeros(N, dtype=F64)

    def loss_with(**kw):
        def loss(params, x):
            return lrt.fixed_point(_cell(params, x), h0, **kw).sum()
        return loss

    with pytest.raises(ValueError, match="forward_tol=None"):
        func.vmap(lambda x: lrt.fixed_point(_cell(params, x), h0))(xs)
    with pytest.raises(ValueError, match="forward='iterate'"):
        func.vmap(lambda x: lrt.fixed_point(_cell(params, x), h0, forward="anderson", **FIXED))(xs)
    with pytest.raises(ValueError, match=r"'method': 'neumann', 'rtol': None, 'atol': None, 'maxiter': K"):
        func.grad(loss_with(**FIXED))(params, xs[0])  # the default backward, gmres, reads the host
    with pytest.raises(ValueError, match=r"'method': 'phantom'.*got backward method 'neumann' with 'callback'"):
        func.grad(loss_with(backward={"method": "neumann", "rtol": None, "atol": None, "maxiter": 5,
                                      "callback": lambda *a: None}, **FIXED))(params, xs[0])
    with pytest.raises(ValueError, match="warm_start=None"):
        func.vmap(lambda x: lrt.fixed_point(_cell(params, x), h0, warm_start=lrt.WarmStart(), **FIXED))(xs)
    params["W"].requires_grad_()
    with pytest.raises(RuntimeError, match="batch_dims=1"):
        func.vmap(lambda x: lrt.implicit_grad(_cell(params, x), h0, h0, [params["W"]],
                                              method="neumann", rtol=None, atol=None, maxiter=5)[0][0])(xs)
    params["W"].requires_grad_(False)
    with pytest.raises(RuntimeError, match="torch.func.vjp"):
        func.vmap(lambda x: lrt.JacobianOperator(_cell(params, x), h0) @ h0)(xs)
    # Inference under vmap needs no backward: the default backward is not judged then.
    assert func.vmap(lambda x: lrt.fixed_point(_cell(params, x), h0, **FIXED))(xs).shape == (B, N)


def test_jacfwd_and_jacrev_are_the_implicit_jacobian():
    """Forward mode through the layer (torch.func.jacfwd) gives the same Jacobian dh*/dW as
    reverse mode, and both are the implicit one, (I - J)^{-1} df/dW, at large budgets."""
    params, xs, _ = _data()
    x = xs[0]
    backward = {"method": "neumann", "rtol": None, "atol": None, "maxiter": 150}

    def h_of(W):
        return lrt.fixed_point(_cell({"W": W, "U": params["U"]}, x), torch.zeros(N, dtype=F64),
                               backward=backward, forward_tol=None, forward_maxiter=200)

    rev = func.jacrev(h_of)(params["W"])
    fwd = func.jacfwd(h_of)(params["W"])
    h = h_of(params["W"])
    f = _cell(params, x)
    J = torch.autograd.functional.jacobian(f, h)
    dfdW = torch.autograd.functional.jacobian(lambda W: _cell({"W": W, "U": params["U"]}, x)(h), params["W"])
    exact = torch.linalg.solve(torch.eye(N, dtype=F64) - J, dfdW.reshape(N, N * N)).reshape(N, N, N)
    assert torch.allclose(rev, exact, atol=1e-12) and torch.allclose(fwd, exact, atol=1e-12)


def test_core_forward_ad_is_refused_with_the_route_that_works():
    import torch.autograd.forward_ad as fwAD

    params, xs, _ = _data()
    with fwAD.dual_level():
        W = fwAD.make_dual(params["W"], torch.ones_like(params["W"]))
        with pytest.raises(RuntimeError, match="torch.func.jvp or torch.func.jacfwd with forward_tol=None"):
            lrt.fixed_point(_cell({"W": W, "U": params["U"]}, xs[0]), torch.zeros(N, dtype=F64))


def test_second_order_transforms_are_refused():
    """A transform that differentiates inside another (hessian, jvp of grad, grad of grad)
    would miss the terms through h*, which is found without a graph: refused."""
    params, xs, ys = _data()
    backward = BACKWARDS[0]
    W = params["W"]

    def loss(W):
        return _loss({"W": W, "U": params["U"]}, xs[0], ys[0], backward)

    for second in (lambda: func.hessian(loss)(W),
                   lambda: func.jvp(func.grad(loss), (W,), (torch.ones_like(W),)),
                   lambda: func.grad(lambda W: func.grad(loss)(W).sum())(W)):
        with pytest.raises(RuntimeError, match=r"second derivative.*lrt\.unroll"):
            second()
    # One level of differentiation, vmapped, still works.
    assert func.vmap(func.grad(loss), in_dims=0)(torch.stack([W, W])).shape == (2, N, N)
