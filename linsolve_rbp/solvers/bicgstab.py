"""BiCGStab: the stabilised bi-conjugate gradient method, preconditioned.

Needs: products with ``A`` only (two per iteration), any nonsingular ``A``; memory for a
handful of vectors, whatever the number of iterations.

Reference: H. A. van der Vorst, "Bi-CGSTAB: A fast and smoothly converging variant of Bi-CG for
the solution of nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 13(2), 1992.
"""

from __future__ import annotations

from ._base import BREAKDOWN, Monitor, Problem, Solver, dot, norm, safe_norm

__all__ = ["BiCGStab"]


class BiCGStab(Solver):
    """BiCGStab (van der Vorst, 1992) with the preconditioner applied on the right, as in
    scipy's ``bicgstab``, so that the residual tested is the true ``b - A x``; batched.

    Needs
        ``A x`` only, two products and two applications of ``M`` per iteration, plus one
        product at the end (and at the start when ``x0`` is given) for the true residual.
        Memory for eight vectors per system.
    Converges
        Often on nonsymmetric systems where restarted GMRES needs a large basis, at constant
        memory; but convergence is not monotone and not guaranteed: the method can break down.
    Stops
        When the recursively updated residual ``r_k`` meets ``max(rtol ||b||, atol)`` (also
        after the half step ``s = r - alpha A p``, as scipy does). ``x`` is then checked with
        the true residual ``||b - A x||`` (one product); a system whose true residual misses
        the tolerance restarts from it with a tighter internal tolerance rather than being
        reported CONVERGED. BREAKDOWN when ``rho = <r_hat, r>``, ``<r_hat, A p>`` or
        ``omega = <t, s> / <t, t>`` vanishes relative to the norms of its factors (below
        ``eps^2`` times their product) while the residual is not zero. After ``maxiter``
        iterations: MAX_ITERATIONS, or COMPLETED in fixed-budget mode (exactly ``maxiter``
        iterations). The reported ``residual_norm`` is the true one; ``residual_history``
        holds the recursive residuals.

    Systems of a batch that have stopped do not change. The callback sees every iterate.

    References
    ----------
    H. A. van der Vorst, SIAM J. Sci. Stat. Comput. 13(2):631-644, 1992.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> from linsolve_rbp.problems import convection_diffusion
    >>> A = convection_diffusion(10)
    >>> res = lr.solve(A, np.ones(100), method="bicgstab", rtol=1e-8)
    >>> res.status.name
    'CONVERGED'
    """

    name = "bicgstab"
    checks_claims = True
    accepts_preconditioner = True

    def run(self, prob: Problem):
        xp = prob.xp
        dev = prob.device
        B = prob.nsys
        dtype, rdtype = prob.dtype, prob.real_dtype
        eps2 = float(xp.finfo(rdtype).eps) ** 2
        ones = xp.ones((B,), dtype=dtype, device=dev)
        zeros = xp.zeros((B,), dtype=dtype, device=dev)
        no = xp.zeros((B,), dtype=xp.bool, device=dev)

        def safe(d):
            return xp.where(d != 0, d, ones)

        def col(a):
            return a[:, None]

        def M(v):
            return v if prob.psolve is None else prob.psolve(v)

        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        rnorm = norm(xp, r)
        mon = Monitor(prob, rnorm, x0=x)
        rtrue = rnorm
        restarts = 0
        while mon.k < prob.maxiter and bool(xp.any(mon.active)):
            # (Re)start from the true residual; the shadow residual r_hat = r_0.
            rhat = r
            rhat_n = rnorm
            p = v = xp.zeros_like(r)
            rho_prev = alpha = omega = ones
            while mon.k < prob.maxiter:
                # An exactly zero residual (possible in fixed-budget mode, where nothing
                # converges) means x is exact: freeze without calling it a breakdown.
                go = mon.active & (rnorm > 0)
                rho = dot(xp, rhat, r)
                mon.flag(go & (xp.abs(rho) <= eps2 * rhat_n * rnorm), BREAKDOWN)
                go = go & mon.active
                beta = (rho / safe(rho_prev)) * (alpha / safe(omega))
                # Stopped systems get p = 0, so their (unused) scalars stay finite.
                p = xp.where(col(go), r + col(beta) * (p - col(omega) * v), xp.zeros_like(p))
                phat = M(p)
                v = prob.mv(phat)
                rv = dot(xp, rhat, v)
                bad = go & (xp.abs(rv) <= eps2 * rhat_n * norm(xp, v))
                mon.flag(bad, BREAKDOWN)
                go = go & ~bad
                alpha = rho / safe(rv)
                s = r - col(alpha) * v
                snorm = norm(xp, s)
                # Half-step convergence: x + alpha p_hat already meets the tolerance.
                half = no if mon.threshold is None else go & (snorm <= mon.threshold)
                shat = M(s)
                t = prob.mv(shat)
                ts = dot(xp, t, s)
                full = go & ~half & (snorm > 0)
                bad = full & (xp.abs(ts) <= eps2 * norm(xp, t) * snorm)
                full = full & ~bad
                omega = xp.where(full, ts / safe(dot(xp, t, t)), zeros)
                # A system whose omega broke down still takes the half step (x + alpha p_hat,
                # residual s), the best iterate the method has for it.
                x = xp.where(col(go), x + col(alpha) * phat + col(omega) * shat, x)
                r = xp.where(col(go), s - col(omega) * t, r)
                rnorm = xp.where(go, xp.where(full, norm(xp, r), snorm), rnorm)
                rho_prev = xp.where(go, rho, rho_prev)
                mon.flag(bad, BREAKDOWN)
                if mon.update(rnorm, x):
                    break
            r = prob.b - prob.mv(x)
            rtrue = rnorm = safe_norm(xp, r)
            reopened = mon.check(x, rtrue)
            if reopened is not None:
                # Ask the recursive residual to go as far below the tolerance as the true
                # residual was above it.
                mon.tighten(reopened, rtrue, factor=1.0)
            restarts += 1
        return mon.finish(x, rtrue, info={"restarts": max(restarts - 1, 0)})
