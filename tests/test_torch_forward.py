"""Forward solvers of ``fixed_point`` (``forward="iterate" | "anderson" | "broyden" |
"newton"``): each finds the fixed point, reports per sample, fails under the policy, and the
gradient through the layer is the exact implicit gradient whichever forward found ``h*``."""

import warnings

import numpy as np
import pytest
import torch

import linsolve_rbp as lr
from linsolve_rbp.adapters import torch as lrt
from linsolve_rbp.adapters.torch.forward import FORWARD_METHODS, check_forward, solve_forward

F64 = torch.float64
METHODS = FORWARD_METHODS
# Non-contracting maps need the memory to cover the dimension for Anderson.
STRONG = {"iterate": "iterate", "anderson": {"method": "anderson", "m": 30}, "broyden": "broyden",
          "newton": "newton"}


def _tanh_cell(n=8, scale=0.8, seed=0, symmetric=False, xscale=1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, dtype=F64, generator=g)
    if symmetric:
        W = W + W.T
    W = scale * W / torch.linalg.matrix_norm(W, ord=2)
    x = xscale * torch.randn(n, dtype=F64, generator=g)
    return W.requires_grad_(), x


def _residual(f, h):
    with torch.no_grad():
        return float(torch.linalg.vector_norm(f(h) - h))


def _non_contracting(n=12, seed=1):
    """``f(h) = A h + 0.1 tanh(h) + x`` with eigenvalues of ``A`` up to 1.5 in modulus:
    plain iteration blows up; ``I - J`` stays nonsingular, so the fixed point exists."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    eig = torch.linspace(-1.5, 1.5, n, dtype=F64)
    eig = torch.where((eig - 1).abs() < 0.2, eig + 0.5, eig)  # keep 1 out of the spectrum of J
    A = (Q * eig) @ Q.T
    x = torch.randn(n, dtype=F64, generator=g)
    return A.requires_grad_(), x


# -- finding the fixed point ---------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_each_method_finds_the_fixed_point_of_a_contracting_map(method):
    W, x = _tanh_cell()
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    h0 = torch.zeros(8, dtype=F64)
    h, info = lrt.fixed_point(f, h0, forward=method, forward_tol=1e-12, forward_maxiter=500,
                              return_info=True)
    res = info.forward
    assert res.method == method and res.status is lr.Status.CONVERGED and res.converged and res.success
    assert _residual(f, res.x) <= 1e-10
    assert _residual(f, h.detach()) <= 1e-10
    assert torch.equal(h0, torch.zeros(8, dtype=F64))  # the start is not modified
    assert res.info["f_evals"] >= res.iterations >= 1
    assert len(res.residual_history) >= res.iterations


@pytest.mark.parametrize("method", ["anderson", "broyden", "newton"])
def test_accelerated_methods_converge_where_plain_iteration_fails(method):
    A, x = _non_contracting()
    f = lambda h: h @ A.T + 0.1 * torch.tanh(h) + x  # noqa: E731
    h0 = torch.zeros(12, dtype=F64)
    with pytest.warns(lr.ConvergenceWarning, match="iterate"):
        _, plain = lrt.fixed_point(f, h0, forward_tol=1e-10, forward_maxiter=200, return_info=True)
    assert not plain.forward.success
    h, info = lrt.fixed_point(f, h0, forward=STRONG[method], forward_tol=1e-10, forward_maxiter=200,
                              return_info=True)
    assert info.forward.status is lr.Status.CONVERGED, info.forward.message
    assert _residual(f, info.forward.x) <= 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_float32_states(method):
    W, x = _tanh_cell(n=16)
    W32, x32 = W.detach().float(), x.float()
    f = lambda h: torch.tanh(h @ W32.T + x32)  # noqa: E731
    h, info = lrt.fixed_point(f, torch.zeros(16), forward=method, forward_tol=1e-5, return_info=True)
    assert h.dtype == torch.float32 and info.forward.converged
    assert isinstance(info.forward.residual_norm, float)


# -- fewer iterations on the documented example ---------------------------------------------------
def test_anderson_broyden_newton_need_fewer_iterations_on_the_documented_example():
    # The example of linsolve_rbp.adapters.torch.forward's docstring.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 64, dtype=F64, generator=g)
    W = 0.9 * (W + W.T) / torch.linalg.matrix_norm(W + W.T, ord=2)
    x = 0.1 * torch.randn(64, dtype=F64, generator=g)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    its, evals = {}, {}
    for method in METHODS:
        _, info = lrt.fixed_point(f, torch.zeros(64, dtype=F64), forward=method, forward_tol=1e-8,
                                  forward_maxiter=500, return_info=True)
        assert info.forward.converged
        its[method], evals[method] = info.forward.iterations, info.forward.info["f_evals"]
    assert its["iterate"] >= 100
    assert its["anderson"] < its["iterate"] / 2 and its["broyden"] < its["iterate"] / 2
    assert its["newton"] < 10
    # Anderson and Broyden: one evaluation of f per iteration (plus the first).
    assert evals["anderson"] == its["anderson"] + 1 and evals["anderson"] < evals["iterate"] / 2


# -- batches: per-sample tests and statuses -------------------------------------------------------
def _affine_batch():
    """Three samples of ``f(h)_i = a_i h_i + c_i``; sample 1 (a = 1.5) is not contracting."""
    a = torch.tensor([0.5, 1.5, 0.3], dtype=F64)[:, None]
    c = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(3, 4)
    return (lambda h: a * h + c), (c / (1 - a))


def test_batched_iterate_reports_each_sample():
    f, exact = _affine_batch()
    h, info = lrt.fixed_point(f, torch.zeros(3, 4, dtype=F64), batch_dims=1, forward_tol=1e-10,
                              forward_maxiter=40, on_failure="ignore", return_info=True)
    res = info.forward
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.MAX_ITERATIONS, lr.Status.CONVERGED)
    assert res.status is lr.Status.MAX_ITERATIONS and not res.success
    assert list(res.converged) == [True, False, True]
    assert res.residual_norm.shape == (3,) and res.residual_history.shape == (res.iterations, 3)
    assert "2 converged, 1 max_iterations of 3 samples" in res.message
    for i in (0, 2):
        assert torch.allclose(res.x[i], exact[i], atol=1e-9)
    # A converged sample stops changing: its reported residual stays where it met the test.
    hist = res.residual_history[:, 2]
    stop = int(np.argmax(hist <= 1e-10 * max(1.0, float(exact[2].norm()))))
    assert np.all(hist[stop:] == hist[stop])


@pytest.mark.parametrize("method", ["anderson", "broyden", "newton"])
def test_batched_accelerated_methods_solve_every_sample(method):
    f, exact = _affine_batch()
    _, info = lrt.fixed_point(f, torch.zeros(3, 4, dtype=F64), batch_dims=1, forward=method,
                              forward_tol=1e-10, forward_maxiter=50, return_info=True)
    res = info.forward
    assert res.statuses == (lr.Status.CONVERGED,) * 3 and res.success
    assert torch.allclose(res.x, exact, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_batched_solve_equals_one_solve_per_sample(method):
    W, x = _tanh_cell(n=6, scale=0.9)
    X = torch.stack([x, 0.5 * x, -x])
    f = lambda h: torch.tanh(h @ W.T + X)  # noqa: E731
    _, info = lrt.fixed_point(f, torch.zeros(3, 6, dtype=F64), batch_dims=1, forward=method,
                              forward_tol=1e-12, forward_maxiter=300, return_info=True)
    assert info.forward.success
    for i in range(3):
        fi = lambda h, i=i: torch.tanh(h @ W.T + X[i])  # noqa: E731
        _, one = lrt.fixed_point(fi, torch.zeros(6, dtype=F64), forward=method, forward_tol=1e-12,
                                 forward_maxiter=300, return_info=True)
        assert torch.allclose(info.forward.x[i], one.forward.x, atol=1e-10)


# -- gradients ----------------------------------------------------------------------------------
def _dense_implicit_grad(f, h_star, c, W):
    """``dL/dW`` for ``L = c . h*``: ``z = (I - J^T)^{-1} c`` with the dense Jacobian."""
    J = torch.autograd.functional.jacobian(f, h_star).detach()
    z = torch.linalg.solve(torch.eye(len(c), dtype=F64) - J.T, c)
    (gW,) = torch.autograd.grad(f(h_star), W, z)
    return gW


@pytest.mark.parametrize(
    "method, case",
    [(m, "contracting") for m in METHODS]
    + [(m, "non_contracting") for m in METHODS if m != "iterate"],  # iterate cannot find it
)
def test_gradient_through_each_forward_is_the_exact_implicit_gradient(method, case):
    if case == "contracting":
        W, x = _tanh_cell(n=6)
        f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    else:
        W, x = _non_contracting(n=6)
        f = lambda h: h @ W.T + 0.1 * torch.tanh(h) + x  # noqa: E731
    n = W.shape[0]
    c = torch.linspace(-1.0, 2.0, n, dtype=F64)
    h, info = lrt.fixed_point(f, torch.zeros(n, dtype=F64), forward=STRONG[method], forward_tol=1e-13,
                              forward_maxiter=500, backward={"method": "gmres", "rtol": 1e-13},
                              return_info=True)
    (h * c).sum().backward()
    assert info.forward.converged and info.backward.converged
    want = _dense_implicit_grad(f, info.forward.x, c, W)
    assert torch.linalg.matrix_norm(W.grad - want) <= 1e-8 * torch.linalg.matrix_norm(want)


# -- options ------------------------------------------------------------------------------------
def test_forward_option_validation_names_the_argument():
    calls = []

    def f(h):
        calls.append(1)
        return 0.5 * h

    h0 = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match=r"forward must be one of .*did you mean 'anderson'"):
        lrt.fixed_point(f, h0, forward="andersen")
    with pytest.raises(ValueError, match=r"got 'fixed_point_iter' \(did you mean 'iterate'\?\)"):
        lrt.fixed_point(f, h0, forward="fixed_point_iter")  # torchdeq's f_solver name
    with pytest.raises(TypeError, match="forward must be a method name"):
        lrt.fixed_point(f, h0, forward=3)
    with pytest.raises(ValueError, match=r"forward\['method'\] must be one of"):
        lrt.fixed_point(f, h0, forward={"method": "secant"})
    with pytest.raises(ValueError, match="forward must name its method"):
        lrt.fixed_point(f, h0, forward={"m": 3})
    with pytest.raises(ValueError, match=r"forward\['m'\] must be a positive integer"):
        lrt.fixed_point(f, h0, forward={"method": "anderson", "m": 0})
    with pytest.raises(TypeError, match=r"forward\['m'\] must be a positive integer"):
        lrt.fixed_point(f, h0, forward={"method": "anderson", "m": 2.5})
    with pytest.raises(ValueError, match=r"forward\['tau'\] must be a positive"):
        lrt.fixed_point(f, h0, forward={"method": "anderson", "tau": 0.0})
    with pytest.raises(ValueError, match=r"forward\['lam'\]"):
        lrt.fixed_point(f, h0, forward={"method": "anderson", "lam": -1.0})
    with pytest.raises(TypeError, match=r"forward\['line_search'\] must be True or False"):
        lrt.fixed_point(f, h0, forward={"method": "newton", "line_search": 1})
    with pytest.raises(ValueError, match=r"forward\['jvp'\] must be one of"):
        lrt.fixed_point(f, h0, forward={"method": "newton", "jvp": "reverse"})
    with pytest.raises(TypeError, match=r"unknown option 'beta' \(did you mean 'tau'\?\)"):
        lrt.fixed_point(f, h0, forward={"method": "anderson", "beta": 0.5})
    with pytest.raises(TypeError, match=r"unknown option 'LBFGS_thres' \(did you mean 'memory'\?\)"):
        lrt.fixed_point(f, h0, forward={"method": "broyden", "LBFGS_thres": 10})
    with pytest.raises(TypeError, match="'iterate' got unknown option 'm'"):
        lrt.fixed_point(f, h0, forward={"method": "iterate", "m": 3})
    for key, where in (("maxiter", "forward_maxiter"), ("tol", "forward_tol"), ("batch_dims", "batch_dims")):
        with pytest.raises(ValueError, match=f"must not set '{key}'.*{where}="):
            lrt.fixed_point(f, h0, forward={"method": "newton", key: 5})
    assert not calls  # every refusal came before f was evaluated


def test_check_forward_fills_in_defaults():
    assert check_forward("iterate") == ("iterate", {"tau": 1.0})
    method, opts = check_forward({"method": "newton", "inner_rtol": 1e-6})
    assert method == "newton" and opts["inner_rtol"] == 1e-6 and opts["line_search"] is True
    assert check_forward({"method": "broyden", "memory": 4})[1]["memory"] == 4


# -- failure policy, NONFINITE, tol=None ---------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_failure_policy(method):
    W, x = _tanh_cell()
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    h0 = torch.zeros(8, dtype=F64)
    kw = dict(forward=method, forward_maxiter=1, forward_tol=1e-15)
    with pytest.warns(lr.ConvergenceWarning, match=f"fixed_point forward solve: {method}: max_iterations"):
        _, info = lrt.fixed_point(f, h0, return_info=True, **kw)
    assert info.forward.status is lr.Status.MAX_ITERATIONS and info.forward.iterations == 1
    with pytest.raises(lr.SolveError, match=f"method '{method}' failed") as err:
        lrt.fixed_point(f, h0, on_failure="raise", **kw)
    assert err.value.result.method == method and not err.value.result.success
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = lrt.fixed_point(f, h0, on_failure="ignore", return_info=True, **kw)
        assert not info.forward.success
        # A fixed budget (forward_tol=None) is a success: no warning, exactly that many steps.
        _, info = lrt.fixed_point(f, h0, forward=method, forward_maxiter=3, forward_tol=None,
                                  return_info=True)
    assert info.forward.status is lr.Status.COMPLETED and info.forward.iterations == 3


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_f_stops_at_the_last_finite_state(method):
    # Sample 1's f is NaN everywhere; the others converge and keep their statuses.
    c = torch.tensor([0.5, float("nan"), -0.5], dtype=F64)[:, None]
    f = lambda h: 0.5 * torch.tanh(h) + c  # noqa: E731
    h0 = torch.ones(3, 2, dtype=F64)
    with pytest.warns(lr.ConvergenceWarning, match="NaN or inf"):
        h, info = lrt.fixed_point(f, h0, batch_dims=1, forward=method, forward_tol=1e-10,
                                  forward_maxiter=100, return_info=True)
    res = info.forward
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.NONFINITE, lr.Status.CONVERGED)
    assert res.status is lr.Status.NONFINITE
    assert torch.isfinite(res.x).all() and torch.equal(res.x[1], h0[1])
    with pytest.raises(lr.SolveError, match="NaN or inf"):
        lrt.fixed_point(f, h0, batch_dims=1, forward=method, forward_tol=1e-10, on_failure="raise")


def test_iterate_overflowing_is_nonfinite_with_a_finite_state_even_without_tolerance():
    f = lambda h: 10.0 * h + 1e300  # noqa: E731
    h0 = torch.zeros(3, dtype=F64)
    with pytest.warns(lr.ConvergenceWarning, match="NaN or inf"):
        _, info = lrt.fixed_point(f, h0, forward_maxiter=50, forward_tol=None, return_info=True)
    assert info.forward.status is lr.Status.NONFINITE and torch.isfinite(info.forward.x).all()


def test_iterate_without_tolerance_reads_the_host_only_after_the_loop(monkeypatch):
    W, x = _tanh_cell()
    f = lambda h: torch.tanh(h @ W.detach().T + x)  # noqa: E731
    reads = []
    for name in ("__bool__", "item", "__float__", "__int__", "tolist", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads.append(1)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for maxiter in (3, 30):
        reads.clear()
        _, res = solve_forward(f, torch.zeros(8, dtype=F64), "iterate", {"tau": 1.0}, maxiter=maxiter,
                               tol=None, batch_dims=0)
        assert res.status is lr.Status.COMPLETED and res.iterations == maxiter
        counts.append(len(reads))
    assert counts[0] == counts[1]


# -- what Newton did --------------------------------------------------------------------------
@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_newton_reports_its_inner_solves(jvp):
    W, x = _tanh_cell()
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    _, info = lrt.fixed_point(f, torch.zeros(8, dtype=F64), forward={"method": "newton", "jvp": jvp},
                              forward_tol=1e-12, return_info=True)
    res = info.forward
    assert res.converged and res.info["jvp_mode"] == jvp
    assert len(res.info["inner_iterations"]) == res.iterations == len(res.info["inner_success"])
    # gmres: one product per inner iteration, and the true residual checked per solve.
    assert res.matvecs == res.info["jvps"] >= sum(res.info["inner_iterations"]) > 0
    # Without a line search, steps are h + tau dh; no backtracking.
    _, info = lrt.fixed_point(f, torch.zeros(8, dtype=F64), forward_tol=1e-12, return_info=True,
                              forward={"method": "newton", "line_search": False, "jvp": jvp})
    assert info.forward.converged and info.forward.info["backtracks"] == 0


@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_newton_under_inference_mode_takes_the_same_steps(jvp):
    """Evaluation under torch.inference_mode(): the Jacobian is still recorded, so Newton
    takes the steps it takes under torch.no_grad() (not plain iteration with J = 0)."""
    W, x = _tanh_cell(scale=1.5)
    W = W.detach()
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    forward = {"method": "newton", "jvp": jvp}
    runs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            _, info = lrt.fixed_point(f, torch.zeros(8, dtype=F64), forward=forward, forward_tol=1e-12,
                                      return_info=True)
        runs.append(info.forward)
    assert runs[0].converged and runs[1].converged
    assert runs[1].iterations == runs[0].iterations and runs[1].matvecs == runs[0].matvecs
    assert torch.allclose(runs[1].x, runs[0].x, atol=1e-14)


def test_jacobian_operator_built_under_inference_mode_is_the_jacobian():
    W, x = _tanh_cell()
    W = W.detach()
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    h = torch.randn(8, dtype=F64)
    dense = torch.autograd.functional.jacobian(f, h)
    v = torch.linspace(-1, 1, 8, dtype=F64)
    for jvp in ("forward", "double_backward"):
        with torch.inference_mode():
            J = lrt.JacobianOperator(f, h, jvp=jvp)
            jv, jtv = J @ v, J.T @ v
        assert torch.allclose(jv, dense @ v, atol=1e-14) and torch.allclose(jtv, dense.T @ v, atol=1e-14)
    # f multiplying by a tensor made in inference mode, which autograd cannot save: J @ v by
    # forward mode still works (Newton uses it), and J.T @ u says why it cannot, never 0.
    with torch.inference_mode():
        s = torch.full((8,), 0.5, dtype=F64)
        g = lambda h: torch.tanh(s * (h @ W.T) + x)  # noqa: E731
        J = lrt.JacobianOperator(g, h)
        dense_g = (1 - g(h) ** 2)[:, None] * s[:, None] * W  # d/dh tanh(s * (W h) + x)
        assert torch.allclose(J @ v, dense_g @ v, atol=1e-14)
        with pytest.raises(RuntimeError, match=r"J.T @ u .*torch.inference_mode\(\).*torch.no_grad\(\)"):
            J.T @ v
        _, info = lrt.fixed_point(g, torch.zeros(8, dtype=F64), forward="newton", forward_tol=1e-12,
                                  return_info=True)
        assert info.forward.converged and info.forward.info["jvp_mode"] == "forward"


def test_broyden_with_bounded_memory_and_line_search():
    A, x = _non_contracting()
    f = lambda h: h @ A.T + 0.1 * torch.tanh(h) + x  # noqa: E731
    _, info = lrt.fixed_point(f, torch.zeros(12, dtype=F64), forward_tol=1e-10, forward_maxiter=300,
                              forward={"method": "broyden", "memory": 30, "line_search": True},
                              return_info=True)
    assert info.forward.converged, info.forward.message


# -- a random f --------------------------------------------------------------------------------
def test_failure_message_says_when_f_is_random():
    W, x = _tanh_cell()
    torch.manual_seed(0)
    f = lambda h: torch.nn.functional.dropout(torch.tanh(h @ W.T + x), 0.3, training=True)  # noqa: E731
    h0 = torch.zeros(8, dtype=F64)
    with pytest.warns(lr.ConvergenceWarning, match=r"f is random.*VariationalDropout"):
        _, info = lrt.fixed_point(f, h0, forward_maxiter=30, return_info=True)
    assert info.forward.info["f_random"] is True
    with pytest.raises(lr.SolveError, match="f is random"):
        lrt.fixed_point(f, h0, forward="anderson", forward_maxiter=30, on_failure="raise")
    # A deterministic f that fails is not called random.
    g = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    _, info = lrt.fixed_point(g, h0, forward_maxiter=2, forward_tol=1e-14, on_failure="ignore",
                              return_info=True)
    assert info.forward.info["f_random"] is False and "random" not in info.forward.message


# -- CUDA --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_forward_matches_cpu(method):
    W, x = _tanh_cell(n=16, scale=0.9)
    X = torch.stack([x, 0.5 * x, -x, 2 * x])
    hs, infos = {}, {}
    for device in ("cpu", "cuda"):
        Wd, Xd = W.detach().to(device).requires_grad_(), X.to(device)
        f = lambda h, Wd=Wd, Xd=Xd: torch.tanh(h @ Wd.T + Xd)  # noqa: E731
        h, info = lrt.fixed_point(f, torch.zeros(4, 16, dtype=F64, device=device), batch_dims=1,
                                  forward=method, forward_tol=1e-12, forward_maxiter=300,
                                  return_info=True)
        h.sum().backward()
        assert info.forward.x.device.type == device and info.forward.success
        hs[device], infos[device] = (info.forward.x.cpu(), Wd.grad.cpu()), info.forward
    assert torch.allclose(hs["cuda"][0], hs["cpu"][0], atol=1e-10)
    assert torch.allclose(hs["cuda"][1], hs["cpu"][1], atol=1e-8)
    assert infos["cuda"].statuses == infos["cpu"].statuses
