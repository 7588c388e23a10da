"""Every method of :func:`linsolve_rbp.solve`, tested from one registry.

The registry crosses the methods with operator factories (dense, scipy sparse, closures with
and without ``rmatvec``, the RBP operator ``I - J^T``, an SPD matrix, convection-diffusion, a
rectangular least-squares problem), dtypes (float32, float64) and backends (numpy, torch,
array_api_strict; the ``scipy.*`` bridges on numpy and torch CPU). Each case lists the methods
that cannot converge on it (they must say so with a non-success status) and the methods that
do not apply to it (they must raise a ValueError naming the method); every other method must
match ``numpy.linalg.solve`` / ``lstsq`` to a tolerance derived from ``rtol`` and the
condition number.

Methods whose module is not installed are skipped, so the registry covers every name in
``linsolve_rbp.solve._REGISTRY`` as the solvers land.
"""

from __future__ import annotations

import copy
import functools
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp

import linsolve_rbp as lr
from linsolve_rbp import backend as lb
from linsolve_rbp.problems import convection_diffusion, random_contractive
from linsolve_rbp.solve import _REGISTRY

torch = pytest.importorskip("torch")
xs = pytest.importorskip("array_api_strict")

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

ALL_METHODS = tuple(_REGISTRY)
OWN_METHODS = tuple(m for m in ALL_METHODS if not m.startswith("scipy."))
SCIPY_METHODS = tuple(m for m in ALL_METHODS if m.startswith("scipy."))
SYMMETRIC_ONLY = {"cg", "minres", "scipy.cg"}
NEEDS_CONTRACTION = {"fixed_point", "neumann"}
NEEDS_RMATVEC = {"cgne", "lsqr", "scipy.lsqr", "scipy.lsmr"}
RECTANGULAR_OK = {"lsqr", "scipy.lsqr", "scipy.lsmr"}

RTOL = {np.float32: 1e-4, np.float64: 1e-8}
EPS = {np.float32: float(np.finfo(np.float32).eps), np.float64: float(np.finfo(np.float64).eps)}


# Deviations of methods from the contract of solve(), found by the tests below. Each entry
# turns the named test into a strict xfail for that method (so the check still runs, and
# fixing the method makes the test XPASS and fail until the entry is removed).
_NO_CALLBACK = ("scipy's lsqr and lsmr have no per-iteration hook and do not expose their "
                "iterates, so the bridge refuses a callback with a ValueError instead of calling "
                "it every iteration")
KNOWN_DEVIATIONS = {
    "maxiter_one": {m: _NO_CALLBACK for m in ("scipy.lsqr", "scipy.lsmr")},
    "batched_stop": {m: _NO_CALLBACK for m in ("scipy.lsqr", "scipy.lsmr")},
    "callback": {m: _NO_CALLBACK for m in ("scipy.lsqr", "scipy.lsmr")},
}

# Methods whose maxiter counts outer iterations, each running an inner GMRES of several
# products (their documented meaning, scipy's). Tests that need maxiter to bind pass the
# inner size here, small enough that one outer iteration cannot solve the system.
OUTER_ITERATIONS = {"scipy.lgmres": {"inner_m": 1, "outer_k": 1}, "scipy.gcrotmk": {"m": 2, "k": 1}}


def require(method):
    """Skip while the module of ``method`` is not written yet (import errors still fail)."""
    if method not in lr.methods():
        pytest.skip(f"method {method!r}: module {_REGISTRY[method]} not available yet")


def backends_of(method):
    return ("numpy", "torch") if method.startswith("scipy.") else ("numpy", "torch", "strict")


def to_backend(be, a):
    if be == "numpy":
        return np.array(a, copy=True)
    if be == "torch":
        return torch.from_numpy(np.array(a, copy=True))
    if be == "cuda":
        return torch.from_numpy(np.array(a, copy=True)).to("cuda")
    return xs.asarray(np.array(a, copy=True))


def to_np(a):
    return np.array(lb.to_numpy(a), copy=True)


# -------------------------------------------------------------------------------------------
# matrices (float64; cast per case)


def spd_contractive(n, seed):
    """Symmetric positive definite, eigenvalues in [0.3, 1.7]: every method converges on it
    (``I - A`` has spectral radius 0.7)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.linspace(0.3, 1.7, n)) @ Q.T


def spd(n, seed):
    """SPD with eigenvalues in [1, 20]: ``I - A`` has spectral radius 19."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.geomspace(1.0, 20.0, n)) @ Q.T


def nonsymmetric(n, seed, shift):
    """``shift I`` plus a random matrix with a strong skew-symmetric part."""
    rng = np.random.default_rng(seed)
    R, K = rng.standard_normal((n, n)) / np.sqrt(n), rng.standard_normal((n, n)) / np.sqrt(n)
    return shift * np.eye(n) + 0.3 * R + 1.2 * (K - K.T)


def sparse_contractive(n, seed):
    """``I - S`` with ``S`` sparse, nonsymmetric, of 2-norm 0.6."""
    S = sp.random(n, n, density=0.2, random_state=seed, data_rvs=np.random.default_rng(seed).standard_normal)
    S = S.toarray()
    S = S - 1.5 * S.T  # make it far from symmetric
    S *= 0.6 / np.linalg.norm(S, 2)
    return np.eye(n) - S


def rectangular(m, n, seed):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (U * np.linspace(1.0, 3.0, n)) @ V.T


# -------------------------------------------------------------------------------------------
# operator factories: (reference numpy matrix, backend, b) -> LinearOperator


def _f_dense(A, be, b):
    return lr.aslinearoperator(to_backend(be, A))


def _f_sparse(A, be, b):
    if be == "numpy":
        return lr.aslinearoperator(sp.csr_matrix(A))
    return lr.aslinearoperator(to_backend(be, A).to_sparse_csr())


def _closure(A, be, b, with_rmatvec):
    M = to_backend(be, A)
    xp = lb.array_namespace(M)
    MT = xp.matrix_transpose(M)
    # Row-vector convention: x @ M^T is M x for a vector and for every row of a batch.
    return lr.LinearOperator(
        A.shape, matvec=lambda x: x @ MT, rmatvec=(lambda y: y @ M) if with_rmatvec else None, like=b
    )


def _f_closure(A, be, b):
    return _closure(A, be, b, True)


def _f_closure_no_rmatvec(A, be, b):
    return _closure(A, be, b, False)


def _f_rbp(A, be, b):
    # A = I - J^T is stored; rebuild it the way RBP does, from J.
    n = A.shape[0]
    J = (np.eye(n) - A).T
    return lr.IdentityOperator(n, like=b) - lr.aslinearoperator(to_backend(be, J.astype(A.dtype))).T


FACTORIES = {
    "dense": (_f_dense, ("numpy", "torch", "strict", "cuda")),
    "sparse": (_f_sparse, ("numpy", "torch", "cuda")),
    "closure": (_f_closure, ("numpy", "torch", "strict", "cuda")),
    "closure_no_rmatvec": (_f_closure_no_rmatvec, ("numpy", "torch", "strict", "cuda")),
    "rbp": (_f_rbp, ("numpy", "torch", "strict", "cuda")),
}


@dataclass(frozen=True)
class Case:
    """A linear system and what each method is expected to do on it.

    ``fails``: methods that cannot converge on it (they must report a non-success status);
    ``refuses``: methods that do not apply (``solve`` must raise a ValueError naming the
    method). Every other method must converge to the reference solution.
    """

    name: str
    matrix: object  # callable () -> float64 numpy matrix
    factory: str
    fails: frozenset = frozenset()
    refuses: frozenset = frozenset()
    # Enough for every converging method here (n <= 30); bounds the cost of the failing ones.
    maxiter: int | None = 150
    slow: bool = False
    least_squares: bool = False


CASES = [
    Case("dense_nonsymmetric", lambda: nonsymmetric(24, 0, shift=3.0), "dense",
         fails=frozenset(SYMMETRIC_ONLY | NEEDS_CONTRACTION)),
    Case("scipy_sparse_contractive", lambda: sparse_contractive(30, 1), "sparse",
         fails=frozenset(SYMMETRIC_ONLY)),
    Case("closure_spd_contractive", lambda: spd_contractive(20, 2), "closure"),
    Case("closure_no_rmatvec", lambda: nonsymmetric(20, 3, shift=1.0), "closure_no_rmatvec",
         fails=frozenset(SYMMETRIC_ONLY | NEEDS_CONTRACTION), refuses=frozenset(NEEDS_RMATVEC)),
    Case("rbp_I_minus_JT", lambda: np.eye(24) - random_contractive(24, rho=0.7, seed=4).T, "rbp",
         fails=frozenset(SYMMETRIC_ONLY)),
    Case("spd", lambda: spd(24, 5), "dense", fails=frozenset(NEEDS_CONTRACTION)),
    Case("convection_diffusion", lambda: convection_diffusion(5, peclet=10.0).toarray(), "sparse",
         fails=frozenset(SYMMETRIC_ONLY | NEEDS_CONTRACTION)),
    # The scipy lsqr/lsmr bridges turn scipy's least-squares test off (see their docstring),
    # so on an inconsistent problem they must run out of iterations and say so.
    Case("rectangular_least_squares", lambda: rectangular(30, 20, 6), "dense",
         fails=frozenset(RECTANGULAR_OK - {"lsqr"}),
         refuses=frozenset(set(ALL_METHODS) - RECTANGULAR_OK), least_squares=True),
    # Bigger versions of the same structures.
    Case("convection_diffusion_256", lambda: convection_diffusion(16, peclet=10.0).toarray(), "sparse",
         fails=frozenset(SYMMETRIC_ONLY | NEEDS_CONTRACTION), maxiter=2000, slow=True),
    Case("rbp_I_minus_JT_200_rho_0.95", lambda: np.eye(200) - random_contractive(200, rho=0.95, seed=7).T,
         "rbp", fails=frozenset(SYMMETRIC_ONLY), maxiter=2000, slow=True),
]
CASES_BY_NAME = {c.name: c for c in CASES}


@functools.lru_cache(maxsize=None)
def reference(case_name, dtype):
    """(matrix cast to dtype, b, reference solution in float64, condition number)."""
    case = CASES_BY_NAME[case_name]
    A = np.asarray(case.matrix(), dtype=np.float64).astype(dtype)
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))
    b = rng.standard_normal(A.shape[0]).astype(dtype)
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    if case.least_squares:
        x = np.linalg.lstsq(A64, b64, rcond=None)[0]
    else:
        x = np.linalg.solve(A64, b64)
    return A, b, x, float(np.linalg.cond(A64))


def registry_params():
    for case in CASES:
        factory_backends = FACTORIES[case.factory][1]
        for method in ALL_METHODS:
            for dtype in (np.float32, np.float64):
                # The package's own methods also run on CUDA torch tensors (GPU runs only).
                gpu = () if method.startswith("scipy.") or case.slow else ("cuda",)
                for be in backends_of(method) + gpu:
                    if be not in factory_backends:
                        continue
                    marks = [pytest.mark.slow] if case.slow else []
                    marks += [pytest.mark.gpu] if be == "cuda" else []
                    yield pytest.param(
                        case.name, method, dtype, be, marks=marks,
                        id=f"{case.name}-{method}-{np.dtype(dtype).name}-{be}",
                    )


def build(case_name, dtype, be):
    case = CASES_BY_NAME[case_name]
    A, b_np, x_ref, cond = reference(case_name, dtype)
    b = to_backend(be, b_np)
    op = FACTORIES[case.factory][0](A, be, b)
    return case, op, b, b_np, x_ref, cond


def assert_like(x, b, n):
    """``x`` has the backend, device and dtype of ``b`` and the operator's column size."""
    assert lb.backend_name(x) == lb.backend_name(b)
    assert str(lb.device_of(x)) == str(lb.device_of(b))
    assert x.dtype == b.dtype
    assert tuple(x.shape) == tuple(b.shape[:-1]) + (n,)


@pytest.mark.parametrize("case_name, method, dtype, be", list(registry_params()))
def test_registry(case_name, method, dtype, be):
    require(method)
    case, op, b, b_np, x_ref, cond = build(case_name, dtype, be)
    if method in case.refuses:
        with pytest.raises(ValueError, match=f"method '{method}'"):
            lr.solve(op, b, method=method, rtol=RTOL[dtype], maxiter=case.maxiter)
        return
    if method in SYMMETRIC_ONLY and op.symmetric is False:
        # The operator's structure tag says it is not symmetric: refused up front (issue 10).
        with pytest.raises(ValueError, match=f"method '{method}' needs a symmetric"):
            lr.solve(op, b, method=method, rtol=RTOL[dtype], maxiter=case.maxiter)
        assert op.matvec_count == 0
        return
    rtol = RTOL[dtype]
    # A least-squares solution is what the inconsistent case asks for.
    opts = {"least_squares": True} if case.least_squares and method == "lsqr" else {}
    res = lr.solve(op, b, method=method, rtol=rtol, maxiter=case.maxiter, **opts)
    assert res.method == method
    assert_like(res.x, b, op.shape[1])
    x = to_np(res.x)
    assert np.all(np.isfinite(x)), "x must never hold NaN or inf"
    np.testing.assert_array_equal(to_np(b), b_np)  # b untouched
    assert isinstance(res.status, lr.Status) and res.message
    if method in case.fails:
        assert not res.success, f"{method} cannot converge on {case_name} but reported {res.status}"
        assert res.status is not lr.Status.CONVERGED and res.converged is False
        return
    if opts:
        # x minimises the residual without solving the system: a success only because the
        # least-squares solution was asked for, and never called converged.
        assert res.status is lr.Status.LEAST_SQUARES, res.message
        assert res.success and res.converged is False
    else:
        assert res.status is lr.Status.CONVERGED, res.message
        assert res.success and res.converged is True
        # CONVERGED is a claim about the x returned: its true residual meets the tolerance,
        # up to the rounding of one product in the working dtype.
        A64, x64 = reference(case_name, dtype)[0].astype(np.float64), x.astype(np.float64)
        resid = np.linalg.norm(b_np.astype(np.float64) - A64 @ x64)
        slack = op.shape[0] * EPS[dtype] * np.linalg.norm(A64, 2) * np.linalg.norm(x64)
        assert resid <= rtol * np.linalg.norm(b_np.astype(np.float64)) + slack, res.message
    assert res.iterations >= 1 and res.matvecs + res.rmatvecs >= 1
    # ||x - x*|| / ||x*|| <= kappa ||b - A x|| / ||b||; then the roundoff of the dtype.
    slack = 10.0 * (cond**2 * np.sqrt(op.shape[1]) if case.least_squares else cond)
    err = np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref)
    assert err <= slack * (rtol + 50 * op.shape[0] * EPS[dtype]), (
        f"{method} on {case_name}: relative error {err:.2e} (cond {cond:.1f}); {res.message}"
    )


SCIPY_TWINS = [("cg", "scipy.cg"), ("gmres", "scipy.gmres"), ("bicgstab", "scipy.bicgstab"),
               ("lsqr", "scipy.lsqr")]


@pytest.mark.parametrize("own, twin, case_name", [
    pytest.param(own, twin, c, id=f"{own}-{c}")
    for own, twin in SCIPY_TWINS
    for c in ("closure_spd_contractive", "spd", "convection_diffusion", "rbp_I_minus_JT")
    if own not in CASES_BY_NAME[c].fails
])
def test_own_method_matches_its_scipy_twin(own, twin, case_name):
    """The same algorithm takes the same number of iterations (+-1: scipy's BiCGStab may stop
    at a half step) and products as scipy's implementation, and gives the same x."""
    require(own)
    require(twin)
    A, b, x_ref, cond = reference(case_name, np.float64)
    r1 = lr.solve(A, b, method=own, rtol=1e-8, maxiter=300)
    r2 = lr.solve(A, b, method=twin, rtol=1e-8, maxiter=300)
    assert r1.status is r2.status is lr.Status.CONVERGED
    assert abs(r1.iterations - r2.iterations) <= 1
    assert abs(r1.matvecs + r1.rmatvecs - r2.matvecs - r2.rmatvecs) <= 2
    np.testing.assert_allclose(r1.x, r2.x, rtol=0, atol=20 * cond * 1e-8 * np.linalg.norm(x_ref))


def test_registry_covers_every_method():
    """Each registered method has a converging case and, where it has one, a failing or
    refusing case on each backend it serves."""
    params = list(registry_params())
    assert {p.values[1] for p in params} == set(_REGISTRY)
    for method in _REGISTRY:
        good = [c for c in CASES if method not in c.fails | c.refuses and not c.slow]
        assert good, f"no case where {method} must converge"


# -------------------------------------------------------------------------------------------
# failure modes, for every method


def small_system(be, dtype=np.float64, n=12, seed=10):
    A = spd_contractive(n, seed).astype(dtype)
    b_np = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    b = to_backend(be, b_np)
    return A, b_np, b, _f_closure(A, be, b)


def method_backend_params(test=None, methods=ALL_METHODS):
    known = KNOWN_DEVIATIONS.get(test, {})
    return [
        pytest.param(m, be, id=f"{m}-{be}",
                     marks=[pytest.mark.xfail(strict=True, reason=known[m])] if m in known else [])
        for m in methods for be in backends_of(m)
    ]


# Methods whose history entry of iteration k is the residual of iterate k - 1 (the newest
# Neumann term, the last fixed-point step), free of products; the residual norm they report
# is that of the x returned, checked with one product.
STALE_HISTORY = {"neumann", "fixed_point"}


@pytest.mark.parametrize("method, be", method_backend_params("history"))
def test_residual_history_has_one_entry_per_iteration(method, be):
    require(method)
    A, b_np, b, op = small_system(be)
    res = lr.solve(op, b, method=method, rtol=1e-8)
    assert res.status is lr.Status.CONVERGED, res.message
    assert res.residual_history.shape == (res.iterations + 1,)
    np.testing.assert_allclose(res.residual_history[0], np.linalg.norm(b_np), rtol=1e-12)
    # The reported residual norm is the true one of the x returned.
    true = np.linalg.norm(b_np - A @ to_np(res.x))
    assert res.residual_norm == pytest.approx(true, rel=1e-6, abs=1e-15 * np.linalg.norm(b_np))
    if method not in STALE_HISTORY:
        assert res.residual_history[-1] == pytest.approx(res.residual_norm, rel=1e-12)
    assert res.residual_norm <= 1e-8 * np.linalg.norm(b_np)
    # A system solved in two steps: the last entry is the final residual.
    A, B_np, Bb, op = _two_systems(be)
    res = lr.solve(op, Bb[0, ...], method=method, rtol=RTOL_BATCH)
    assert res.status is lr.Status.CONVERGED, res.message
    assert res.residual_history.shape == (res.iterations + 1,)
    if method not in STALE_HISTORY:
        assert res.residual_history[-1] == pytest.approx(res.residual_norm, rel=1e-6, abs=1e-14)
    assert res.residual_history[-1] <= RTOL_BATCH * np.linalg.norm(B_np[0])


@pytest.mark.parametrize("method, be", method_backend_params("callback"))
def test_callback_sees_every_iteration_up_to_the_last(method, be):
    require(method)
    A, B_np, Bb, op = _two_systems(be)
    seen = []
    res = lr.solve(op, Bb[0, ...], method=method, rtol=RTOL_BATCH,
                   callback=lambda k, x, r: seen.append((k, None if x is None else to_np(x), float(r))))
    assert res.status is lr.Status.CONVERGED, res.message
    assert [k for k, _, _ in seen] == list(range(1, res.iterations + 1))
    assert seen[-1][2] == pytest.approx(res.residual_history[-1], rel=1e-12)
    assert seen[-1][2] <= RTOL_BATCH * np.linalg.norm(B_np[0])
    if seen[-1][1] is not None:
        np.testing.assert_array_equal(seen[-1][1], to_np(res.x))


@pytest.mark.parametrize("method, be", method_backend_params("maxiter_one"))
def test_maxiter_one_reports_max_iterations_with_one_callback(method, be):
    require(method)
    A, b_np, b, op = small_system(be)
    calls = []
    res = lr.solve(op, b, method=method, rtol=1e-10, maxiter=1, callback=lambda *a: calls.append(a),
                   **OUTER_ITERATIONS.get(method, {}))
    assert res.status is lr.Status.MAX_ITERATIONS, res.message
    assert not res.success and res.converged is False
    assert len(calls) == 1 and calls[0][0] == 1
    assert res.iterations == 1
    assert "maxiter" in res.message
    assert np.all(np.isfinite(to_np(res.x)))


@pytest.mark.parametrize("method, be", method_backend_params(methods=tuple(OUTER_ITERATIONS)))
def test_maxiter_one_is_one_outer_iteration(method, be):
    """maxiter=1 runs one outer iteration, seen by one callback; with the default inner basis,
    larger than n, that iteration solves the system exactly, which is CONVERGED."""
    require(method)
    A, b_np, b, op = small_system(be)
    calls = []
    res = lr.solve(op, b, method=method, rtol=1e-10, maxiter=1, callback=lambda *a: calls.append(a))
    assert res.status is lr.Status.CONVERGED, res.message
    assert len(calls) == 1 and calls[0][0] == 1 and res.iterations == 1
    assert res.matvecs >= A.shape[0]  # one outer iteration holds a whole inner solve
    assert float(calls[0][2]) == pytest.approx(res.residual_norm, rel=1e-12)
    np.testing.assert_allclose(to_np(res.x), np.linalg.solve(A, b_np), rtol=1e-7)


@pytest.mark.parametrize("method, be", method_backend_params())
def test_inputs_unchanged_and_x0_used(method, be):
    require(method)
    A, b_np, b, op = small_system(be)
    x_ref = np.linalg.solve(A, b_np)
    x0_np = x_ref + 1e-3 * np.random.default_rng(0).standard_normal(b_np.shape)
    x0 = to_backend(be, x0_np)
    b_before, x0_before = copy.deepcopy(to_np(b)), copy.deepcopy(to_np(x0))
    res = lr.solve(op, b, method=method, x0=x0, rtol=1e-9)
    np.testing.assert_array_equal(to_np(b), b_before)
    np.testing.assert_array_equal(to_np(x0), x0_before)
    assert res.status is lr.Status.CONVERGED, res.message
    assert_like(res.x, b, A.shape[1])
    np.testing.assert_allclose(to_np(res.x), x_ref, rtol=1e-6)
    # Starting near the solution has to help: the initial residual is that of x0.
    np.testing.assert_allclose(res.residual_history[0], np.linalg.norm(b_np - A @ x0_np), rtol=1e-6)
    # Changing the result must not change b or x0 (no aliasing).
    if be == "numpy":
        res.x[...] = 7.0
    elif be == "torch":
        res.x.fill_(7.0)
    np.testing.assert_array_equal(to_np(b), b_before)
    np.testing.assert_array_equal(to_np(x0), x0_before)


def nan_after(A, be, b, k):
    """An operator whose products return NaN from the ``k+1``-th product on (counting
    products with ``A`` and ``A^H`` together)."""
    M = to_backend(be, A)
    xp = lb.array_namespace(M)
    MT = xp.matrix_transpose(M)
    count = [0]

    def prod(x, W):
        count[0] += 1
        y = x @ W
        return y if count[0] <= k else y * float("nan")

    return lr.LinearOperator(A.shape, matvec=lambda x: prod(x, MT), rmatvec=lambda y: prod(y, M), like=b)


@pytest.mark.parametrize("method, be", method_backend_params("nonfinite"))
def test_nonfinite_products_give_nonfinite_and_finite_x(method, be):
    require(method)
    A, b_np, b, _ = small_system(be, n=16)
    op = nan_after(A, be, b, 3)
    res = lr.solve(op, b, method=method, rtol=1e-12)
    assert res.status is lr.Status.NONFINITE, res.message
    assert not res.success
    assert np.all(np.isfinite(to_np(res.x)))
    assert_like(res.x, b, A.shape[1])


@pytest.mark.parametrize("method", ["fixed_point", "neumann"])
@pytest.mark.parametrize("be", ["numpy", "torch", "strict"])
def test_spectral_radius_two_is_not_a_success(method, be):
    require(method)
    n = 16
    J = random_contractive(n, rho=2.0, seed=11)
    b_np = np.random.default_rng(11).standard_normal(n)
    b = to_backend(be, b_np)
    op = lr.IdentityOperator(n, like=b) - lr.aslinearoperator(to_backend(be, J)).T
    res = lr.solve(op, b, method=method, rtol=1e-6, maxiter=500)
    assert not res.success and res.status in (lr.Status.DIVERGED, lr.Status.MAX_ITERATIONS)
    assert np.all(np.isfinite(to_np(res.x)))
    assert "spectral radius" in res.message or "maxiter" in res.message
    # Fixed-budget mode does not turn a divergent iteration into a success either.
    res = lr.solve(op, b, method=method, rtol=None, atol=None, maxiter=60)
    assert res.status is lr.Status.DIVERGED and not res.success
    assert np.all(np.isfinite(to_np(res.x)))


@pytest.mark.parametrize("method", ["fixed_point", "neumann"])
@pytest.mark.parametrize("be", ["numpy", "torch", "strict"])
def test_fixed_budget_completes_after_exactly_maxiter(method, be):
    require(method)
    n, K = 16, 7
    J = random_contractive(n, rho=0.5, seed=12)
    b = to_backend(be, np.random.default_rng(12).standard_normal(n))
    op = lr.IdentityOperator(n, like=b) - lr.aslinearoperator(to_backend(be, J)).T
    calls = []
    res = lr.solve(op, b, method=method, rtol=None, atol=None, maxiter=K, callback=lambda k, x, r: calls.append(k))
    assert res.status is lr.Status.COMPLETED and res.success and res.converged is False
    assert res.iterations == K and calls == list(range(1, K + 1))
    assert res.residual_history.shape == (K + 1,)
    assert res.residual_history[-1] < res.residual_history[0]
    with pytest.raises(ValueError, match="maxiter"):
        lr.solve(op, b, method=method, rtol=None, atol=None)


@pytest.mark.parametrize("K", [1, 4, 20])
@pytest.mark.parametrize("be", ["numpy", "torch", "strict"])
@pytest.mark.parametrize("batched", [False, True])
def test_proposition_3_fixed_point_equals_neumann(K, be, batched):
    """Liao et al. (2018), Proposition 3: K+1 RBP iterations from zero equal K-term
    Neumann-RBP, at the same number of products."""
    n = 20
    J = random_contractive(n, rho=0.8, seed=13)
    shape = (3, n) if batched else (n,)
    b = to_backend(be, np.random.default_rng(13).standard_normal(shape))
    JT = lr.aslinearoperator(to_backend(be, J)).T
    op = lr.IdentityOperator(n, like=b) - JT
    kw = dict(rtol=None, atol=None, batch_dims=int(batched))
    fp = lr.solve(op, b, method="fixed_point", maxiter=K + 1, **kw)
    ne = lr.solve(op, b, method="neumann", maxiter=K, **kw)
    np.testing.assert_allclose(to_np(fp.x), to_np(ne.x), rtol=1e-12, atol=1e-12)
    assert fp.matvecs == ne.matvecs == K and fp.rmatvecs == ne.rmatvecs == 0
    # ... and both are the truncated series sum_{k<=K} (J^T)^k b, counted on J as VJPs.
    series, term = np.zeros(shape), to_np(b)
    for _ in range(K + 1):
        series, term = series + term, term @ J
    np.testing.assert_allclose(to_np(ne.x), series, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------
# the facade


def _bad_solve_calls():
    n = 6
    A = np.eye(n) * 2.0
    b = np.ones(n)
    normv = lr.LinearOperator((n, n), matvec=lambda x: 2.0 * x, like=b)
    return {
        "unknown method": (lambda: lr.solve(A, b, method="nope"), ValueError, "method must be one of"),
        "method not a string": (lambda: lr.solve(A, b, method=3), TypeError, "method must be a string"),
        "negative rtol": (lambda: lr.solve(A, b, rtol=-1.0), ValueError, "rtol"),
        "rtol not a number": (lambda: lr.solve(A, b, rtol="1e-5"), ValueError, "rtol"),
        "negative atol": (lambda: lr.solve(A, b, atol=-1.0), ValueError, "atol"),
        "maxiter zero": (lambda: lr.solve(A, b, method="neumann", maxiter=0), ValueError, "maxiter"),
        "maxiter float": (lambda: lr.solve(A, b, method="neumann", maxiter=2.5), ValueError, "maxiter"),
        "callback not callable": (lambda: lr.solve(A, b, method="neumann", callback=1), TypeError, "callback"),
        "x0 wrong shape": (lambda: lr.solve(A, b, method="neumann", x0=np.ones(n + 1)), ValueError, "x0"),
        "x0 wrong dtype": (lambda: lr.solve(A, b, method="neumann", x0=np.ones(n, np.float32)), TypeError, "x0"),
        "x0 wrong backend": (lambda: lr.solve(A, b, method="neumann", x0=torch.ones(n, dtype=torch.float64)), TypeError, "x0"),
        "x0 not an array": (lambda: lr.solve(A, b, method="neumann", x0=[0.0] * n), TypeError, "x0"),
        "b wrong shape": (lambda: lr.solve(A, np.ones(n + 1), method="neumann"), ValueError, "b must have shape"),
        "b batched without batch_dims": (lambda: lr.solve(A, np.ones((2, n)), method="neumann"), ValueError, "b must have shape"),
        "b integer": (lambda: lr.solve(lr.IdentityOperator(n), np.ones(n, dtype=int), method="neumann"), TypeError, "b must have a floating dtype"),
        "b wrong backend": (lambda: lr.solve(A, torch.ones(n, dtype=torch.float64), method="neumann"), TypeError, "b is a torch array"),
        "b not an array": (lambda: lr.solve(A, [1.0] * n, method="neumann"), TypeError, "b must be an array"),
        "A not an operator": (lambda: lr.solve("A", b, method="neumann"), TypeError, "A must be"),
        "M for a method without preconditioner": (lambda: lr.solve(A, b, method="neumann", M=np.eye(n)), ValueError, "preconditioner M"),
        "unknown option": (lambda: lr.solve(A, b, method="neumann", tolerance=1e-3), TypeError, "unknown option"),
        "batch_dims": (lambda: lr.solve(A, b, method="neumann", batch_dims=2), ValueError, "batch_dims"),
        "check_every": (lambda: lr.solve(A, b, method="neumann", check_every=0), ValueError, "check_every"),
        "divtol": (lambda: lr.solve(A, b, method="neumann", divtol=-1.0), ValueError, "divtol"),
        "rmatvec method without rmatvec": (lambda: lr.solve(normv, b, method="cgne"), ValueError, "rmatvec"),
        "square method on rectangular A": (lambda: lr.solve(np.ones((4, 3)), np.ones(4), method="neumann"), ValueError, "square"),
    }


@pytest.mark.parametrize("name", list(_bad_solve_calls()))
def test_solve_bad_input_names_the_argument(name):
    fn, exc, pattern = _bad_solve_calls()[name]
    if name == "rmatvec method without rmatvec":
        require("cgne")
    with pytest.raises(exc, match=pattern):
        fn()


def test_throw_raises_solve_error_with_the_result():
    n = 12
    J = random_contractive(n, rho=0.95, seed=14)
    b = np.ones(n)
    op = lr.IdentityOperator(n, like=b) - lr.aslinearoperator(J).T
    with pytest.raises(lr.SolveError) as info:
        lr.solve(op, b, method="fixed_point", rtol=1e-12, maxiter=3, throw=True)
    res = info.value.result
    assert isinstance(res, lr.SolveResult) and res.status is lr.Status.MAX_ITERATIONS
    assert res.message in str(info.value) and "fixed_point" in str(info.value)
    # throw=True on a successful solve returns normally.
    assert lr.solve(op, b, method="fixed_point", rtol=1e-6, maxiter=1000, throw=True).success
    assert lr.solve(op, b, method="neumann", rtol=None, atol=None, maxiter=3, throw=True).success


def test_auto_picks_gmres_without_rmatvec():
    require("gmres")
    n = 10
    A = nonsymmetric(n, 15, shift=3.0)
    b = np.ones(n)
    op = lr.LinearOperator((n, n), matvec=lambda x: x @ A.T, like=b)
    res = lr.solve(op, b, rtol=1e-8)
    assert res.method == "gmres" and res.status is lr.Status.CONVERGED
    assert res.rmatvecs == 0
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-6)


def test_auto_picks_lsqr_for_rectangular():
    require("lsqr")
    A = rectangular(9, 5, 16)
    b = np.ones(9)
    res = lr.solve(A, b, rtol=1e-10)
    # b is not in the range of A: the least-squares solution, not a solve.
    assert res.method == "lsqr" and res.status is lr.Status.LEAST_SQUARES and not res.success
    np.testing.assert_allclose(res.x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-6)
    res = lr.solve(A, b, rtol=1e-10, least_squares=True)
    assert res.method == "lsqr" and res.success
    np.testing.assert_allclose(res.x, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-6)


# -------------------------------------------------------------------------------------------
# batched solves


def _two_systems(be):
    """Row 0 of ``b`` lies in the span of two eigenvectors of ``A`` (eigenvalues 1 and 0.95):
    Krylov methods solve it in two steps and fixed-point iteration contracts it by 0.05 a
    step, so every method converges on it within 10 iterations, with a small but nonzero
    residual, so that an unfrozen system would keep changing. Row 1 needs more than 10."""
    n = 20
    d = np.linspace(0.3, 1.7, n)
    d[0], d[1] = 1.0, 0.95
    Q, _ = np.linalg.qr(np.random.default_rng(17).standard_normal((n, n)))
    A = (Q * d) @ Q.T
    B_np = np.stack([Q[:, 0] + Q[:, 1], np.random.default_rng(18).standard_normal(n)])
    Bb = to_backend(be, B_np)
    return A, B_np, Bb, _f_closure(A, be, Bb[0, ...])


RTOL_BATCH, MAXITER_BATCH = 1e-10, 10


def _batchable(method, A, Bb, op, be):
    """``op``, or for a method that solves a batch one system at a time (a scipy bridge)
    the matrix ``A`` as an operator: such methods refuse closures, which may act per system,
    with batch_dims=1 (checked here), and serve operators known to act row by row."""
    if lr.get_method(method).batched_products:
        return op
    with pytest.raises(ValueError, match="row by row"):
        lr.solve(op, Bb, method=method, batch_dims=1)
    assert op.matvec_count == 0
    return lr.aslinearoperator(to_backend(be, A))


@pytest.mark.parametrize("method, be", method_backend_params("batched_statuses"))
def test_batched_solve_has_per_system_statuses(method, be):
    require(method)
    A, B_np, Bb, op = _two_systems(be)
    op = _batchable(method, A, Bb, op, be)
    n = A.shape[0]
    res = lr.solve(op, Bb, method=method, rtol=RTOL_BATCH, maxiter=MAXITER_BATCH, batch_dims=1,
                   **OUTER_ITERATIONS.get(method, {}))
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.MAX_ITERATIONS), res.message
    assert res.status is lr.Status.MAX_ITERATIONS and not res.success
    assert "1 CONVERGED" in res.message and "1 MAX_ITERATIONS" in res.message
    np.testing.assert_array_equal(res.converged, [True, False])
    assert np.shape(res.residual_norm) == (2,)
    assert res.residual_history.shape[1:] == (2,)
    assert_like(res.x, Bb, n)
    np.testing.assert_allclose(to_np(res.x)[0], np.linalg.solve(A, B_np[0]), rtol=1e-8)
    np.testing.assert_array_equal(to_np(Bb), B_np)


@pytest.mark.parametrize("method, be", method_backend_params("batched_stop"))
def test_batched_converged_systems_stop_changing(method, be):
    require(method)
    A, B_np, Bb, op = _two_systems(be)
    op = _batchable(method, A, Bb, op, be)
    seen = []
    res = lr.solve(op, Bb, method=method, rtol=RTOL_BATCH, maxiter=MAXITER_BATCH, batch_dims=1,
                   callback=lambda k, x, r: seen.append((k, None if x is None else to_np(x), to_np(r))),
                   **OUTER_ITERATIONS.get(method, {}))
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.MAX_ITERATIONS), res.message
    assert [k for k, _, _ in seen] == list(range(1, res.iterations + 1))
    assert all(r.shape == (2,) for _, _, r in seen)
    # the iteration at which system 0 met its tolerance
    thr = RTOL_BATCH * np.linalg.norm(B_np[0])
    first = next(i for i, (_, _, r) in enumerate(seen) if r[0] <= thr)
    assert first < len(seen) - 1, "system 0 should converge before the last iteration"
    for _, xk, r in seen[first:]:
        assert r[0] == seen[first][2][0]
        if xk is not None:  # methods that form x every iteration: row 0 is frozen
            np.testing.assert_array_equal(xk[0], seen[first][1][0])
    if seen[-1][1] is not None:
        np.testing.assert_array_equal(to_np(res.x)[0], seen[first][1][0])
        assert not np.array_equal(seen[-1][1][1], seen[-2][1][1])  # system 1 still moves


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m not in SYMMETRIC_ONLY | NEEDS_CONTRACTION | RECTANGULAR_OK] + ["cg", "minres", "fixed_point", "neumann", "lsqr"])
def test_batched_equals_separate_solves(method):
    require(method)
    n = 10
    A = spd_contractive(n, 18)
    B_np = np.random.default_rng(18).standard_normal((3, n))
    res = lr.solve(A, B_np, method=method, rtol=1e-10, batch_dims=1)
    assert res.success and len(res.statuses) == 3, res.message
    np.testing.assert_allclose(res.x, np.linalg.solve(A, B_np.T).T, rtol=1e-7, atol=1e-9)


# -------------------------------------------------------------------------------------------
# property tests

from hypothesis import given, settings, strategies as st  # noqa: E402


def _random_system(seed, n, symmetric):
    """Well conditioned: singular values in [0.5, 1.5], ``I - A`` of norm <= 0.5."""
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((n, n))
    if symmetric:
        R = R + R.T
    A = np.eye(n) + 0.5 * R / np.linalg.norm(R, 2)
    return A, rng.standard_normal(n)


PROPERTY_METHODS = ["fixed_point", "neumann", "cg", "cgne", "gmres", "bicgstab", "lsqr", "minres",
                    "scipy.gmres", "scipy.lsqr"]


@pytest.mark.parametrize("method", PROPERTY_METHODS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10))
def test_property_random_well_conditioned_systems(method, seed, n):
    require(method)
    A, b = _random_system(seed, n, symmetric=method in SYMMETRIC_ONLY)
    res = lr.solve(A, b, method=method, rtol=1e-10, maxiter=500)
    assert res.status is lr.Status.CONVERGED, res.message
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=0, atol=1e-8 * np.linalg.norm(np.linalg.solve(A, b)) * 10)
    assert np.linalg.norm(b - A @ res.x) <= 1e-10 * np.linalg.norm(b) * 3


@pytest.mark.parametrize("method", ["fixed_point", "neumann", "cg", "cgne", "gmres", "bicgstab", "lsqr", "minres"])
def test_zero_rhs_with_nonzero_x0_converges_to_zero(method):
    """A zero right-hand side is solved by x = 0 whatever x0 is (scipy returns zeros too)."""
    n = 6
    A = 3.0 * np.eye(n) + np.diag(np.ones(n - 1), 1) * 0.1
    A = (A + A.T) / 2
    if method in ("fixed_point", "neumann"):
        A = np.eye(n) - 0.3 * (A - 3.0 * np.eye(n))
    b = np.zeros((2, n))
    b[1, 0] = 1.0
    x0 = np.ones((2, n))
    res = lr.solve(A, b, method=method, x0=x0, rtol=1e-10, batch_dims=1)
    assert res.statuses[0] == lr.Status.CONVERGED
    assert np.all(res.x[0] == 0)
    assert res.success
    assert np.allclose(A @ res.x[1], b[1], atol=1e-8)
    assert np.all(x0 == 1)
