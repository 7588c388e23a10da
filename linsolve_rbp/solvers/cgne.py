"""Conjugate gradients on the normal equations (CGNE, in the CGLS form): CG-RBP.

Needs: products with ``A`` and ``A^H``, one of each per iteration (for ``A = I - J^T``, one
vector-Jacobian and one Jacobian-vector product). ``A`` may be nonsymmetric. Memory: five
vectors.

CG applied to ``A^H A x = A^H b`` (plus ``eta x`` with Tikhonov damping). The CGLS form keeps
the residual ``r = b - A x`` of the user's system by recurrence instead of the residual of
the normal equations, which is both more accurate (it never forms ``A^H A``) and what the
stopping test needs. It reuses the recurrence of :mod:`.cg`.

References: M. R. Hestenes and E. Stiefel, J. Res. Natl. Bur. Stand. 49(6), 1952 (Section
10); C. C. Paige and M. A. Saunders, ACM Trans. Math. Softw. 8(1), 1982 (CGLS as the
comparison method for LSQR); R. Liao et al., "Reviving and Improving Recurrent
Back-Propagation", ICML 2018 (CG-RBP).
"""

from __future__ import annotations

from ._base import (BREAKDOWN, Monitor, Problem, Solver, allreduce_sum, dot, local_dot, norm,
                    verified_rounds)
from ._krylov import real_part, safe_div, where_of
from .cg import VARIANTS, conjugate_gradients

__all__ = ["CGNE", "single_reduction_cgls"]


def single_reduction_cgls(prob: Problem, mon: Monitor, x, r, rnorm, eta: float):
    """Run CGLS from iterate ``x`` with residual ``r = b - A x`` (norms ``rnorm``), with the
    inner products of an iteration reduced in one collective for all the systems: the
    rearrangement of Chronopoulos and Gear (1989) applied to CGLS.

    With ``s = A^H r - eta x`` and ``t = A s`` computed before the reduction, ``A p`` is kept
    by recurrence (``q <- t + beta q``) and its squared norm, the step's denominator, follows
    from the reduced ``<t, t>``, ``<t, q>`` and ``<q, q>`` by expanding
    ``||t + beta q||^2`` (and ``||p||^2`` likewise with ``eta > 0``). Each iteration applies
    ``A^H`` and ``A`` once, plus once each at the start of a round.

    Returns
    -------
    x, rnorm
        The last iterate and its recurred residual norms.
    """
    xp = prob.xp
    where = where_of(xp)

    def seed(r, x):
        s = prob.rmv(r)
        return s - eta * x if eta else s

    def rdot(u, v):
        return real_part(xp, local_dot(xp, u, v))

    s = seed(r, x)
    t = prob.mv(s)
    rho, qq = allreduce_sum(xp, rdot(s, s), rdot(t, t))
    pp = rho
    p, q = s, t
    while mon.k < prob.maxiter:
        den = qq + eta * pp if eta else qq
        mon.flag(((rho == 0) | (den == 0)) & (rnorm > 0), BREAKDOWN)
        active = mon.active
        alpha = where(active, safe_div(xp, rho, den), xp.zeros_like(rho))
        # Stopped systems keep x and r exactly, even where their p or q hold NaN.
        col = active[:, None]
        x = where(col, x + alpha[:, None] * p, x)
        r = where(col, r - alpha[:, None] * q, r)
        s = seed(r, x)
        t = prob.mv(s)
        if eta:
            rr, ss, tt, tq, qq, sp, pp = allreduce_sum(
                xp, rdot(r, r), rdot(s, s), rdot(t, t), rdot(t, q), rdot(q, q), rdot(s, p), rdot(p, p))
        else:
            rr, ss, tt, tq, qq = allreduce_sum(
                xp, rdot(r, r), rdot(s, s), rdot(t, t), rdot(t, q), rdot(q, q))
        rnorm = where(active, xp.sqrt(rr), rnorm)
        beta = safe_div(xp, ss, rho)
        p = s + beta[:, None] * p
        q = t + beta[:, None] * q
        # ||t + beta q||^2 (and ||s + beta p||^2), with the norms of the old q (and p) reduced
        # afresh each iteration rather than recurred.
        qq = tt + beta * (2.0 * tq + beta * qq)
        if eta:
            pp = ss + beta * (2.0 * sp + beta * pp)
        rho = ss
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm


class CGNE(Solver):
    """Conjugate gradients on the normal equations ``(A^H A + eta I) x = A^H b``, in the
    CGLS form.

    For ``A = I - J^T`` this is CG-RBP of Liao et al. (2018): CG on
    ``(I - J)(I - J^T) z = (I - J) b``.

    Needs
        Products with ``A`` and ``A^H``: one of each per iteration, plus one ``A`` product
        for the true residual at the end of each round (and one to form ``b - A x0`` when
        ``x0`` is given). Any nonsingular ``A``.
    Converges
        Like CG on ``A^H A``, whose condition number is the square of ``A``'s; in at most
        ``n`` iterations in exact arithmetic. Slower than ``gmres`` or ``lsqr`` when ``A`` is
        ill conditioned, but with short recurrences and fixed memory.
    Stops
        When the residual of the user's system, ``r = b - A x`` (kept by recurrence), meets
        ``max(rtol ||b||, atol)`` and then the true residual (one product) meets it too;
        otherwise the iteration restarts from the true residual with a tighter internal
        tolerance. After ``maxiter`` iterations (COMPLETED in fixed-budget
        mode); BREAKDOWN when ``A^H r - eta x = 0`` or ``A p = 0`` while ``r != 0``
        (singular ``A`` and ``b`` outside its range); DIVERGED / NONFINITE as for every
        method. On any early exit ``x`` is the current (most recent) iterate.

    The callback sees every iterate.

    Options
        ``variant`` (default ``"hestenes-stiefel"``): the recurrence. The default, CGLS,
        takes its inner products one after the other: three collectives per iteration when
        the vectors are sharded over processes (``reduction=``; four with ``eta > 0``).
        ``"chronopoulos-gear"`` computes ``A^H r`` and ``A (A^H r)`` first and reduces every
        inner product of the iteration in one collective (the rearrangement of cg's
        single-reduction variant, applied to CGLS): the denominator ``||A p||^2`` then comes
        from expanding ``||A s + beta A p_old||^2``, which cancels where the two terms
        nearly cancel, so on ill-conditioned systems its recurred residual can drift
        further from the true one, and it needs more iterations (never a false CONVERGED:
        claims are checked on the true residual); it also applies ``A`` and ``A^H`` once
        more per round.

        ``eta`` (float, default 0.0): Tikhonov damping, solving ``(A^H A + eta I) x = A^H b``
        instead. The public code of Liao et al. (github.com/lrjconan/RBP, ``model/rbp.py``)
        uses ``eta = 1e-5`` for CG-RBP. With ``eta > 0`` the damped solution differs from
        that of ``A x = b`` by about ``eta / sigma_min(A)^2`` relative, so a tolerance below
        that is never met: use fixed-budget mode or a looser ``rtol``.

    References
    ----------
    M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving linear
    systems", J. Res. Natl. Bur. Stand. 49(6), 409-436, 1952.

    C. C. Paige and M. A. Saunders, "LSQR: An algorithm for sparse linear equations and
    sparse least squares", ACM Trans. Math. Softw. 8(1), 43-71, 1982.

    R. Liao, Y. Xiong, E. Fetaya, L. Zhang, K. Yoon, X. Pitkow, R. Urtasun and R. Zemel,
    "Reviving and Improving Recurrent Back-Propagation", ICML 2018.

    A. T. Chronopoulos and C. W. Gear, "s-step iterative methods for symmetric linear
    systems", J. Comput. Appl. Math. 25(2), 153-168, 1989.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> A = np.array([[2.0, 1.0], [0.0, 3.0]])
    >>> res = lr.solve(A, np.array([1.0, 2.0]), method="cgne", rtol=1e-10)
    >>> res.status.name, res.matvecs, res.rmatvecs, np.allclose(A @ res.x, [1.0, 2.0])
    ('CONVERGED', 3, 2, True)
    """

    name = "cgne"
    checks_claims = True
    needs_rmatvec = True
    options = {"eta": 0.0, "variant": VARIANTS[0]}
    option_kinds = {"eta": "nonnegative", "variant": VARIANTS}

    def run(self, prob: Problem):
        xp = prob.xp
        eta = prob.options["eta"]
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        mon = Monitor(prob, norm(xp, r), x0=x)
        if prob.options.get("variant", VARIANTS[0]) == "chronopoulos-gear":
            def iterate(x, r, rnorm):
                return single_reduction_cgls(prob, mon, x, r, rnorm, eta)

            x, rnorm = verified_rounds(prob, mon, x, r, mon.history[0], iterate)
            return mon.finish(x, rnorm)

        # The gradient of the (damped) least-squares objective seeds the direction, so that
        # A^H is applied once per iteration, to the residual, and never after the last one.
        # Squared norms as one fused inner product each (<s, s>, not ||s||^2 from a norm).
        def seed(r, x):
            s = prob.rmv(r)
            if eta:
                s = s - eta * x
            return s, real_part(xp, dot(xp, s, s))

        def curvature(p, q):
            c = real_part(xp, dot(xp, q, q))
            if eta:
                c = c + eta * real_part(xp, dot(xp, p, p))
            return c

        def iterate(x, r, rnorm):
            return conjugate_gradients(prob, mon, x, r, rnorm, seed, curvature)

        x, rnorm = verified_rounds(prob, mon, x, r, mon.history[0], iterate)
        return mon.finish(x, rnorm)
