"""The LinearOperator algebra and the backend module.

Every operator kind and every composite passes the dot test ``<A x, y> == <x, A^H y>`` and
equals the dense matrix it stands for; batched products equal row-wise products; product
counters count what was applied; bad input gets a TypeError/ValueError naming the argument.
"""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import linsolve_rbp as lr
from linsolve_rbp import backend as lb
from linsolve_rbp.problems import random_contractive

from registry import backend_params, needs_strict, needs_torch, param, torch, xs

# torch warns that sparse CSR support is "in beta" on every conversion; it is not a test failure.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

M_ROWS, N_COLS = 5, 4

# -------------------------------------------------------------------------------------------
# backends: numpy arrays in, arrays of the backend out, and back


def _to(backend, a):
    if backend == "numpy":
        return np.asarray(a)
    if backend == "torch":
        return torch.from_numpy(np.ascontiguousarray(a))
    return xs.asarray(a)


def _np(a):
    return np.asarray(lb.to_numpy(a))


def _tol(dtype):
    """Relative tolerance of one product of size ~5 in ``dtype`` (a few hundred ulps)."""
    return 1e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-11


def _rand(rng, shape, dtype):
    a = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        a = a + 1j * rng.standard_normal(shape)
    return a.astype(dtype)


# -------------------------------------------------------------------------------------------
# operator kinds: build(M numpy, backend) -> LinearOperator over M


def _dense(M, be):
    return lr.aslinearoperator(_to(be, M))


def _scipy_csr(M, be):
    return lr.aslinearoperator(sp.csr_matrix(M))


def _scipy_coo(M, be):
    return lr.aslinearoperator(sp.coo_matrix(M))


def _torch_coo(M, be):
    return lr.aslinearoperator(torch.from_numpy(M).to_sparse_coo())


def _torch_csr(M, be):
    return lr.aslinearoperator(torch.from_numpy(M).to_sparse_csr())


def _scipy_lo(M, be):
    return lr.aslinearoperator(spla.aslinearoperator(M))


def _closure(M, be):
    Mb = _to(be, M)
    xp = lb.array_namespace(Mb)
    MT = xp.matrix_transpose(Mb)
    MHT = xp.conj(Mb) if lb.is_complex_dtype(xp, Mb.dtype) else Mb
    # Row-vector convention: x @ M^T is M x for a vector and for each row of a batch.
    return lr.LinearOperator(
        M.shape, matvec=lambda x: x @ MT, rmatvec=lambda y: y @ MHT, like=Mb[0, ...]
    )


KINDS = {
    "dense": (_dense, ("numpy", "torch", "strict")),
    "scipy_csr": (_scipy_csr, ("numpy",)),
    "scipy_coo": (_scipy_coo, ("numpy",)),
    "torch_sparse_coo": (_torch_coo, ("torch",)),
    "torch_sparse_csr": (_torch_csr, ("torch",)),
    "scipy_linearoperator": (_scipy_lo, ("numpy",)),
    "closure": (_closure, ("numpy", "torch", "strict")),
}
DTYPES = (np.float32, np.float64, np.complex128)


def _eye_like(n, be, dtype):
    return lr.IdentityOperator(n, like=_to(be, np.zeros(n, dtype=dtype)))


# composites: build(make, rng, dtype, be) -> (operator, dense numpy matrix it stands for)
def _c_plain(make, rng, dt, be):
    M = _rand(rng, (M_ROWS, N_COLS), dt)
    return make(M), M


def _c_T(make, rng, dt, be):
    M = _rand(rng, (M_ROWS, N_COLS), dt)
    return make(M).T, M.T


def _c_H(make, rng, dt, be):
    M = _rand(rng, (M_ROWS, N_COLS), dt)
    return make(M).H, M.conj().T


def _c_add(make, rng, dt, be):
    M1, M2 = _rand(rng, (M_ROWS, N_COLS), dt), _rand(rng, (M_ROWS, N_COLS), dt)
    return make(M1) + make(M2), M1 + M2


def _c_sub(make, rng, dt, be):
    M1, M2 = _rand(rng, (M_ROWS, N_COLS), dt), _rand(rng, (M_ROWS, N_COLS), dt)
    return make(M1) - make(M2), M1 - M2


def _c_scale(make, rng, dt, be):
    M = _rand(rng, (M_ROWS, N_COLS), dt)
    return 2.0 * make(M), 2.0 * M


def _c_neg(make, rng, dt, be):
    M = _rand(rng, (M_ROWS, N_COLS), dt)
    return -make(M), -M


def _c_div(make, rng, dt, be):
    M = _rand(rng, (M_ROWS, N_COLS), dt)
    return make(M) / 2, M / 2


def _c_matmul(make, rng, dt, be):
    M1, M2 = _rand(rng, (M_ROWS, N_COLS), dt), _rand(rng, (N_COLS, 3), dt)
    return make(M1) @ make(M2), M1 @ M2


def _c_rbp(make, rng, dt, be):
    J = _rand(rng, (N_COLS, N_COLS), dt)
    return _eye_like(N_COLS, be, dt) - make(J).T, np.eye(N_COLS) - J.T


def _c_nested(make, rng, dt, be):
    M1, M2 = _rand(rng, (M_ROWS, N_COLS), dt), _rand(rng, (M_ROWS, N_COLS), dt)
    A, B = make(M1), make(M2)
    op = (((A - 0.5 * B).H @ (A + B)).T - _eye_like(N_COLS, be, dt)) / 4
    ref = (((M1 - 0.5 * M2).conj().T @ (M1 + M2)).T - np.eye(N_COLS)) / 4
    return op, ref


COMPOSITES = {
    "plain": _c_plain, "T": _c_T, "H": _c_H, "add": _c_add, "sub": _c_sub, "scale": _c_scale,
    "neg": _c_neg, "div": _c_div, "matmul": _c_matmul, "I-J.T": _c_rbp, "nested": _c_nested,
}


def _cases():
    for kind, (_, backends) in KINDS.items():
        for be in backends:
            for dt in DTYPES:
                for comp in COMPOSITES:
                    yield param(kind, be, dt, comp, backend=be, id=f"{kind}-{be}-{np.dtype(dt).name}-{comp}")


def _build(kind, be, dt, comp, seed=0):
    make_kind = KINDS[kind][0]
    rng = np.random.default_rng(seed)
    op, ref = COMPOSITES[comp](lambda M: make_kind(M, be), rng, dt, be)
    return op, ref.astype(dt), rng


def _vdot(u, v):
    return np.sum(np.conj(u) * v, axis=-1)


@pytest.mark.parametrize("kind, be, dt, comp", list(_cases()))
def test_dot_test_and_dense_matrix(kind, be, dt, comp):
    op, ref, rng = _build(kind, be, dt, comp)
    m, n = ref.shape
    assert op.shape == (m, n)
    x, y = _rand(rng, (n,), dt), _rand(rng, (m,), dt)
    Ax = op.matvec(_to(be, x))
    AHy = op.rmatvec(_to(be, y))
    assert lb.backend_name(Ax) == lb.backend_name(_to(be, x))
    assert Ax.dtype == _to(be, x).dtype and AHy.dtype == Ax.dtype
    scale = np.linalg.norm(ref) * np.linalg.norm(x) * np.linalg.norm(y)
    # <A x, y> = <x, A^H y>
    lhs, rhs = _vdot(y, _np(Ax)), _vdot(_np(AHy), x)
    assert abs(lhs - rhs) <= _tol(dt) * scale
    # ... and both are the products with the matrix the operator stands for.
    np.testing.assert_allclose(_np(Ax), ref @ x, rtol=0, atol=_tol(dt) * np.linalg.norm(ref) * np.linalg.norm(x))
    np.testing.assert_allclose(_np(AHy), ref.conj().T @ y, rtol=0, atol=_tol(dt) * np.linalg.norm(ref) * np.linalg.norm(y))


@pytest.mark.parametrize("kind, be, dt, comp", list(_cases()))
def test_batched_product_equals_rowwise(kind, be, dt, comp):
    op, ref, rng = _build(kind, be, dt, comp, seed=1)
    m, n = ref.shape
    X, Y = _rand(rng, (3, n), dt), _rand(rng, (3, m), dt)
    AX, AHY = _np(op.matvec(_to(be, X))), _np(op.rmatvec(_to(be, Y)))
    assert AX.shape == (3, m) and AHY.shape == (3, n)
    atol = _tol(dt) * np.linalg.norm(ref) * 10
    for i in range(3):
        np.testing.assert_allclose(AX[i], _np(op.matvec(_to(be, X[i]))), rtol=0, atol=atol)
        np.testing.assert_allclose(AHY[i], _np(op.rmatvec(_to(be, Y[i]))), rtol=0, atol=atol)
    np.testing.assert_allclose(AX, X @ ref.T, rtol=0, atol=atol)


@pytest.mark.parametrize("be", backend_params())
@pytest.mark.parametrize("comp", ["plain", "T", "H", "I-J.T", "nested", "matmul"])
def test_to_dense_equals_matrix(be, comp):
    op, ref, _ = _build("closure", be, np.complex128, comp, seed=2)
    np.testing.assert_allclose(_np(op.to_dense()), ref, atol=1e-12)


@pytest.mark.parametrize("be", backend_params())
@pytest.mark.parametrize("dt", DTYPES)
def test_identity_operator(be, dt):
    n = 4
    I = _eye_like(n, be, dt)
    rng = np.random.default_rng(3)
    x, y = _rand(rng, (n,), dt), _rand(rng, (n,), dt)
    assert abs(_vdot(y, _np(I.matvec(_to(be, x)))) - _vdot(_np(I.rmatvec(_to(be, y))), x)) <= 1e-5
    np.testing.assert_array_equal(_np(I.to_dense()), np.eye(n))
    for op, ref in [(I.T, np.eye(n)), (I.H, np.eye(n)), (2.0 * I - I, np.eye(n)), (I @ I / 2, np.eye(n) / 2)]:
        np.testing.assert_allclose(_np(op.to_dense()), ref, atol=1e-6)
    X = _rand(rng, (3, n), dt)
    np.testing.assert_array_equal(_np(I.matvec(_to(be, X))), X)


@needs_torch
@needs_strict
def test_identity_without_like_adopts_the_vector():
    I = lr.IdentityOperator(3)
    for v in (np.arange(3.0), torch.arange(3.0), xs.asarray([0.0, 1.0, 2.0])):
        assert lb.backend_name(I @ v) == lb.backend_name(v)
    np.testing.assert_array_equal(I.to_dense(like=np.zeros(1)), np.eye(3))


def test_mixed_kinds_compose_on_numpy():
    rng = np.random.default_rng(4)
    M1, M2, M3 = (rng.standard_normal((4, 4)) for _ in range(3))
    op = lr.aslinearoperator(M1) + lr.aslinearoperator(sp.csr_matrix(M2)) @ _closure(M3, "numpy").T
    np.testing.assert_allclose(op.to_dense(like=np.zeros(1)), M1 + M2 @ M3.T, atol=1e-12)


@pytest.mark.parametrize("be", backend_params(("numpy", "torch")))
def test_matrices_on_the_left_become_operators(be):
    rng = np.random.default_rng(5)
    M, N = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    A = lr.aslinearoperator(_to(be, M))
    for op, ref in [(_to(be, N) - A, N - M), (_to(be, N) + A, N + M), (A - _to(be, N), M - N),
                    (2.0 * A, 2.0 * M), (lr.aslinearoperator(_to(be, N)) @ A, N @ M)]:
        assert isinstance(op, lr.LinearOperator)
        np.testing.assert_allclose(_np(op.to_dense()), ref, atol=1e-12)
    A = lr.aslinearoperator(M)
    for op, ref in [(sp.csr_matrix(N) - A, N - M), (sp.csr_matrix(N) @ A, N @ M), (A @ sp.csr_matrix(N), M @ N)]:
        assert isinstance(op, lr.LinearOperator)
        np.testing.assert_allclose(op.to_dense(like=np.zeros(1)), ref, atol=1e-12)
    # A 2-D array on either side of @ could be a matrix or a batch of vectors: refused with advice.
    for f in (lambda: A @ N, lambda: N @ A):
        with pytest.raises(lr.OperatorMismatchError, match="aslinearoperator"):
            f()


def test_transpose_of_transpose_is_the_operator():
    A = lr.aslinearoperator(np.ones((2, 3)))
    assert A.T.T is A and A.H.H is A


def test_complex_transpose_is_not_conjugated():
    rng = np.random.default_rng(6)
    M = _rand(rng, (3, 2), np.complex128)
    for A in (lr.aslinearoperator(M), _closure(M, "numpy"), lr.aslinearoperator(sp.csr_matrix(M))):
        np.testing.assert_allclose(A.T.to_dense(like=np.zeros(1, complex)), M.T, atol=1e-14)
        np.testing.assert_allclose(A.H.to_dense(like=np.zeros(1, complex)), M.conj().T, atol=1e-14)
        np.testing.assert_allclose((1j * A).H.to_dense(like=np.zeros(1, complex)), (1j * M).conj().T, atol=1e-14)


# -------------------------------------------------------------------------------------------
# to_scipy


@pytest.mark.parametrize("factory", ["dense", "rbp", "closure"])
def test_to_scipy_runs_scipy_gmres_and_counts(factory):
    rng = np.random.default_rng(7)
    n = 8
    J = random_contractive(n, rho=0.5, seed=7)
    calls = []

    def mv(x):
        calls.append(1)
        return x - x @ J  # row convention: (I - J^T) x

    if factory == "dense":
        A, ref = lr.aslinearoperator(np.eye(n) - J.T), np.eye(n) - J.T
    elif factory == "rbp":
        A, ref = lr.IdentityOperator(n, like=np.zeros(n)) - lr.aslinearoperator(J).T, np.eye(n) - J.T
    else:
        A, ref = lr.LinearOperator((n, n), matvec=mv, like=np.zeros(n)), np.eye(n) - J.T
    b = rng.standard_normal(n)
    S = A.to_scipy()
    assert isinstance(S, spla.LinearOperator) and S.shape == (n, n)
    x, info = spla.gmres(S, b, rtol=1e-10, atol=0.0)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(ref, b), rtol=1e-7)
    assert A.matvec_count > 0
    if factory == "closure":
        assert A.matvec_count == len(calls)
        assert A.has_rmatvec is False
    else:
        # the transposed product through scipy is counted as an rmatvec
        r0 = A.rmatvec_count
        np.testing.assert_allclose(S.rmatvec(b), ref.T @ b, atol=1e-12)
        assert A.rmatvec_count == r0 + 1


@needs_torch
def test_to_scipy_refuses_other_backends():
    A = lr.aslinearoperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="to_scipy"):
        A.to_scipy()


# -------------------------------------------------------------------------------------------
# counters


def test_counters_of_a_plain_operator():
    A = lr.aslinearoperator(np.eye(3))
    assert (A.matvec_count, A.rmatvec_count) == (0, 0)
    A.matvec(np.ones(3))
    A @ np.ones(3)
    A.rmatvec(np.ones(3))
    assert (A.matvec_count, A.rmatvec_count) == (2, 1)
    A.matvec(np.ones((7, 3)))  # a batch is one product
    A.rmatvec(np.ones((7, 3)))
    assert (A.matvec_count, A.rmatvec_count) == (3, 2)
    A.reset_counters()
    assert (A.matvec_count, A.rmatvec_count) == (0, 0)


def test_counters_of_composites():
    J = lr.aslinearoperator(np.eye(3) * 0.5)
    K = lr.aslinearoperator(np.eye(3) * 0.25)
    J.T.matvec(np.ones(3))
    J.T.matvec(np.ones((4, 3)))
    assert (J.matvec_count, J.rmatvec_count) == (0, 2)
    J.T.rmatvec(np.ones(3))
    assert (J.matvec_count, J.rmatvec_count) == (1, 2)
    J.reset_counters()

    rbp = lr.IdentityOperator(3, like=np.zeros(3)) - J.T
    rbp.matvec(np.ones((5, 3)))
    assert (rbp.matvec_count, J.matvec_count, J.rmatvec_count) == (1, 0, 1)
    rbp.rmatvec(np.ones(3))
    assert (rbp.rmatvec_count, J.matvec_count, J.rmatvec_count) == (1, 1, 1)
    J.reset_counters()

    prod = (J @ K) + 2.0 * J
    prod.matvec(np.ones(3))
    assert (J.matvec_count, K.matvec_count, J.rmatvec_count, K.rmatvec_count) == (2, 1, 0, 0)
    prod.rmatvec(np.ones(3))
    assert (J.matvec_count, K.matvec_count, J.rmatvec_count, K.rmatvec_count) == (2, 1, 2, 1)
    J.reset_counters()
    assert (J.matvec_count, J.rmatvec_count) == (0, 0)
    assert K.matvec_count == 1  # resetting one operator leaves the others alone


def test_to_dense_costs_one_batched_product():
    fn_calls = []
    A = lr.LinearOperator((4, 4), matvec=lambda x: fn_calls.append(1) or 2.0 * x, like=np.zeros(4))
    np.testing.assert_array_equal(A.to_dense(), 2.0 * np.eye(4))
    assert A.matvec_count == 1 and len(fn_calls) == 1


# -------------------------------------------------------------------------------------------
# bad input: TypeError / ValueError naming the argument, never AttributeError / IndexError

_M = np.arange(12.0).reshape(4, 3)


def _A():
    return lr.aslinearoperator(_M)


def _At():
    return lr.aslinearoperator(torch.from_numpy(_M))


def _no_rmv():
    return lr.LinearOperator((4, 3), matvec=lambda x: x @ _M.T, like=np.zeros(3))


BAD = {
    "vector of wrong length": (lambda: _A().matvec(np.ones(4)), lr.OperatorMismatchError, r"x must have shape \(3,\)"),
    "rmatvec vector of wrong length": (lambda: _A().rmatvec(np.ones(3)), lr.OperatorMismatchError, r"y must have shape \(4,\)"),
    "3-D vector": (lambda: _A().matvec(np.ones((2, 2, 3))), lr.OperatorMismatchError, "x must have shape"),
    "0-D vector": (lambda: _A().matvec(np.float64(1.0)), lr.OperatorMismatchError, "x must have shape"),
    "@ with a 2-D array": (lambda: _A() @ np.ones((3, 2)), lr.OperatorMismatchError, "A @ v"),
    "vector dtype": (lambda: _A().matvec(np.ones(3, np.float32)), TypeError, "x has dtype float32"),
    "torch vector dtype": (lambda: _At().matvec(torch.ones(3)), TypeError, "x has dtype torch.float32"),
    "vector device": (lambda: _At().matvec(torch.ones(3, dtype=torch.float64, device="meta")), lr.OperatorMismatchError, "x is on device meta"),
    "torch vector, numpy operator": (lambda: _A().matvec(torch.ones(3, dtype=torch.float64)), TypeError, "x is a torch array"),
    "numpy vector, torch operator": (lambda: _At().rmatvec(np.ones(4)), TypeError, "y is a numpy array"),
    "strict vector, numpy operator": (lambda: _A().matvec(xs.ones(3, dtype=xs.float64)), TypeError, "x is a array_api_strict array"),
    "list vector": (lambda: _A().matvec([1.0, 2.0, 3.0]), TypeError, "x must be an array"),
    "transpose without rmatvec": (lambda: _no_rmv().T, lr.MissingRmatvecError, "pass rmatvec="),
    "conjugate transpose without rmatvec": (lambda: _no_rmv().H, lr.MissingRmatvecError, "pass rmatvec="),
    "rmatvec without rmatvec": (lambda: _no_rmv().rmatvec(np.ones(4)), lr.MissingRmatvecError, "pass rmatvec="),
    "composite rmatvec without rmatvec": (lambda: (2.0 * _no_rmv()).rmatvec(np.ones(4)), lr.MissingRmatvecError, "pass rmatvec="),
    "scipy operator without rmatvec": (lambda: lr.aslinearoperator(spla.LinearOperator((4, 3), matvec=lambda x: _M @ x)).T, lr.MissingRmatvecError, "rmatvec"),
    "matvec not callable": (lambda: lr.LinearOperator((4, 3), matvec=3.0), TypeError, "matvec must be callable"),
    "rmatvec not callable": (lambda: lr.LinearOperator((4, 3), matvec=abs, rmatvec="no"), TypeError, "rmatvec must be callable"),
    "matvec missing": (lambda: lr.LinearOperator((4, 3)), TypeError, "matvec must be given"),
    "shape not a pair": (lambda: lr.LinearOperator((4,), matvec=abs), ValueError, "shape must be"),
    "shape not integers": (lambda: lr.LinearOperator("ab", matvec=abs), TypeError, "shape must be"),
    "negative shape": (lambda: lr.LinearOperator((4, -1), matvec=abs), ValueError, "shape must be"),
    "like not an array": (lambda: lr.LinearOperator((4, 3), matvec=abs, like=[0.0]), TypeError, "like must be an array"),
    "identity size": (lambda: lr.IdentityOperator(2.5), TypeError, "n must be"),
    "identity like": (lambda: lr.IdentityOperator(2, like="x"), TypeError, "like must be"),
    "string as operator": (lambda: lr.aslinearoperator("abc"), TypeError, "A must be"),
    "list as operator": (lambda: lr.aslinearoperator([[1.0, 0.0], [0.0, 1.0]]), TypeError, "A must be"),
    "1-D array as operator": (lambda: lr.aslinearoperator(np.ones(3)), ValueError, "A must be a 2-D"),
    "3-D array as operator": (lambda: lr.aslinearoperator(np.ones((2, 2, 2))), ValueError, "A must be a 2-D"),
    "3-D torch array as operator": (lambda: lr.aslinearoperator(torch.ones(2, 2, 2)), ValueError, "A must be a 2-D"),
    "integer matrix": (lambda: lr.aslinearoperator(np.ones((2, 2), dtype=int)), TypeError, "matrix must have a floating dtype"),
    "integer sparse matrix": (lambda: lr.aslinearoperator(sp.eye(3, dtype=int, format="csr")), TypeError, "sparse matrix must have a floating dtype"),
    "3-D torch sparse": (lambda: lr.aslinearoperator(torch.ones(2, 2, 2).to_sparse()), ValueError, "sparse tensor must be 2-D"),
    "add mismatched shapes": (lambda: _A() + lr.aslinearoperator(_M.T.copy()), lr.OperatorMismatchError, r"shapes \(4, 3\) and \(3, 4\)"),
    "subtract mismatched shapes": (lambda: lr.IdentityOperator(3) - _A(), lr.OperatorMismatchError, "cannot subtract"),
    "compose mismatched shapes": (lambda: _A() @ _A(), lr.OperatorMismatchError, "inner sizes 3 and 4"),
    "compose with sparse matrix of wrong shape": (lambda: sp.eye(2, format="csr") @ _A(), lr.OperatorMismatchError, "cannot compose"),
    "combine backends": (lambda: _A() + lr.aslinearoperator(torch.from_numpy(_M)), TypeError, "numpy and torch"),
    "combine devices": (lambda: _At() + lr.aslinearoperator(torch.ones(4, 3, dtype=torch.float64, device="meta")), lr.OperatorMismatchError, "cpu and meta"),
    "combine dtypes": (lambda: _At() - lr.aslinearoperator(torch.ones(4, 3)), lr.OperatorMismatchError, "different dtypes"),
    "add a number": (lambda: _A() + 1.0, TypeError, "unsupported operand"),
    "multiply by a vector": (lambda: np.ones(4) * _A(), TypeError, "unsupported operand"),
    "matvec returns wrong shape": (lambda: lr.LinearOperator((4, 3), matvec=lambda x: x).matvec(np.ones(3)), lr.OperatorMismatchError, r"matvec returned shape \(3,\)"),
    "rmatvec returns wrong shape": (lambda: lr.LinearOperator((4, 3), matvec=abs, rmatvec=lambda y: y).rmatvec(np.ones(4)), lr.OperatorMismatchError, "rmatvec returned shape"),
    "matvec returns None": (lambda: lr.LinearOperator((4, 3), matvec=lambda x: None).matvec(np.ones(3)), lr.OperatorMismatchError, "matvec returned NoneType"),
    "to_dense without backend": (lambda: lr.LinearOperator((2, 2), matvec=abs).to_dense(), TypeError, "like="),
}


def _bad_params():
    for name, (fn, _, _) in BAD.items():
        names = set(fn.__code__.co_names)
        marks = [needs_torch] if names & {"torch", "_At"} else []
        marks += [needs_strict] if "xs" in names else []
        yield pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", list(_bad_params()))
def test_bad_input_gets_a_clear_error(name):
    fn, exc, pattern = BAD[name]
    assert issubclass(exc, (TypeError, ValueError))
    with pytest.raises(exc, match=pattern):
        fn()


def test_error_subclasses():
    assert issubclass(lr.MissingRmatvecError, TypeError)
    assert issubclass(lr.OperatorMismatchError, ValueError)


def test_has_rmatvec():
    assert _A().has_rmatvec and _no_rmv().has_rmatvec is False
    assert (2.0 * _no_rmv()).has_rmatvec is False
    assert (_A() + _no_rmv()).has_rmatvec is False
    assert lr.aslinearoperator(spla.aslinearoperator(_M)).has_rmatvec
    assert not lr.aslinearoperator(spla.LinearOperator((4, 3), matvec=lambda x: _M @ x)).has_rmatvec


# -------------------------------------------------------------------------------------------
# backend


@needs_torch
@needs_strict
def test_backend_namespace_device_dtype():
    a, t, s = np.zeros(2), torch.zeros(2, dtype=torch.float64), xs.zeros(2, dtype=xs.float64)
    for arr in (a, t, s):
        xp = lb.array_namespace(arr)
        assert xp.isdtype(arr.dtype, "real floating")
        assert lb.is_floating_dtype(xp, arr.dtype) and not lb.is_complex_dtype(xp, arr.dtype)
        assert lb.is_array(arr) and not lb.is_sparse(arr)
    assert [lb.backend_name(v) for v in (a, t, s)] == ["numpy", "torch", "array_api_strict"]
    assert str(lb.device_of(a)) == "cpu" and lb.device_of(t) == torch.device("cpu")
    assert lb.same_device(t, torch.zeros(1)) and not lb.same_device(t, torch.zeros(1, device="meta"))
    xp = lb.array_namespace(t)
    assert lb.real_dtype(xp, torch.complex64) == torch.float32
    assert lb.real_dtype(xp, torch.complex128) == torch.float64
    assert lb.real_dtype(xp, torch.float32) == torch.float32
    assert lb.is_complex_dtype(lb.array_namespace(a), np.complex64)
    assert not lb.is_floating_dtype(lb.array_namespace(a), np.int64)
    assert lb.is_sparse(sp.eye(2, format="csr")) and lb.is_sparse(torch.eye(2).to_sparse())
    assert not lb.is_array(sp.eye(2, format="csr")) and not lb.is_array([1.0])
    with pytest.raises(TypeError):
        lb.array_namespace(np.zeros(1), torch.zeros(1))


@needs_torch
@needs_strict
def test_to_numpy_shares_memory_with_cpu_torch():
    t = torch.arange(4, dtype=torch.float64)
    a = lb.to_numpy(t)
    assert isinstance(a, np.ndarray)
    t[0] = 42.0
    assert a[0] == 42.0
    tc = torch.tensor([1 + 2j]).conj()  # a lazily conjugated view is resolved, not dropped
    assert lb.to_numpy(tc)[0] == 1 - 2j
    tg = torch.ones(2, requires_grad=True)
    np.testing.assert_array_equal(lb.to_numpy(tg * 2), [2.0, 2.0])
    n = np.ones(2)
    assert lb.to_numpy(n) is n
    np.testing.assert_array_equal(lb.to_numpy(xs.asarray([1.0, 2.0])), [1.0, 2.0])


@needs_torch
@needs_strict
def test_from_numpy_round_trips():
    a = np.arange(5.0)
    t = lb.from_numpy(a, torch.zeros(1, dtype=torch.float64))
    assert lb.is_torch_array(t) and t.dtype == torch.float64
    a[1] = -1.0
    assert t[1] == -1.0  # CPU torch shares memory
    np.testing.assert_array_equal(lb.to_numpy(t), a)
    assert lb.from_numpy(a, np.zeros(1)) is a
    s = lb.from_numpy(a, xs.zeros(1))
    assert lb.backend_name(s) == "array_api_strict"
    np.testing.assert_array_equal(lb.to_numpy(s), a)
    f = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(lb.to_numpy(lb.from_numpy(f, torch.zeros(1))), f)


def test_has_module_and_import_optional():
    assert lb.has_module("numpy") and lb.has_module("scipy.sparse")
    assert not lb.has_module("linsolve_rbp_no_such_module")
    assert not lb.has_module("linsolve_rbp_no_such_module.sub")
    with pytest.raises(ImportError, match=r"pip install"):
        lb.import_optional("linsolve_rbp_no_such_module", "a test feature")


@needs_torch
def test_torch_cupy_bridges_refuse_wrong_input():
    with pytest.raises((TypeError, ValueError, ImportError)):
        lb.torch_to_cupy(torch.zeros(2))
    with pytest.raises((TypeError, ImportError)):
        lb.cupy_to_torch(np.zeros(2))


def test_import_does_not_import_torch():
    code = "import sys, linsolve_rbp; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_without_warnings():
    code = "import warnings; warnings.simplefilter('error'); import linsolve_rbp"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
