"""Operators over explicit matrices: dense arrays of any array-API backend, scipy / cupyx sparse
matrices, torch sparse tensors, and scipy ``LinearOperator`` objects; and
:func:`aslinearoperator`, which picks the right one."""

from __future__ import annotations

from .. import backend as _b
from .base import LinearOperator

__all__ = [
    "aslinearoperator",
    "DenseOperator",
    "SparseOperator",
    "TorchSparseOperator",
    "ScipyOperator",
]


#: Dense matrices up to this size get their ``symmetric`` tag from a comparison with their
#: conjugate transpose (O(n^2), on first use); larger ones are tagged None (unknown).
SYMMETRY_CHECK_MAX_N = 4096


def _tiny(xp, dtype):
    """The relative asymmetry tolerated in a "symmetric" matrix: sqrt(eps), so that matrices
    formed as ``B @ B.T`` or ``(B + B.T) / 2`` in floating point count as symmetric."""
    try:
        return float(xp.finfo(_b.real_dtype(xp, dtype)).eps) ** 0.5
    except (TypeError, ValueError, AttributeError):
        return 1e-8


def _close_to_zero(diff, scale, tiny):
    """``diff <= tiny * scale`` for host floats; None when they are not finite."""
    if not (diff == diff and scale == scale) or scale == float("inf"):
        return None
    return bool(diff <= tiny * scale)


class _MatrixOperator(LinearOperator):
    """Operators over an explicit matrix: products act row by row on a batch, and the
    symmetry check's result is kept."""

    _cache_symmetric = True

    @property
    def rowwise(self):
        return True


def _apply(M, MT, x):
    """``M x`` for a vector, ``X M^T`` for a batch of row vectors."""
    if x.ndim == 1:
        return M @ x
    return x @ MT


class DenseOperator(_MatrixOperator):
    """A dense 2-D array (numpy, torch, cupy, array_api_strict, ...) as an operator."""

    def __init__(self, M):
        if M.ndim != 2:
            raise ValueError(f"M must be a 2-D array, got shape {tuple(M.shape)}")
        xp = _b.array_namespace(M)
        if not _b.is_floating_dtype(xp, M.dtype):
            raise TypeError(
                f"the dense matrix must have a floating dtype (float32, float64, complex64, complex128), "
                f"got {M.dtype}; cast it first"
            )
        self.M = M
        self._MT = xp.matrix_transpose(M)
        if _b.is_complex_dtype(xp, M.dtype):
            self._MH = xp.conj(self._MT)
            self._MHT = xp.conj(M)
        else:
            self._MH, self._MHT = self._MT, M
        self._setup(M.shape, dtype=M.dtype, xp=xp, device=_b.device_of(M), backend=_b.backend_name(M))

    def _matvec(self, x):
        return _apply(self.M, self._MT, x)

    def _rmatvec(self, x):
        return _apply(self._MH, self._MHT, x)

    def to_dense(self, like=None):
        return self.M

    def _detect_symmetric(self):
        m, n = self.shape
        if m != n:
            return False
        if n == 0:
            return True
        if n > SYMMETRY_CHECK_MAX_N:
            return None
        xp = _b.array_namespace(self.M)
        try:
            diff = float(xp.max(xp.abs(self.M - self._MH)))
            scale = float(xp.max(xp.abs(self.M)))
        except (TypeError, ValueError, RuntimeError):  # a backend without these reductions
            return None
        return _close_to_zero(diff, scale, _tiny(xp, self.M.dtype))


class SparseOperator(_MatrixOperator):
    """A scipy.sparse or cupyx.scipy.sparse matrix as an operator (stored as CSR)."""

    def __init__(self, S):
        S = S.tocsr()
        self.S = S
        self._SH = S.conj().T.tocsr() if S.dtype.kind == "c" else S.T.tocsr()
        data = S.data
        xp = _b.array_namespace(data)
        if not _b.is_floating_dtype(xp, data.dtype):
            raise TypeError(
                f"the sparse matrix must have a floating dtype, got {data.dtype}; "
                "cast it with .astype(float)"
            )
        self._setup(S.shape, dtype=data.dtype, xp=xp, device=_b.device_of(data), backend=_b.backend_name(data))

    @staticmethod
    def _sp(S, x):
        if x.ndim == 1:
            return S @ x
        return (S @ x.T).T

    def _matvec(self, x):
        return self._sp(self.S, x)

    def _rmatvec(self, x):
        return self._sp(self._SH, x)

    def to_dense(self, like=None):
        return self.S.toarray()

    def _detect_symmetric(self):
        m, n = self.shape
        if m != n:
            return False
        if self.S.nnz == 0:
            return True
        try:
            D = self.S - self._SH
            diff = float(abs(D).max()) if D.nnz else 0.0
            scale = float(abs(self.S).max())
        except (TypeError, ValueError, AttributeError, NotImplementedError):
            return None
        return _close_to_zero(diff, scale, _tiny(self.xp, self.dtype))


class TorchSparseOperator(_MatrixOperator):
    """A sparse torch tensor (COO or CSR) as an operator (stored as CSR)."""

    def __init__(self, S):
        torch = _b.import_optional("torch", "torch sparse operators")
        if S.ndim != 2:
            raise ValueError(f"the sparse tensor must be 2-D, got shape {tuple(S.shape)}")
        if not (S.dtype.is_floating_point or S.dtype.is_complex):
            raise TypeError(f"the sparse tensor must have a floating dtype, got {S.dtype}")
        coo = S.to_sparse_coo().coalesce() if S.layout != torch.sparse_coo else S.coalesce()
        self.S = coo.to_sparse_csr()
        ST = coo.t().coalesce()
        if S.dtype.is_complex:
            ST = ST.conj().resolve_conj()
        self._SH = ST.to_sparse_csr()
        dense_like = torch.empty(0, dtype=S.dtype, device=S.device)
        self._setup(
            tuple(S.shape), dtype=S.dtype, xp=_b.array_namespace(dense_like),
            device=S.device, backend="torch",
        )

    @staticmethod
    def _sp(S, x):
        if x.ndim == 1:
            return (S @ x[:, None])[:, 0]
        return (S @ x.T).T

    def _matvec(self, x):
        return self._sp(self.S, x)

    def _rmatvec(self, x):
        return self._sp(self._SH, x)

    def to_dense(self, like=None):
        return self.S.to_dense()

    def _detect_symmetric(self):
        m, n = self.shape
        if m != n:
            return False
        try:
            S = self.S.to_sparse_coo().coalesce()
            D = (S - self._SH.to_sparse_coo()).coalesce()
            if S.values().numel() == 0:
                return True
            diff = float(D.values().abs().max()) if D.values().numel() else 0.0
            scale = float(S.values().abs().max())
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            return None
        return _close_to_zero(diff, scale, _tiny(self.xp, self.dtype))


class ScipyOperator(_MatrixOperator):
    """A :class:`scipy.sparse.linalg.LinearOperator` (numpy data) as an operator."""

    def __init__(self, L):
        import numpy as np

        self.L = L
        dtype = np.dtype(L.dtype) if L.dtype is not None else np.dtype(np.float64)
        self._setup(L.shape, dtype=dtype, xp=_b.array_namespace(np.empty(0)), device="cpu", backend="numpy")

    @property
    def has_rmatvec(self) -> bool:
        from scipy.sparse.linalg import LinearOperator as SciPyLO

        L = self.L
        if getattr(L, "_CustomLinearOperator__rmatvec_impl", "n/a") is None:
            return False
        cls = type(L)
        return cls._rmatvec is not SciPyLO._rmatvec or cls._adjoint is not SciPyLO._adjoint

    def _matvec(self, x):
        if x.ndim == 1:
            return self.L.matvec(x).reshape(self.shape[0])
        return self.L.matmat(x.T).T

    def _rmatvec(self, x):
        if x.ndim == 1:
            return self.L.rmatvec(x).reshape(self.shape[1])
        return self.L.rmatmat(x.T).T


def aslinearoperator(A) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator`.

    Parameters
    ----------
    A : LinearOperator, array, sparse matrix or scipy LinearOperator
        A :class:`LinearOperator` (returned as is); a dense 2-D numpy, torch, cupy or array-API
        array; a scipy.sparse or cupyx.scipy.sparse matrix; a sparse torch tensor (COO or CSR);
        or a :class:`scipy.sparse.linalg.LinearOperator`.

    Returns
    -------
    LinearOperator
        An operator whose products run in ``A``'s own backend and device.

    Raises
    ------
    TypeError
        If ``A`` is none of the above.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp, linsolve_rbp as lr
    >>> A = lr.aslinearoperator(sp.eye(3, format="csr") * 2.0)
    >>> A @ np.ones(3)
    array([2., 2., 2.])
    """
    if isinstance(A, LinearOperator):
        return A
    if _b.is_sparse(A):
        if _b.is_torch_array(A):
            return TorchSparseOperator(A)
        return SparseOperator(A)
    mod = type(A).__module__
    if mod.startswith("scipy.sparse.linalg"):
        from scipy.sparse.linalg import LinearOperator as SciPyLO

        if isinstance(A, SciPyLO):
            return ScipyOperator(A)
    if type(A).__name__ == "matrix" and mod.startswith("numpy"):
        import numpy as np

        A = np.asarray(A)
    if _b.is_array(A):
        if A.ndim != 2:
            raise ValueError(f"A must be a 2-D matrix, got an array of shape {tuple(A.shape)}")
        return DenseOperator(A)
    raise TypeError(
        "A must be a linsolve_rbp.LinearOperator, a 2-D array (numpy, torch, cupy, array-API), "
        "a scipy/cupyx sparse matrix, a sparse torch tensor or a scipy LinearOperator; "
        f"got {type(A).__module__}.{type(A).__name__}"
    )
