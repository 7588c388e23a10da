"""Restarted GMRES with right preconditioning.

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per Arnoldi
step), any nonsingular ``A``. Memory: a ``(B, restart + 1, n)`` Krylov basis.

References: Y. Saad and M. H. Schultz, "GMRES: A generalized minimal residual algorithm for
solving nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 1986. Reorthogonalised
classical Gram-Schmidt: L. Giraud, J. Langou and M. Rozloznik, "The loss of orthogonality in
the Gram-Schmidt orthogonalization process", Comput. Math. Appl. 50, 2005.
"""

from __future__ import annotations

import numbers

from ._base import BREAKDOWN, Problem, Solver, norm
from ._checked import CheckedMonitor

__all__ = ["GMRES"]


def _givens(xp, a, b, cplx):
    """Per-system rotation ``G = [[c, s], [-conj(s), c]]`` with ``G [a, b]^T = [r, 0]^T``;
    ``c`` is real. A zero pair gives the identity and ``r = 0``."""
    absa = xp.abs(a)
    nrm = xp.hypot(absa, xp.abs(b))
    one = xp.ones_like(absa)
    pos = nrm > 0
    safe = xp.where(pos, nrm, one)
    c = xp.where(pos, absa / safe, one)
    if cplx:
        phase = xp.where(absa > 0, a / xp.where(absa > 0, absa, one), xp.ones_like(a))
        s = phase * xp.conj(b) / safe
    else:
        phase = xp.where(a < 0, -one, one)
        s = phase * b / safe
    return c, s, phase * nrm


class GMRES(Solver):
    """Restarted GMRES(m) (Saad & Schultz, 1986), right-preconditioned, batched.

    Each cycle builds an orthonormal basis of the Krylov space of ``A M`` from the current
    residual by Arnoldi with classical Gram-Schmidt and one reorthogonalisation (CGS2, done as
    two batched matrix products, which keeps the basis orthogonal to working precision in
    float32; Giraud et al., 2005), reduces the Hessenberg matrix to triangular form with
    Givens rotations, and minimises ``||b - A x||`` over ``x0 + M K_m``.

    Options
        ``restart`` (int, default 20, scipy's default): the Krylov dimension ``m`` of a
        cycle, capped at ``n``. Memory grows as ``(m + 1) n`` per system and the work per
        cycle as ``m^2 n``.

    Needs
        ``A x`` only, one product per Arnoldi step, plus one per cycle for the true residual
        from which the next cycle restarts (and one at the start when ``x0`` is given).
        ``M`` is applied once per step and once per cycle.
    Converges
        For any nonsingular ``A`` without restarts (in at most ``n`` steps in exact
        arithmetic); restarted GMRES can stall on strongly non-normal or indefinite ``A``:
        raise ``restart`` or precondition.
    Stops
        When the residual norm carried by the rotated right-hand side of the least-squares
        problem (free of products; with right preconditioning it is the norm of the
        unpreconditioned residual ``b - A x``) meets ``max(rtol ||b||, atol)``. The cycle
        then ends, ``x`` is formed and the true residual ``||b - A x||`` is computed; only if
        it meets the tolerance too does the system count as CONVERGED, otherwise it restarts
        with a tighter internal tolerance (scipy's adaptive inner tolerance). A lucky
        breakdown (``h_{k+1,k} = 0``: the Krylov space is invariant and ``x`` exact) converges;
        a pivot of the triangular factor that vanishes to working precision (``A`` singular
        on the Krylov space) is BREAKDOWN. ``maxiter`` counts Arnoldi steps, i.e. the products with ``A`` apart from
        the one per cycle (scipy's ``gmres`` counts restart cycles instead); reaching it gives
        MAX_ITERATIONS, or COMPLETED in fixed-budget mode, which runs exactly ``maxiter``
        steps. The reported ``residual_norm`` is the true one; ``residual_history`` holds the
        per-step estimates.

    A system of a batch that converges (or breaks down) in the middle of a cycle keeps
    exactly its own Krylov dimension: its unused basis columns are masked out of the
    triangular solve, so its ``x`` stops changing.

    The callback sees ``x`` at every step only because a callback is given: ``x`` is then
    formed every step (a small triangular solve and one ``M`` product per step); without a
    callback it is formed at the end of each cycle. ``info`` holds the number of ``cycles``
    and the ``restart`` used. Host synchronisation: once per cycle, plus the Monitor's
    ``check_every`` cadence inside a cycle.

    References
    ----------
    Y. Saad and M. H. Schultz, SIAM J. Sci. Stat. Comput. 7(3):856-869, 1986.
    L. Giraud, J. Langou and M. Rozloznik, Comput. Math. Appl. 50:1069-1075, 2005.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> from linsolve_rbp.problems import convection_diffusion
    >>> A = convection_diffusion(10)
    >>> b = np.ones(100)
    >>> res = lr.solve(A, b, method="gmres", rtol=1e-8, restart=30)
    >>> res.status.name, bool(np.linalg.norm(b - A @ res.x) <= 1e-8 * 10)
    ('CONVERGED', True)
    """

    name = "gmres"
    accepts_preconditioner = True
    options = {"restart": 20}

    def check_options(self, options: dict) -> dict:
        out = super().check_options(options)
        m = out["restart"]
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"restart must be a positive integer, got {m!r}")
        return out

    @staticmethod
    def _form_x(xp, dev, x, V, R, g, kdim, psolve):
        """``x + M V_k y`` with ``y`` solving the masked triangular system ``R y = g``."""
        k = len(g) - 1
        if k == 0:
            return x
        Rk = R[:, :k, :k]
        diag = xp.stack([R[:, i, i] for i in range(k)], axis=-1)
        cols = xp.arange(k, device=dev)
        # Columns past a system's own Krylov dimension (it stopped mid-cycle) or behind a
        # zero pivot are replaced by identity columns with a zero right-hand side: y = 0 there.
        use = (cols[None, :] < kdim[:, None]) & (diag != 0)
        eye = xp.eye(k, dtype=R.dtype, device=dev)
        Rm = xp.where(use[:, None, :], Rk, eye)
        gk = xp.stack(g[:k], axis=-1)
        gm = xp.where(use, gk, xp.zeros_like(gk))
        y = xp.linalg.solve(Rm, gm[:, :, None])
        u = xp.matmul(xp.matrix_transpose(V[:, :k, :]), y)[:, :, 0]
        if psolve is not None:
            u = psolve(u)
        return xp.where((kdim > 0)[:, None], x + u, x)

    def run(self, prob: Problem):
        xp = prob.xp
        dev = prob.device
        B, n = prob.nsys, prob.A.shape[1]
        m = min(int(prob.options["restart"]), n)
        dtype, rdtype = prob.dtype, prob.real_dtype
        cplx = xp.isdtype(dtype, "complex floating")
        eps = float(xp.finfo(rdtype).eps)

        def conj(a):
            return xp.conj(a) if cplx else a

        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        beta = norm(xp, r)
        mon = CheckedMonitor(prob, beta, x0=x)
        target = mon.target
        ones_r = xp.ones((B,), dtype=rdtype, device=dev)
        zeros_r = xp.zeros((B,), dtype=rdtype, device=dev)
        factor = ones_r
        V = xp.zeros((B, m + 1, n), dtype=dtype, device=dev)
        R = xp.zeros((B, m, m), dtype=dtype, device=dev)
        rtrue = beta
        cycles = 0
        while mon.k < prob.maxiter and bool(xp.any(mon.active)):
            cycles += 1
            live = mon.active & (beta > 0)
            safe = xp.where(beta > 0, beta, ones_r)
            V[:, 0, :] = xp.where(live[:, None], r / safe[:, None], xp.zeros_like(r))
            g = [xp.astype(beta, dtype)]
            cs, sn = [], []
            kdim = xp.zeros((B,), dtype=xp.int64, device=dev)
            est = beta
            for j in range(m):
                if mon.k >= prob.maxiter:
                    break
                vj = V[:, j, :]
                w = prob.mv(vj if prob.psolve is None else prob.psolve(vj))
                h0 = norm(xp, w)
                Vj = V[:, : j + 1, :]
                VjH = conj(Vj)
                VjT = xp.matrix_transpose(Vj)
                h = xp.matmul(VjH, w[:, :, None])
                w = w - xp.matmul(VjT, h)[:, :, 0]
                h2 = xp.matmul(VjH, w[:, :, None])
                w = w - xp.matmul(VjT, h2)[:, :, 0]
                h = (h + h2)[:, :, 0]
                hn = norm(xp, w)
                lucky = hn <= eps * h0
                hn = xp.where(lucky, zeros_r, hn)
                safe_hn = xp.where(hn > 0, hn, ones_r)
                V[:, j + 1, :] = xp.where((live & ~lucky)[:, None], w / safe_hn[:, None], xp.zeros_like(w))
                col = [h[:, i] for i in range(j + 1)]
                for i in range(j):
                    a, b = col[i], col[i + 1]
                    col[i] = cs[i] * a + sn[i] * b
                    col[i + 1] = -conj(sn[i]) * a + cs[i] * b
                c, s, rr = _givens(xp, col[j], xp.astype(hn, dtype), cplx)
                cs.append(c)
                sn.append(s)
                col[j] = rr
                R[:, : j + 1, j] = xp.stack(col, axis=-1)
                # A pivot that vanishes to working precision (so h_{j+1,j} does too): A M is
                # singular on the Krylov space and the residual cannot be reduced further; the
                # column is left out, so x minimises the residual over the previous space.
                broke = live & (xp.abs(rr) <= eps * h0)
                mon.flag(broke, BREAKDOWN)
                live = live & ~broke
                gj = g[j]
                g[j] = xp.where(live, c * gj, gj)
                g.append(xp.where(live, -conj(s) * gj, xp.zeros_like(gj)))
                kdim = xp.where(live, kdim + 1, kdim)
                est = xp.where(live, xp.abs(g[j + 1]), est)
                live = live & ~lucky
                xk = None
                if prob.callback is not None:
                    xk = self._form_x(xp, dev, x, V, R, g, kdim, prob.psolve)
                stop = mon.update(est, xk)
                live = live & mon.active
                if stop:
                    break
            x = self._form_x(xp, dev, x, V, R, g, kdim, prob.psolve)
            r = prob.b - prob.mv(x)
            rtrue = norm(xp, r)
            reopened = mon.check(x, rtrue)
            if reopened is not None:
                # scipy's adaptive inner tolerance (scipy gh-8400): the estimate's target for
                # the next cycle is scaled by how far the true residual was from it, tighter
                # after an estimate that passed while the true residual did not.
                factor = xp.where(
                    reopened,
                    xp.maximum(factor * 0.25, xp.full_like(factor, eps)),
                    xp.minimum(factor * 1.5, ones_r),
                )
                safe_rt = xp.where(rtrue > 0, rtrue, ones_r)
                inner = est * xp.minimum(factor, target / safe_rt)
                mon.threshold = xp.where(mon.active, inner, mon.threshold)
            beta = rtrue
        return mon.finish(x, rtrue, info={"cycles": cycles, "restart": m})
