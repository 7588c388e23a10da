"""A :class:`Monitor` for methods whose per-iteration residual norm is not computed from ``x``.

GMRES tests the residual norm carried by the rotated Hessenberg right-hand side, BiCGStab a
recursively updated residual. Both drift from the true ``||b - A x||`` in finite precision
(most visibly in float32), so a CONVERGED verdict taken on them is checked against the true
residual once ``x`` is formed, and withdrawn when the true residual misses the tolerance: the
solver then goes on (a restart from the true residual) instead of reporting a false success.
"""

from __future__ import annotations

from ._base import CONVERGED, NONFINITE, RUNNING, Monitor

__all__ = ["CheckedMonitor"]


class CheckedMonitor(Monitor):
    """:class:`Monitor` whose ``threshold`` (the test applied to the solver's own residual
    estimate) may be tightened per system, while ``target`` keeps the user's
    ``max(rtol ||b||, atol)`` that the true residual must meet."""

    def __init__(self, prob, r0norm, x0=None):
        super().__init__(prob, r0norm, x0=x0)
        self.target = self.threshold

    def check(self, x, rtrue):
        """Test the true residual norms ``rtrue`` of the iterate ``x``.

        Records ``x`` as the best iterate where it is, marks running systems whose true
        residual is non-finite NONFINITE and those that meet the target CONVERGED, and reopens
        (sets running again) CONVERGED systems whose true residual misses the target.

        Returns
        -------
        array of bool, shape (B,), or None
            The reopened systems; None in fixed-budget mode (there is no target).
        """
        xp = self.xp
        better = xp.isfinite(rtrue) & (rtrue <= self.best_r)
        self.best_r = xp.where(better, rtrue, self.best_r)
        self.best_x = x if self.best_x is None else xp.where(better[:, None], x, self.best_x)
        self._set(self.active & ~xp.isfinite(rtrue), NONFINITE)
        if self.target is None:
            return None
        ok = rtrue <= self.target
        reopen = (self.codes == CONVERGED) & ~ok
        self.codes = xp.where(reopen, self._code[RUNNING], self.codes)
        self.active = self.active | reopen
        self._set(self.active & ok, CONVERGED)
        return reopen
