"""Restarted GMRES with right preconditioning.

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per Arnoldi
step), any nonsingular ``A``. Memory: a ``(B, restart + 1, n)`` Krylov basis.

References: Y. Saad and M. H. Schultz, "GMRES: A generalized minimal residual algorithm for
solving nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 1986. Reorthogonalised
classical Gram-Schmidt: L. Giraud, J. Langou and M. Rozloznik, "The loss of orthogonality in
the Gram-Schmidt orthogonalization process", Comput. Math. Appl. 50, 2005.
"""

from __future__ import annotations

import math

from .. import backend as _b
from ._base import BREAKDOWN, Monitor, Problem, Solver, allreduce_sum, local_dot, norm, safe_norm
from ._compile import requested
from ._krylov import host_upper_solve
from .cg import compiled_step

__all__ = ["GMRES"]

#: The values of gmres's ``orthogonalization`` option: classical Gram-Schmidt twice (two
#: collectives per Arnoldi step when the vectors are sharded), or once (one collective).
ORTHOGONALIZATIONS = ("cgs2", "cgs")


def _gram_schmidt(xp, Vj, w, twice: bool, cplx: bool, eps: float, count=None):
    """Orthogonalise ``w`` (B, n) against the basis ``Vj`` (B, j + 1, n) by classical
    Gram-Schmidt with the inner products of a pass reduced together: one collective per pass
    (:func:`allreduce_sum`), for all the systems of the batch, whatever the number of
    coefficients.

    Each pass reduces its coefficients ``V^H w`` with the squared norm of the vector it
    orthogonalises, and the squared norm of the result follows by Pythagoras,
    ``||w - V h||^2 = ||w||^2 - ||h||^2`` (the basis being orthonormal), with no third
    reduction. With ``twice`` (CGS2) the second pass, two collectives in all, removes what
    the first left in the span of the basis, and the subtraction in the norm is then benign
    (the second coefficients are at rounding level). With one pass (CGS) it cancels when
    ``h_{j+1,j}`` is small compared to ``||w||``: below ``sqrt((j + 2) eps) ||w||`` the
    computed value is rounding noise, and ``h_{j+1,j}`` counts as zero (an invariant space to
    that accuracy: the cycle ends there and restarts from the true residual).

    ``count`` is the number of basis vectors, ``j + 1`` (a Python int or an array; default
    ``Vj``'s rows), where ``Vj`` holds zero rows after them.

    Returns ``h`` (B, j + 1, 1), ``hn = h_{j+1,j}`` (B,) (zero where ``lucky``), ``wn``
    ``= ||w||`` (B,), the orthogonalised ``w`` (B, n), and ``lucky`` (B,) bools."""
    VjT = Vj.mT

    def coefficients(v):
        # V^H v as a (B, j + 1, 1) column, and <v, v> in the coefficients' dtype (one buffer).
        vc = v[:, :, None]
        h = xp.conj(xp.matmul(Vj, xp.conj(vc))) if cplx else xp.matmul(Vj, vc)
        vv = local_dot(xp, v, v)
        return h, vv

    def sq(h):
        # ||h||^2 per system; h is replicated on every rank, so this is not reduced.
        return xp.sum(xp.real(h * xp.conj(h)) if cplx else h * h, axis=(-2, -1))

    h, ww = allreduce_sum(xp, *coefficients(w))
    ww = xp.real(ww) if cplx else ww
    w1 = w - xp.matmul(VjT, h)[:, :, 0]
    if twice:
        h2, w1w1 = allreduce_sum(xp, *coefficients(w1))
        w1w1 = xp.real(w1w1) if cplx else w1w1
        w2 = w1 - xp.matmul(VjT, h2)[:, :, 0]
        hn2 = w1w1 - sq(h2)
        h = h + h2
        floor = (eps * eps) * ww
    else:
        w2 = w1
        hn2 = ww - sq(h)
        floor = ((Vj.shape[1] if count is None else count) + 1) * eps * ww
    zero = xp.zeros_like(hn2)
    lucky = hn2 <= floor
    hn = xp.where(lucky, zero, xp.sqrt(xp.where(lucky, zero, hn2)))
    return h, hn, xp.sqrt(ww), w2, lucky


def _on_host(prob) -> bool:
    """Whether the data lives in host memory (numpy, torch on the CPU, any array-API library
    on a CPU device): reading a small array back then costs no device synchronisation, so the
    small dense algebra of a cycle runs in numpy."""
    name = _b.backend_name(prob.b)
    if name == "numpy":
        return True
    if name == "cupy":
        return False
    dev = prob.device
    kind = getattr(dev, "type", None)
    if kind is not None:
        return kind == "cpu"
    return "cpu" in str(dev).lower()


def _orthogonalization(prob):
    """``(fused, twice)``: whether the Arnoldi steps reduce their inner products together
    (:func:`_gram_schmidt`: with ``orthogonalization="cgs"``, and whenever a reduction is
    given, so that a sharded solve makes its collectives fused), and whether they
    reorthogonalise. Without a reduction the default (CGS2) keeps the paths below, whose
    three inner-product passes per step cost nothing to communicate."""
    twice = prob.options.get("orthogonalization", "cgs2") == "cgs2"
    return (not twice) or prob.reduction is not None, twice


def _arnoldi_step(xp, mv, psolve, V, j, live, anorm, fused, twice, cplx, eps, dtype, w=None):
    """The arithmetic of step ``j`` (a Python int) of an Arnoldi cycle of the device path, a
    function of arrays with no host read: ``w = A M v_j`` (or the ``w`` given, the product
    made outside), orthogonalised against ``v_0 .. v_j``; returns the coefficients ``h``
    (B, j + 1, 1), ``h_{j+1,j}`` (zero where ``lucky``: an invariant space), ``lucky``, the
    updated estimate ``anorm`` of ``||A M||``, and the next basis vector (zero for a system
    that stopped or is lucky)."""
    vj, Vj, count = V[:, j, :], V[:, : j + 1, :], j + 1
    if w is None:
        w = mv(vj if psolve is None else psolve(vj))
    ones_r = xp.ones_like(anorm)
    zeros_r = xp.zeros_like(anorm)
    if fused:
        h, hn, wn, w, lucky = _gram_schmidt(xp, Vj, w, twice, cplx, eps, count)
        anorm = xp.where(live & (wn > anorm), wn, anorm)
    else:
        def nrm(v):
            return xp.sqrt(xp.real(xp.vecdot(v, v))) if cplx else xp.sqrt(xp.vecdot(v, v))

        wn = nrm(w)
        eh0 = eps * wn
        anorm = xp.where(live & (wn > anorm), wn, anorm)
        # Classical Gram-Schmidt, twice, as batched products with the basis; w is a (B, n, 1)
        # column here.
        w = w[:, :, None]
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
    # One scaling pass over w: 1 / h_{j+1,j} for a system that goes on, 0 for one that
    # stopped or found an invariant space (its unused rows stay zero).
    scale = xp.where(live & ~lucky, ones_r / xp.where(lucky, ones_r, hn), zeros_r)
    return h, hn, lucky, anorm, w * (xp.astype(scale, dtype) if cplx else scale)[:, None]


def _cycle(xp, mv, psolve, b, x, V, w0, beta, live, active, anorm, thr, divlim, phase, steps,
           check_every, fused, twice, cplx, eps, piv_tol, lucky_tol):
    """A whole restart cycle of the device path as one function of arrays with no host read,
    compiled with ``compile=True``: ``steps`` Arnoldi steps (a Python int: the loop is
    unrolled, each step on its own prefix of the basis) with the Givens updates and the
    monitor's test of each estimate, then ``x`` formed and its true residual.

    ``V`` (B, m + 1, n) holds ``v_0`` (written in place with the rest of the basis), ``w0``
    is the first product ``A M v_0`` (made outside: the solve's first product is checked
    eagerly), ``active`` the monitor's running systems, ``thr`` and ``divlim`` its threshold
    and divergence limit (None when unset), ``phase`` the iterations before the cycle modulo
    ``check_every`` (a 0-d integer array).

    The steps run to ``steps`` whatever the estimates say; the cycle's length ``K`` is the
    step at which the uncompiled loop stops: the first step that ends on a ``check_every``
    boundary with no system running, or ``steps``. Each system's ``x`` uses its own Krylov
    dimension within the first ``K`` steps, as uncompiled.

    Returns ``(x, r, rtrue, worse, K, E, BR, LS, H, Qh, C, S, L, anorm)``: the new iterate,
    its residual and true residual norms, the systems whose cycle made the residual more
    than 10 times worse, ``K`` (0-d), the estimates of each step as the monitor sees them
    ``E`` (steps, B), the systems that broke down at each step ``BR`` (steps, B), those live
    at the start of each step ``LS`` (steps, B), the Hessenberg matrix and rotations (for a
    callback's iterates), the live columns ``L`` (B, m) and the updated ``||A M||``
    estimate."""
    dtype = V.dtype
    B, m = V.shape[0], V.shape[1] - 1
    dev = V.device
    ones_r = xp.ones_like(beta)
    H = xp.zeros((B, m + 1, m), dtype=dtype, device=dev)
    Qh = xp.zeros((B, m, m + 1), dtype=dtype, device=dev)
    q = xp.zeros((B, m + 1), dtype=dtype, device=dev)
    q[:, 0] = 1
    gcur = xp.astype(beta, dtype)
    est = beta
    started = live
    cs, sn, lives, ests, brokes, starts, acts = [], [], [], [], [], [], []
    for j in range(steps):
        starts.append(live)
        h, hn, lucky, anorm, V[:, j + 1, :] = _arnoldi_step(
            xp, mv, psolve, V, j, live, anorm, fused, twice, cplx, eps, dtype,
            w=w0 if j == 0 else None)
        unlucky = ~lucky
        q, gcur, broke = _rotate(xp, H, Qh, q, gcur, h, hn, lucky, live, anorm, j, cs, sn,
                                 cplx, dtype, ones_r, piv_tol, lucky_tol)
        active = active & ~broke
        live = live & ~broke
        lives.append(live)
        est = xp.where(live, xp.abs(gcur), est)
        live = live & unlucky
        # The monitor's test of the estimate (Monitor.update), on the device.
        if thr is not None:
            go = est > thr
            go = go & (est <= divlim) if divlim is not None else go & xp.isfinite(est)
        elif divlim is not None:
            go = est <= divlim
        else:
            go = xp.isfinite(est)
        active = active & go
        live = live & active
        ests.append(est)
        brokes.append(broke)
        acts.append(xp.any(active))
    # The step at which the uncompiled loop stops: a check_every boundary with nothing running.
    j1 = xp.arange(1, steps + 1, device=dev)
    stop = (((phase + j1) % check_every) == 0) & ~xp.stack(acts)
    stop = stop | (j1 == steps)
    K = xp.argmax(xp.astype(stop, xp.int32)) + 1
    L = xp.stack(lives, axis=-1)
    C, S = xp.stack(cs, axis=-1), xp.stack(sn, axis=-1)
    y, use = GMRES._small(xp, dev, H, Qh, C, S, L & (j1 <= K)[None, :], beta)
    u = xp.matmul(xp.matrix_transpose(V[:, :steps, :]), y)[:, :, 0]
    if psolve is not None:
        u = psolve(u)
    x = xp.where(use[:, 0:1], x + u, x)
    r = b - mv(x)
    rtrue = safe_norm(xp, r)
    worse = started & xp.isfinite(rtrue) & (rtrue > 10.0 * beta)
    return (x, r, rtrue, worse, K, xp.stack(ests), xp.stack(brokes), xp.stack(starts), H, Qh, C, S,
            L, anorm)


def _global_size(prob, n: int) -> int:
    """The number of unknowns of the whole system: ``n``, or with a reduction the sum of the
    shards' (one collective), so that every rank caps the Krylov dimension alike."""
    if prob.reduction is None:
        return n
    xp = prob.xp
    (tot,) = allreduce_sum(xp, xp.asarray([float(n)], dtype=prob.real_dtype, device=prob.device))
    return int(round(float(tot[0])))


def _mutable(prob) -> bool:
    """Whether arrays of the namespace support item assignment (JAX arrays do not); found
    once per solve, on a one-element array."""
    cached = getattr(prob, "_gmres_mutable", None)
    if cached is not None:
        return cached
    xp = prob.xp
    a = xp.zeros((1,), dtype=prob.dtype, device=prob.device)
    try:
        a[0] = 1
        ok = True
    except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError):
        ok = False
    try:
        prob._gmres_mutable = ok
    except AttributeError:  # pragma: no cover - a frozen Problem
        pass
    return ok


def _rotate(xp, H, Qh, q, gcur, h, hn, lucky, live, anorm, j, cs, sn, cplx, dtype, ones_r,
            piv_tol, lucky_tol):
    """Step ``j``'s column of the Hessenberg matrix into ``H``, its Givens rotation (appended
    to ``cs``, ``sn``; the rotations' product so far kept in ``q``, its rows in ``Qh``) and the
    rotated residual ``gcur``, on device arrays (the device loop and the compiled cycle).
    Returns ``q, gcur, broke``: ``broke`` marks the live systems whose rotated pivot vanishes
    to working precision (so ``h_{j+1,j}`` does too): ``A M`` is singular on the Krylov
    space and the residual cannot be reduced further; the column is left out, so ``x``
    minimises the residual over the previous space (at a lucky breakdown the threshold is
    :func:`_lucky_tol`)."""
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
    tol = xp.where(lucky, lucky_tol * anorm, piv_tol * anorm)
    broke = live & ((xp.abs(rr) if cplx else rr) <= tol)
    return q, ms * gcur, broke


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


def _givens1(hp, a, b, cplx, T):
    """:func:`_givens` for one system, on numpy scalars (``T`` the real scalar type; ``hp`` is
    numpy, whose ``hypot`` rounds numpy scalars as it rounds arrays of their precision)."""
    if cplx:
        absa = abs(a)
        nrm = hp.hypot(absa, b)
        safe = nrm if nrm > 0 else T(1)
        phase = a / absa if absa > 0 else type(a)(1)
        return type(a)(absa / safe), phase * (b / safe), phase * nrm
    nrm = hp.hypot(a, b)
    safe = nrm if nrm > 0 else T(1)
    return a / safe, b / safe, nrm


_SHIFTS: dict = {}


def _shift(hp, k: int, dtype):
    """``eye(k, k + 1, k=1)`` on the host, made once per size and dtype (read only)."""
    key = (k, dtype)
    a = _SHIFTS.get(key)
    if a is None:
        a = _SHIFTS[key] = hp.eye(k, k + 1, k=1, dtype=dtype)
        a.flags.writeable = False
    return a


def _small1(hp, H, Qh, c, s, lives, beta):
    """:meth:`GMRES._small` for one system, on the 2-D host arrays of its cycle (``H``
    (m + 1, m), ``Qh`` whose rows are the ``q_i``, ``c``, ``s``, ``lives`` of shape (k,),
    ``beta`` of shape (1,)), with the same operations on arrays without the batch axis (the
    same values, bit for bit), the masking skipped when every column is taken, and then, in
    float64 with a finite ``R``, LAPACK's triangular solve for ``numpy.linalg.solve``
    (:func:`host_upper_solve`: the same values there): ``(y, use)``, ``y`` of shape (k,)."""
    k = c.shape[0]
    Q = c[:, None] * Qh[:k, : k + 1] + s[:, None] * _shift(hp, k, H.dtype)
    R = Q @ H[: k + 1, :k]
    if H.dtype == hp.float64:
        g = beta[0] * Q[:, 0]
        trtrs = host_upper_solve()
        if trtrs is not None and lives.all() and math.isfinite(R.sum()):
            # The solve reads R's upper triangle (what triu keeps); a zero pivot (info > 0)
            # takes the masked solve below, and so does a non-finite R (where the LU would
            # differ from the triangular solve).
            y, info = trtrs(R, g)
            if info == 0:
                return y, lives
    else:
        g = hp.astype(beta, H.dtype) * Q[:, 0]
    R = hp.triu(R)
    use = lives & (hp.linalg.diagonal(R) != 0)
    if not use.all():
        R = hp.where(use[None, :], R, hp.eye(k, dtype=H.dtype))
        g = hp.where(use, g, hp.zeros_like(g))
    return hp.linalg.solve(R, g[:, None])[:, 0], use


def _small_host(hp, H, Qh, c, s, lives, beta, work):
    """:meth:`GMRES._small` for a batch on the host (numpy arrays), the same values bit for
    bit with less work. ``Q`` and ``R = Q H`` are written into the workspaces ``work`` (a
    dict, filled on first use: flat buffers for the largest ``k``), and ``Q`` formed in one
    pass (``c_i q_i``, then ``s_i`` added on its superdiagonal: where the shift is zero,
    ``s_i * 0 = +0`` is added, which only turns a ``-0`` into ``+0``, done with ``+= 0``;
    ``s_i >= 0`` unless NaN). In float64 each system's masked triangular system (unused
    columns replaced by identity columns) is solved by LAPACK's triangular solve
    (:func:`host_upper_solve`: the value ``numpy.linalg.solve`` gives on an upper-triangular
    matrix with a nonzero diagonal), a system with no column taken gets ``y = 0`` (what that
    solve gives), and systems whose ``R`` is not finite go through ``numpy.linalg.solve`` as
    in ``_small``."""
    B, k = c.shape
    if "Q" not in work:
        m = Qh.shape[1]
        work["Q"] = hp.empty((B * m * (m + 1),), dtype=H.dtype)
        work["R"] = hp.empty((B * m * m,), dtype=H.dtype)
    Q = work["Q"][: B * k * (k + 1)].reshape(B, k, k + 1)
    R = work["R"][: B * k * k].reshape(B, k, k)
    if not hp.isdtype(H.dtype, "complex floating") and not hp.isnan(s).any():
        hp.multiply(Qh[:, :k, : k + 1], c[:, :, None], Q)
        Q.reshape(B, -1)[:, 1 :: k + 2] += s
        Q += 0.0
    else:
        Q[...] = c[:, :, None] * Qh[:, :k, : k + 1] + s[:, :, None] * _shift(hp, k, H.dtype)
    hp.matmul(Q, H[:, : k + 1, :k], R)
    g = hp.astype(beta, H.dtype)[:, None] * Q[:, :, 0]
    use = lives & (hp.linalg.diagonal(R) != 0)
    trtrs = host_upper_solve() if H.dtype == hp.float64 else None
    if trtrs is None:
        rest = None
    else:
        y = hp.zeros((B, k), dtype=H.dtype)
        if use.all():
            Rm, gm = R, g
        else:
            Rm = hp.where(use[:, None, :], R, _eye(hp, k, H.dtype))
            gm = hp.where(use, g, hp.zeros_like(g))
        # (A non-finite R would make the LU differ from the triangular solve.)
        fine = hp.isfinite(R.sum(axis=(1, 2)))
        taken = use.any(axis=1)
        for i in hp.flatnonzero(fine & taken).tolist():
            y[i] = trtrs(Rm[i], gm[i])[0]
        rest = taken & ~fine
        if not rest.any():
            return y[:, :, None], use
    Rr, gr, ur = (R, g, use) if rest is None else (R[rest], g[rest], use[rest])
    Rr = hp.triu(Rr)
    if not ur.all():
        Rr = hp.where(ur[:, None, :], Rr, _eye(hp, k, H.dtype))
        gr = hp.where(ur, gr, hp.zeros_like(gr))
    yr = hp.linalg.solve(Rr, gr[:, :, None])
    if rest is None:
        return yr, use
    y[rest] = yr[:, :, 0]
    return y[:, :, None], use


def _eye(hp, k: int, dtype):
    """``eye(k)`` on the host, made once per size and dtype (read only)."""
    key = (k, -1, dtype)
    a = _SHIFTS.get(key)
    if a is None:
        a = _SHIFTS[key] = hp.eye(k, dtype=dtype)
        a.flags.writeable = False
    return a


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

        ``orthogonalization`` (default ``"cgs2"``): how an Arnoldi step orthogonalises
        ``A M v_j`` against the basis. Both are classical Gram-Schmidt, whose coefficients
        ``h_{1..j,j}`` of a pass are independent inner products and so can be reduced in one
        collective when the vectors are shards over several processes (``reduction=``);
        the norm ``h_{j+1,j}`` comes from the same collective, by Pythagoras
        (``||w - V h||^2 = ||w||^2 - ||h||^2``). ``"cgs2"`` makes the pass twice (CGS2):
        two collectives per step, and a basis orthogonal to working precision (Giraud et al.,
        2005). ``"cgs"`` makes it once: one collective per step, the least communication,
        but the basis loses orthogonality as the Krylov basis becomes ill conditioned
        (which slows convergence and can stall it; Giraud et al., 2005), and the norm from
        Pythagoras cancels where ``h_{j+1,j}`` is small compared to ``||A M v_j||`` (below
        ``sqrt((j + 2) eps)`` of it, it is taken as zero: the cycle ends and the next one
        restarts from the true residual). Neither can give a false CONVERGED: the claim is
        checked on the true residual. Reorthogonalising costs one more collective per step
        and doubles the Gram-Schmidt arithmetic (``8 (j + 1) n`` flops at step ``j``
        instead of ``4 (j + 1) n``). Without a reduction ``"cgs2"`` computes ``h_{j+1,j}``
        directly, as its own inner product, since communication costs nothing there.

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
        ``||A M v_j||`` seen (``A`` singular on the Krylov space, to working precision; at a
        lucky breakdown, below ``1e3 m eps`` times it, the rounding level of the Arnoldi
        relation there) is BREAKDOWN, and so is a cycle whose ``x`` has a true residual more than 10 times the
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
    and the ``restart`` used (and ``allreduces``, the collectives made, when a reduction is
    given: one per step with ``"cgs"``, two with ``"cgs2"``, plus a few per cycle for the
    norms of the true residual). Host synchronisation on a device (CUDA, cupy): once per cycle,
    plus the Monitor's ``check_every`` cadence inside a cycle. Data in host memory (numpy,
    torch on the CPU, array-API libraries on a CPU device) take a path that does the small
    dense algebra of each step in numpy (reading a few numbers costs nothing there); arrays
    without item assignment (JAX) take it too, with a functional basis.

    With ``compile=True`` (torch tensors, on any device; not with ``reduction=``) each restart
    cycle is one call of a graph compiled with :func:`torch.compile` (``fullgraph``): the
    ``m`` Arnoldi steps (unrolled, on a basis of fixed shape), their Givens rotations and the
    monitor's test of each estimate, then ``x`` and its true residual, with one host read per
    cycle (its length) besides the monitor's ``any running?`` between cycles. The estimate is
    therefore acted on once per cycle: the cycle runs all its steps, and ``x`` is formed from
    the first ``k`` of them, ``k`` the step at which the uncompiled loop stops (where the
    estimate met the tolerance, on the ``check_every`` cadence), so ``x``, the status,
    ``iterations`` and ``residual_history`` are those of the uncompiled solve, to rounding.
    The products are counted as applied: a cycle that stops at step ``k < m`` still applied
    ``m`` products (on zero vectors after ``k``), so ``matvecs`` exceeds the uncompiled
    count by those steps, reported as ``info["discarded_steps"]``. Each cycle's first product
    runs before the graph, uncompiled (the solve's first product is checked on the way). A
    cycle cut short by ``maxiter`` compiles a graph of its own length. Compiling a cycle of
    ``m = 30`` takes about a minute on a CPU with inductor. On the CPU the uncompiled path,
    which does the small algebra in numpy, is the faster one at small ``n``: a compiled
    cycle's call has a fixed cost besides its arithmetic (the graph's buffers and guards),
    and inductor's loops for a step's Gram-Schmidt products and updates cost more than the
    numpy path's BLAS calls there; the cycle's ``A @ v`` are kept as BLAS calls (dense
    ``n = 200``, ``m = 30``: 6.39 ms against 3.58 ms uncompiled in the committed
    ``docs/benchmarks_table.md``, from ``python -m asv_benchmarks.lean_gmres``). The
    compiled cycle is meant for devices, where every operation of an uncompiled step costs a
    kernel launch.

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
    compiles = True
    options = {"restart": 20, "orthogonalization": ORTHOGONALIZATIONS[0]}
    option_kinds = {"restart": "positive_int", "orthogonalization": ORTHOGONALIZATIONS}

    @staticmethod
    def _small(sp, sdev, H, Qh, c, s, lives, beta):
        """``y`` minimising ``||beta e_1 - H_k y||`` over each system's own Krylov dimension,
        after ``k = c.shape[1]`` steps of a cycle, in namespace ``sp`` on device ``sdev`` (the
        host, or the device of the data): ``(y, use)`` with ``y`` of shape ``(B, k, 1)`` and
        ``use`` the columns taken.

        Row ``i`` of the rotation product ``Q`` is ``c_i q_i + s_i e_{i+1}``, with ``q_i`` the
        row the step-``i`` rotation acted on (kept in ``Qh``), so ``R = Q H`` and the rotated
        right-hand side ``g = beta Q e_1`` take one matrix product each."""
        k = c.shape[1]
        c = c[:, :, None]
        s = s[:, :, None]
        shift = sp.eye(k, k + 1, k=1, dtype=H.dtype, device=sdev)
        Q = c * Qh[:, :k, : k + 1] + s * shift
        R = sp.triu(sp.matmul(Q, H[:, : k + 1, :k]))
        g = sp.astype(beta, H.dtype)[:, None] * Q[:, :, 0]
        # Columns past a system's own Krylov dimension (it stopped mid-cycle) or behind a
        # zero pivot are replaced by identity columns with a zero right-hand side: y = 0 there.
        use = lives & (sp.linalg.diagonal(R) != 0)
        eye = sp.eye(k, dtype=H.dtype, device=sdev)
        Rm = sp.where(use[:, None, :], R, eye)
        gm = sp.where(use, g, sp.zeros_like(g))
        return sp.linalg.solve(Rm, gm[:, :, None]), use

    @classmethod
    def _form_x(cls, xp, dev, x, V, H, Qh, cs, sn, lives, beta, psolve):
        """``x + M V_k y`` (see :meth:`_small`) on the device, after ``k = len(cs)`` steps."""
        k = len(cs)
        if k == 0:
            return x
        y, use = cls._small(xp, dev, H, Qh, xp.stack(cs, axis=-1), xp.stack(sn, axis=-1),
                            xp.stack(lives, axis=-1), beta)
        u = xp.matmul(xp.matrix_transpose(V[:, :k, :]), y)[:, :, 0]
        if psolve is not None:
            u = psolve(u)
        return xp.where(use[:, 0:1], x + u, x)

    def run(self, prob: Problem):
        if requested(prob):
            # Whole cycles compiled (torch arrays, on any device).
            return self._run_compiled(prob)
        if _on_host(prob) or not _mutable(prob):
            return self._run_host(prob, _mutable(prob))
        return self._run_device(prob)

    def _run_device(self, prob: Problem):
        xp = prob.xp
        dev = prob.device
        B, n = prob.nsys, prob.A.shape[1]
        m = min(int(prob.options["restart"]), _global_size(prob, n))
        fused, twice = _orthogonalization(prob)
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
        mv, psolve, callback = prob.mv, prob.psolve, prob.callback
        rtrue = beta
        cycles = 0
        # Largest ||A M v|| seen per system: an estimate of ||A M|| against which a pivot of
        # the triangular factor counts as zero (relative to ||A M v_j|| alone, a pivot is
        # never small exactly where A is singular, since A v_j is small there too).
        anorm = zeros_r
        piv_tol = 10.0 * eps * (m ** 0.5)
        lucky_tol = _lucky_tol(eps, m)
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
                h, hn, lucky, anorm, V[:, j + 1, :] = _arnoldi_step(
                    xp, mv, psolve, V, j, live, anorm, fused, twice, cplx, eps, dtype)
                unlucky = ~lucky
                q, gcur, broke = _rotate(xp, H, Qh, q, gcur, h, hn, lucky, live, anorm, j, cs, sn,
                                         cplx, dtype, ones_r, piv_tol, lucky_tol)
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
            x, r, rtrue, factor = _end_cycle(
                mon, xp, x, r, rtrue, worse if bool(xp.any(worse)) else None, x_start, r_start,
                beta, factor, est, target, eps, ones_r)
            beta = rtrue
        return mon.finish(x, rtrue, info={"cycles": cycles, "restart": m})

    def _run_compiled(self, prob: Problem):
        """``compile=True``: the device path's iteration with each restart cycle one compiled
        call (:func:`_cycle`) and one host read (the cycle's length), besides the first
        product of each cycle, made before the call, and the monitor's bookkeeping and the
        check of the claims on the true residual after it."""
        cycle = compiled_step(self.name, prob, _cycle)
        xp = prob.xp
        dev = prob.device
        B, n = prob.nsys, prob.A.shape[1]
        m = min(int(prob.options["restart"]), n)
        fused, twice = _orthogonalization(prob)
        dtype, rdtype = prob.dtype, prob.real_dtype
        cplx = xp.isdtype(dtype, "complex floating")
        eps = float(xp.finfo(rdtype).eps)

        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        beta = norm(xp, r)
        mon = Monitor(prob, beta, x0=x)
        target = mon.target
        ones_r = xp.ones((B,), dtype=rdtype, device=dev)
        zero = xp.zeros((1, 1), dtype=dtype, device=dev)
        factor = ones_r
        V = xp.zeros((B, m + 1, n), dtype=dtype, device=dev)
        mv, psolve, callback = prob.mv, prob.psolve, prob.callback
        rtrue = beta
        cycles = 0
        anorm = xp.zeros((B,), dtype=rdtype, device=dev)
        piv_tol = 10.0 * eps * (m ** 0.5)
        lucky_tol = _lucky_tol(eps, m)
        every = prob.check_every
        phases = {}
        discarded = 0
        while mon.k < prob.maxiter and mon.any_active():
            cycles += 1
            x_start, r_start = x, r
            live = mon.active & (beta > 0)
            safe = xp.where(beta > 0, beta, ones_r)
            V[:, 0, :] = xp.where(live[:, None], r / safe[:, None], zero)
            v0 = V[:, 0, :]
            # The cycle's first product, uncompiled: the solve's first product is checked.
            w0 = mv(v0 if psolve is None else psolve(v0))
            steps = min(m, prob.maxiter - mon.k)
            ph = mon.k % every
            phase = phases.get(ph)
            if phase is None:
                phase = phases[ph] = xp.asarray(ph, dtype=xp.int64, device=dev)
            (xn, rn, rt, worse, K, E, BR, LS, H, Qh, C, S, L, anorm) = cycle(
                xp, mv, psolve, prob.b, x, V, w0, beta, live, mon.active, anorm, mon.threshold,
                mon._divlim, phase, steps, every, fused, twice, cplx, eps, piv_tol, lucky_tol)
            K = int(K)  # the host read of the cycle
            discarded += steps - K
            if callback is None:
                # The monitor's updates of the first K steps at once: the estimates, the
                # breakdowns, and the test of the last estimate (a system that stopped keeps
                # its estimate, so the last test decides as the K tests do).
                mon.k += K
                mon.history.extend(E[:K].unbind(0))  # K views in one call
                mon._set(xp.any(BR[:K], axis=0), BREAKDOWN)
                mon._test(E[K - 1])
            else:
                # The iterate of each step, for the callback, as uncompiled.
                xcb = x
                for j in range(K):
                    mon._set(BR[j], BREAKDOWN)
                    y, use = self._small(xp, dev, H, Qh, C[:, : j + 1], S[:, : j + 1],
                                         L[:, : j + 1], beta)
                    u = xp.matmul(xp.matrix_transpose(V[:, : j + 1, :]), y)[:, :, 0]
                    if psolve is not None:
                        u = psolve(u)
                    xk = xp.where(use[:, 0:1], x + u, x)
                    xcb = xp.where(LS[j][:, None], xk, xcb)
                    mon.update(E[j], xcb)
            x, r, rtrue, factor = _end_cycle(
                mon, xp, xn, rn, rt, worse, x_start, r_start, beta, factor, E[K - 1], target, eps,
                ones_r)
            beta = rtrue
        return mon.finish(x, rtrue, info={"cycles": cycles, "restart": m,
                                          "discarded_steps": discarded})

    def _run_host(self, prob: Problem, mutable: bool):
        """The same iteration for data in host memory, with the small dense algebra
        (Hessenberg matrix, Givens rotations, least-squares solve) in numpy: a handful of
        operations on a few numbers per step, which cost well under a microsecond each on
        numpy scalars and several microseconds each as device-library calls.

        One system whose basis numpy can view without a copy (numpy, torch on the CPU) runs
        the Gram-Schmidt passes in numpy on that view too, so that a step costs the product,
        about twenty numpy operations and the monitor, whatever the library. Batches run
        the passes in the data's namespace and bring the coefficients to the host through a
        shared buffer (or a conversion where nothing is shared). Without item assignment
        (``mutable`` False: JAX) the basis is a list of vectors, stacked for the products
        with it. The arithmetic is the device path's, operation for operation.

        Every operation here is a fixed cost paid around the products, and on a slow product
        a cold one (the caches hold the product's data by then): a step writes its results
        straight into preallocated host arrays (the Hessenberg matrix stored by columns, the
        rotations' rows made in place), one system's small solve at the end of a cycle runs
        on 2-D arrays and LAPACK's triangular solve (:func:`_small1`, :func:`_small_host`
        for batches), and one float64 system closes its cycles on host floats
        (:func:`_end_cycle1`), each giving the values of the general form bit for bit."""
        xp = prob.xp
        dev = prob.device
        B, n = prob.nsys, prob.A.shape[1]
        m = min(int(prob.options["restart"]), _global_size(prob, n))
        fused, twice = _orthogonalization(prob)
        dtype, rdtype = prob.dtype, prob.real_dtype
        cplx = xp.isdtype(dtype, "complex floating")
        eps = float(xp.finfo(rdtype).eps)
        like = prob.b
        host = _b.to_numpy

        def to_dev(a):
            return _b.from_numpy(a, like)

        def scaled(v, s_h, divide=False):
            # v (B, n) times (or divided by) the host scalars s_h (B,).
            if B == 1:
                f = s_h[0].item()
                return v / f if divide else v * f
            sd = to_dev(s_h)[:, None]
            return v / sd if divide else v * sd

        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        beta = norm(xp, r)
        mon = Monitor(prob, beta, x0=x)
        target = mon.target
        beta_h = host(beta)
        hdt = host(xp.zeros((1,), dtype=dtype, device=dev)).dtype
        hp = _b.array_namespace(beta_h)
        hrdt = beta_h.dtype
        one_h = hp.ones((B,), dtype=hrdt)
        zero_h = hp.zeros((B,), dtype=hrdt)
        ones_r = xp.ones((B,), dtype=rdtype, device=dev)
        factor = ones_r
        V = xp.zeros((B, m + 1, n), dtype=dtype, device=dev) if mutable else None
        native = isinstance(like, hp.ndarray)  # numpy itself: its results are host arrays
        if mutable:
            rows = [V[:, i, :] for i in range(m + 1)]
        # One system whose basis numpy can share (numpy, torch on the CPU): the Gram-Schmidt
        # passes run in numpy on a host view of the basis, made once, so that a step costs
        # the product and a few numpy operations whatever the library.
        single = False
        if B == 1 and mutable and not fused:
            Vh = host(V)
            V[0, 0, 0] = 1
            single = Vh.shape == (B, m + 1, n) and Vh[0, 0, 0] == 1
            V[0, 0, 0] = 0
        # A batch's small results of a step (the coefficients and h_{j+1,j}^2) are written
        # into one device buffer whose host view is made once, where the library shares
        # memory with numpy: no conversion per step. Elsewhere each is converted (numpy's
        # need none).
        G = G_h = None
        if mutable and not single and not native:
            G = xp.zeros((B, 2 * m + 4, 1), dtype=dtype, device=dev)
            G_h = host(G)
            G[0, 0, 0] = 1
            if not (G_h.shape == (B, 2 * m + 4, 1) and G_h[0, 0, 0] == 1):
                G = G_h = None
        if single:
            V2 = Vh[0, :, :]
            pre = [V2[:i, :] for i in range(m + 1)]
        # The Hessenberg matrix H, stored by columns (Ht[:, j] is column j: a step writes one
        # contiguous row), copied to a contiguous H when x is formed.
        Ht = hp.zeros((B, m, m + 1), dtype=hdt)
        H = Ht.transpose(0, 2, 1)
        # The rows q_j of the rotations' product (see _rotate), row j + 1 made from row j in
        # place; Qh, the first m, is what the small solve reads.
        Qb = hp.zeros((B, m + 1, m + 1), dtype=hdt)
        Qh = Qb[:, :m, :]
        C = hp.zeros((B, m), dtype=hdt)
        S = hp.zeros((B, m), dtype=hdt)
        L = hp.zeros((B, m), dtype=hp.bool)
        e0 = hp.zeros((B, m + 1), dtype=hdt)
        e0[:, 0] = 1
        mv, psolve, callback = prob.mv, prob.psolve, prob.callback
        rtrue = beta
        cycles = 0
        anorm = zero_h
        piv_tol = 10.0 * eps * (m ** 0.5)
        lucky_tol = _lucky_tol(eps, m)
        # Scalars of the working precision, for the scalar algebra of one system: numpy's, or
        # Python floats in float64 (whose arithmetic is float64's, and cheaper than numpy's).
        T = float if hrdt == hp.float64 else hrdt.type
        one1 = T(1)
        zero1 = T(0)
        anorm1 = zero1
        maxiter = prob.maxiter
        check1 = prob.check_every != 1
        target1 = None if target is None else float(host(target)[0])
        if single:
            Hs, Cs, Ss, Ls = H[0], C[0], S[0], L[0]
            V2rows, Qrows = list(V2), list(Qb[0])
        if native:
            def est_array(e):
                return hp.asarray([e])

            def basis_times(k, y):
                return (y @ V2[:k])[None, :]

            def put_row0(r, f):
                hp.divide(r, f, V[:, 0, :])

            def rsub(a, t):
                # a - t, into the temporary t.
                return hp.subtract(a, t, t)

            def put_scaled(dst, v, s_h):
                # dst <- v * s_h (the rows of v by the host scalars s_h), with no temporary.
                hp.multiply(v, s_h[0].item() if B == 1 else s_h[:, None], dst)
        else:
            def est_array(e):
                return to_dev(hp.asarray([e], dtype=hrdt))

            def basis_times(k, y):
                return xp.matmul(xp.matrix_transpose(V[:, :k, :]), to_dev(y[None, :, None]))[:, :, 0]

            def rsub(a, t):
                return a - t

            def put_scaled(dst, v, s_h):
                dst[...] = scaled(v, s_h)

            def put_row0(r, f):
                V[:, 0, :] = r / f

        work = {}

        def form_x(x, basis, k):
            if k == 0:
                return x
            if single:
                y, use = _small1(hp, hp.ascontiguousarray(Hs[: k + 1, :k]), Qb[0], Cs[:k], Ss[:k], Ls[:k],
                                 beta_h)
                if not use[0]:
                    return x
                # numpy: V_k^T y on the host view, the batched product's value; elsewhere
                # the library's own product, as in the batched form below.
                u = basis_times(k, y)
                return x + (u if psolve is None else psolve(u))
            y, use = _small_host(hp, hp.ascontiguousarray(H[:, : k + 1, :k]), Qh, C[:, :k], S[:, :k],
                                 L[:, :k], beta_h, work)
            Vk = basis[:, :k, :] if mutable else xp.stack(basis[:k], axis=1)
            u = xp.matmul(xp.matrix_transpose(Vk), to_dev(y))[:, :, 0]
            if psolve is not None:
                u = psolve(u)
            use0 = use[:, 0]
            if bool(hp.all(use0)):
                return x + u
            if not bool(hp.any(use0)):
                return x
            return xp.where(to_dev(use0)[:, None], x + u, x)

        # Row 0 of the rotations' rows, e_0, is the same every cycle (the steps write rows 1..m).
        Qb[:, 0, :] = e0
        while mon.k < prob.maxiter and mon.any_active():
            cycles += 1
            x_start, r_start = x, r
            if single:
                # The cycle's start on host scalars: a handful of operations fewer per cycle.
                b0 = beta_h[0]
                live1 = started1 = bool(host(mon.active)[0]) and b0 > 0
                if live1:
                    put_row0(r, float(b0))
                else:
                    V[:, 0, :] = 0
                gcur1 = hp.astype(beta_h, hdt)[0] if cplx else T(b0)
                est1 = T(b0)
            else:
                live = host(mon.active) & (beta_h > 0)
                started = live
                safe = hp.where(beta_h > 0, beta_h, one_h)
                v0 = scaled(r, safe, divide=True)
                if not live.all():
                    v0 = xp.where(to_dev(live)[:, None], v0, xp.zeros_like(v0))
                if mutable:
                    V[:, 0, :] = v0
                    basis = V
                else:
                    basis = [v0]
                gcur = hp.astype(beta_h, hdt)
                est = beta_h
            xcb = x
            k = 0
            if single:
                # One system: 2-D and 1-D products on prefix views of the basis made once
                # (cheaper than batched ones with a leading axis of 1), and the small algebra
                # on scalars of the working precision (Python floats in float64), each written
                # straight into the cycle's host arrays; the rotations' rows q_j are rows of
                # Qb, row j + 1 made from row j by one multiplication into it.
                for j in range(m):
                    if mon.k >= maxiter:
                        break
                    stepped1 = live1
                    vj = rows[j]
                    w = host(mv(vj if psolve is None else psolve(vj)))[0]
                    Vj = pre[j + 1]
                    # Classical Gram-Schmidt, twice; ||w||^2 = ||h||^2 + h_{j+1,j}^2.
                    if cplx:
                        h1 = hp.conj(Vj @ hp.conj(w))
                        w1 = w - h1 @ Vj
                        h2 = hp.conj(Vj @ hp.conj(w1))
                        w2 = w1 - h2 @ Vj
                        hn = T(math.sqrt((hp.conj(w2) @ w2).real))
                        h = h1 + h2
                        hh = (h @ hp.conj(h)).real
                    else:
                        h1 = Vj @ w
                        w1 = w - h1 @ Vj
                        h2 = Vj @ w1
                        w2 = w1 - h2 @ Vj
                        hn = T(math.sqrt(w2 @ w2))
                        h = h1 + h2
                        hh = T(h @ h)
                    wn = T(math.sqrt(hh + hn * hn))
                    if live1 and wn > anorm1:
                        anorm1 = wn
                    lucky = hn <= eps * wn
                    if lucky:
                        hn = zero1
                    scale = one1 / hn if live1 and not lucky else zero1
                    hp.multiply(w2, float(scale), V2rows[j + 1])
                    Hs[: j + 1, j] = h
                    Hs[j + 1, j] = hn
                    qj = Qrows[j]
                    # (q_j . h as a 1-D product: the batched one's value, bit for bit)
                    if cplx:
                        c, s, rr = _givens1(hp, qj[: j + 1] @ h, hn, cplx, T)
                        ms = -s.conjugate()
                    else:
                        # _givens1, inline
                        a = T(qj[: j + 1] @ h)
                        rr = T(hp.hypot(a, hn))
                        safe = rr if rr > 0 else one1
                        c = a / safe
                        s = hn / safe
                        ms = -s
                    q1 = Qrows[j + 1]
                    hp.multiply(ms, qj, q1)
                    q1[j + 1] = c
                    Cs[j] = c
                    Ss[j] = s
                    gcur1 = ms * gcur1
                    k = j + 1
                    if live1 and abs(rr) <= (lucky_tol if lucky else piv_tol) * anorm1:
                        mon._set(to_dev(hp.asarray([True])), BREAKDOWN)
                        live1 = False
                    Ls[j] = live1
                    if live1:
                        est1 = abs(gcur1)
                    live1 = live1 and not lucky
                    xk = None
                    if callback is not None:
                        # A system that stopped earlier in the cycle keeps the x it stopped with.
                        xk = form_x(x, V, k) if stepped1 else xcb
                        xcb = xk
                    # est as a new (1,) array of the data's library, holding est exactly.
                    if mon.update(est_array(est1), xk):
                        break
                    if check1:
                        # (With check_every = 1 the monitor says stop exactly when the system
                        # stopped.) On the host, reading the flag costs no synchronisation.
                        live1 = live1 and bool(host(mon.active)[0])
            for j in range(0 if single else m):
                if mon.k >= maxiter:
                    break
                stepped = live
                vj = rows[j] if mutable else basis[j]
                w = mv(vj if psolve is None else psolve(vj))
                # Classical Gram-Schmidt, twice, as products with the basis; ||w|| follows
                # from the coefficients, ||w||^2 = ||h||^2 + h_{j+1,j}^2. (The operators @, -, ...
                # call the library directly; the namespace's functions may go through a wrapper
                # that costs more than the operation on small data.)
                Vj = V[:, : j + 1, :] if mutable else xp.stack(basis, axis=1)
                if fused:
                    # The inner products of a pass reduced together (see _gram_schmidt);
                    # the replicated results come to the host.
                    h, hn, wn, w2, lucky = _gram_schmidt(xp, Vj, w, twice, cplx, eps)
                    h, hn, wn, lucky = host(h)[:, :, 0], host(hn), host(wn), host(lucky)
                else:
                    VjT = Vj.mT
                    wc = w[:, :, None]
                    if cplx:
                        h1 = xp.conj(Vj @ xp.conj(wc))
                        w1 = wc - VjT @ h1
                        h2 = xp.conj(Vj @ xp.conj(w1))
                        w2 = (w1 - VjT @ h2)[:, :, 0]
                        hn2 = xp.conj(w2)[:, None, :] @ w2[:, :, None]
                    else:
                        h1 = Vj @ wc
                        w1 = rsub(wc, VjT @ h1)
                        h2 = Vj @ w1
                        w2 = rsub(w1, VjT @ h2)[:, :, 0]
                        hn2 = w2[:, None, :] @ w2[:, :, None]
                    if G is not None:
                        G[:, : j + 1, :] = h1 + h2
                        G[:, m + 1 : m + 2, :] = hn2
                        h, hn2 = G_h[:, : j + 1, 0], G_h[:, m + 1, 0]
                    else:
                        h, hn2 = host(h1 + h2)[:, :, 0], host(hn2)[:, 0, 0]
                    hn = hp.sqrt(hp.real(hn2) if cplx else hn2)
                    hh = hp.real(hp.sum(h * hp.conj(h), axis=-1)) if cplx else hp.sum(h * h, axis=-1)
                    wn = hp.sqrt(hh + hn * hn)
                    lucky = hn <= eps * wn
                    hn = hp.where(lucky, zero_h, hn)
                anorm = hp.where(live & (wn > anorm), wn, anorm)
                unlucky = ~lucky
                scale = hp.where(live & unlucky, one_h / hp.where(lucky, one_h, hn), zero_h)
                if mutable:
                    put_scaled(rows[j + 1], w2, scale)
                else:
                    basis.append(scaled(w2, scale))
                Ht[:, j, : j + 1] = h
                Ht[:, j, j + 1] = hn
                qj = Qb[:, j, : j + 1]
                a = hp.matmul(qj[:, None, :], h[:, :, None])[:, 0, 0]
                c, s, rr = _givens(hp, a, hn, cplx, one_h)
                ms = -hp.conj(s) if cplx else -s
                # q_{j+1} = -conj(s) q_j + c e_{j+1}; its entries past j + 1 stay zero (of
                # either sign: Q = c q + s shift adds +0 there, see _small).
                q1 = Qb[:, j + 1, :]
                hp.multiply(ms[:, None], qj, out=q1[:, : j + 1])
                q1[:, j + 1] = c
                C[:, j] = c
                S[:, j] = s
                gcur = ms * gcur
                k = j + 1
                # A pivot that vanishes to working precision (so h_{j+1,j} does too): A M is
                # singular on the Krylov space and the residual cannot be reduced further;
                # the column is left out, so x minimises the residual over the previous
                # space.
                broke = live & ((hp.abs(rr) if cplx else rr) <= hp.where(lucky, lucky_tol, piv_tol) * anorm)
                if broke.any():
                    mon._set(to_dev(broke), BREAKDOWN)
                    live = live & ~broke
                L[:, j] = live
                est = hp.where(live, hp.abs(gcur), est)
                live = live & unlucky
                xk = None
                if callback is not None:
                    # Systems that stopped earlier in the cycle keep the x they stopped with.
                    xk = form_x(x, V if mutable else basis, k)
                    if not stepped.all():
                        xk = xp.where(to_dev(stepped)[:, None], xk, xcb)
                    xcb = xk
                stop = mon.update(to_dev(est), xk)
                live = live & host(mon.active)
                if stop:
                    break
            if callback is not None:
                x = xcb
            else:
                x = form_x(x, V if mutable else basis, k)
            r = prob.b - prob.mv(x)
            rtrue = safe_norm(xp, r)
            rtrue_h = host(rtrue)
            # The cycle minimised the residual over x_start + M K: a true residual far above
            # the one it started from means the small least-squares problem was numerically
            # singular (A singular on the Krylov space, b outside its range); keep x_start.
            if single:
                rt = rtrue_h[0]
                if not (started1 and math.isfinite(rt) and rt > 10.0 * b0) and T is float:
                    # float64: the adaptive tolerance on host floats, float64's arithmetic.
                    factor = _end_cycle1(mon, x, rtrue, float(rt), factor, est1, target1, eps, ones_r)
                    beta, beta_h = rtrue, rtrue_h
                    continue
                worse = hp.asarray([started1]) & hp.isfinite(rtrue_h) & (rtrue_h > 10.0 * beta_h)
                est = hp.asarray([est1], dtype=hrdt)
                if isinstance(factor, float):
                    factor = ones_r * factor
            else:
                worse = started & hp.isfinite(rtrue_h) & (rtrue_h > 10.0 * beta_h)
            x, r, rtrue, factor = _end_cycle(
                mon, xp, x, r, rtrue, to_dev(worse) if worse.any() else None, x_start,
                r_start, beta, factor, to_dev(est), target, eps, ones_r)
            beta = rtrue
            beta_h = host(beta)
        return mon.finish(x, rtrue, info={"cycles": cycles, "restart": m})


def _lucky_tol(eps: float, m: int) -> float:
    """The relative size below which the pivot of a step that ended in a lucky breakdown
    (``h_{j+1,j} = 0``: the Krylov space is invariant) counts as zero.

    At such a step the last pivot is the only thing that distinguishes a nonsingular ``A M``
    on the Krylov space (``x`` exact) from a singular one (``b`` outside its range); computed,
    it carries the rounding of the whole Arnoldi relation, ``||A V - V H||`` of order
    ``m eps ||A M||`` times the growth of the basis' loss of orthogonality, and on
    ``diag(1..9, 0)`` came out at 40 ``eps ||A M||``. A pivot below ``1e3 m eps ||A M||``
    is taken as zero: using it would multiply that rounding into a step of size
    ``1 / (1e3 m eps)`` times the residual, while a genuine pivot that small belongs to a
    system whose residual cannot be brought below about ``1e3 m eps`` relative (the
    rounding of ``A x`` for so large an ``x``), beyond any tolerance a user sets.
    """
    return 1e3 * m * eps


def _end_cycle1(mon, x, rtrue, rt, factor, est, target, eps, ones_r):
    """:func:`_end_cycle` for one float64 system whose cycle did not make the residual worse,
    with the adaptive tolerance on host floats (``rt``, ``est``, ``target`` and ``factor``:
    Python floats, whose arithmetic is float64's; ``factor`` may come as a (1,) array):
    returns ``factor``."""
    reopened = mon.check(x, rtrue)
    if reopened is None:
        return factor
    host = _b.to_numpy
    if not isinstance(factor, float):
        factor = float(host(factor)[0])
    factor = max(factor * 0.25, eps) if bool(host(reopened)[0]) else min(factor * 1.5, 1.0)
    if bool(host(mon.active)[0]):
        inner = est * min(factor, target / (rt if rt > 0 else 1.0))
        mon.threshold = ones_r * inner
    else:
        mon.threshold = mon.threshold
    return factor


def _end_cycle(mon, xp, x, r, rtrue, worse, x_start, r_start, beta, factor, est, target, eps, ones_r):
    """Close a restart cycle on the true residual ``rtrue`` of ``x``: the systems in ``worse``
    (None: none) keep the cycle's start, as a breakdown; the claims are checked; and the
    estimate's target for the next cycle follows scipy's adaptive inner tolerance. Returns
    ``x, r, rtrue, factor``."""
    if worse is not None:
        x = xp.where(worse[:, None], x_start, x)
        r = xp.where(worse[:, None], r_start, r)
        rtrue = xp.where(worse, beta, rtrue)
        mon._set(worse, BREAKDOWN)
    reopened = mon.check(x, rtrue)
    if reopened is not None:
        # scipy's adaptive inner tolerance (scipy gh-8400): the estimate's target for the next
        # cycle is scaled by how far the true residual was from it, tighter after an estimate
        # that passed while the true residual did not.
        factor = xp.where(
            reopened,
            xp.maximum(factor * 0.25, xp.full_like(factor, eps)),
            xp.minimum(factor * 1.5, ones_r),
        )
        safe_rt = xp.where(rtrue > 0, rtrue, ones_r)
        inner = est * xp.minimum(factor, target / safe_rt)
        mon.threshold = xp.where(mon.active, inner, mon.threshold)
    return x, r, rtrue, factor
