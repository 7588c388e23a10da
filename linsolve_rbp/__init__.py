"""linsolve_rbp: matrix-free linear solvers for implicit differentiation.

Solve ``(I - J^T) z = dL/dh*`` (recurrent back-propagation) and any other linear system with
fixed-point iteration, Neumann series, CG, CGNE, GMRES, BiCGStab, LSQR, MINRES or scipy's
solvers, on numpy, torch and cupy arrays, with results that say whether they converged.
"""

from ._result import ConvergenceWarning, SolveError, SolveResult, Status
from ._warnings import reset_convergence_warnings, show_all_convergence_warnings
from .operators import (
    IdentityOperator,
    LinearOperator,
    MissingRmatvecError,
    OperatorMismatchError,
    aslinearoperator,
)
from .solve import get_method, methods, register_method, solve

__version__ = "0.1.0"

__all__ = [
    "LinearOperator",
    "IdentityOperator",
    "aslinearoperator",
    "MissingRmatvecError",
    "OperatorMismatchError",
    "solve",
    "methods",
    "get_method",
    "register_method",
    "Status",
    "SolveResult",
    "SolveError",
    "ConvergenceWarning",
    "show_all_convergence_warnings",
    "reset_convergence_warnings",
    "__version__",
]
