"""The :class:`LinearOperator` algebra and operators over matrices and closures."""

from .base import IdentityOperator, LinearOperator, MissingRmatvecError, OperatorMismatchError
from .matrix import (
    DenseOperator,
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
