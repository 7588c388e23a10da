"""Shared test helpers: the same matrix as a dense, sparse or closure operator on numpy, torch
or array_api_strict."""

import numpy as np
import pytest
import scipy.sparse as sp

import linsolve_rbp as lr

torch = pytest.importorskip("torch")
xps = pytest.importorskip("array_api_strict")

RTOL = {np.float32: 1e-4, np.float64: 1e-8}

CASES = [
    (backend, kind)
    for backend in ("numpy", "torch", "array_api_strict")
    for kind in ("dense", "sparse", "closure")
    if not (backend == "array_api_strict" and kind == "sparse")
]


def to_backend(a, backend):
    """A copy of numpy array ``a`` in ``backend`` (numpy is returned as is)."""
    if backend == "numpy":
        return a
    if backend == "torch":
        return torch.from_numpy(np.array(a))
    return xps.asarray(a)


def make_operator(kind, M, backend, rmatvec=True):
    """The matrix ``M`` (numpy) as an operator of kind dense / sparse / closure; the closure
    has an rmatvec only when ``rmatvec`` is true."""
    if kind == "sparse":
        if backend == "numpy":
            return sp.csr_matrix(M)
        return torch.from_numpy(np.array(M)).to_sparse_csr()
    Mb = to_backend(M, backend)
    if kind == "dense":
        return Mb
    MT = to_backend(np.ascontiguousarray(M.T), backend)
    like = to_backend(np.zeros(M.shape[1], dtype=M.dtype), backend)
    rmv = (lambda y: y @ Mb) if rmatvec else None
    return lr.LinearOperator(M.shape, matvec=lambda x: x @ MT, rmatvec=rmv, like=like)


def rel_residual(A, x, b):
    """``||b - A x|| / ||b||`` in float64, for numpy ``A`` and numpy or converted ``x``."""
    A, x, b = (np.asarray(v, dtype=np.float64) for v in (A, x, b))
    return np.linalg.norm(b - A @ x) / np.linalg.norm(b)
