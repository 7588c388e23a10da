"""Typed results of a solve: :class:`Status`, :class:`SolveResult`, :class:`SolveError`."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Status", "SolveResult", "SolveError", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """Warned when a solve whose result is used (for example a gradient) did not succeed."""


class Status(enum.Enum):
    """Why a solve stopped. Each value is a sentence a person can act on."""

    CONVERGED = "converged: the residual norm met max(rtol * ||b||, atol)"
    COMPLETED = (
        "completed the fixed budget of maxiter iterations (rtol=None, atol=None); "
        "the residual reached is reported but no tolerance was asked"
    )
    LEAST_SQUARES = (
        "least-squares solution: x minimises ||b - A x|| but does not solve the system (the "
        "residual misses max(rtol * ||b||, atol)); b is not in the range of A, or A is too ill "
        "conditioned for the tolerance. Pass least_squares=True if a least-squares solution is "
        "what you want, or loosen rtol/atol"
    )
    MAX_ITERATIONS = (
        "maximum number of iterations reached before the tolerance was met; raise maxiter, "
        "loosen rtol/atol, use a preconditioner, or try another method"
    )
    DIVERGED = (
        "diverged: the residual grew past the divergence bound; the iteration is not "
        "contracting (for fixed_point and neumann the spectral radius of J is likely >= 1); "
        "use a Krylov method such as gmres"
    )
    BREAKDOWN = (
        "breakdown: the method hit a zero denominator (the operator may be singular or "
        "indefinite for this method); try gmres or lsqr"
    )
    NONFINITE = (
        "non-finite values (NaN or inf) appeared in the iteration; the operator or the "
        "right-hand side produced them; x holds the last finite iterate"
    )

    @property
    def success(self) -> bool:
        """CONVERGED, or COMPLETED in fixed-budget mode. (LEAST_SQUARES is a success only
        for a solve that asked for a least-squares solution; :attr:`SolveResult.success`
        says so.)"""
        return self in (Status.CONVERGED, Status.COMPLETED)

    @property
    def code(self) -> int:
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> "Status":
        return _FROM_CODE[int(code)]


# Integer codes used on the device inside solvers; ordered so that max() gives the most
# severe outcome of a batch.
_CODES = {
    Status.CONVERGED: 0,
    Status.COMPLETED: 1,
    Status.LEAST_SQUARES: 2,
    Status.MAX_ITERATIONS: 3,
    Status.BREAKDOWN: 4,
    Status.DIVERGED: 5,
    Status.NONFINITE: 6,
}
_FROM_CODE = {v: k for k, v in _CODES.items()}


@dataclass
class SolveResult:
    """The outcome of :func:`linsolve_rbp.solve`.

    Attributes
    ----------
    x : array
        The solution, in the backend, device and dtype of ``b``. Never NaN: on DIVERGED or
        NONFINITE it is the best finite iterate.
    status : Status
        Why the solve stopped; for a batched solve the most severe status of the batch.
    statuses : tuple of Status or None
        Per-system statuses of a batched solve (``batch_dims=1``); None otherwise.
    converged : bool or numpy.ndarray of bool
        Whether a tolerance was asked and met (per system for batched solves).
    success : bool
        Every system CONVERGED, or COMPLETED in fixed-budget mode.
    iterations : int
        Iterations run (the largest over a batch).
    matvecs, rmatvecs : int
        Products with ``A`` and ``A^H`` that the solve applied (a batched product counts once).
    residual_norm : float or numpy.ndarray
        Final residual norm ``||b - A x||`` (per system for batched solves). For ``neumann``
        and ``fixed_point`` it is the free estimate described in their docstrings.
    residual_history : numpy.ndarray
        Residual norms, starting with the initial one; shape ``(iterations + 1,)``, or
        ``(iterations + 1, B)`` for a batched solve.
    message : str
        A sentence saying what happened and what to do about it.
    method : str
        The method that ran.
    info : dict
        Method-specific extras (for example restarts for gmres, ``rho`` estimates).
    """

    x: Any
    status: Status
    converged: Any
    success: bool
    iterations: int
    matvecs: int
    rmatvecs: int
    residual_norm: Any
    residual_history: np.ndarray
    message: str
    method: str
    statuses: tuple | None = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        rn = self.residual_norm
        if np.ndim(rn) == 0:
            rn = f"{rn:.3e}"
        else:
            rn = np.asarray(rn)
            rn = f"max {rn.max():.3e} over {rn.size} systems" if rn.size else "[]"
        return (
            f"SolveResult(method={self.method!r}, status={self.status.name}, "
            f"iterations={self.iterations}, matvecs={self.matvecs}, rmatvecs={self.rmatvecs}, "
            f"residual_norm={rn})"
        )

    def warn_if_failed(self, context: str = "linear solve", stacklevel: int = 2) -> None:
        """Issue a :class:`ConvergenceWarning` if the solve did not succeed."""
        if not self.success:
            warnings.warn(f"{context}: {self.message}", ConvergenceWarning, stacklevel=stacklevel + 1)


class SolveError(RuntimeError):
    """Raised when ``throw=True`` (or ``on_failure="raise"``) and a solve did not succeed.

    The :class:`SolveResult` is kept in ``.result``.
    """

    def __init__(self, result: SolveResult, context: str = "linear solve"):
        self.result = result
        super().__init__(f"{context} with method {result.method!r} failed: {result.message}")
