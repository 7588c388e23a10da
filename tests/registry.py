"""The test registry shared by the solver tests.

* Backends are pytest parameters: ``backend_params()`` / ``method_params()`` give each backend
  a skip mark of its own when its library is missing, so that a numpy + scipy install runs
  every test that needs neither torch nor array_api_strict. Tests that need torch for a
  reason other than a backend parameter use ``needs_torch`` (or ``pytest.importorskip``).
* The methods and their capabilities come from the solver classes (``solver(name)`` is
  ``lr.get_method(name)``; ``methods_where(needs_symmetric=True)`` ...), never from copies.
* One ``to_backend``, one ``RTOL`` table, and the operator factories.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp

import linsolve_rbp as lr
from linsolve_rbp import backend as lb


def optional(name):
    """The module ``name``, or None when it is not installed."""
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


torch = optional("torch")
xs = optional("array_api_strict")

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
needs_strict = pytest.mark.skipif(xs is None, reason="needs array_api_strict")
BACKEND_MARKS = {"numpy": [], "torch": [needs_torch], "strict": [needs_strict],
                 "cuda": [needs_torch, pytest.mark.gpu]}
BACKENDS = ("numpy", "torch", "strict")

RTOL = {np.float32: 1e-4, np.float64: 1e-8}
EPS = {np.float32: float(np.finfo(np.float32).eps), np.float64: float(np.finfo(np.float64).eps)}

# ------------------------------------------------------------------------------------ methods

METHODS = tuple(lr.methods())
BRIDGES = tuple(m for m in METHODS if m.startswith("scipy."))
OWN = tuple(m for m in METHODS if m not in BRIDGES)


def solver(method):
    """The solver object of ``method``: its class attributes are the method's capabilities."""
    return lr.get_method(method)


def methods_where(methods=METHODS, **capabilities):
    """The methods whose solver has every given capability value."""
    return tuple(m for m in methods if all(getattr(solver(m), k) == v for k, v in capabilities.items()))


def backends_of(method, cuda=False):
    """The backends a method is tested on: the scipy bridges hand numpy to scipy, so numpy and
    torch CPU show everything about them; the package's own methods run on every backend
    (CUDA torch tensors on GPU runs, where ``cuda`` is asked)."""
    if method in BRIDGES:
        return ("numpy", "torch")
    return BACKENDS + (("cuda",) if cuda else ())


def param(*values, backend, id=None, marks=()):
    """``pytest.param(*values)`` carrying the skip marks of ``backend``."""
    return pytest.param(*values, id=id, marks=[*BACKEND_MARKS[backend], *marks])


def backend_params(backends=BACKENDS):
    """Parameters for ``@pytest.mark.parametrize("be", ...)``."""
    return [param(be, backend=be, id=be) for be in backends]


def method_params(methods=METHODS, cuda=False):
    """``(method, be)`` parameters: every method on each of its backends."""
    return [param(m, be, backend=be, id=f"{m}-{be}") for m in methods for be in backends_of(m, cuda)]


# ------------------------------------------------------------------------------------ arrays


def to_backend(a, be, dtype=None):
    """A copy of numpy array (or scipy.sparse matrix) ``a`` in backend ``be`` ("numpy", "torch",
    "strict", "cuda"): sparse becomes scipy CSR or torch sparse CSR."""
    if sp.issparse(a):
        a = a.tocsr(copy=True)
        if be == "numpy":
            return a if dtype is None else a.astype(dtype)
    else:
        a = np.array(a, dtype=dtype, copy=True)
    if be == "strict":
        return xs.asarray(a)
    if be in ("torch", "cuda"):
        return lb.to_backend(a, "torch", dtype=dtype, device="cuda" if be == "cuda" else None)
    return lb.to_backend(a, be, dtype=dtype)


def to_np(a):
    """A numpy copy of an array of any backend."""
    return np.array(lb.to_numpy(a), copy=True)


def rel_residual(A, x, b):
    """``||b - A x|| / ||b||`` in float64, for numpy ``A`` and an ``x`` of any backend."""
    A, x, b = (np.asarray(to_np(v) if lb.is_array(v) else v, dtype=np.float64) for v in (A, x, b))
    return np.linalg.norm(b - A @ x) / np.linalg.norm(b)


def assert_like(x, b, n):
    """``x`` has the backend, device and dtype of ``b`` and the operator's column size."""
    assert lb.backend_name(x) == lb.backend_name(b)
    assert lb.same_device(x, b)
    assert x.dtype == b.dtype
    assert tuple(x.shape) == tuple(b.shape[:-1]) + (n,)


# ------------------------------------------------------------------------------------ matrices


def spd(n, lo=0.3, hi=1.7, seed=0, geom=False):
    """Symmetric with eigenvalues spread over [lo, hi] (geometrically if ``geom``), and its
    eigenvectors. The default, [0.3, 1.7], is a contraction for fixed-point iteration."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * (np.geomspace(lo, hi, n) if geom else np.linspace(lo, hi, n))) @ Q.T
    return (A + A.T) / 2, Q


def nonsymmetric(n, seed, shift):
    """``shift I`` plus a random matrix with a strong skew-symmetric part."""
    rng = np.random.default_rng(seed)
    R, K = rng.standard_normal((n, n)) / np.sqrt(n), rng.standard_normal((n, n)) / np.sqrt(n)
    return shift * np.eye(n) + 0.3 * R + 1.2 * (K - K.T)


def rectangular(m, n, seed):
    """Full rank ``m x n`` with singular values in [1, 3]."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (U * np.linspace(1.0, 3.0, n)) @ V.T


# ------------------------------------------------------------------------------------ operators


def _closure(A, be, like, rmatvec):
    M = to_backend(A, be)
    MT = lb.array_namespace(M).matrix_transpose(M)
    if like is None:
        like = to_backend(np.zeros(A.shape[1], dtype=A.dtype), be)
    # Row-vector convention: x @ M^T is M x for a vector and for every row of a batch.
    return lr.LinearOperator(A.shape, matvec=lambda x: x @ MT,
                             rmatvec=(lambda y: y @ M) if rmatvec else None, like=like)


def _rbp(A, be, like):
    # A = I - J^T is given; rebuild it the way RBP does, from J.
    n = A.shape[0]
    like = to_backend(np.zeros(n, dtype=A.dtype), be) if like is None else like
    J = (np.eye(n, dtype=A.dtype) - A).T
    return lr.IdentityOperator(n, like=like) - lr.aslinearoperator(to_backend(J, be)).T


#: kind -> (factory(A, be, like), backends it exists on)
KINDS = {
    "dense": (lambda A, be, like: lr.aslinearoperator(to_backend(A, be)), BACKENDS + ("cuda",)),
    "sparse": (lambda A, be, like: lr.aslinearoperator(to_backend(sp.csr_matrix(A), be)), ("numpy", "torch", "cuda")),
    "closure": (lambda A, be, like: _closure(A, be, like, True), BACKENDS + ("cuda",)),
    "closure_no_rmatvec": (lambda A, be, like: _closure(A, be, like, False), BACKENDS + ("cuda",)),
    "rbp": (_rbp, BACKENDS + ("cuda",)),
}
#: (backend, kind) pairs of the dense, sparse and closure operators
OPERATOR_CASES = [(be, kind) for kind in ("dense", "sparse", "closure") for be in BACKENDS
                  if be in KINDS[kind][1]]


def make_operator(kind, A, be, like=None):
    """The numpy matrix ``A`` as an operator of ``kind`` (see ``KINDS``) on backend ``be``."""
    return KINDS[kind][0](A, be, like)


def operator_params(*values_before):
    """``(backend, kind)`` parameters, each with its backend's skip mark."""
    return [param(*values_before, be, kind, backend=be, id=f"{be}-{kind}") for be, kind in OPERATOR_CASES]
