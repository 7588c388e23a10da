"""Preconditioned conjugate gradients (CG).

Needs: a Hermitian positive-definite ``A``; one product with ``A`` per iteration and, when a
preconditioner ``M ~ A^{-1}`` (itself Hermitian positive definite) is given, one application
of ``M``. Memory: five vectors (``x``, ``r``, ``M r``, ``p``, ``A p``).

The iteration itself, :func:`conjugate_gradients`, is shared with ``cgne`` (CG on the normal
equations), which differs only in how the search direction is seeded and how its curvature
is measured.

Reference: M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving linear
systems", J. Res. Natl. Bur. Stand. 49(6), 409-436, 1952.
"""

from __future__ import annotations

from ._base import BREAKDOWN, Monitor, Problem, Solver, dot, is_host, norm, verified_rounds
from ._krylov import host_axpy, real_part, safe_div, where_of

__all__ = ["CG", "conjugate_gradients"]


def conjugate_gradients(prob: Problem, mon: Monitor, x, r, rnorm, seed, curvature, fused: bool = False):
    """Run the conjugate-gradient recurrence from iterate ``x`` with residual ``r = b - A x``
    (norms ``rnorm``) until the monitor stops every system or ``maxiter`` is reached.

    Parameters
    ----------
    prob : Problem
    mon : Monitor
        Built on ``||r||``; updated once per iteration with the residual norm and ``x``.
    x : array, shape (B, n)
    r : array, shape (B, m)
        The residual of the user's system, kept by recurrence (``r <- r - alpha A p``).
    seed : callable
        ``seed(r, x) -> (z, rho)``: the vector that seeds the next search direction and the
        real ``(B,)`` numerator ``rho`` of the step (``z = M r``, ``rho = <r, M r>`` for CG;
        ``z = A^H r - eta x``, ``rho = ||z||^2`` for CGLS).
    curvature : callable
        ``curvature(p, q) -> (B,)`` with ``q = A p``: the step's denominator
        (``<p, A p>`` for CG; ``||A p||^2 + eta ||p||^2`` for CGLS).
    fused : bool
        ``seed`` is ``(r, <r, r>)`` (CG without a preconditioner): the inner product that
        gives the residual norm of one iteration is the numerator of the next, computed once.

    Returns
    -------
    x, rnorm
        The last iterate and its recurred residual norms (systems that stopped keep theirs).

    Notes
    -----
    A zero numerator or denominator in a system whose residual is not zero is a breakdown
    (singular or indefinite ``A``, or an indefinite ``M``) and that system stops with
    BREAKDOWN; a zero residual (an exact solve in fixed-budget mode) just stops changing.

    Each iteration makes a new ``x`` (the monitor keeps a reference to the best one, no
    copy) and updates ``r`` and ``p`` in place where the namespace allows it (augmented
    assignment; on immutable arrays it rebinds). A single system on the host (numpy) takes
    its decisions on host scalars and applies no masks: a stopped system is not updated.
    """
    xp = prob.xp
    if mon.host_single and is_host(xp):
        return _cg_host(prob, mon, x, r, rnorm, seed, curvature, fused)
    where = where_of(xp)
    p = rho_old = rr = None
    while mon.k < prob.maxiter:
        if fused and rr is not None:
            z, rho = r, rr
        else:
            z, rho = seed(r, x)
        if p is None:
            p = xp.asarray(z, copy=True)
        else:
            p *= safe_div(xp, rho, rho_old)[:, None]
            p += z
        q = prob.mv(p)
        den = curvature(p, q)
        mon.flag(((rho == 0) | (den == 0)) & (rnorm > 0), BREAKDOWN)
        active = mon.active
        alpha = where(active, safe_div(xp, rho, den), xp.zeros_like(rho))
        # Stopped systems keep x and r exactly, even where their p or q hold NaN.
        col = active[:, None]
        x = where(col, x + alpha[:, None] * p, x)
        r = where(col, r - alpha[:, None] * q, r)
        if fused:
            rr = real_part(xp, dot(xp, r, r))
            rnorm = where(active, xp.sqrt(rr), rnorm)
        else:
            rnorm = where(active, norm(xp, r), rnorm)
        rho_old = rho
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm


def _cg_host(prob: Problem, mon: Monitor, x, r, rnorm, seed, curvature, fused):
    """:func:`conjugate_gradients` for one system on the host (numpy): the step sizes are
    host floats (a float32 quotient computed in float64 and rounded to float32 is the
    float32 quotient), a stopped system is simply not updated (no masks), ``r`` and ``p``
    are updated in place and ``x`` is a new array each iteration, all with BLAS ``axpy``."""
    xp = prob.xp
    axpy = host_axpy(xp, prob.b)
    p = None
    # r is updated in place: a copy of the one given (it may be prob.b).
    r = xp.asarray(r, copy=True)
    r1 = r[0, ...]
    rho_old = rr = 0.0
    rn = float(rnorm[0])
    while mon.k < prob.maxiter:
        if fused and p is not None:
            z, rho = r, rr
        else:
            z, rho_a = seed(r, x)
            rho = float(rho_a[0])
        if p is None:
            p = xp.asarray(z, copy=True)
            p1 = p[0, ...]
        else:
            p *= rho / rho_old if rho_old != 0.0 else 0.0
            p += z
        q = prob.mv(p)
        den = float(curvature(p, q)[0])
        if (rho == 0.0 or den == 0.0) and rn > 0.0:
            mon.flag(mon.active, BREAKDOWN)
        if bool(mon.active[0]):
            alpha = rho / den if den != 0.0 else 0.0
            x = xp.asarray(x, copy=True)
            axpy(alpha, p1, x[0, ...])
            axpy(-alpha, q[0, ...], r1)
            if fused:
                rr_a = real_part(xp, dot(xp, r, r))
                rr = float(rr_a[0])
                rnorm = xp.sqrt(rr_a)
            else:
                rnorm = norm(xp, r)
            rn = float(rnorm[0])
        rho_old = rho
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm


class CG(Solver):
    """Preconditioned conjugate gradients for Hermitian positive-definite ``A``.

    Needs
        ``A`` Hermitian positive definite (not checked); one product with ``A`` per
        iteration. An optional preconditioner ``M ~ A^{-1}``, also Hermitian positive
        definite, is applied once per iteration.
    Converges
        In at most ``n`` iterations in exact arithmetic; the ``A``-norm of the error falls at
        least like ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k`` with ``kappa`` the condition
        number of ``M A``.
    Stops
        When the residual ``r = b - A x``, kept by recurrence (no extra product), meets
        ``max(rtol ||b||, atol)`` and then the true residual, computed with one product,
        meets it too (in finite precision the recurred residual drifts from the true one:
        by 25x in float32 on the 1-D Poisson matrix of order 100). When the true residual
        misses the tolerance, CG restarts from it (residual replacement) with a tighter
        internal tolerance. After ``maxiter`` iterations (COMPLETED in fixed-budget
        mode); BREAKDOWN on a zero step denominator ``<p, A p>`` or ``<r, M r>`` (singular or
        indefinite ``A`` or ``M``); DIVERGED / NONFINITE as for every method.

    The callback sees every iterate.

    References
    ----------
    M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving linear
    systems", J. Res. Natl. Bur. Stand. 49(6), 409-436, 1952.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = lr.solve(A, np.array([1.0, 2.0]), method="cg", rtol=1e-10)
    >>> res.status.name, res.iterations, np.allclose(A @ res.x, [1.0, 2.0])
    ('CONVERGED', 2, True)
    """

    name = "cg"
    checks_claims = True
    needs_symmetric = True
    accepts_preconditioner = True

    def run(self, prob: Problem):
        xp = prob.xp
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        mon = Monitor(prob, norm(xp, r), x0=x)
        psolve = prob.psolve

        def seed(r, x):
            z = r if psolve is None else psolve(r)
            return z, real_part(xp, dot(xp, r, z))

        def curvature(p, q):
            return real_part(xp, dot(xp, p, q))

        def iterate(x, r, rnorm):
            return conjugate_gradients(prob, mon, x, r, rnorm, seed, curvature, fused=psolve is None)

        x, rnorm = verified_rounds(prob, mon, x, r, mon.history[0], iterate)
        return mon.finish(x, rnorm)
