"""Restarted GMRES with right preconditioning.

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per Arnoldi
step), any nonsingular ``A``. Memory: a ``(B, restart + 1, n)`` Krylov basis.

References: Y. Saad and M. H. Schultz, "GMRES: A generalized minimal residual algorithm for
solving nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 1986. Reorthogonalised
classical Gram-Schmidt: L. Giraud, J. Langou and M. Rozloznik, "The loss of orthogonality in
the Gram-Schmidt orthogonalization process", Comput. Math. Appl. 50, 2005.
"""

from __future__ import annotations

from ._base import BREAKDOWN, Monitor, Problem, Solver, norm, safe_norm

__all__ = ["GMRES"]


def _givens(xp, a, b, cplx, one):
    """Per-system rotation ``G = [[c, s], [-conj(s), c]]`` with ``G [a, b]^T = [r, 0]^T``,
    for ``b >= 0`` real; ``c`` is real. A zero pair gives ``c = s = r = 0``: it only occurs
    where GMRES breaks down, and that system's rotation is not used afterwards."""
    if cplx:
        absa = xp.abs(a)
        nrm = xp.hypot(absa, b)
        safe = xp.where(nrm > 0, nrm, one)
        phase = xp.where(absa > 0, a / xp.where(absa > 0, absa, one), xp.ones_like(a))
        return absa / safe, phase * (b / safe), phase * nrm
    nrm = xp.hypot(a, b)
    safe = xp.where(nrm > 0, nrm, one)
    return a / safe, b / safe, nrm


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
        a pivot of the triangular factor below ``10 sqrt(m) eps`` times the largest
        ``||A M v_j||`` seen (``A`` singular on the Krylov space, to working precision) is
        BREAKDOWN, and so is a cycle whose ``x`` has a true residual more than 10 times the
        one the cycle started from (its small least-squares problem was numerically
        singular): that system keeps the ``x`` it had before the cycle. A singular,
        inconsistent system therefore ends BREAKDOWN with an ``x`` no worse than ``x0``. ``maxiter`` counts Arnoldi steps, i.e. the products with ``A`` apart from
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
    checks_claims = True
    accepts_preconditioner = True
    options = {"restart": 20}
    option_kinds = {"restart": "positive_int"}

    @staticmethod
    def _form_x(xp, dev, x, V, H, Qh, cs, sn, lives, beta, psolve):
        """``x + M V_k y`` with ``y`` minimising ``||beta e_1 - H_k y||`` over each system's
        own Krylov dimension, after ``k = len(cs)`` steps of a cycle.

        Row ``i`` of the rotation product ``Q`` is ``c_i q_i + s_i e_{i+1}``, with ``q_i`` the
        row the step-``i`` rotation acted on (kept in ``Qh``), so ``R = Q H`` and the rotated
        right-hand side ``g = beta Q e_1`` take one matrix product each."""
        k = len(cs)
        if k == 0:
            return x
        c = xp.stack(cs, axis=-1)[:, :, None]
        s = xp.stack(sn, axis=-1)[:, :, None]
        shift = xp.eye(k, k + 1, k=1, dtype=H.dtype, device=dev)
        Q = c * Qh[:, :k, : k + 1] + s * shift
        R = xp.triu(xp.matmul(Q, H[:, : k + 1, :k]))
        g = xp.astype(beta, H.dtype)[:, None] * Q[:, :, 0]
        # Columns past a system's own Krylov dimension (it stopped mid-cycle) or behind a
        # zero pivot are replaced by identity columns with a zero right-hand side: y = 0 there.
        use = xp.stack(lives, axis=-1) & (xp.linalg.diagonal(R) != 0)
        eye = xp.eye(k, dtype=H.dtype, device=dev)
        Rm = xp.where(use[:, None, :], R, eye)
        gm = xp.where(use, g, xp.zeros_like(g))
        y = xp.linalg.solve(Rm, gm[:, :, None])
        u = xp.matmul(xp.matrix_transpose(V[:, :k, :]), y)[:, :, 0]
        if psolve is not None:
            u = psolve(u)
        return xp.where(use[:, 0:1], x + u, x)

    def run(self, prob: Problem):
        xp = prob.xp
        dev = prob.device
        B, n = prob.nsys, prob.A.shape[1]
        m = min(int(prob.options["restart"]), n)
        dtype, rdtype = prob.dtype, prob.real_dtype
        cplx = xp.isdtype(dtype, "complex floating")
        eps = float(xp.finfo(rdtype).eps)

        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        beta = norm(xp, r)
        mon = Monitor(prob, beta, x0=x)
        target = mon.target
        ones_r = xp.ones((B,), dtype=rdtype, device=dev)
        zeros_r = xp.zeros((B,), dtype=rdtype, device=dev)
        zero = xp.zeros((1, 1), dtype=dtype, device=dev)
        factor = ones_r
        V = xp.zeros((B, m + 1, n), dtype=dtype, device=dev)
        # The Hessenberg matrix of a cycle, and the rows q_j of the accumulated Givens
        # rotations Q that the step-j rotation acts on: the rotated pivot of a new column is
        # q_j . h (one product per step, not j rotations), and Q is rebuilt from the q_j when
        # x is formed.
        H = xp.zeros((B, m + 1, m), dtype=dtype, device=dev)
        Qh = xp.zeros((B, m, m + 1), dtype=dtype, device=dev)
        e0 = xp.zeros((B, m + 1), dtype=dtype, device=dev)
        e0[:, 0] = 1
        if cplx:
            def nrm(v):
                return xp.sqrt(xp.real(xp.vecdot(v, v)))
        else:
            def nrm(v):
                return xp.sqrt(xp.vecdot(v, v))
        mv, psolve, callback = prob.mv, prob.psolve, prob.callback
        rtrue = beta
        cycles = 0
        # Largest ||A M v|| seen per system: an estimate of ||A M|| against which a pivot of
        # the triangular factor counts as zero (relative to ||A M v_j|| alone, a pivot is
        # never small exactly where A is singular, since A v_j is small there too).
        anorm = zeros_r
        piv_tol = 10.0 * eps * (m ** 0.5)
        while mon.k < prob.maxiter and mon.any_active():
            cycles += 1
            x_start, r_start = x, r
            live = mon.active & (beta > 0)
            started = live
            safe = xp.where(beta > 0, beta, ones_r)
            V[:, 0, :] = xp.where(live[:, None], r / safe[:, None], zero)
            q = xp.asarray(e0, copy=True)
            gcur = xp.astype(beta, dtype)
            cs, sn, lives = [], [], []
            est = beta
            xcb = x
            for j in range(m):
                if mon.k >= prob.maxiter:
                    break
                stepped = live
                vj = V[:, j, :]
                w = mv(vj if psolve is None else psolve(vj))
                wn = nrm(w)
                eh0 = eps * wn
                anorm = xp.where(live & (wn > anorm), wn, anorm)
                # Classical Gram-Schmidt, twice, as batched products with the basis; w is a
                # (B, n, 1) column here.
                w = w[:, :, None]
                Vj = V[:, : j + 1, :]
                VjT = Vj.mT
                if cplx:
                    h = xp.conj(xp.matmul(Vj, xp.conj(w)))
                    w = w - xp.matmul(VjT, h)
                    h2 = xp.conj(xp.matmul(Vj, xp.conj(w)))
                else:
                    h = xp.matmul(Vj, w)
                    w = w - xp.matmul(VjT, h)
                    h2 = xp.matmul(Vj, w)
                w = w[:, :, 0] - xp.matmul(VjT, h2)[:, :, 0]
                h = h + h2
                hn = nrm(w)
                lucky = hn <= eh0
                hn = xp.where(lucky, zeros_r, hn)
                unlucky = ~lucky
                # One scaling pass over w: 1 / h_{j+1,j} for a system that goes on, 0 for one
                # that stopped or found an invariant space (its unused rows stay zero).
                scale = xp.where(live & unlucky, ones_r / xp.where(lucky, ones_r, hn), zeros_r)
                V[:, j + 1, :] = w * (xp.astype(scale, dtype) if cplx else scale)[:, None]
                H[:, : j + 1, j] = h[:, :, 0]
                a = xp.matmul(q[:, None, : j + 1], h)[:, 0, 0]
                c, s, rr = _givens(xp, a, hn, cplx, ones_r)
                Qh[:, j, :] = q
                if cplx:
                    H[:, j + 1, j] = xp.astype(hn, dtype)
                    c = xp.astype(c, dtype)
                    ms = -xp.conj(s)
                else:
                    H[:, j + 1, j] = hn
                    ms = -s
                q = ms[:, None] * q
                q[:, j + 1] = c
                cs.append(c)
                sn.append(s)
                gcur = ms * gcur
                # A pivot that vanishes to working precision (so h_{j+1,j} does too): A M is
                # singular on the Krylov space and the residual cannot be reduced further; the
                # column is left out, so x minimises the residual over the previous space.
                broke = live & ((xp.abs(rr) if cplx else rr) <= piv_tol * anorm)
                mon._set(broke, BREAKDOWN)
                live = live & ~broke
                lives.append(live)
                est = xp.where(live, xp.abs(gcur), est)
                live = live & unlucky
                xk = None
                if callback is not None:
                    # Systems that stopped earlier in the cycle keep the x they stopped with.
                    xk = self._form_x(xp, dev, x, V, H, Qh, cs, sn, lives, beta, psolve)
                    xk = xp.where(stepped[:, None], xk, xcb)
                    xcb = xk
                stop = mon.update(est, xk)
                live = live & mon.active
                if stop:
                    break
            if callback is not None:
                x = xcb
            else:
                x = self._form_x(xp, dev, x, V, H, Qh, cs, sn, lives, beta, psolve)
            r = prob.b - prob.mv(x)
            rtrue = safe_norm(xp, r)
            # The cycle minimised the residual over x_start + M K: a true residual far above
            # the one it started from means the small least-squares problem was numerically
            # singular (A singular on the Krylov space, b outside its range); keep x_start.
            worse = started & xp.isfinite(rtrue) & (rtrue > 10.0 * beta)
            if bool(xp.any(worse)):
                x = xp.where(worse[:, None], x_start, x)
                r = xp.where(worse[:, None], r_start, r)
                rtrue = xp.where(worse, beta, rtrue)
                mon._set(worse, BREAKDOWN)
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
