"""BiCGStab: the stabilised bi-conjugate gradient method, preconditioned.

Needs: products with ``A`` only (two per iteration), any nonsingular ``A``; memory for a
handful of vectors, whatever the number of iterations.

Reference: H. A. van der Vorst, "Bi-CGSTAB: A fast and smoothly converging variant of Bi-CG for
the solution of nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 13(2), 1992.
"""

from __future__ import annotations

import math

from .. import backend as _b
from ._base import BREAKDOWN, Monitor, Problem, Solver, _given, allreduce_sum, norm, safe_norm
from .gmres import _mutable, _on_host

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
        # With the vectors sharded over ranks (a reduction given), the batched path, whose
        # inner products are reduced (and fused two by two where they can be).
        if prob.nsys == 1 and _given() is None and _on_host(prob) and _mutable(prob):
            out = self._run_single(prob)
            if out is not None:
                return out
        return self._run_batched(prob)

    def _run_single(self, prob: Problem):
        """One system on the host: the same iteration with its scalars (``rho``, ``alpha``,
        ``omega``, the norms and the tests on them) as numpy scalars of the working precision,
        read from a small device buffer whose host view is made once; the device does only the
        vector work (a dozen operations per iteration instead of a hundred). None where the
        library does not share memory with numpy (arrays without item assignment take the
        batched path, which assigns nothing)."""
        xp = prob.xp
        dev = prob.device
        dtype, rdtype = prob.dtype, prob.real_dtype
        cplx = xp.isdtype(dtype, "complex floating")
        eps2 = float(xp.finfo(rdtype).eps) ** 2
        host = _b.to_numpy
        Gc = xp.zeros((4, 1, 1), dtype=dtype, device=dev)
        Gr = xp.zeros((4,), dtype=rdtype, device=dev)
        Gc_h, Gr_h = host(Gc), host(Gr)
        Gc[0, 0, 0] = 1
        Gr[0] = 1
        if not (Gc_h.shape == (4, 1, 1) and Gc_h[0, 0, 0] == 1 and Gr_h.shape == (4,) and Gr_h[0] == 1):
            return None
        one = Gc_h.dtype.type(1)
        Tr = Gr_h.dtype.type
        ones_r = xp.ones((1,), dtype=rdtype, device=dev)

        def nrm(sq):
            # The 2-norm from its square <u, u> (one BLAS dot, where vector_norm makes two or
            # three passes): the data are scaled to a largest magnitude in [1, 2) (see
            # run_scaled), so the square neither overflows nor underflows.
            return Tr(math.sqrt(sq.real if cplx else sq))
        zero = Gc_h.dtype.type(0)
        yes = xp.ones((1,), dtype=xp.bool, device=dev)

        def cj(u):
            return xp.conj(u) if cplx else u

        def M(v):
            return v if prob.psolve is None else prob.psolve(v)

        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        rnorm = norm(xp, r)
        mon = Monitor(prob, rnorm, x0=x)
        rtrue = rnorm
        restarts = 0
        zeros = xp.zeros_like(r)
        while mon.k < prob.maxiter and mon.any_active():
            # (Re)start from the true residual; the shadow residual r_hat = r_0.
            rhat_c = cj(r)
            rn = rhat_n = host(rnorm)[0]
            thr = mon.threshold
            thr = None if thr is None else host(thr)[0]
            active = True
            p = v = zeros
            rho_prev = alpha = omega = one
            while mon.k < prob.maxiter:
                # An exactly zero residual (possible in fixed-budget mode, where nothing
                # converges) means x is exact: freeze without calling it a breakdown.
                go = active and rn > 0
                Gc[0, ...] = rhat_c @ r.mT
                rho = Gc_h[0, 0, 0]
                if go and abs(rho) <= eps2 * rhat_n * rn:
                    mon.flag(yes, BREAKDOWN)
                    go = False
                beta = (rho / (rho_prev if rho_prev != 0 else one)) * (alpha / (omega if omega != 0 else one))
                # A stopped system gets p = 0, so its (unused) scalars stay finite.
                p = r + beta.item() * (p - omega.item() * v) if go else zeros
                phat = M(p)
                v = prob.mv(phat)
                Gc[1, ...] = rhat_c @ v.mT
                Gc[2, ...] = cj(v) @ v.mT
                rv = Gc_h[1, 0, 0]
                if go and abs(rv) <= eps2 * rhat_n * nrm(Gc_h[2, 0, 0]):
                    mon.flag(yes, BREAKDOWN)
                    go = False
                alpha = rho / (rv if rv != 0 else one)
                s = r - alpha.item() * v
                Gc[3, ...] = cj(s) @ s.mT
                sn = nrm(Gc_h[3, 0, 0])
                # Half-step convergence: x + alpha p_hat already meets the tolerance.
                half = thr is not None and go and sn <= thr
                shat = M(s)
                t = prob.mv(shat)
                tc = cj(t)
                Gc[0, ...] = tc @ s.mT
                ts = Gc_h[0, 0, 0]
                full = go and not half and sn > 0
                bad = False
                omega = zero
                if full:
                    Gc[1, ...] = tc @ t.mT
                    tt = Gc_h[1, 0, 0]
                    if abs(ts) <= eps2 * nrm(tt) * sn:
                        bad, full = True, False
                    else:
                        omega = ts / (tt if tt != 0 else one)
                # A system whose omega broke down still takes the half step (x + alpha p_hat,
                # residual s), the best iterate the method has for it.
                if go:
                    x = x + alpha.item() * phat + omega.item() * shat
                    if full:
                        r = s - omega.item() * t
                        Gc[2, ...] = cj(r) @ r.mT
                        rn = nrm(Gc_h[2, 0, 0])
                    else:
                        r = s - omega.item() * t
                        rn = sn
                    # ones * rn: a new device array holding rn exactly, in one operation.
                    rnorm = ones_r * rn.item()
                    rho_prev = rho
                if bad:
                    mon.flag(yes, BREAKDOWN)
                stop = mon.update(rnorm, x)
                if stop:
                    break
                if prob.check_every != 1:
                    # (With check_every = 1 the monitor says stop exactly when the system
                    # stopped.) On the host, reading the flag costs no synchronisation.
                    active = bool(host(mon.active)[0])
            r = prob.b - prob.mv(x)
            rtrue = rnorm = safe_norm(xp, r)
            reopened = mon.check(x, rtrue)
            if reopened is not None:
                # Ask the recursive residual to go as far below the tolerance as the true
                # residual was above it.
                mon.tighten(reopened, rtrue, factor=1.0)
            restarts += 1
        return mon.finish(x, rtrue, info={"restarts": max(restarts - 1, 0)})

    def _run_batched(self, prob: Problem):
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

        cplx = xp.isdtype(dtype, "complex floating")

        def ldot(u, v):
            # Per-row <u, v> as one product (a BLAS dot, no temporary); u is conjugated by
            # the caller for complex data.
            return (u[:, None, :] @ v[:, :, None])[:, 0, 0]

        # Vectors sharded over ranks: every inner product summed over them, and the pairs
        # an iteration can take together in one collective (<r_hat, v> with <v, v>, <t, s>
        # with <t, t>, <r, r> with the next iteration's <r_hat, r>): four collectives per
        # iteration instead of seven.
        sharded = _given() is not None
        if sharded:
            def dot(u, v):
                return allreduce_sum(xp, ldot(u, v))[0]
        else:
            dot = ldot

        def cj(u):
            return xp.conj(u) if cplx else u

        # On the host, whether every system goes on costs nothing to read: the masks that
        # freeze stopped systems are then skipped (the arithmetic of a running system is the
        # same either way). On a device that would be a synchronisation per iteration.
        host = _on_host(prob)

        def every(mask):
            return host and bool(xp.all(mask))

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
            rhat_c = cj(rhat)
            rhat_n = rnorm
            p = v = xp.zeros_like(r)
            rho_prev = alpha = omega = ones
            # Sharded: <r_hat, r> of the next iteration, reduced with the norm of r.
            rho_next = None
            while mon.k < prob.maxiter:
                # An exactly zero residual (possible in fixed-budget mode, where nothing
                # converges) means x is exact: freeze without calling it a breakdown.
                go = mon.active & (rnorm > 0)
                rho = dot(rhat_c, r) if rho_next is None else rho_next
                mon.flag(go & (xp.abs(rho) <= eps2 * rhat_n * rnorm), BREAKDOWN)
                go = go & mon.active
                beta = (rho / safe(rho_prev)) * (alpha / safe(omega))
                # Stopped systems get p = 0, so their (unused) scalars stay finite.
                p = r + beta[:, None] * (p - omega[:, None] * v)
                all_go = every(go)
                if not all_go:
                    p = xp.where(go[:, None], p, xp.zeros_like(p))
                phat = M(p)
                v = prob.mv(phat)
                if sharded:
                    rv, vv = allreduce_sum(xp, ldot(rhat_c, v), ldot(cj(v), v))
                    vnorm = xp.sqrt(xp.real(vv) if cplx else vv)
                else:
                    rv, vnorm = dot(rhat_c, v), norm(xp, v)
                bad = go & (xp.abs(rv) <= eps2 * rhat_n * vnorm)
                mon.flag(bad, BREAKDOWN)
                go = go & ~bad
                alpha = rho / safe(rv)
                s = r - alpha[:, None] * v
                snorm = norm(xp, s)
                # Half-step convergence: x + alpha p_hat already meets the tolerance.
                half = no if mon.threshold is None else go & (snorm <= mon.threshold)
                shat = M(s)
                t = prob.mv(shat)
                tc = cj(t)
                if sharded:
                    ts, tt = allreduce_sum(xp, ldot(tc, s), ldot(tc, t))
                    tnorm = xp.sqrt(xp.real(tt) if cplx else tt)
                else:
                    ts, tnorm, tt = dot(tc, s), norm(xp, t), None
                full = go & ~half & (snorm > 0)
                bad = full & (xp.abs(ts) <= eps2 * tnorm * snorm)
                full = full & ~bad
                omega = xp.where(full, ts / safe(dot(tc, t) if tt is None else tt), zeros)
                # A system whose omega broke down still takes the half step (x + alpha p_hat,
                # residual s), the best iterate the method has for it.
                xn = x + alpha[:, None] * phat + omega[:, None] * shat
                rn = s - omega[:, None] * t
                if all_go and every(go):
                    x, r = xn, rn
                else:
                    x = xp.where(go[:, None], xn, x)
                    r = xp.where(go[:, None], rn, r)
                if sharded:
                    rr, rho_next = allreduce_sum(xp, ldot(cj(r), r), ldot(rhat_c, r))
                    nr = xp.sqrt(xp.real(rr) if cplx else rr)
                    rnorm = nr if every(full) else xp.where(go, xp.where(full, nr, snorm), rnorm)
                elif every(full):
                    rnorm = norm(xp, r)
                else:
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
