"""The DEQ layer module, its regularisers and variational dropout: what a training loop relies
on (statistics it can log, train/eval budgets, its own warm start, regularisers equal in
expectation to the exact ||J||_F^2 and costing the products they say, one dropout mask per
solve)."""

import math

import pytest

torch = pytest.importorskip("torch")

from linsolve_rbp.adapters import torch as lrt  # noqa: E402

DT = torch.float64


class Cell(torch.nn.Module):
    """``f(h, x) = tanh(W h + U x)``, contracting (||W||_2 = scale)."""

    def __init__(self, n=6, m=3, scale=0.5, seed=0, dropout=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=DT)
        self.W = torch.nn.Parameter(scale * W / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(n, m, generator=g, dtype=DT))
        self.drop = dropout

    def forward(self, h, x):
        pre = h @ self.W.T
        if self.drop is not None:
            pre = self.drop(pre)
        return torch.tanh(pre + x @ self.U.T)


def _x(batch=5, m=3, seed=1):
    return torch.randn(batch, m, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _exact_frobenius(cell, h, x):
    """Per-sample ||J_i||_F^2 from the dense per-sample Jacobians, and the Jacobians."""
    Js = []
    for i in range(h.shape[0]):
        Ji = torch.autograd.functional.jacobian(lambda v: cell(v[None], x[i:i + 1])[0], h[i],
                                                create_graph=True)
        Js.append(Ji)
    J = torch.stack(Js)
    return (J ** 2).sum(dim=(1, 2)), J


# -- statistics ----------------------------------------------------------------------------------
def test_stats_of_a_call_are_its_results():
    cell, x = Cell(), _x()
    layer = lrt.DEQ(cell, forward_maxiter=100, forward_tol=1e-8, batch_dims=1,
                    backward={"method": "gmres", "rtol": 1e-8})
    h = layer(torch.zeros(5, 6, dtype=DT), x)
    s = layer.stats()
    info = layer.last.info
    assert s["mode"] == "train"
    assert s["forward_method"] == "iterate"
    assert s["forward_status"] == "CONVERGED" == info.forward.status.name
    assert s["forward_iterations"] == info.forward.iterations > 1
    assert s["forward_residual"] == pytest.approx(float(max(info.forward.residual_norm)))
    assert s["forward_time_s"] > 0
    assert s["backward_status"] is None and s["backward_time_s"] is None  # not yet
    h.pow(2).sum().backward()
    s = layer.stats()
    assert s["backward_method"] == "gmres" and s["backward_status"] == "CONVERGED"
    assert s["backward_iterations"] == info.backward.iterations > 0
    assert s["backward_matvecs"] == info.backward.matvecs
    assert s["backward_residual"] == pytest.approx(float(max(info.backward.residual_norm)))
    assert s["backward_time_s"] > 0
    assert cell.W.grad is not None  # the cell's parameters are the layer's
    assert {id(p) for p in layer.parameters()} == {id(cell.W), id(cell.U)}


def test_summary_aggregates_calls_and_resets():
    cell, x = Cell(), _x()
    layer = lrt.DEQ(cell, forward_maxiter=100, batch_dims=1)
    its = []
    for _ in range(3):
        layer(torch.zeros(5, 6, dtype=DT), x).sum().backward()
        its.append(layer.last.info.forward.iterations)
    layer.eval()
    with torch.no_grad():
        layer(torch.zeros(5, 6, dtype=DT), x)
    its.append(layer.last.info.forward.iterations)
    s = layer.summary()
    assert (s["calls"], s["train_calls"], s["eval_calls"], s["backward_calls"]) == (4, 3, 1, 3)
    assert s["forward_iterations_mean"] == pytest.approx(sum(its) / 4)
    assert s["forward_iterations_max"] == max(its)
    assert s["forward_statuses"] == {"CONVERGED": 4}
    assert s["backward_statuses"] == {"CONVERGED": 3}
    assert s["backward_products"] > 0 and s["backward_time_s"] > 0
    assert layer.summary(reset=True)["calls"] == 4
    assert layer.summary()["calls"] == 0


def test_many_calls_fold_into_numbers():
    cell, x = Cell(n=3), _x()
    layer = lrt.DEQ(cell, forward_maxiter=30, forward_tol=None, batch_dims=1)
    with torch.no_grad():
        for _ in range(300):
            layer(torch.zeros(5, 3, dtype=DT), x)
    assert len(layer._pending) <= 256
    s = layer.summary()
    assert s["calls"] == 300 and s["forward_iterations_mean"] == 30
    assert s["forward_statuses"] == {"COMPLETED": 300}


def test_finished_calls_do_not_keep_their_solutions():
    # The statistics of a call whose backward pass has run (or that has no graph) are plain
    # numbers: the layer does not keep the h* and adjoint tensors of the calls of an epoch.
    import gc
    import weakref

    cell, x = Cell(), _x()
    layer = lrt.DEQ(cell, forward_maxiter=100, batch_dims=1)
    refs = []
    for _ in range(3):
        layer(torch.zeros(5, 6, dtype=DT), x).sum().backward()
        info = layer.last.info
        refs.append((weakref.ref(info.forward.x), weakref.ref(info.backward.x)))
    del info
    with torch.no_grad():
        layer(torch.zeros(5, 6, dtype=DT), x)
    refs.append((weakref.ref(layer.last.info.forward.x),))
    pending = layer(torch.zeros(5, 6, dtype=DT), x)  # its backward has not run yet
    gc.collect()
    # every h* is gone; every adjoint solution but the latest, the warm start's
    assert [[r() is None for r in pair] for pair in refs] == [[True, True], [True, True],
                                                               [True, False], [True]]
    assert refs[2][1]() is layer.warm_start.last_result.x
    s = layer.summary()
    assert (s["calls"], s["backward_calls"]) == (5, 3)
    pending.sum().backward()
    assert layer.summary()["backward_calls"] == 4  # a late backward pass is still counted


# -- train / eval budgets --------------------------------------------------------------------------
def test_train_and_eval_budgets():
    cell, x = Cell(), _x()
    layer = lrt.DEQ(cell, forward_maxiter=7, forward_tol=None, eval_forward_maxiter=19,
                    eval_forward="anderson", batch_dims=1)
    layer(torch.zeros(5, 6, dtype=DT), x)
    assert layer.last.info.forward.iterations == 7
    assert layer.stats()["forward_method"] == "iterate"
    layer.eval()
    assert not cell.training  # eval() reaches f
    with torch.no_grad():
        layer(torch.zeros(5, 6, dtype=DT), x)
    assert layer.last.info.forward.iterations == 19
    assert layer.stats()["forward_method"] == "anderson"
    assert layer.stats()["mode"] == "eval"
    layer.train()
    layer(torch.zeros(5, 6, dtype=DT), x)
    assert layer.last.info.forward.iterations == 7


def test_eval_tolerance_defaults_to_training_and_can_differ():
    layer = lrt.DEQ(Cell(), forward_tol=1e-4)
    assert layer.eval_forward_tol == 1e-4 and layer.eval_forward_maxiter == 50
    layer = lrt.DEQ(Cell(), forward_tol=1e-4, eval_forward_tol=None)
    assert layer.eval_forward_tol is None


def test_forward_solver_is_passed_through():
    cell, x = Cell(scale=0.9), _x()
    plain = lrt.DEQ(cell, forward_maxiter=200, forward_tol=1e-10, batch_dims=1)
    fast = lrt.DEQ(cell, forward={"method": "anderson", "m": 5}, forward_maxiter=200,
                   forward_tol=1e-10, batch_dims=1)
    h1 = plain(torch.zeros(5, 6, dtype=DT), x)
    h2 = fast(torch.zeros(5, 6, dtype=DT), x)
    torch.testing.assert_close(h1, h2, atol=1e-8, rtol=0)
    assert fast.stats()["forward_method"] == "anderson"
    assert fast.stats()["forward_iterations"] < plain.stats()["forward_iterations"]


# -- warm start ------------------------------------------------------------------------------------
def test_warm_start_is_the_layers_own():
    cell, x = Cell(), _x()
    a = lrt.DEQ(cell, batch_dims=1)
    b = lrt.DEQ(cell, batch_dims=1)
    assert a.warm_start is not b.warm_start
    for _ in range(3):
        a(torch.zeros(5, 6, dtype=DT), x).sum().backward()
    assert (a.warm_start.misses, a.warm_start.hits) == (1, 2)
    assert a.warm_start.last_result is a.last.info.backward
    assert (b.warm_start.hits, b.warm_start.misses) == (0, 0)
    # a warm start saves adjoint iterations on the same system
    assert a.last.info.backward.iterations <= a.summary()["backward_iterations_max"]


def test_warm_start_off_starts_cold():
    cell, x = Cell(), _x()
    layer = lrt.DEQ(cell, batch_dims=1, warm_start=False)
    for _ in range(2):
        layer(torch.zeros(5, 6, dtype=DT), x).sum().backward()
    assert layer.warm_start.hits == 0 and layer.warm_start.x is None
    assert layer.stats()["backward_time_s"] > 0  # still timed


def test_timing_off_records_no_times():
    layer = lrt.DEQ(Cell(), batch_dims=1, timing=False)
    layer(torch.zeros(5, 6, dtype=DT), _x()).sum().backward()
    s = layer.stats()
    assert s["backward_status"] == "CONVERGED"
    assert s["forward_time_s"] is None and s["backward_time_s"] is None
    assert layer.summary()["backward_time_s"] is None


# -- regularisers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_jacobian_penalty_estimates_the_exact_frobenius_norm(distribution):
    torch.manual_seed(0)
    cell, x = Cell(scale=0.8), _x()
    h = lrt.fixed_point(lambda h: cell(h, x), torch.zeros(5, 6, dtype=DT), batch_dims=1)
    exact = _exact_frobenius(cell, h.detach(), x)[0].detach()
    probes = 4000
    est = lrt.jacobian_penalty(lambda v: cell(v, x), h.detach(), probes=probes, batch_dims=1,
                               distribution=distribution, create_graph=False)
    assert est.shape == (5,)
    # Var ||v^T J||^2 <= 2 ||J J^T||_F^2 for both distributions: a 5-sigma band
    sd = torch.sqrt(2 * (exact ** 2) / probes)
    assert torch.all((est - exact).abs() <= 5 * sd), (est, exact)
    whole = lrt.jacobian_penalty(lambda v: cell(v, x), h.detach(), probes=probes,
                                 distribution=distribution, create_graph=False)
    assert whole.ndim == 0
    assert abs(float(whole) - float(exact.sum())) <= 5 * float(torch.sqrt(2 * exact.sum() ** 2
                                                                         / probes))


def test_jacobian_penalty_gradient_matches_the_exact_gradient():
    torch.manual_seed(1)
    cell, x = Cell(scale=0.8), _x(batch=2)
    h = lrt.fixed_point(lambda h: cell(h, x), torch.zeros(2, 6, dtype=DT), batch_dims=1).detach()
    exact, _ = _exact_frobenius(cell, h, x)
    gW_exact, = torch.autograd.grad(exact.sum(), cell.W)
    est = lrt.jacobian_penalty(lambda v: cell(v, x), h, probes=6000, batch_dims=1,
                               distribution="rademacher")
    gW, = torch.autograd.grad(est.sum(), cell.W)
    err = torch.linalg.norm(gW - gW_exact) / torch.linalg.norm(gW_exact)
    assert err < 0.05, float(err)


def test_jacobian_penalty_is_differentiable_for_fixed_probes():
    # With the probes fixed (a seeded generator), the estimate is a smooth function of the
    # parameters: its derivative is checked against finite differences.
    x = _x(batch=2)
    h = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(3))

    def estimate(W):
        g = torch.Generator().manual_seed(7)
        return lrt.jacobian_penalty(lambda v: torch.tanh(v @ W.T + x[:, :1]), h, probes=3,
                                    batch_dims=1, generator=g)

    W = (0.3 * torch.randn(4, 4, dtype=DT)).requires_grad_()
    assert torch.autograd.gradcheck(estimate, (W,))


def test_layer_penalties_equal_the_functions_and_cost_what_they_say():
    cell, x = Cell(scale=0.7), _x()
    vjps = {"n": 0}

    class CountVJP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, g):
            vjps["n"] += 1
            return g

    def f(h, x):
        return cell(CountVJP.apply(h), x)

    layer = lrt.DEQ(f, forward_maxiter=100, forward_tol=1e-10, batch_dims=1)
    h0 = torch.zeros(5, 6, dtype=DT)
    torch.manual_seed(5)
    h, reg = layer(h0, x, penalties={"jacobian": {"probes": 3}})
    assert set(reg) == {"jacobian"} and reg["jacobian"].ndim == 0
    assert vjps["n"] == 3 and layer.stats()["penalty_vjps"] == 3
    torch.manual_seed(5)
    direct = lrt.jacobian_penalty(lambda v: cell(v, x), h.detach(), probes=3, batch_dims=1)
    torch.testing.assert_close(reg["jacobian"], direct.mean())
    assert layer.stats()["penalty_jacobian"] == pytest.approx(float(direct.mean().detach()))

    vjps["n"] = 0
    h, reg = layer(h0, x, penalties=("column_norm", "gershgorin"))
    assert vjps["n"] == 6 and layer.stats()["penalty_vjps"] == 6  # n = 6, shared
    _, J = _exact_frobenius(cell, h.detach(), x)
    torch.testing.assert_close(reg["column_norm"], lrt.column_norm_penalty(J, mu=0.9).mean())
    torch.testing.assert_close(reg["gershgorin"], lrt.gershgorin_penalty(J, margin=0.1).mean())
    (reg["column_norm"] + reg["gershgorin"]).backward()
    assert cell.W.grad is not None and torch.isfinite(cell.W.grad).all()


def test_jacobian_matrix_is_the_dense_jacobian():
    cell, x = Cell(), _x()
    h = torch.randn(5, 6, dtype=DT)
    J = lrt.jacobian_matrix(lambda v: cell(v, x), h, batch_dims=1)
    _, exact = _exact_frobenius(cell, h, x)
    torch.testing.assert_close(J, exact)
    W = torch.randn(3, 3, dtype=DT)
    tree = lrt.jacobian_matrix(lambda s: (s[0] @ W.T, 2 * s[1]),
                               (torch.zeros(3, dtype=DT), torch.zeros(2, dtype=DT)))
    expected = torch.block_diag(W, 2 * torch.eye(2, dtype=DT))
    torch.testing.assert_close(tree, expected)


def test_penalty_of_a_structured_state():
    W = torch.randn(3, 3, dtype=DT)
    f = lambda s: {"a": s["a"] @ W.T, "b": 0.5 * s["b"]}  # noqa: E731
    state = {"a": torch.zeros(3, dtype=DT), "b": torch.zeros(4, dtype=DT)}
    est = lrt.jacobian_penalty(f, state, probes=1, distribution="rademacher")
    # ||v^T W||^2 + 0.25 * 4 for a sign vector v; its mean is ||W||_F^2 + 1
    assert float(est) >= 1.0 - 1e-12


def test_layer_bad_penalty_options_name_the_argument():
    layer = lrt.DEQ(Cell())
    h0, x = torch.zeros(5, 6, dtype=DT), _x()
    with pytest.raises(ValueError, match="penalties"):
        layer(h0, x, penalties="jacobain")
    with pytest.raises(TypeError, match=r"penalties\['jacobian'\].*probs"):
        layer(h0, x, penalties={"jacobian": {"probs": 2}})
    with pytest.raises(ValueError, match="probes"):
        layer(h0, x, penalties={"jacobian": {"probes": 0}})
    with pytest.raises(TypeError, match="penalties"):
        layer(h0, x, penalties=3)


def test_bad_construction_names_the_argument():
    with pytest.raises(TypeError, match="f must be callable"):
        lrt.DEQ(3)
    with pytest.raises(ValueError, match="forward"):
        lrt.DEQ(Cell(), forward="andersen")
    with pytest.raises(ValueError, match="eval_forward"):
        lrt.DEQ(Cell(), eval_forward="newtn")
    with pytest.raises(ValueError, match="forward_maxiter"):
        lrt.DEQ(Cell(), forward_maxiter=0)
    with pytest.raises(ValueError, match="eval_forward_maxiter"):
        lrt.DEQ(Cell(), eval_forward_maxiter=-1)
    with pytest.raises(TypeError, match="backward"):
        lrt.DEQ(Cell(), backward="gmres")
    # the backward options are checked when the layer is built, not at the first backward
    with pytest.raises(ValueError, match=r"backward.*'gmers'.*did you mean 'gmres'"):
        lrt.DEQ(Cell(), backward={"method": "gmers"})
    with pytest.raises(TypeError, match=r"backward.*'rtool'"):
        lrt.DEQ(Cell(), backward={"method": "gmres", "rtool": 1e-4})
    with pytest.raises(TypeError, match=r"backward.*steps"):
        lrt.DEQ(Cell(), backward={"method": "phantom"})
    with pytest.raises(ValueError, match=r"backward.*on_failure"):
        lrt.DEQ(Cell(), backward={"method": "gmres", "on_failure": "raise"})
    lrt.DEQ(Cell(), backward={"method": "phantom", "steps": 3, "damping": 0.5})
    lrt.DEQ(Cell(), backward={"method": "neumann", "rtol": None, "atol": None, "maxiter": 5})
    with pytest.raises(ValueError, match="batch_dims"):
        lrt.DEQ(Cell(), batch_dims=2)
    with pytest.raises(TypeError, match="warm_start"):
        lrt.DEQ(Cell(), warm_start=1)
    with pytest.raises(ValueError, match="on_failure"):
        lrt.DEQ(Cell(), on_failure="loud")


# -- variational dropout ---------------------------------------------------------------------------
def test_plain_dropout_cannot_converge_variational_dropout_does():
    torch.manual_seed(0)
    x = _x()
    noisy = Cell(dropout=torch.nn.Dropout(0.3))
    layer = lrt.DEQ(noisy, forward_maxiter=60, forward_tol=1e-8, batch_dims=1,
                    on_failure="ignore")
    layer(torch.zeros(5, 6, dtype=DT), x)
    assert layer.stats()["forward_status"] == "MAX_ITERATIONS"
    fixed = Cell(dropout=lrt.VariationalDropout(0.3))
    layer = lrt.DEQ(fixed, forward_maxiter=200, forward_tol=1e-10, batch_dims=1)
    layer(torch.zeros(5, 6, dtype=DT), x)
    assert layer.stats()["forward_status"] == "CONVERGED"


def test_each_call_has_one_mask_used_by_its_backward():
    torch.manual_seed(0)
    x = _x()
    drop = lrt.VariationalDropout(0.4)
    cell = Cell(dropout=drop)
    layer = lrt.DEQ(cell, forward_maxiter=200, forward_tol=1e-12, batch_dims=1,
                    backward={"method": "gmres", "rtol": 1e-12})
    h0 = torch.zeros(5, 6, dtype=DT)
    h1 = layer(h0, x)
    mask1 = drop.mask.clone()
    h2 = layer(h0, x)  # a second call draws a new mask before the first one's backward
    mask2 = drop.mask.clone()
    assert not torch.equal(mask1, mask2)
    (h1.sum() + 0 * h2.sum()).backward()
    g_layer = cell.W.grad.clone()

    # reference: the same map with mask1 as a constant, through an exact implicit gradient
    cell.W.grad = None
    ref = Cell()
    ref.load_state_dict({"W": cell.W.detach(), "U": cell.U.detach()})
    f = lambda h: torch.tanh(mask1 * (h @ ref.W.T) + x @ ref.U.T)  # noqa: E731
    h = lrt.fixed_point(f, h0, forward_maxiter=200, forward_tol=1e-12, batch_dims=1,
                        backward={"method": "gmres", "rtol": 1e-12})
    h.sum().backward()
    torch.testing.assert_close(h1, h.detach())
    torch.testing.assert_close(g_layer, ref.W.grad, atol=1e-9, rtol=1e-7)


def test_variational_dropout_contract():
    torch.manual_seed(0)
    drop = lrt.VariationalDropout(0.5)
    x = torch.ones(4, 1000)
    y = drop(x)
    assert torch.equal(y, drop(x))  # the same mask until reset
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 2.0))
    assert abs(kept.double().mean().item() - 0.5) < 0.03
    drop.reset_mask()
    assert not torch.equal(y, drop(x))
    with pytest.raises(ValueError, match="reset_mask"):
        drop(torch.ones(3, 1000))  # a different batch in the same solve
    assert lrt.reset_dropout(torch.nn.Sequential(drop, torch.nn.Linear(2, 2))) == 1
    assert drop.mask is None
    shared = lrt.VariationalDropout(0.5, shared_dims=(-1,))
    z = shared(torch.ones(6, 5))
    assert all(len(set(row.tolist())) == 1 for row in z)  # whole rows kept or dropped
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match="p must be in"):
        lrt.VariationalDropout(1.0)
    with pytest.raises(TypeError, match="p must be"):
        lrt.VariationalDropout("0.5")
    with pytest.raises(TypeError, match="module"):
        lrt.reset_dropout(3)


def test_statistics_are_plain_numbers_for_a_logger():
    cell, x = Cell(), _x()
    layer = lrt.DEQ(cell, batch_dims=1)
    h, reg = layer(torch.zeros(5, 6, dtype=DT), x, penalties="jacobian")
    (h.sum() + reg["jacobian"]).backward()
    for key, value in {**layer.stats(), **layer.summary()}.items():
        assert value is None or isinstance(value, (str, int, float, dict)), (key, value)
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert "DEQ(" in repr(layer) and "forward='iterate'" in repr(layer)


def test_a_structured_state_trains_through_the_layer():
    torch.manual_seed(0)
    A = torch.nn.Linear(4, 4, bias=False).double()
    B = torch.nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        A.weight.mul_(0.4 / torch.linalg.matrix_norm(A.weight, 2))
        B.weight.mul_(0.4 / torch.linalg.matrix_norm(B.weight, 2))

    def f(state, x):
        lo, hi = state
        return torch.tanh(A(lo) + x), torch.tanh(B(hi) + 0.1 * lo[:, :3])

    layer = lrt.DEQ(f, forward="anderson", forward_tol=1e-10, forward_maxiter=100, batch_dims=1)
    x = torch.randn(5, 4, dtype=DT)
    (lo, hi), reg = layer((torch.zeros(5, 4, dtype=DT), torch.zeros(5, 3, dtype=DT)), x,
                          penalties=("jacobian", "gershgorin"))
    assert lo.shape == (5, 4) and hi.shape == (5, 3)
    (lo.sum() + hi.sum() + reg["jacobian"] + reg["gershgorin"]).backward()
    assert A.weight.grad is not None and B.weight.grad is not None
    s = layer.stats()
    assert s["forward_status"] == "CONVERGED" and s["backward_status"] == "CONVERGED"
    assert s["penalty_vjps"] == 1 + 7  # one probe, and n = 4 + 3 for the dense Jacobian


def test_layer_inside_torch_func_per_sample_gradients():
    # Fixed budgets: per-sample gradients by vmap(grad(loss)) through the layer, equal to the
    # gradients of each sample's loss taken one at a time.
    torch.manual_seed(0)
    W = (0.3 * torch.randn(4, 4, dtype=DT))
    x = torch.randn(3, 4, dtype=DT)
    layer = lrt.DEQ(lambda h, W, xi: torch.tanh(h @ W.T + xi), forward_tol=None,
                    forward_maxiter=40, warm_start=False,  # cold: each is the 30-term series
                    backward={"method": "neumann", "rtol": None, "atol": None, "maxiter": 30})

    def loss(W, xi):
        return layer(torch.zeros(4, dtype=DT), W, xi).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(W, x)
    for i in range(3):
        Wi = W.clone().requires_grad_()
        loss(Wi, x[i]).backward()
        torch.testing.assert_close(per_sample[i], Wi.grad, atol=1e-8, rtol=1e-6)
    with pytest.raises(RuntimeError, match="penalties"):
        torch.func.grad(lambda W: layer(torch.zeros(4, dtype=DT), W, x[0],
                                        penalties="jacobian")[0].sum())(W)


def test_condition_ii_penalties_of_a_stack_are_per_matrix():
    J = torch.randn(3, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(2))
    for penalty in (lrt.column_norm_penalty, lrt.gershgorin_penalty):
        stacked = penalty(J)
        assert stacked.shape == (3,)
        torch.testing.assert_close(stacked, torch.stack([penalty(Ji) for Ji in J]))
    with pytest.raises(ValueError, match="square"):
        lrt.column_norm_penalty(torch.zeros(2, 3, 4))


def test_a_model_of_two_layers_trains_saves_copies_and_moves_to_float64():
    # A multiscale (tuple-state) layer and a second layer in one model: each keeps its own
    # statistics and warm start; the model trains, round-trips through state_dict, deep-copies
    # and runs in float64 after .double().
    import copy
    import io

    torch.manual_seed(0)

    class TwoScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hi, self.lo = torch.nn.Linear(4, 4), torch.nn.Linear(2, 2)
            self.down, self.up = torch.nn.Linear(4, 2), torch.nn.Linear(2, 4)
            for m in (self.hi, self.lo, self.down, self.up):
                with torch.no_grad():
                    m.weight.mul_(0.3)

        def forward(self, state, u):
            hi, lo = state
            return (torch.tanh(self.hi(hi) + self.up(lo) + u),
                    torch.tanh(self.lo(lo) + self.down(hi)))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(3, 4)
            self.a = lrt.DEQ(TwoScale(), forward="anderson", forward_maxiter=60, batch_dims=1)
            self.b = lrt.DEQ(lambda h, v: torch.tanh(0.5 * h + v), forward_maxiter=60,
                             batch_dims=1)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            u = self.enc(x)
            hi, lo = self.a((torch.zeros_like(u), torch.zeros(len(x), 2, dtype=u.dtype)), u)
            feat = torch.cat([hi, lo], dim=1)
            return self.head(self.b(torch.zeros_like(feat), feat))

    model = Model()
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for layer in (model.a, model.b):
        s = layer.summary()
        assert s["calls"] == s["backward_calls"] == 8
        assert s["forward_statuses"] == {"CONVERGED": 8} == s["backward_statuses"]
        assert (layer.warm_start.misses, layer.warm_start.hits) == (1, 7)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = Model()
    other.load_state_dict(torch.load(buf))
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref, rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(model)
    assert twin.a.warm_start is not model.a.warm_start
    wide = twin.double().train()
    wide(x.double()).sum().backward()
    assert wide.a.stats()["backward_status"] == "CONVERGED"
    assert wide.enc.weight.grad.dtype == torch.float64
    assert model.a.summary()["calls"] == 9  # the copy's calls are its own


def test_penalties_take_states_as_fixed_point_does():
    """A dict state whose f returns its keys in another order is the same state (as for
    fixed_point), and jacobian_matrix of the dict equals that of the flat vector."""
    W = torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=DT) * 0.3

    def f_flat(v):
        return torch.tanh(v @ W.T)

    def f_dict(s):
        v = torch.cat([s["a"], s["b"]])
        out = f_flat(v)
        return {"b": out[2:], "a": out[:2]}  # keys in another order

    v = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=DT)
    state = {"a": v[:2], "b": v[2:]}
    J = lrt.jacobian_matrix(f_flat, v)
    assert torch.allclose(lrt.jacobian_matrix(f_dict, state), J, rtol=0, atol=1e-14)
    g = torch.Generator().manual_seed(5)
    est_dict = lrt.jacobian_penalty(f_dict, state, probes=3, generator=g)
    g = torch.Generator().manual_seed(5)
    est_flat = lrt.jacobian_penalty(f_flat, v, probes=3, generator=g)
    assert torch.allclose(est_dict, est_flat, rtol=1e-12)


@pytest.mark.parametrize("bad", [1.0, True, 2, "1"])
def test_batch_dims_judged_as_solve_judges_it(bad):
    # 1.0 and True are not the integer 1: refused by the layer and the penalty alike, as
    # linsolve_rbp.solve refuses them.
    with pytest.raises((ValueError, TypeError), match="batch_dims"):
        lrt.DEQ(lambda h: 0.5 * h, batch_dims=bad)
    with pytest.raises((ValueError, TypeError), match="batch_dims"):
        lrt.jacobian_penalty(lambda h: 0.5 * h, torch.zeros(2, 3), batch_dims=bad)
