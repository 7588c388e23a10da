"""The :class:`LinearOperator` algebra and operators over matrices and closures."""

from .base import (
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    MissingRmatvecError,
    OperatorMismatchError,
    ScipyOperator,
    SparseOperator,
    TorchSparseOperator,
    aslinearoperator,
)

__all__ = [
    "LinearOperator",
    "IdentityOperator",
    "MissingRmatvecError",
    "OperatorMismatchError",
    "DenseOperator",
    "SparseOperator",
    "TorchSparseOperator",
    "ScipyOperator",
    "aslinearoperator",
]
