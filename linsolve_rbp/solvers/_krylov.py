"""Small helpers shared by the Krylov solvers (cg, cgne, minres, lsqr).

Every scalar of a batched Krylov recurrence is a ``(B,)`` array, one entry per system. A zero
denominator in one system (a breakdown, or a system that has already stopped) must not put
NaN or inf into the others, so divisions go through :func:`safe_div`.
"""

from __future__ import annotations

__all__ = ["safe_div", "real_part", "scalars"]


def safe_div(xp, num, den):
    """``num / den`` where ``den != 0`` and 0 elsewhere, elementwise, never NaN or inf from a
    zero ``den``."""
    nonzero = den != 0
    safe = xp.where(nonzero, den, xp.ones_like(den))
    return xp.where(nonzero, num / safe, xp.zeros_like(num / safe))


def real_part(xp, a):
    """The real part of ``a`` (``a`` itself for a real dtype)."""
    if xp.isdtype(a.dtype, "complex floating"):
        return xp.real(a)
    return a


def scalars(prob, value: float):
    """A ``(B,)`` array of per-system real scalars, all equal to ``value``."""
    return prob.xp.full((prob.nsys,), value, dtype=prob.real_dtype, device=prob.device)
