"""MINRES: minimum-residual Krylov method for Hermitian, possibly indefinite, systems.

Needs: a Hermitian ``A`` (definite or not); one product with ``A`` per iteration and, when a
preconditioner ``M ~ A^{-1}`` is given (it must be Hermitian positive definite), one
application of ``M``. Memory: eleven vectors, whatever the number of iterations (the Lanczos
process has a three-term recurrence).

Reference: C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of linear
equations", SIAM J. Numer. Anal. 12(4), 617-629, 1975.
"""

from __future__ import annotations

from ._base import BREAKDOWN, Monitor, Problem, Solver, _given, allreduce_sum, dot, local_dot, norm, verified_rounds
import math

from ._krylov import fdiv, fmax, host_axpy, host_scalars, real_part, safe_div, scalars, sq_norm, where_of

__all__ = ["MINRES"]


def _indefinite(xp, rmr, r, mr):
    """Systems where ``<r, M r>`` is negative beyond round-off: ``M`` is not positive
    definite."""
    roundoff = 100 * xp.finfo(rmr.dtype).eps * norm(xp, r) * norm(xp, mr)
    return rmr < -roundoff


class MINRES(Solver):
    """MINRES for Hermitian, possibly indefinite, ``A`` (Paige & Saunders, 1975).

    The iterate ``x_k`` minimises ``||b - A x||`` (``||b - A x||_M`` with a preconditioner)
    over ``x0`` plus the ``k``-th Krylov space, built by the Lanczos process and solved with
    Givens rotations.

    Needs
        ``A`` Hermitian (not checked; positive definiteness is not needed); one product with
        ``A`` per iteration. An optional preconditioner ``M ~ A^{-1}``, which must be
        Hermitian positive definite, is applied once per iteration.
    Converges
        In at most ``n`` iterations in exact arithmetic, with a monotonically falling
        residual (in the ``M``-norm when preconditioned); on definite problems about as fast as
        ``cg``, and also on indefinite ones, where ``cg`` may break down.
    Stops
        When the residual ``r = b - A x`` of the user's system, kept by recurrence alongside
        the iterate (no extra product, also when preconditioned), meets
        ``max(rtol ||b||, atol)`` and then the true residual (one product) meets it too;
        otherwise MINRES restarts from the true residual with a tighter internal tolerance
        (in float32, or at condition numbers near 1/eps, the recurred residual can fall far
        below the true one). A solve that ends with a true residual worse than that of its
        best verified iterate (``x0`` or an earlier check) returns that iterate; one whose
        true residual passes ``divtol`` times the initial one is DIVERGED. After ``maxiter`` iterations (COMPLETED in fixed-budget
        mode); BREAKDOWN when ``M`` turns out not to be positive definite (``<r, M r> < 0``)
        or the projected system is singular (singular ``A`` with ``b`` outside its range);
        DIVERGED / NONFINITE as for every method.

    The callback sees every iterate.

    References
    ----------
    C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of linear
    equations", SIAM J. Numer. Anal. 12(4), 617-629, 1975.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> A = np.diag([3.0, -1.0, 2.0])        # symmetric indefinite
    >>> res = lr.solve(A, np.ones(3), method="minres", rtol=1e-10)
    >>> res.status.name, np.allclose(res.x, [1 / 3, -1.0, 0.5])
    ('CONVERGED', True)
    """

    name = "minres"
    checks_claims = True
    needs_symmetric = True
    accepts_preconditioner = True

    def run(self, prob: Problem):
        xp = prob.xp
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        mon = Monitor(prob, norm(xp, r), x0=x)

        def iterate(x, r, rnorm):
            return _minres(prob, mon, x, r, rnorm)

        x, rnorm = verified_rounds(prob, mon, x, r, mon.history[0], iterate)
        return mon.finish(x, rnorm)


def _minres(prob: Problem, mon: Monitor, x, r, rnorm):
    """The MINRES recurrence from ``x`` with true residual ``r``, until the monitor stops
    every system or ``maxiter`` is reached; returns ``x`` and the recurred residual norms."""
    xp = prob.xp
    if host_scalars(prob, mon):
        return _minres_host(prob, mon, x, r, rnorm)
    where = where_of(xp)
    psolve = prob.psolve if prob.psolve is not None else (lambda v: v)
    one = scalars(prob, 1.0)

    # Lanczos vectors: r_prev, r_cur are unnormalised and live in A's range space;
    # y = M r_cur, beta = sqrt(<r_cur, M r_cur>), and v = y / beta is the next basis vector.
    zero = scalars(prob, 0.0)
    r_prev = r_cur = r
    y = psolve(r_cur)
    beta2 = real_part(xp, dot(xp, r_cur, y))
    mon.flag(_indefinite(xp, beta2, r_cur, y), BREAKDOWN)
    beta = xp.sqrt(where(beta2 > 0, beta2, zero))
    beta_old = zero
    # Givens rotation state of the QR factorisation of the Lanczos tridiagonal matrix.
    cs, sn = scalars(prob, -1.0), zero
    dbar = eps = zero
    phibar = beta
    # Search directions w_{k-1}, w_{k-2} and their images under A, for the residual
    # recurrence r <- r - phi A w (A w is built from A v, which Lanczos computes anyway).
    w = w_old = xp.zeros_like(x)
    aw = aw_old = xp.zeros_like(r)
    # A running estimate of ||A|| (the largest column of the Lanczos tridiagonal matrix): a
    # new beta below round-off relative to it ends the Lanczos process (the Krylov space is
    # invariant), and a system not solved by then has b outside the range of a singular A.
    anorm = zero
    tiny = 10.0 * float(xp.finfo(prob.real_dtype).eps)
    # Vectors sharded over ranks (a reduction given): the inner products of a step fused.
    sharded = _given() is not None

    while mon.k < prob.maxiter:
        v = safe_div(xp, one, beta)[:, None] * y
        av = prob.mv(v)
        y = av - safe_div(xp, beta, beta_old)[:, None] * r_prev
        alpha = real_part(xp, dot(xp, v, y))
        y = y - safe_div(xp, alpha, beta)[:, None] * r_cur
        r_prev, r_cur = r_cur, y
        y = psolve(r_cur)
        beta_old = beta
        if sharded:
            # <r, M r> and the two norms of the indefiniteness test in one collective.
            beta2, rr, yy = allreduce_sum(xp, local_dot(xp, r_cur, y), local_dot(xp, r_cur, r_cur),
                                          local_dot(xp, y, y))
            beta2 = real_part(xp, beta2)
            roundoff = 100 * xp.finfo(beta2.dtype).eps * xp.sqrt(real_part(xp, rr)) * xp.sqrt(real_part(xp, yy))
            mon.flag(beta2 < -roundoff, BREAKDOWN)
        else:
            beta2 = real_part(xp, dot(xp, r_cur, y))
            mon.flag(_indefinite(xp, beta2, r_cur, y), BREAKDOWN)
        beta = xp.sqrt(where(beta2 > 0, beta2, zero))
        anorm = xp.maximum(anorm, xp.hypot(xp.hypot(alpha, beta), beta_old))
        ended = beta <= tiny * anorm

        # Apply the previous rotation to the new column of the tridiagonal matrix, then
        # build the rotation that annihilates its subdiagonal entry beta.
        eps_old = eps
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps = sn * beta
        dbar = -cs * beta
        gamma = xp.hypot(gbar, beta)
        # A pivot that vanishes to round-off: the projected system is singular (A singular
        # on the Krylov space); the step would be garbage, so it is not taken.
        mon.flag((gamma <= tiny * anorm) & (phibar > 0), BREAKDOWN)
        cs = safe_div(xp, gbar, gamma)
        sn = safe_div(xp, beta, gamma)
        phi = cs * phibar
        phibar = sn * phibar

        inv_gamma = safe_div(xp, one, gamma)[:, None]
        w_new = (v - eps_old[:, None] * w_old - delta[:, None] * w) * inv_gamma
        aw_new = (av - eps_old[:, None] * aw_old - delta[:, None] * aw) * inv_gamma
        w_old, w = w, w_new
        aw_old, aw = aw, aw_new

        active = mon.active
        x = where(active[:, None], x + phi[:, None] * w, x)
        r = where(active[:, None], r - phi[:, None] * aw, r)
        rnorm = where(active, norm(xp, r), rnorm)
        # The step just taken minimised the residual over the whole invariant space: a
        # system that it does not solve cannot be solved by going on.
        if mon.threshold is not None:
            mon.flag(ended & ~(rnorm <= mon.threshold), BREAKDOWN)
        if mon.update(rnorm, x):
            break
    return x, rnorm


def _minres_host(prob: Problem, mon: Monitor, x, r, rnorm):
    """:func:`_minres` for one float64 system on the host (numpy): the Lanczos and Givens
    scalars are host floats (float64 arithmetic, as in the ``(1,)`` array path), a stopped
    system is not updated (no masks), ``x`` is a new array each iteration and ``r`` is
    updated in place (BLAS ``axpy``); the definiteness test of ``M`` computes its norms only
    when ``<r, M r>`` is negative (it cannot fire otherwise)."""
    xp = prob.xp
    psolve = prob.psolve if prob.psolve is not None else (lambda v: v)
    axpy = host_axpy(xp, prob.b)
    tiny = 10.0 * float(xp.finfo(prob.real_dtype).eps)

    def rmr(r_cur, y):
        b2 = float(real_part(xp, dot(xp, r_cur, y))[0])
        if b2 < 0.0 and bool(_indefinite(xp, xp.asarray([b2], dtype=prob.real_dtype, device=prob.device), r_cur, y)[0]):
            mon.flag(mon.active, BREAKDOWN)
        return b2

    r_prev = r_cur = r
    y = psolve(r_cur)
    beta2 = rmr(r_cur, y)
    beta = math.sqrt(beta2) if beta2 > 0.0 else 0.0
    beta_old = 0.0
    cs, sn = -1.0, 0.0
    dbar = eps = 0.0
    phibar = beta
    w = w_old = xp.zeros_like(x)
    aw = aw_old = xp.zeros_like(r)
    anorm = 0.0
    # The residual, updated in place: a copy (r itself is r_prev and r_cur).
    r = xp.asarray(r, copy=True)
    r1 = r[0, ...]
    while mon.k < prob.maxiter:
        v = fdiv(1.0, beta) * y
        av = prob.mv(v)
        y = av - fdiv(beta, beta_old) * r_prev
        alpha = float(real_part(xp, dot(xp, v, y))[0])
        y = y - fdiv(alpha, beta) * r_cur
        r_prev, r_cur = r_cur, y
        y = psolve(r_cur)
        beta_old = beta
        beta2 = rmr(r_cur, y)
        beta = math.sqrt(beta2) if beta2 > 0.0 else 0.0
        anorm = fmax(anorm, math.hypot(math.hypot(alpha, beta), beta_old))
        ended = beta <= tiny * anorm

        eps_old = eps
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps = sn * beta
        dbar = -cs * beta
        gamma = math.hypot(gbar, beta)
        if gamma <= tiny * anorm and phibar > 0.0:
            mon.flag(mon.active, BREAKDOWN)
        cs = fdiv(gbar, gamma)
        sn = fdiv(beta, gamma)
        phi = cs * phibar
        phibar = sn * phibar

        inv_gamma = fdiv(1.0, gamma)
        w_new = (v - eps_old * w_old - delta * w) * inv_gamma
        aw_new = (av - eps_old * aw_old - delta * aw) * inv_gamma
        w_old, w = w, w_new
        aw_old, aw = aw, aw_new

        if bool(mon.active[0]):
            x = xp.asarray(x, copy=True)
            axpy(phi, w[0, ...], x[0, ...])
            axpy(-phi, aw[0, ...], r1)
            rnorm = xp.sqrt(sq_norm(xp, r))
        thr = mon.threshold
        if ended and thr is not None and not (float(rnorm[0]) <= float(thr[0])):
            mon.flag(mon.active, BREAKDOWN)
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm
