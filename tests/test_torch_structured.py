"""Structured states (tuples, lists, dicts of tensors, nested) in the torch adapter.

What a multiscale DEQ relies on: ``fixed_point``, its backward, ``implicit_grad``, ``unroll`` and
``JacobianOperator`` take the state as it is; ``f`` sees it and returns it as it is; the
output has it; and the gradients are those of the flattened single-tensor problem, which are
checked against the dense implicit gradient ``(df/dw)^T (I - J^T)^{-1} g``.
"""

import collections

import pytest

torch = pytest.importorskip("torch")

from linsolve_rbp.adapters import torch as lrt  # noqa: E402

F64 = torch.float64
TOL = dict(forward_tol=1e-13, forward_maxiter=400)
EXACT = {"method": "gmres", "rtol": 1e-13}


class TwoScale:
    """Two coupled states, ``a`` of shape ``(3,)`` and ``b`` of shape ``(2, 2)`` (or with a
    leading batch axis): ``a <- tanh(W1 a + U1 vec(b) + x)``, ``b <- tanh(W2 vec(b) + U2 a)``,
    the block matrix ``[[W1, U1], [U2, W2]]`` of spectral norm 0.6 (contracting)."""

    def __init__(self, batch=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(7, 7, generator=g, dtype=F64)
        M = 0.6 * M / torch.linalg.matrix_norm(M, 2)
        self.W1, self.U1 = M[:3, :3].clone(), M[:3, 3:].clone()
        self.U2, self.W2 = M[3:, :3].clone(), M[3:, 3:].clone()
        self.x = torch.randn((3,) if batch is None else (batch, 3), generator=g, dtype=F64)
        self.params = [p.requires_grad_() for p in (self.W1, self.U1, self.U2, self.W2)]
        self.batch = batch
        lead = () if batch is None else (batch,)
        self.shapes = (lead + (3,), lead + (2, 2))

    def step(self, a, b):
        vb = b.reshape(*b.shape[:-2], 4)
        a_new = torch.tanh(a @ self.W1.T + vb @ self.U1.T + self.x)
        b_new = torch.tanh(vb @ self.W2.T + a @ self.U2.T).reshape(b.shape)
        return a_new, b_new

    # the same map on each layout
    def f_tuple(self, s):
        return self.step(*s)

    def f_dict(self, s):
        a, b = self.step(s["a"], s["b"])
        return {"a": a, "b": b}

    def f_list(self, s):
        return list(self.step(*s))

    def f_nested(self, s):
        a, b = self.step(s[0]["a"], s[1][0])
        return ({"a": a}, [b])

    def f_flat(self, v):
        lead = v.shape[:-1]
        a, b = v[..., :3], v[..., 3:].reshape(*lead, 2, 2)
        a, b = self.step(a, b)
        return torch.cat([a, b.reshape(*lead, 4)], dim=-1)

    def zeros(self, layout):
        a, b = (torch.zeros(s, dtype=F64) for s in self.shapes)
        return {
            "tuple": (a, b), "dict": {"a": a, "b": b}, "list": [a, b], "nested": ({"a": a}, [b]),
        }[layout]

    def f(self, layout):
        return {"tuple": self.f_tuple, "dict": self.f_dict, "list": self.f_list, "nested": self.f_nested}[layout]


def _parts(state, layout):
    if layout == "dict":
        return state["a"], state["b"]
    if layout == "nested":
        return state[0]["a"], state[1][0]
    return tuple(state)


def _loss_of_parts(a, b):
    # A loss that uses both parts, nonlinearly.
    return (a ** 2).sum() + (b.sin() * torch.arange(1.0, b.numel() + 1, dtype=F64).reshape(b.shape)).sum()


def _grads(loss, params):
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def _flat_fixed_point(model):
    v = torch.zeros(7, dtype=F64)
    with torch.no_grad():
        for _ in range(400):
            v = model.f_flat(v)
    return v


def _dense_exact(model):
    """The dense implicit gradient of ``_loss_of_parts`` at the fixed point, from the flat map."""
    v = _flat_fixed_point(model)
    J = torch.autograd.functional.jacobian(model.f_flat, v)
    vg = v.clone().requires_grad_()
    (g,) = torch.autograd.grad(_loss_of_parts(vg[:3], vg[3:].reshape(2, 2)), vg)
    z = torch.linalg.solve(torch.eye(7, dtype=F64) - J.T, g)
    return _grads((model.f_flat(v) * z).sum(), model.params)


def _close(a, b, tol=1e-10):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=tol, atol=tol), float((x - y).abs().max())


@pytest.mark.parametrize("layout", ["tuple", "dict", "list", "nested"])
def test_fixed_point_structured_gradient_equals_dense_and_flat(layout):
    model = TwoScale()
    out = lrt.fixed_point(model.f(layout), model.zeros(layout), backward=EXACT, **TOL)
    # The output has the state's structure, with its shapes.
    assert type(out) is type(model.zeros(layout))
    a, b = _parts(out, layout)
    assert a.shape == (3,) and b.shape == (2, 2)
    g_struct = _grads(_loss_of_parts(a, b), model.params)
    v = lrt.fixed_point(model.f_flat, torch.zeros(7, dtype=F64), backward=EXACT, **TOL)
    g_flat = _grads(_loss_of_parts(v[:3], v[3:].reshape(2, 2)), model.params)
    _close(g_struct, g_flat, 1e-12)
    _close(g_struct, _dense_exact(model))


def test_only_one_part_of_the_output_used():
    """A loss on one part: the other part's gradient is zero, the adjoint still couples them."""
    model = TwoScale()
    a, b = lrt.fixed_point(model.f_tuple, model.zeros("tuple"), backward=EXACT, **TOL)
    g_struct = _grads(b.sum(), model.params)
    v = lrt.fixed_point(model.f_flat, torch.zeros(7, dtype=F64), backward=EXACT, **TOL)
    g_flat = _grads(v[3:].sum(), model.params)
    _close(g_struct, g_flat, 1e-12)
    assert torch.linalg.vector_norm(g_struct[0]) > 0  # W1 acts on a only: reached through the coupling


def test_structured_info_h0_gradient_and_no_grad():
    model = TwoScale()
    a0 = torch.zeros(3, dtype=F64, requires_grad=True)
    b0 = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    out, info = lrt.fixed_point(model.f_dict, {"a": a0, "b": b0}, backward=EXACT, return_info=True, **TOL)
    assert set(info.forward.x) == {"a", "b"} and info.forward.x["b"].shape == (2, 2)
    assert info.forward.converged
    assert torch.allclose(info.forward.x["a"], out["a"], atol=1e-12)
    grads = torch.autograd.grad(_loss_of_parts(out["a"], out["b"]), [a0, b0] + model.params)
    # The fixed point does not depend on where the iteration started.
    assert torch.equal(grads[0], torch.zeros(3, dtype=F64)) and torch.equal(grads[1], torch.zeros(2, 2, dtype=F64))
    assert info.backward.converged and info.backward.x.shape == (7,)
    with torch.no_grad():
        out = lrt.fixed_point(model.f_dict, model.zeros("dict"), **TOL)
    assert set(out) == {"a", "b"} and not out["a"].requires_grad


def test_namedtuple_state_keeps_its_type():
    State = collections.namedtuple("State", "a b")
    model = TwoScale()
    f = lambda s: State(*model.step(s.a, s.b))  # noqa: E731
    out = lrt.fixed_point(f, State(*model.zeros("tuple")), backward=EXACT, **TOL)
    assert isinstance(out, State) and out.b.shape == (2, 2)
    _close(_grads(_loss_of_parts(out.a, out.b), model.params), _dense_exact(model))


@pytest.mark.parametrize("method", ["neumann", "bicgstab"])
def test_structured_batched_equals_flat_batched(method):
    model = TwoScale(batch=4)
    backward = {"method": method, "rtol": 1e-12, "maxiter": 400}
    (a, b), info = lrt.fixed_point(model.f_tuple, model.zeros("tuple"), batch_dims=1, backward=backward,
                                   return_info=True, **TOL)
    assert a.shape == (4, 3) and b.shape == (4, 2, 2)
    g_struct = _grads(_loss_of_parts(a, b), model.params)
    v = lrt.fixed_point(model.f_flat, torch.zeros(4, 7, dtype=F64), batch_dims=1, backward=backward, **TOL)
    g_flat = _grads(_loss_of_parts(v[:, :3], v[:, 3:].reshape(4, 2, 2)), model.params)
    _close(g_struct, g_flat, 1e-11)
    assert info.backward.x.shape == (4, 7) and len(info.backward.statuses) == 4


def test_structured_forward_methods():
    """Every forward method iterates on the flat state; the fixed point is the same."""
    from linsolve_rbp.adapters.torch.forward import FORWARD_METHODS

    model = TwoScale()
    ref = _flat_fixed_point(model)
    for method in FORWARD_METHODS:
        (a, b), info = lrt.fixed_point(model.f_tuple, model.zeros("tuple"), forward=method, return_info=True,
                                       forward_tol=1e-12, forward_maxiter=200)
        assert info.forward.converged, (method, info.forward.message)
        assert torch.allclose(torch.cat([a, b.reshape(4)]), ref, atol=1e-10), method


def test_implicit_grad_structured_equals_dense_and_flat():
    model = TwoScale()
    v = _flat_fixed_point(model)
    h = (v[:3].clone(), v[3:].reshape(2, 2).clone())
    vg = [t.clone().requires_grad_() for t in h]
    g = torch.autograd.grad(_loss_of_parts(*vg), vg)
    grads, res = lrt.implicit_grad(model.f_tuple, h, g, model.params, rtol=1e-13)
    _close(grads, _dense_exact(model))
    flat_grads, flat_res = lrt.implicit_grad(model.f_flat, v, torch.cat([g[0], g[1].reshape(4)]), model.params,
                                             rtol=1e-13)
    _close(grads, flat_grads, 1e-12)
    assert res.x.shape == (7,) and torch.allclose(res.x, flat_res.x, atol=1e-12)
    # A structured warm start is accepted and used.
    x0 = (res.x[:3], res.x[3:].reshape(2, 2))
    _, warm = lrt.implicit_grad(model.f_tuple, h, g, model.params, method="neumann", rtol=1e-10, x0=x0)
    _, cold = lrt.implicit_grad(model.f_tuple, h, g, model.params, method="neumann", rtol=1e-10)
    assert warm.iterations < cold.iterations


def test_jacobian_operator_structured_is_the_flat_jacobian():
    model = TwoScale()
    v = _flat_fixed_point(model)
    state = {"a": v[:3].clone(), "b": v[3:].reshape(2, 2).clone()}
    J = lrt.JacobianOperator(model.f_dict, state)
    dense = torch.autograd.functional.jacobian(model.f_flat, v)
    eye = torch.eye(7, dtype=F64)
    assert J.shape == (7, 7)
    assert torch.allclose(torch.stack([J @ e for e in eye], dim=1), dense, atol=1e-12)
    assert torch.allclose(torch.stack([J.T @ e for e in eye], dim=1), dense.T, atol=1e-12)
    # pack / unpack convert between the state and the vector the operator acts on.
    u = J.unpack(torch.arange(7.0, dtype=F64))
    assert set(u) == {"a", "b"} and u["b"].shape == (2, 2)
    assert torch.equal(J.pack(u), torch.arange(7.0, dtype=F64))
    # vjp_params takes z flat or structured.
    z = torch.linspace(-1, 1, 7, dtype=F64)
    _close(J.vjp_params(z, model.params), J.vjp_params(J.unpack(z), model.params), 0)
    _close(J.vjp_params(z, model.params), _grads((model.f_flat(v) * z).sum(), model.params), 1e-12)
    with pytest.raises(ValueError, match=r"z must have 7 entries"):
        J.vjp_params(z[:6], model.params)


def test_unroll_structured_equals_flat():
    model = TwoScale()
    for truncate in (None, 3):
        a, b = lrt.unroll(model.f_tuple, model.zeros("tuple"), steps=6, truncate=truncate)
        g_struct = _grads(_loss_of_parts(a, b), model.params)
        v = lrt.unroll(model.f_flat, torch.zeros(7, dtype=F64), steps=6, truncate=truncate)
        g_flat = _grads(_loss_of_parts(v[:3], v[3:].reshape(2, 2)), model.params)
        _close(g_struct, g_flat, 1e-13)
    out = lrt.unroll(model.f_dict, model.zeros("dict"), steps=0)
    assert set(out) == {"a", "b"}


def test_structured_bad_input_names_the_part():
    model = TwoScale()
    a, b = model.zeros("tuple")
    with pytest.raises(TypeError, match=r"h0\[1\].*dtype and device of h0\[0\]"):
        lrt.fixed_point(model.f_tuple, (a, b.float()))
    with pytest.raises(TypeError, match=r"h0\['b'\]\[0\] must be a torch.Tensor"):
        lrt.fixed_point(model.f_dict, {"a": a, "b": [1.0]})
    with pytest.raises(TypeError, match=r"h0\[1\] must have a real floating dtype"):
        lrt.fixed_point(model.f_tuple, (a, b.long()))
    with pytest.raises(ValueError, match="holds no tensor"):
        lrt.fixed_point(model.f_tuple, ())
    with pytest.raises(ValueError, match=r"same structure: h0 is \{'a': tensor, 'b': tensor\}, f\(h\) is \{'a': tensor\}"):
        lrt.fixed_point(lambda s: {"a": s["a"]}, {"a": a, "b": b})
    with pytest.raises(ValueError, match=r"f\(h\)\[1\] has shape \(4,\) but h0\[1\] has shape \(2, 2\)"):
        lrt.fixed_point(lambda s: (s[0], s[1].reshape(4)), (a, b))
    with pytest.raises(TypeError, match="f must return a state of the structure of h0"):
        lrt.fixed_point(lambda s: s[0], (a, b))
    with pytest.raises(ValueError, match=r"h0\[1\] has 3 samples, h0\[0\] has 2"):
        lrt.fixed_point(model.f_tuple, (torch.zeros(2, 3, dtype=F64), torch.zeros(3, 2, 2, dtype=F64)), batch_dims=1)
    with pytest.raises(ValueError, match=r"grad_h must have the structure of h_star"):
        lrt.implicit_grad(model.f_tuple, (a, b), (a,), model.params)
    with pytest.raises(ValueError, match=r"grad_h\[1\] must have shape \(2, 2\)"):
        lrt.implicit_grad(model.f_tuple, (a, b), (a, a), model.params)
    with pytest.raises(TypeError, match=r"h\[1\] must be a torch.Tensor"):
        lrt.JacobianOperator(model.f_tuple, (a, b.numpy()))
    with pytest.raises(ValueError, match=r"state must have the structure of h"):
        lrt.JacobianOperator(model.f_tuple, (a, b)).pack((a,))
    with pytest.raises(TypeError, match=r"h0\[1\] must be a torch.Tensor"):
        lrt.unroll(model.f_tuple, (a, "b"), steps=2)


def test_dict_keys_in_another_order_are_the_same_state():
    """A dict is a mapping: ``f`` may build its output with the keys in another order (and so
    may ``grad_h``); each tensor is matched by its key, not by its position."""
    model = TwoScale()

    def f_swapped(s):
        a, b = model.step(s["a"], s["b"])
        return {"b": b, "a": a}

    out, info = lrt.fixed_point(f_swapped, model.zeros("dict"), backward=EXACT, return_info=True, **TOL)
    assert list(out) == ["a", "b"] and out["b"].shape == (2, 2)
    assert info.forward.converged
    _close(_grads(_loss_of_parts(out["a"], out["b"]), model.params), _dense_exact(model))
    v = _flat_fixed_point(model)
    h = {"a": v[:3].clone(), "b": v[3:].reshape(2, 2).clone()}
    vg = [t.clone().requires_grad_() for t in (h["a"], h["b"])]
    ga, gb = torch.autograd.grad(_loss_of_parts(*vg), vg)
    grads, _ = lrt.implicit_grad(f_swapped, h, {"b": gb, "a": ga}, model.params, rtol=1e-13)
    _close(grads, _dense_exact(model))
    a, b = lrt.unroll(f_swapped, model.zeros("dict"), steps=3).values()
    assert a.shape == (3,) and b.shape == (2, 2)


def test_dict_subclass_states_keep_their_type():
    model = TwoScale()
    a0, b0 = model.zeros("tuple")
    for state in (collections.OrderedDict(a=a0, b=b0), collections.defaultdict(list, a=a0, b=b0)):
        out = lrt.fixed_point(model.f_dict, state, backward=EXACT, **TOL)
        assert type(out) is type(state) and list(out) == ["a", "b"]
        if isinstance(state, collections.defaultdict):
            assert out.default_factory is list
        _close(_grads(_loss_of_parts(out["a"], out["b"]), model.params), _dense_exact(model))
