"""Approximate backward methods of the fixed-point layer: phantom gradients and Jacobian-free
backprop, reported like the exact methods.

What users rely on: ``backward={"method": "phantom", "steps": k, "damping": lam}`` is the
gradient of back-propagating through ``k`` damped steps ``h <- (1 - lam) h + lam f(h)``
unrolled from the fixed point (Geng et al., NeurIPS 2021), and approaches the exact implicit
gradient as ``k`` grows; ``{"method": "jfb"}`` is the gradient through one application of
``f`` at the (detached) fixed point (Fung et al., AAAI 2022); both say what they did in
``info.backward``.
"""

import numpy as np

import pytest

torch = pytest.importorskip("torch")

import linsolve_rbp as lr  # noqa: E402
from linsolve_rbp.adapters import torch as lrt  # noqa: E402

F64 = torch.float64


class Cell:
    """``h <- tanh(W h + U x + c)``, ``||W||_2 = rho``."""

    def __init__(self, n=6, batch=None, rho=0.7, seed=0):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=F64)
        self.W = (rho * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
        self.U = (torch.randn(n, 3, generator=g, dtype=F64) / 3 ** 0.5).requires_grad_()
        self.c = (0.1 * torch.randn(n, generator=g, dtype=F64)).requires_grad_()
        self.x = torch.randn((3,) if batch is None else (batch, 3), generator=g, dtype=F64)
        self.params = [self.W, self.U, self.c]
        self.hshape = (n,) if batch is None else (batch, n)

    def f(self, h):
        return torch.tanh(h @ self.W.T + self.x @ self.U.T + self.c)

    def h0(self):
        return torch.zeros(self.hshape, dtype=F64)


def _loss(h):
    return (h ** 2).sum() + h.sum()


def _layer_grads(model, backward, **kw):
    out, info = lrt.fixed_point(model.f, model.h0(), forward_tol=1e-14, forward_maxiter=500, backward=backward,
                                return_info=True, **kw)
    return [g.detach() for g in torch.autograd.grad(_loss(out), model.params)], info


def _rel(a, b):
    return max(float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y)) for x, y in zip(a, b))


def _h_star(model):
    h = model.h0()
    with torch.no_grad():
        for _ in range(500):
            h = model.f(h)
    return h


@pytest.mark.parametrize("steps,damping", [(1, 1.0), (4, 1.0), (5, 0.5), (12, 0.3)])
def test_phantom_is_backprop_through_damped_steps_from_the_fixed_point(steps, damping):
    model = Cell()
    grads, info = _layer_grads(model, {"method": "phantom", "steps": steps, "damping": damping})
    # The definition: k damped steps unrolled from h* (detached), back-propagated.
    h = _h_star(model).detach()
    for _ in range(steps):
        h = (1 - damping) * h + damping * model.f(h)
    ref = torch.autograd.grad(_loss(h), model.params)
    assert _rel(grads, ref) < 1e-12
    res = info.backward
    assert res.method == "phantom" and res.status is lr.Status.COMPLETED and res.success and not res.converged
    assert res.iterations == steps and res.matvecs == steps - 1
    assert res.residual_history.shape == (steps + 1,)
    assert res.info["steps"] == steps and res.info["damping"] == damping
    assert "phantom" in res.message and "Geng" in res.message


def test_phantom_approaches_the_exact_gradient():
    model = Cell(rho=0.8)
    exact, _ = _layer_grads(model, {"method": "gmres", "rtol": 1e-13})
    errors = []
    for steps in (1, 5, 20, 60):
        grads, info = _layer_grads(model, {"method": "phantom", "steps": steps, "damping": 1.0})
        errors.append(_rel(grads, exact))
    assert all(b < a / 10 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-10, errors
    # With damping, more steps are needed for the same accuracy, and it gets there too.
    grads, _ = _layer_grads(model, {"method": "phantom", "steps": 200, "damping": 0.5})
    assert _rel(grads, exact) < 1e-10


def test_phantom_with_damping_one_is_the_fixed_budget_rbp():
    """k undamped steps from zero are k iterations of RBP's fixed-point iteration."""
    model = Cell()
    for k in (1, 3, 10):
        ph, ph_info = _layer_grads(model, {"method": "phantom", "steps": k})
        fp, fp_info = _layer_grads(model, {"method": "fixed_point", "rtol": None, "atol": None, "maxiter": k})
        assert _rel(ph, fp) < 1e-13
        assert torch.allclose(ph_info.backward.x, fp_info.backward.x, rtol=1e-13, atol=1e-15)
        assert np.allclose(ph_info.backward.residual_history, fp_info.backward.residual_history, rtol=1e-12)
        assert ph_info.backward.matvecs == fp_info.backward.matvecs


def test_jfb_is_the_one_step_gradient():
    model = Cell()
    grads, info = _layer_grads(model, {"method": "jfb"})
    out = model.f(_h_star(model).detach())
    ref = torch.autograd.grad(_loss(out), model.params)
    assert _rel(grads, ref) < 1e-14
    res = info.backward
    assert res.method == "jfb" and res.status is lr.Status.COMPLETED and res.success
    assert res.matvecs == 0 and res.iterations == 1 and "Fung" in res.message
    exact, _ = _layer_grads(model, {"method": "gmres", "rtol": 1e-13})
    assert _rel(grads, exact) > 1e-2  # an approximation, not the implicit gradient


def test_approximate_methods_in_implicit_grad_match_the_layer():
    model = Cell()
    h = _h_star(model)
    hg = h.clone().requires_grad_()
    (g,) = torch.autograd.grad(_loss(hg), hg)
    for backward in ({"method": "phantom", "steps": 6, "damping": 0.7}, {"method": "jfb"}):
        opts = {k: v for k, v in backward.items() if k != "method"}
        grads, res = lrt.implicit_grad(model.f, h, g, model.params, method=backward["method"], **opts)
        layer, info = _layer_grads(model, backward)
        assert _rel(grads, layer) < 1e-12
        assert res.method == backward["method"] and res.iterations == info.backward.iterations


def test_phantom_batched_equals_per_sample():
    model = Cell(batch=3)
    backward = {"method": "phantom", "steps": 5, "damping": 0.6}
    out, info = lrt.fixed_point(model.f, model.h0(), batch_dims=1, forward_tol=1e-14, forward_maxiter=500,
                                backward=backward, return_info=True)
    batched = torch.autograd.grad(_loss(out), model.params)
    res = info.backward
    assert res.statuses == (lr.Status.COMPLETED,) * 3 and res.residual_norm.shape == (3,)
    assert res.residual_history.shape == (6, 3)
    total = [torch.zeros_like(p) for p in model.params]
    x_all = model.x
    for i in range(3):
        model.x = x_all[i]
        model.hshape = (6,)
        grads, one = _layer_grads(model, backward)
        total = [t + g for t, g in zip(total, grads)]
        assert np.isclose(one.backward.residual_norm, res.residual_norm[i], rtol=1e-10)
    assert _rel(batched, total) < 1e-12


def test_structured_state_with_phantom():
    model = Cell()
    f = lambda s: (model.f(s[0]),)  # noqa: E731
    (out,), info = lrt.fixed_point(f, (model.h0(),), forward_tol=1e-14, forward_maxiter=500,
                                   backward={"method": "phantom", "steps": 4}, return_info=True)
    grads = torch.autograd.grad(_loss(out), model.params)
    ref, _ = _layer_grads(model, {"method": "phantom", "steps": 4})
    assert _rel(grads, ref) < 1e-13 and info.backward.method == "phantom"


def test_warm_start_keeps_the_result_and_is_not_used():
    model = Cell()
    ws = lrt.WarmStart()
    for _ in range(2):
        out = lrt.fixed_point(model.f, model.h0(), backward={"method": "phantom", "steps": 3}, warm_start=ws)
        _loss(out).backward()
    assert ws.last_result.method == "phantom" and ws.x is None and (ws.hits, ws.misses) == (0, 0)


def test_nonfinite_adjoint_reported_and_raised():
    """At h* = 0, f(h) = c sqrt(|h|) has an infinite derivative: the phantom steps meet inf;
    the status says so, x is the last finite iterate, on_failure='raise' raises."""
    c = torch.tensor(0.5, dtype=F64, requires_grad=True)
    f = lambda h: c * torch.sqrt(torch.abs(h))  # noqa: E731
    h0 = torch.zeros(3, dtype=F64)
    out, info = lrt.fixed_point(f, h0, backward={"method": "phantom", "steps": 3}, return_info=True)
    with pytest.warns(lr.ConvergenceWarning, match="phantom.*non-finite"):
        out.sum().backward()
    res = info.backward
    assert res.status is lr.Status.NONFINITE and not res.success
    assert torch.isfinite(res.x).all() and torch.equal(res.x, torch.ones(3, dtype=F64))  # z_1 = g
    out = lrt.fixed_point(f, h0, backward={"method": "phantom", "steps": 3}, on_failure="raise")
    with pytest.raises(lr.SolveError, match="phantom"):
        out.sum().backward()


def test_approximate_backward_bad_options_name_the_argument():
    model = Cell()
    h0 = model.h0()
    with pytest.raises(TypeError, match=r"backward\['steps'\]"):
        lrt.fixed_point(model.f, h0, backward={"method": "phantom"})
    with pytest.raises(ValueError, match=r"backward\['steps'\] must be a positive integer"):
        lrt.fixed_point(model.f, h0, backward={"method": "phantom", "steps": 0})
    with pytest.raises(ValueError, match=r"backward\['damping'\] must be in \(0, 1\]"):
        lrt.fixed_point(model.f, h0, backward={"method": "phantom", "steps": 2, "damping": 1.5})
    with pytest.raises(ValueError, match=r"backward\['damping'\]"):
        lrt.fixed_point(model.f, h0, backward={"method": "phantom", "steps": 2, "damping": 0.0})
    with pytest.raises(TypeError, match="'jfb' got unknown option.*'rtol'"):
        lrt.fixed_point(model.f, h0, backward={"method": "jfb", "rtol": 1e-3})
    with pytest.raises(TypeError, match="'phantom' got unknown option.*'maxiter'.*steps, damping"):
        lrt.fixed_point(model.f, h0, backward={"method": "phantom", "steps": 2, "maxiter": 3})
    with pytest.raises(ValueError, match="'phantom' or 'jfb'"):
        lrt.fixed_point(model.f, h0, backward={"method": "phantm"})
    with pytest.raises(ValueError, match=r"implicit_grad\['damping'\]"):
        lrt.implicit_grad(model.f, h0, h0, model.params, method="phantom", steps=2, damping=-1)
    with pytest.raises(ValueError, match="x0 is not used by method 'jfb'"):
        lrt.implicit_grad(model.f, h0, h0, model.params, method="jfb", x0=h0)


@pytest.mark.parametrize("backward", [{"method": "phantom", "steps": 3}, {"method": "jfb"},
                                      {"method": "gmres", "rtol": 1e-10},
                                      {"method": "neumann", "rtol": None, "atol": None, "maxiter": 8}],
                         ids=lambda b: b["method"])
def test_double_backward_is_refused(backward):
    """create_graph=True would give a second derivative missing the terms through z and h*
    (z is computed without a graph): refused, naming what gives exact second derivatives."""
    model = Cell()
    out = lrt.fixed_point(model.f, model.h0(), backward=backward)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*lrt\.unroll"):
        torch.autograd.grad(_loss(out), model.params, create_graph=True)
    # retain_graph alone is fine: the same gradient twice.
    out = lrt.fixed_point(model.f, model.h0(), backward=backward)
    g1 = torch.autograd.grad(_loss(out), model.params, retain_graph=True)
    g2 = torch.autograd.grad(_loss(out), model.params)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
