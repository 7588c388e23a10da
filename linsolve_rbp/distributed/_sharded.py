"""Operators over sharded vectors: rank ``r`` holds rows ``offset_r .. offset_r + n_r - 1`` of
the matrix and the same entries of every vector."""

from __future__ import annotations

from .. import backend as _b
from ..operators import LinearOperator
from ._engines import Reduction

__all__ = ["row_sharded"]


def row_sharded(A_local, reduction, *, sizes=None, symmetric=None, like=None) -> LinearOperator:
    """The operator of a square matrix whose rows are split over the ranks of ``reduction``,
    acting on vectors split the same way.

    Rank ``r`` holds the block of rows ``A_local`` (shape ``(n_r, n)``, ``n = sum n_r``), and
    of every vector the ``n_r`` entries of those rows. The product all-gathers the vector
    (one :meth:`~linsolve_rbp.distributed.Reduction.allgather`) and multiplies by the local
    rows; the adjoint product multiplies by the local rows' conjugate transpose and sums the
    ``(n,)`` partial results over the ranks (one all-reduce), keeping this rank's entries.
    A sparse operator is better served by exchanging only the halo (the entries its rows
    touch): see the distributed solves guide.

    Parameters
    ----------
    A_local : array or sparse matrix, shape (n_r, n)
        This rank's rows: numpy, scipy.sparse, torch (dense or sparse) or cupy.
    reduction : Reduction
        The ranks (:class:`TorchDistributed`, :class:`MPI`, a rank of :class:`Simulated`).
    sizes : sequence of int, optional
        ``n_r`` of every rank; found with one all-gather when not given.
    symmetric : bool or None
        The structure tag of the global matrix (cg and minres need True or None).
    like : array, optional
        An array of the vectors' backend, device and dtype (default: a column of
        ``A_local``'s kind).

    Returns
    -------
    LinearOperator
        Of shape ``(n_r, n_r)`` (the local shard of the global ``(n, n)`` operator), to pass to
        :func:`linsolve_rbp.solve` with ``reduction=reduction``.
    """
    if not isinstance(reduction, Reduction):
        raise TypeError(
            "reduction must be a reduction of linsolve_rbp.distributed (TorchDistributed(group), "
            f"MPI(comm), Simulated(n)[rank], Local()), got {type(reduction).__name__}"
        )
    shape = getattr(A_local, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"A_local must be a 2-D block of rows, got shape {shape}")
    n_r, n = shape
    if like is None:
        like = _dense_row(A_local)
    xp = _b.array_namespace(like)
    if sizes is None:
        counts = reduction.allgather(xp, xp.asarray([float(n_r)], device=_b.device_of(like)), sizes=[1] * reduction.size)
        sizes = [int(c) for c in _b.to_numpy(counts).tolist()]
    sizes = [int(s) for s in sizes]
    if len(sizes) != reduction.size or sum(sizes) != n or sizes[reduction.rank] != n_r:
        raise ValueError(
            f"sizes {sizes} must give the rows of each of the {reduction.size} ranks, summing "
            f"to the matrix's {n} columns, with this rank's {n_r}"
        )
    start = sum(sizes[: reduction.rank])
    AH = _conj_t(A_local)

    def apply(M, v):
        if v.ndim == 1:
            return M @ v
        return xp.permute_dims(M @ xp.permute_dims(v, (1, 0)), (1, 0))

    def matvec(x):
        return apply(A_local, reduction.allgather(xp, x, sizes=sizes))

    def rmatvec(y):
        (w,) = reduction._reduce(xp, (apply(AH, y),), "sum")
        reduction.allreduces -= 1  # the operator's collective, not the solver's
        return w[..., start:start + n_r]

    return LinearOperator((n_r, n_r), matvec=matvec, rmatvec=rmatvec, like=like, symmetric=symmetric)


def _is_torch(A) -> bool:
    return type(A).__module__.startswith("torch")


def _dense_row(A):
    """A zero vector of ``A``'s backend, device and dtype."""
    if _is_torch(A):  # dense or sparse
        import torch

        return torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    if _b.is_array(A):
        xp = _b.array_namespace(A)
        return xp.zeros((A.shape[0],), dtype=A.dtype, device=_b.device_of(A))
    import numpy as np  # scipy.sparse

    return np.zeros(A.shape[0], dtype=A.dtype)


def _conj_t(A):
    """``A^H``, in ``A``'s kind (a CSR matrix for scipy and torch sparse ones)."""
    if _is_torch(A):
        import torch

        if A.layout != torch.strided:
            At = A.to_sparse_coo().t().coalesce()
            At = At.conj().resolve_conj() if A.is_complex() else At
            return At.to_sparse_csr()
        return A.mH
    if not _b.is_array(A):  # scipy.sparse, cupyx.scipy.sparse
        return A.conj().T.tocsr()
    xp = _b.array_namespace(A)
    At = xp.permute_dims(A, (1, 0))
    return xp.conj(At) if xp.isdtype(A.dtype, "complex floating") else At
