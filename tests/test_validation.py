"""The facade's validation (issue 10): one validated options object built at the call, the
failure policy, validated products, structure tags, methods refused up front, half precision
and empty inputs. Every malformed call fails before any product, with an error naming the
argument."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import linsolve_rbp as lr
from linsolve_rbp import backend as lb
from linsolve_rbp._validate import COMMON_OPTIONS, check_kind
from linsolve_rbp.operators import base as lmatrix
from linsolve_rbp.solve import SolveOptions, check_options
from linsolve_rbp.solvers._base import Solver

from registry import backend_params, method_params, needs_strict, needs_torch, torch, xs

# the module (the package's ``solve`` attribute is the function)
lsolve = importlib.import_module("linsolve_rbp.solve")

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

BACKENDS = backend_params()


def arr(be, a, dtype=None):
    a = np.array(a, dtype=dtype if dtype is not None else np.float64, copy=True)
    if be == "numpy":
        return a
    if be == "torch":
        return torch.from_numpy(a)
    return xs.asarray(a)


def closure(M, be, rmatvec=True, **kw):
    """``M`` (numpy) as a closure operator of backend ``be`` (acting on rows)."""
    Mb, MT = arr(be, M, M.dtype), arr(be, np.ascontiguousarray(M.T), M.dtype)
    like = arr(be, np.zeros(M.shape[1]), M.dtype)
    return lr.LinearOperator(M.shape, matvec=lambda x: x @ MT,
                             rmatvec=(lambda y: y @ Mb) if rmatvec else None, like=like, **kw)


def spd(n=6):
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.linspace(1.0, 3.0, n)) @ Q.T


def nonsym(n=6):
    return 3.0 * np.eye(n) + np.triu(np.ones((n, n)), 1) * 0.3


# -------------------------------------------------------------------------------------------
# 1. check_options and the options object


def test_check_options_normalises_and_returns_the_given_keys():
    out = check_options("gmres", {"rtol": 1, "maxiter": np.int64(5), "restart": 30, "divtol": None})
    assert out == {"rtol": 1.0, "maxiter": 5, "restart": 30, "divtol": None}
    assert type(out["rtol"]) is float and type(out["maxiter"]) is int
    assert check_options("neumann", {}) == {}
    assert lsolve.check_options is check_options


def test_unknown_option_lists_everything_and_suggests():
    with pytest.raises(TypeError) as info:
        check_options("gmres", {"restrat": 5})
    msg = str(info.value)
    assert "method 'gmres' got unknown option 'restrat' (did you mean 'restart'?)" in msg
    accepted = msg.split("it accepts: ")[1].split(", ")
    assert set(accepted) == set(COMMON_OPTIONS) | {"restart", "orthogonalization"}
    with pytest.raises(TypeError, match=r"'tol' \(did you mean 'rtol'\?\)"):
        check_options("gmres", {"tol": 1e-5})
    with pytest.raises(TypeError, match=r"did you mean 'rtol'.*it accepts: .*restart"):
        lr.solve(np.eye(3), np.ones(3), method="gmres", tol=1e-5)
    with pytest.raises(TypeError, match=r"did you mean 'inner_m'"):
        check_options("scipy.lgmres", {"innerm": 3})


@pytest.mark.parametrize("typo, meant", [("gmers", "gmres"), ("scipy_gmres", "scipy.gmres"),
                                         ("CG", "cg"), ("bicgstb", "bicgstab"),
                                         ("fixedpoint", "fixed_point")])
def test_misspelt_method_names_get_did_you_mean(typo, meant):
    with pytest.raises(ValueError, match=rf"method must be one of .*did you mean '{meant}'"):
        check_options(typo, {})
    with pytest.raises(ValueError, match=rf"did you mean '{meant}'"):
        lr.solve(np.eye(3), np.ones(3), method=typo)
    with pytest.raises(ValueError, match=rf"did you mean '{meant}'"):
        lr.get_method(typo)


# a value of the wrong kind for every option kind a method declares
_BAD = {
    "nonnegative": [-1.0, float("nan"), float("inf"), "a", True, None],
    "nonnegative_or_inf": [-1.0, float("nan"), "a", True, None],
    "nonnegative_or_none": [-1.0, "a"],
    "positive_int": [0, -3, 1.5, True, None, "2"],
    "nonnegative_int": [-1, 1.5, True, None],
    "positive_int_or_none": [0, -1, 2.5, True],
    "bool": [1, 0, "yes", None],
}


def _bad_method_options():
    for method in lr.methods():
        solver = lr.get_method(method)
        for name, kind in solver.option_kinds.items():
            bad = _BAD[kind] if not isinstance(kind, tuple) else ["no-such-choice", 3]
            for value in bad:
                yield pytest.param(method, name, value, id=f"{method}-{name}-{value!r}")


@pytest.mark.parametrize("method, name, value", list(_bad_method_options()))
def test_every_method_option_is_validated_by_kind(method, name, value):
    with pytest.raises((TypeError, ValueError), match=name):
        check_options(method, {name: value})
    A = lr.aslinearoperator(np.eye(4) * 2.0)
    with pytest.raises((TypeError, ValueError), match=name):
        lr.solve(A, np.ones(4), method=method, **{name: value})
    assert A.matvec_count == 0 and A.rmatvec_count == 0


def test_every_declared_option_kind_is_known():
    for method in lr.methods():
        solver = lr.get_method(method)
        assert set(solver.option_kinds) <= set(solver.options), method
        # defaults pass their own kind
        solver.check_options({})


def test_solver_check_options_kinds():
    class Demo(Solver):
        name = "demo"
        options = {"a": 1.0, "b": 2, "c": 0, "d": False, "e": None, "f": "oldest"}
        option_kinds = {"a": "nonnegative", "b": "positive_int", "c": "nonnegative_int",
                        "d": "bool", "e": "positive_int_or_none", "f": ("oldest", "smallest")}

    s = Demo()
    out = s.check_options({"a": 2, "b": np.int32(3), "e": 4, "f": "smallest"})
    assert out == {"a": 2.0, "b": 3, "c": 0, "d": False, "e": 4, "f": "smallest"}
    assert type(out["b"]) is int
    for name, value in [("a", -1), ("b", 0), ("c", -1), ("d", 1), ("e", 0), ("f", "newest")]:
        with pytest.raises(ValueError, match=name):
            s.check_options({name: value})
    with pytest.raises(ValueError, match=r"did you mean 'smallest'"):
        s.check_options({"f": "smalest"})
    with pytest.raises(TypeError, match=r"unknown option 'bb'.*it accepts: .*rtol"):
        s.check_options({"bb": 1})
    with pytest.raises(ValueError, match="unknown option kind"):
        check_kind(1, "z", "positive")


def test_solve_builds_one_frozen_options_object(monkeypatch):
    seen = {}
    real = lsolve._run

    def spy(opts, *args):
        seen["opts"] = opts
        return real(opts, *args)

    monkeypatch.setattr(lsolve, "_run", spy)
    lr.solve(np.eye(3) * 2, np.ones(3), method="gmres", rtol=1e-8, restart=7, throw=True)
    opts = seen["opts"]
    assert isinstance(opts, SolveOptions)
    assert (opts.method, opts.rtol, opts.atol, opts.maxiter, opts.on_failure, opts.throw) == (
        "gmres", 1e-8, 0.0, 30, "raise", True)
    assert dict(opts.method_options) == {"restart": 7, "orthogonalization": "cgs2"}
    with pytest.raises(Exception):
        opts.rtol = 1.0
    with pytest.raises(TypeError):
        opts.method_options["restart"] = 3


def test_solvers_see_the_users_operator_by_its_repr(monkeypatch):
    """A solver gets the facade's checked wrapper of A, which reads as the user's operator."""
    seen = []
    cls = type(lr.get_method("gmres"))
    real = cls.run
    monkeypatch.setattr(cls, "run", lambda self, prob: seen.append(prob.A) or real(self, prob))
    A = lr.aslinearoperator(np.eye(3) * 2)
    assert lr.solve(A, np.ones(3), method="gmres").success
    assert seen and seen[0] is not A and repr(seen[0]) == repr(A)


# -------------------------------------------------------------------------------------------
# 2. the failure policy


def _failing(be="numpy"):
    A = arr(be, np.diag(np.arange(1.0, 30.0)))
    return A, arr(be, np.ones(29))


@pytest.mark.parametrize("be", backend_params(("numpy", "torch")))
def test_on_failure_policies(be):
    A, b = _failing(be)
    lr.reset_convergence_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lr.solve(A, b, maxiter=2)  # default: ignore
        assert not res.success
        lr.solve(A, b, maxiter=2, on_failure="ignore")
    with pytest.warns(lr.ConvergenceWarning, match="maximum number of iterations") as rec:
        lr.solve(A, b, maxiter=2, on_failure="warn")
    assert rec[0].filename == __file__  # attributed to the caller's line
    with pytest.raises(lr.SolveError) as info:
        lr.solve(A, b, maxiter=2, on_failure="raise")
    assert not info.value.result.success
    with pytest.raises(lr.SolveError):
        lr.solve(A, b, maxiter=2, throw=True)
    with pytest.raises(lr.SolveError):
        lr.solve(A, b, maxiter=2, throw=True, on_failure="raise")
    # a successful solve is quiet under every policy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pol in ("warn", "raise", "ignore"):
            assert lr.solve(A, b, rtol=1e-8, on_failure=pol).success


@pytest.mark.parametrize("kw, pattern", [
    (dict(throw=True, on_failure="warn"), "throw=True conflicts with on_failure='warn'"),
    (dict(throw=True, on_failure="ignore"), "throw=True conflicts"),
    (dict(on_failure="wran"), r"on_failure must be one of .*did you mean 'warn'"),
    (dict(on_failure=True), "on_failure"),
    (dict(throw=1), "throw must be True or False"),
])
def test_on_failure_bad(kw, pattern):
    A = lr.aslinearoperator(np.eye(3))
    with pytest.raises((TypeError, ValueError), match=pattern):
        lr.solve(A, np.ones(3), **kw)
    assert A.matvec_count == 0


# -------------------------------------------------------------------------------------------
# 3. validated products


def _torch_op(matvec, rmatvec=None, n=3):
    return lr.LinearOperator((n, n), matvec=matvec, rmatvec=rmatvec,
                             like=torch.zeros(n, dtype=torch.float64))


_BAD_PRODUCTS = [
    (lambda: _torch_op(lambda x: np.ones(3)), lambda: torch.ones(3, dtype=torch.float64), "gmres",
     "A's matvec returned a numpy array for a torch input; expected a torch tensor of shape "
     r"\(3,\) and dtype torch.float64"),
    (lambda: _torch_op(lambda x: None), lambda: torch.ones(3, dtype=torch.float64), "bicgstab",
     "A's matvec returned None; expected a torch tensor"),
    (lambda: _torch_op(lambda x: x[..., :2]), lambda: torch.ones(3, dtype=torch.float64), "cg",
     r"A's matvec returned shape \(2,\) for an input of shape \(3,\)"),
    (lambda: _torch_op(lambda x: x.float()), lambda: torch.ones(3, dtype=torch.float64), "neumann",
     "A's matvec returned dtype torch.float32"),
    (lambda: _torch_op(lambda x: x, lambda y: [0.0] * 3), lambda: torch.ones(3, dtype=torch.float64),
     "cgne", "A's rmatvec returned a builtins.list"),
    (lambda: lr.LinearOperator((3, 3), matvec=lambda x: x, rmatvec=lambda y: y[..., 1:]),
     lambda: np.ones(3), "lsqr", r"A's rmatvec returned shape \(2,\)"),
    (lambda: lr.LinearOperator((3, 3), matvec=lambda x: xs.asarray(np.asarray(x))), lambda: np.ones(3),
     "scipy.gmres", "A's matvec returned an array_api_strict array for a numpy input"),
    (lambda: _torch_op(lambda x: x.reshape(-1)), lambda: torch.ones((2, 3), dtype=torch.float64), "gmres",
     r"A's matvec returned shape \(6,\) for an input of shape \(2, 3\); expected a torch tensor "
     r"of shape \(2, 3\)"),
]


def _bad_product_params():
    for make, b, method, pattern in _BAD_PRODUCTS:
        names = set(make.__code__.co_names) | set(b.__code__.co_names)
        marks = [needs_torch] if names & {"torch", "_torch_op"} else []
        marks += [needs_strict] if "xs" in names else []
        yield pytest.param(make, b, method, pattern, marks=marks)


@pytest.mark.parametrize("make, b, method, pattern", list(_bad_product_params()))
def test_bad_products_are_named(make, b, method, pattern):
    A, b = make(), b()
    with pytest.raises((TypeError, ValueError), match=pattern):
        lr.solve(A, b, method=method, batch_dims=b.ndim - 1)


@pytest.mark.parametrize("be", BACKENDS)
def test_bad_preconditioner_is_named(be):
    A = arr(be, spd())
    b = arr(be, np.ones(6))
    op = lr.aslinearoperator(A)
    for M, pattern in [
        (lambda x: x[..., :3], r"M returned shape \(3,\) for an input of shape \(6,\)"),
        (lambda x: None, "M returned None"),
        (arr(be, np.ones(6)), r"M must be a 2-D matrix of shape \(6, 6\).*got an array of shape \(6,\)"),
        (arr(be, np.eye(5)), r"M must have shape \(6, 6\)"),
        (arr(be, np.eye(6), np.float32), "M has dtype"),
        ("M", "M must be a LinearOperator"),
    ]:
        with pytest.raises((TypeError, ValueError), match=pattern):
            lr.solve(op, b, method="cg", M=M)
        assert op.matvec_count == 0 or callable(M)
        op.reset_counters()
    if be != "numpy" or torch is not None:
        other = np.eye(6) if be != "numpy" else torch.eye(6, dtype=torch.float64)
        with pytest.raises(TypeError, match="M works on"):
            lr.solve(op, b, method="cg", M=other)
        with pytest.raises(TypeError, match="M works on"):
            lr.solve(op, b, method="gmres", M=sp.eye(6).tocsr() if be != "numpy" else
                     torch.eye(6, dtype=torch.float64).to_sparse_csr())
    # a good M of any kind works
    for M in (arr(be, np.diag(1 / np.diag(spd()))), lambda x: x, lr.IdentityOperator(6, like=b)):
        assert lr.solve(op, b, method="cg", M=M, rtol=1e-8).success


def test_products_are_checked_only_once(monkeypatch):
    calls = []
    real = lsolve._product_error
    monkeypatch.setattr(lsolve, "_product_error", lambda *a: calls.append(a[0]) or real(*a))
    A = lr.aslinearoperator(nonsym(20))
    res = lr.solve(A, np.ones(20), method="cgne", rtol=1e-10)
    assert res.success and res.matvecs > 3 and res.rmatvecs > 3
    assert sorted(set(calls)) == ["A's matvec", "A's rmatvec"]
    assert len(calls) <= 4  # one per kind of product (counted and uncounted)
    calls.clear()
    res = lr.solve(spd(20), np.ones(20), method="cg", M=lambda x: x, rtol=1e-10)
    assert res.success and calls.count("M") == 1


# -------------------------------------------------------------------------------------------
# 4. structure tags


@pytest.mark.parametrize("be", BACKENDS)
def test_symmetric_tags_of_matrices_and_composites(be):
    S = lr.aslinearoperator(arr(be, spd()))
    N = lr.aslinearoperator(arr(be, nonsym()))
    b = arr(be, np.ones(6))
    I = lr.IdentityOperator(6, like=b)
    assert S.symmetric is True and N.symmetric is False and I.symmetric is True
    assert (S.T.symmetric, S.H.symmetric, (2.0 * S).symmetric, (-S).symmetric) == (True,) * 4
    assert (N.T.symmetric, (2.0 * N).symmetric) == (False, False)
    assert (S + S).symmetric is True and (I - S).symmetric is True
    assert (S + N).symmetric is False and (I - N.T).symmetric is False
    assert (N + N).symmetric is None  # N + N^T would be symmetric: unknown in general
    assert (S @ S).symmetric is None and (N.T @ N).symmetric is True
    C = closure(spd(), be)
    assert C.symmetric is None and (I - C).symmetric is None
    C.symmetric = True
    assert (I - C).symmetric is True
    assert closure(nonsym(), be, symmetric=False).symmetric is False
    assert lr.aslinearoperator(arr(be, np.ones((4, 3)))).symmetric is False


@needs_torch
def test_symmetric_tags_sparse_and_validation(monkeypatch):
    P = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(8, 8)).tocsr()
    assert lr.aslinearoperator(P).symmetric is True
    assert lr.aslinearoperator(sp.triu(P).tocsr()).symmetric is False
    T = torch.from_numpy(P.toarray())
    assert lr.aslinearoperator(T.to_sparse()).symmetric is True
    assert lr.aslinearoperator(torch.triu(T).to_sparse_csr()).symmetric is False
    # rounding-level asymmetry (B B^T in floating point) still counts as symmetric
    B = np.random.default_rng(1).standard_normal((30, 30))
    assert lr.aslinearoperator(B @ B.T * (1 + 1e-15)).symmetric is True
    # complex: Hermitian
    H = np.array([[2.0, 1j], [-1j, 3.0]])
    assert lr.aslinearoperator(H).symmetric is True
    assert lr.aslinearoperator(np.array([[2.0, 1j], [1j, 3.0]])).symmetric is False
    # large dense matrices are not checked
    monkeypatch.setattr(lmatrix, "SYMMETRY_CHECK_MAX_N", 4)
    assert lr.aslinearoperator(np.eye(5)).symmetric is None
    with pytest.raises(TypeError, match="symmetric must be True, False or None"):
        lr.LinearOperator((2, 2), matvec=lambda x: x, symmetric="yes")
    with pytest.raises(ValueError, match="symmetric=True needs a square operator"):
        lr.LinearOperator((2, 3), matvec=lambda x: x, symmetric=True)
    op = lr.LinearOperator((2, 2), matvec=lambda x: x)
    with pytest.raises(TypeError):
        op.symmetric = 1


@pytest.mark.parametrize("method", ["cg", "minres", "scipy.cg"])
@pytest.mark.parametrize("be", backend_params(("numpy", "torch")))
def test_symmetric_methods_refused_on_nonsymmetric(method, be):
    b = arr(be, np.ones(6))
    for A in (lr.aslinearoperator(arr(be, nonsym())), closure(nonsym(), be, symmetric=False),
              lr.IdentityOperator(6, like=b) - 0.5 * lr.aslinearoperator(arr(be, nonsym() / 3)).T):
        with pytest.raises(ValueError, match=rf"method '{method}' needs a symmetric.*gmres.*bicgstab.*cgne.*lsqr"):
            lr.solve(A, b, method=method)
        assert A.matvec_count == 0
    # unknown (None) is not refused
    assert lr.solve(closure(spd(), be), b, method=method, rtol=1e-8).success


@needs_torch
def test_jacobian_operator_is_not_symmetric():
    from linsolve_rbp.adapters import torch as lrt

    W = torch.from_numpy(nonsym() / 10)
    h = torch.ones(6, dtype=torch.float64)
    J = lrt.JacobianOperator(lambda z: torch.tanh(z @ W.T), h)
    A = lr.IdentityOperator(6, like=h) - J.T
    assert J.symmetric is False and A.symmetric is False
    with pytest.raises(ValueError, match="needs a symmetric"):
        lr.solve(A, h, method="minres")


# -------------------------------------------------------------------------------------------
# 5. methods that cannot serve the request


@pytest.mark.parametrize("method", [m for m in lr.methods() if m.startswith("scipy.")])
def test_bridges_refuse_batched_closures(method):
    M = spd()
    Bb = np.ones((2, 6))
    for op in (closure(M, "numpy"), lr.IdentityOperator(6) - closure(M / 4, "numpy")):
        with pytest.raises(ValueError, match=rf"method '{method}'.* row by row.*own '"):
            lr.solve(op, Bb, method=method, batch_dims=1)
        assert op.matvec_count == 0
    with pytest.raises(ValueError, match="M to be known to act row by row"):
        lr.solve(M, Bb, method=method, batch_dims=1, M=lambda x: x) if lr.get_method(
            method).accepts_preconditioner else (_ for _ in ()).throw(
            ValueError("M to be known to act row by row"))
    # matrices, and composites of matrices and identities, are served
    for op in (M, sp.csr_matrix(M), lr.IdentityOperator(6) - lr.aslinearoperator(M / 4).T):
        res = lr.solve(op, Bb, method=method, batch_dims=1, rtol=1e-8)
        assert len(res.statuses) == 2
    # unbatched closures are fine
    assert lr.solve(closure(M, "numpy"), np.ones(6), method=method, rtol=1e-8).x.shape == (6,)


@needs_torch
def test_rowwise_tags():
    b = torch.ones(3, dtype=torch.float64)
    D = lr.aslinearoperator(torch.eye(3, dtype=torch.float64))
    I = lr.IdentityOperator(3, like=b)
    assert D.rowwise and I.rowwise and (I - D.T).rowwise and (2 * D @ D).rowwise
    C = lr.LinearOperator((3, 3), matvec=lambda x: x, like=b)
    assert not C.rowwise and not (I - C).rowwise and not (D @ C).rowwise


# -------------------------------------------------------------------------------------------
# 6. half precision


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["gmres", "bicgstab", "cg", "lsqr", "neumann", "scipy.gmres"])
def test_half_precision_torch_dense(dtype, method):
    dt = getattr(torch, dtype)
    M = 0.2 * spd() if method == "neumann" else spd()
    A = torch.from_numpy(M).to(dt)
    b = torch.ones(6, dtype=dt)
    res = lr.solve(A, b, method=method, rtol=2e-2)
    assert res.x.dtype == dt and res.x.shape == (6,)
    assert res.success, res.message
    assert isinstance(res.residual_norm, float) and res.residual_history.dtype == np.float64
    x = res.x.double().numpy()
    assert np.linalg.norm(A.double().numpy() @ x - 1) <= 5e-2 * np.sqrt(6)


@needs_torch
def test_half_precision_closures_and_batches():
    M = spd()
    Mh = torch.from_numpy(M).half()
    op = lr.LinearOperator((6, 6), matvec=lambda x: x @ Mh.T, like=torch.zeros(6, dtype=torch.float16))
    seen = []
    res = lr.solve(op, torch.ones((2, 6), dtype=torch.float16), batch_dims=1, rtol=1e-2,
                   callback=lambda k, x, r: seen.append(x.dtype))
    assert res.success and res.x.dtype == torch.float16 and res.x.shape == (2, 6)
    assert seen and set(seen) == {torch.float16}
    Mn = M.astype(np.float16)
    opn = lr.LinearOperator((6, 6), matvec=lambda x: x @ Mn.T, like=np.zeros(6, np.float16))
    res = lr.solve(opn, np.ones(6, np.float16), rtol=1e-2, x0=np.zeros(6, np.float16))
    assert res.success and res.x.dtype == np.float16
    # a closure that returns float32 for float16 input is caught at its first product
    bad = lr.LinearOperator((6, 6), matvec=lambda x: x.float(), like=torch.zeros(6, dtype=torch.float16))
    with pytest.raises(TypeError, match="dtype torch.float32 for an input of dtype torch.float16"):
        lr.solve(bad, torch.ones(6, dtype=torch.float16))


@needs_torch
def test_to_numpy_bfloat16():
    t = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    a = lb.to_numpy(t)
    assert a.dtype == np.float32 and a.tolist() == [1.5, -2.0]
    assert lb.is_half_dtype(lb.array_namespace(t), t.dtype)
    assert lb.is_half_dtype(np, np.float16) and not lb.is_half_dtype(np, np.float32)


# -------------------------------------------------------------------------------------------
# 7. empty inputs


@pytest.mark.parametrize("method, be", method_params())
def test_empty_inputs(method, be):
    calls = []

    def mv(x):
        calls.append(1)
        return x

    for A, b, batch in [
        (lr.LinearOperator((0, 0), matvec=mv, rmatvec=mv, like=arr(be, np.zeros(0))), arr(be, np.zeros(0)), 0),
        (arr(be, np.zeros((0, 0))), arr(be, np.zeros(0)), 0),
        (arr(be, np.eye(3)), arr(be, np.zeros((0, 3))), 1),
        (lr.LinearOperator((3, 3), matvec=mv, rmatvec=mv, like=arr(be, np.zeros(3))), arr(be, np.zeros((0, 3))), 1),
        (arr(be, np.zeros((0, 0))), arr(be, np.zeros((2, 0))), 1),
    ]:
        if batch and isinstance(A, lr.LinearOperator) and not lr.get_method(method).batched_products:
            # The request itself is refused, whatever the batch size (see the bridge tests).
            with pytest.raises(ValueError, match="row by row"):
                lr.solve(A, b, method=method, batch_dims=batch)
            continue
        res = lr.solve(A, b, method=method, batch_dims=batch)
        assert tuple(res.x.shape) == tuple(b.shape) and res.x.dtype == b.dtype
        assert lb.backend_name(res.x) == lb.backend_name(b)
        assert res.status is lr.Status.CONVERGED and res.success
        assert res.iterations == 0 and res.matvecs == 0 and res.rmatvecs == 0
        nsys = b.shape[0] if batch else None
        if batch:
            assert res.residual_history.shape == (1, nsys) and np.shape(res.residual_norm) == (nsys,)
            assert len(res.statuses) == nsys and np.shape(res.converged) == (nsys,)
        else:
            assert res.residual_history.shape == (1,) and res.residual_norm == 0.0
        repr(res)
        fb = lr.solve(A, b, method=method, batch_dims=batch, rtol=None, atol=None, maxiter=3)
        assert fb.status is lr.Status.COMPLETED and fb.success
    assert calls == []


def test_empty_columns_is_a_least_squares_answer():
    res = lr.solve(np.zeros((3, 0)), np.ones(3), method="lsqr")
    assert res.x.shape == (0,) and res.status is lr.Status.LEAST_SQUARES and not res.success
    assert lr.solve(np.zeros((3, 0)), np.ones(3), method="lsqr", least_squares=True).success


# -------------------------------------------------------------------------------------------
# 8. malformed calls: named, before any product


def _malformed(be):
    n = 4
    b = arr(be, np.ones(n))
    # an array of another backend (torch, else array_api_strict)
    other_be = "torch" if be != "torch" and torch is not None else "strict" if be != "strict" else "numpy"
    other = arr(other_be, np.ones(n))
    return {
        "bad method": (dict(method="gmers"), "method"),
        "method not str": (dict(method=None), "method"),
        "unknown option": (dict(method="gmres", restrat=3), "restrat"),
        "rtol str": (dict(rtol="a"), "rtol"),
        "rtol nan": (dict(rtol=float("nan")), "rtol"),
        "rtol negative": (dict(rtol=-1), "rtol"),
        "rtol inf": (dict(rtol=float("inf")), "rtol"),
        "atol negative": (dict(atol=-1e-3), "atol"),
        "atol array": (dict(atol=np.ones(2)), "atol"),
        "maxiter 0": (dict(maxiter=0), "maxiter"),
        "maxiter True": (dict(maxiter=True), "maxiter"),
        "maxiter 1.5": (dict(maxiter=1.5), "maxiter"),
        "fixed budget without maxiter": (dict(rtol=None, atol=None), "maxiter"),
        "x0 wrong shape": (dict(x0=arr(be, np.ones(n + 1))), "x0"),
        "x0 wrong backend": (dict(x0=other), "x0"),
        "x0 wrong dtype": (dict(x0=arr(be, np.ones(n), np.float32)), "x0"),
        "x0 list": (dict(x0=[0.0] * n), "x0"),
        "M 1-d": (dict(M=arr(be, np.ones(n))), "M"),
        "M wrong backend": (dict(M=arr(other_be, np.eye(n))), "M"),
        "M wrong dtype": (dict(M=arr(be, np.eye(n), np.float32)), "M"),
        "M wrong shape": (dict(M=arr(be, np.eye(n + 1))), "M"),
        "M not an operator": (dict(M=3.0), "M"),
        "M with neumann": (dict(method="neumann", M=arr(be, np.eye(n))), "preconditioner M"),
        "callback": (dict(callback=3), "callback"),
        "on_failure": (dict(on_failure="loud"), "on_failure"),
        "throw and on_failure": (dict(throw=True, on_failure="ignore"), "on_failure"),
        "throw not bool": (dict(throw="yes"), "throw"),
        "batch_dims 2": (dict(batch_dims=2), "batch_dims"),
        "batch_dims True": (dict(batch_dims=True), "batch_dims"),
        "batch_dims with 1-d b": (dict(batch_dims=1), "b must have shape"),
        "check_every 0": (dict(check_every=0), "check_every"),
        "check_every float": (dict(check_every=2.0), "check_every"),
        "divtol -1": (dict(divtol=-1), "divtol"),
        "divtol str": (dict(divtol="big"), "divtol"),
        "restart 0": (dict(method="gmres", restart=0), "restart"),
        "restart -3": (dict(method="scipy.gmres", restart=-3), "restart"),
        "inner_m 0": (dict(method="scipy.lgmres", inner_m=0), "inner_m"),
        "outer_k -1": (dict(method="scipy.lgmres", outer_k=-1), "outer_k"),
        "gcrotmk m 0": (dict(method="scipy.gcrotmk", m=0), "m must"),
        "damp -1": (dict(method="lsqr", damp=-1), "damp"),
        "cg on nonsymmetric": (dict(method="cg", _A="nonsym"), "symmetric"),
        "cgne without rmatvec": (dict(method="cgne", _A="no_rmatvec"), "rmatvec"),
        "bridge batched closure": (dict(method="scipy.gmres", batch_dims=1, _b=2), "row by row"),
        "square method rectangular": (dict(method="gmres", _A="rect"), "square"),
    }, b


@pytest.mark.parametrize("be", BACKENDS)
def test_malformed_calls_name_the_argument_before_any_product(be):
    calls, b = _malformed(be)
    n = 4
    for label, (kw, pattern) in calls.items():
        kw = dict(kw)
        method = kw.get("method", "gmres")
        if isinstance(method, str) and method.startswith("scipy.") and be == "strict":
            continue
        which = kw.pop("_A", "closure")
        rows = kw.pop("_b", None)
        M = {"nonsym": nonsym(n), "rect": np.ones((n + 1, n))}.get(which, 2 * np.eye(n))
        A = closure(M, be, rmatvec=which != "no_rmatvec",
                    symmetric=False if which == "nonsym" else None)
        bb = b if rows is None else arr(be, np.ones((rows, n)))
        if which == "rect":
            bb = arr(be, np.ones(n + 1))
        with pytest.raises((TypeError, ValueError), match=pattern) as info:
            lr.solve(A, bb, **kw)
        assert A.matvec_count == 0 and A.rmatvec_count == 0, label
        assert not isinstance(info.value, lr.SolveError), label


# -------------------------------------------------------------------------------------------
# found by an adversarial pass


@pytest.mark.parametrize("method", [m for m in lr.methods()])
def test_tiny_tolerance_is_not_met_by_underflowing_squares(method):
    """A threshold far below the largest entry of b: residual entries whose squares underflow
    must not read as a zero residual."""
    import warnings

    A = np.eye(2) - np.diag([0.0, 0.5])
    b = np.array([1.0, 1e-170])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lr.solve(A, b, method=method, rtol=0.0, atol=1e-180)
    true = np.linalg.norm((b - A @ res.x) * 1e170) / 1e170  # scale-safe in the test too
    if res.converged:
        assert true <= 1e-180 * (1 + 1e-12), f"{method}: CONVERGED with true residual {true:.2e}"
    assert np.all(np.isfinite(res.x))


@pytest.mark.parametrize("A, M, name", [
    (np.eye(3, dtype=int), None, "A"),
    (np.eye(3), np.eye(3, dtype=int), "M"),
])
def test_integer_matrix_error_names_the_argument(A, M, name):
    with pytest.raises(TypeError, match=f"^{name}"):
        lr.solve(A, np.ones(3), M=M)


@pytest.mark.parametrize("method, option", [("lsqr", "damp"), ("cgne", "eta"), ("scipy.lsmr", "damp")])
def test_infinite_damping_is_refused(method, option):
    A = lr.aslinearoperator(np.eye(3))
    with pytest.raises(ValueError, match=option):
        lr.solve(A, np.ones(3), method=method, **{option: float("inf")})
    assert A.matvec_count == A.rmatvec_count == 0
    # conlim (a limit) may be infinite
    assert lr.solve(np.eye(3), np.ones(3), method="scipy.lsqr", conlim=float("inf")).success


def test_a_worse_failure_at_the_same_call_site_still_warns():
    import warnings

    A = np.diag(np.arange(1.0, 30.0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for bb in [np.ones(29), np.ones(29), np.full(29, np.nan)]:
            lr.solve(A, bb, method="cg", maxiter=2, on_failure="warn")
    messages = [str(w.message) for w in seen if issubclass(w.category, lr.ConvergenceWarning)]
    assert len(messages) == 2 and "non-finite" in messages[1], messages


def test_fixed_point_refuses_unservable_backward_requests_at_the_call():
    torch = pytest.importorskip("torch")
    from linsolve_rbp.adapters import torch as lrt

    calls = []

    def f(h):
        calls.append(1)
        return torch.tanh(0.5 * h + 1)

    h0 = torch.zeros(6, dtype=torch.float64)
    for backward, match in [
        ({"M": np.eye(6)}, "M must be a torch tensor"),
        ({"M": torch.eye(8, dtype=torch.float64)}, r"M must have shape \(6, 6\)"),
        ({"method": "cg"}, "symmetric"),
        ({"method": "minres"}, "symmetric"),
        ({"method": "scipy.cg"}, "symmetric"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            lrt.fixed_point(f, h0, backward=backward)
    with pytest.raises(ValueError, match="one system at a time"):
        lrt.fixed_point(f, torch.zeros(2, 6, dtype=torch.float64), backward={"method": "scipy.gmres"}, batch_dims=1)
    assert not calls, "f must not run before the options are refused"
    # implicit_grad: the same, and x0 checked, before f runs
    W = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="symmetric"):
        lrt.implicit_grad(f, h0, torch.ones(6, dtype=torch.float64), [W], method="cg")
    with pytest.raises(ValueError, match="x0"):
        lrt.implicit_grad(f, h0, torch.ones(6, dtype=torch.float64), [W], x0=torch.zeros(7, dtype=torch.float64))
    assert not calls


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["gmres", "bicgstab", "lsqr", "cgne", "scipy.gmres"])
def test_half_precision_claims_hold_for_the_rounded_x(method, dtype_name):
    """CONVERGED in half precision is a claim about the x returned in the input dtype, up to
    the rounding of one product in that dtype."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype_name)
    eps = torch.finfo(dt).eps
    n = 30
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        A = (3 * torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5).to(dt)
        b = torch.randn(n, generator=g).to(dt)
        res = lr.solve(A, b, method=method, rtol=1e-3)
        assert res.x.dtype == dt and bool(torch.isfinite(res.x).all())
        A64, x, b64 = A.double().numpy(), res.x.double().numpy(), b.double().numpy()
        true = np.linalg.norm(b64 - A64 @ x)
        slack = n * eps * np.linalg.norm(A64, 2) * np.linalg.norm(x)
        if res.converged:
            assert true <= 1e-3 * np.linalg.norm(b64) + slack, res.message
