"""LSQR: least squares by Golub-Kahan bidiagonalisation.

Needs: products with ``A`` and ``A^H``, one of each per iteration (one more ``A^H`` product to
start). ``A`` may be rectangular (``m x n``), nonsymmetric, singular. Memory: four
``n``-vectors and four ``m``-vectors.

Solves ``A x = b`` when it is consistent and ``min ||b - A x||`` (minimum norm from
``x0 = 0``) when it is not, optionally damped: ``min ||b - A x||^2 + damp^2 ||x||^2``.
Mathematically equivalent to CG on the normal equations (``cgne``) but more stable when
``A`` is ill conditioned.

Reference: C. C. Paige and M. A. Saunders, "LSQR: An algorithm for sparse linear equations
and sparse least squares", ACM Trans. Math. Softw. 8(1), 43-71, 1982.
"""

from __future__ import annotations

from ._base import LEAST_SQUARES, Monitor, Problem, Solver, norm, verified_rounds
import math

from ._krylov import fdiv, host_axpy, host_scalars, safe_div, scalars, sq_norm, where_of

__all__ = ["LSQR"]


class LSQR(Solver):
    """LSQR for square or rectangular ``A`` (Paige & Saunders, 1982).

    Needs
        Products with ``A`` and ``A^H``: one of each per iteration, plus one ``A^H`` product
        to start (and one ``A`` product to form ``b - A x0`` when ``x0`` is given). ``A`` of
        any shape ``m x n``; ``b`` has length ``m`` and ``x`` length ``n``.
    Converges
        Like CG on ``A^H A`` (condition number ``kappa(A)^2``) in exact arithmetic, but with
        the numerical stability of a bidiagonalisation; to the minimum-norm least-squares
        solution from ``x0 = 0``.
    Stops
        CONVERGED when the recurred residual ``||b - A x||`` meets ``max(rtol ||b||, atol)``
        and then the true residual (one product) meets it too (otherwise LSQR restarts from
        the true residual with a tighter internal tolerance). LEAST_SQUARES when ``x``
        minimises ``||b - A x||`` without solving the system: the least-squares test
        ``||A^H r - damp^2 x|| <= tol ||A||_F ||r||`` (norms estimated by the
        bidiagonalisation, as in the paper; ``r`` here includes the damping rows) with
        ``tol = rtol`` when ``least_squares=True`` asks for a least-squares solution, and
        ``tol = 10 eps`` otherwise, so that a consistent but ill-conditioned system goes on
        to be solved instead of stopping early. LEAST_SQUARES is a success only with
        ``least_squares=True``. Then after ``maxiter`` iterations (COMPLETED in
        fixed-budget mode); DIVERGED / NONFINITE as for every method. An exact solution
        found early (bidiagonalisation ended) is not a breakdown: the iterate then stops
        changing.

    For ``damp=0`` and ``atol=0`` the first test is that of
    ``scipy.sparse.linalg.lsqr(atol=0, btol=rtol)`` (which tests its estimate of ``||r||``
    where we test the recurred residual); the second is scipy's ``atol`` test with
    ``atol=rtol`` (``least_squares=True``). There is no test on the condition number (scipy's ``conlim``).

    The callback sees every iterate.

    Options
        ``damp`` (float, default 0.0): damping; minimise
        ``||b - A x||^2 + damp^2 ||x||^2``.
        ``least_squares`` (bool, default False): a least-squares solution is what is
        wanted; LEAST_SQUARES then counts as success (``res.success``).

    ``info`` holds ``least_squares`` (bool, per system for batched solves: status
    LEAST_SQUARES) and ``normal_residual_norm`` (the estimate of
    ``||A^H r - damp^2 x||``).

    References
    ----------
    C. C. Paige and M. A. Saunders, "LSQR: An algorithm for sparse linear equations and
    sparse least squares", ACM Trans. Math. Softw. 8(1), 43-71, 1982.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])     # overdetermined
    >>> b = np.array([1.0, 1.0, 0.0])                          # inconsistent
    >>> res = lr.solve(A, b, method="lsqr", rtol=1e-8, least_squares=True)
    >>> res.status.name, res.success
    ('LEAST_SQUARES', True)
    >>> np.allclose(res.x, np.linalg.lstsq(A, b, rcond=None)[0])
    True
    """

    name = "lsqr"
    checks_claims = True
    needs_rmatvec = True
    needs_square = False
    options = {"damp": 0.0, "least_squares": False}
    option_kinds = {"damp": "nonnegative", "least_squares": "bool"}

    def run(self, prob: Problem):
        xp = prob.xp
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        mon = Monitor(prob, norm(xp, r), x0=x)
        eps = float(xp.finfo(prob.real_dtype).eps)
        rtol = 0.0 if prob.rtol is None else prob.rtol
        # The least-squares test: at rtol when a least-squares solution is asked for; else
        # only once x is a least-squares solution to working precision, where the residual
        # cannot fall any further.
        ls_tol = max(rtol, eps) if prob.options["least_squares"] else 10 * eps
        arnorm = scalars(prob, 0.0)

        def iterate(x, r, rnorm):
            nonlocal arnorm
            x, rnorm, arnorm = _lsqr(prob, mon, x, r, rnorm, ls_tol)
            return x, rnorm

        x, rnorm = verified_rounds(prob, mon, x, r, mon.history[0], iterate)
        out = mon.finish(x, rnorm)
        out.accept_least_squares = bool(prob.options["least_squares"])
        least_squares = out.codes == LEAST_SQUARES
        if prob.scale is not None:
            arnorm = arnorm * prob.scale
        if prob.batched:
            out.info = {"least_squares": least_squares, "normal_residual_norm": arnorm}
        else:
            out.info = {
                "least_squares": bool(least_squares[0]),
                "normal_residual_norm": float(arnorm[0]),
            }
        return out


def _lsqr(prob: Problem, mon: Monitor, x, r, rnorm, ls_tol: float):
    """LSQR from ``x`` with true residual ``r`` until the monitor stops every system or
    ``maxiter`` is reached; returns ``x``, the recurred residual norms and the estimates of
    ``||A^H r - damp^2 x||``."""
    xp = prob.xp
    if host_scalars(prob, mon):
        return _lsqr_host(prob, mon, x, r, rnorm, ls_tol)
    where = where_of(xp)
    damp = prob.options["damp"]
    one, zero = scalars(prob, 1.0), scalars(prob, 0.0)
    beta = norm(xp, r)

    # Golub-Kahan start: beta u = r, alpha v = A^H u.
    u = safe_div(xp, one, beta)[:, None] * r
    v = prob.rmv(u)
    alpha = norm(xp, v)
    v = safe_div(xp, one, alpha)[:, None] * v
    # A^H r = 0 with r != 0: x is a least-squares solution that does not solve the system.
    if not prob.fixed_budget:
        mon.flag((alpha == 0) & (beta > 0), LEAST_SQUARES)

    phibar, rhobar = beta, alpha
    anorm2 = zero            # estimate of ||[A; damp I]||_F^2 (Frobenius of B_k)
    damped2 = zero           # squared norm of the damping part of the residual
    arnorm = alpha * beta
    # w is the search direction, w = v_k - t w_{k-1}; aw = A w is kept alongside from
    # A v_k (which the bidiagonalisation computes) for the residual recurrence.
    t = zero
    w = xp.zeros_like(x)
    aw = xp.zeros_like(r)

    if not mon.any_active():
        return x, rnorm, arnorm
    while mon.k < prob.maxiter:
        av = prob.mv(v)
        w = v - t[:, None] * w
        aw = av - t[:, None] * aw
        u = av - alpha[:, None] * u
        beta = norm(xp, u)
        u = safe_div(xp, one, beta)[:, None] * u
        anorm2 = anorm2 + alpha**2 + beta**2 + damp**2
        v_next = prob.rmv(u) - beta[:, None] * v
        alpha_next = norm(xp, v_next)
        v = safe_div(xp, one, alpha_next)[:, None] * v_next

        # Eliminate the damping row, then the subdiagonal beta (plane rotations).
        if damp:
            rhobar1 = xp.hypot(rhobar, xp.full_like(rhobar, damp))
            damped2 = damped2 + (safe_div(xp, damp * phibar, rhobar1)) ** 2
            phibar = safe_div(xp, rhobar * phibar, rhobar1)
        else:
            rhobar1 = rhobar
        rho = xp.hypot(rhobar1, beta)
        # rho = 0 only after the bidiagonalisation has ended: keep everything as is.
        live = rho > 0
        c = where(live, safe_div(xp, rhobar1, rho), one)
        s = safe_div(xp, beta, rho)
        theta = s * alpha_next
        rhobar = where(live, -c * alpha_next, rhobar)
        phi = where(live, c * phibar, zero)
        phibar = where(live, s * phibar, phibar)
        step = safe_div(xp, phi, rho)
        t = safe_div(xp, theta, rho)
        alpha = alpha_next

        active = mon.active
        x = where(active[:, None], x + step[:, None] * w, x)
        r = where(active[:, None], r - step[:, None] * aw, r)
        rnorm = where(active, norm(xp, r), rnorm)
        arnorm = where(active, alpha_next * xp.abs(c * phibar), arnorm)
        if not prob.fixed_budget:
            # The least-squares test, on the damped residual ||[r; -damp x]||.
            r2norm = xp.sqrt(phibar**2 + damped2)
            ls = xp.sqrt(anorm2) * r2norm * ls_tol
            ls = active & (arnorm <= ls) & ~(rnorm <= mon.threshold)
            mon.flag(ls, LEAST_SQUARES)
        if mon.update(rnorm, x):
            break
    return x, rnorm, arnorm


def _lsqr_host(prob: Problem, mon: Monitor, x, r, rnorm, ls_tol: float):
    """:func:`_lsqr` for one float64 system on the host (numpy): the bidiagonalisation and
    rotation scalars are host floats (float64 arithmetic, as in the ``(1,)`` array path),
    a stopped system is not updated (no masks), ``x`` is a new array each iteration and
    ``r`` is updated in place (BLAS ``axpy``)."""
    xp = prob.xp
    damp = float(prob.options["damp"])
    axpy = host_axpy(xp, prob.b)

    def fnorm(v):
        return math.sqrt(float(sq_norm(xp, v)[0]))

    beta = fnorm(r)
    u = fdiv(1.0, beta) * r
    v = prob.rmv(u)
    alpha = fnorm(v)
    v = fdiv(1.0, alpha) * v
    if not prob.fixed_budget and alpha == 0.0 and beta > 0.0:
        mon.flag(mon.active, LEAST_SQUARES)

    phibar, rhobar = beta, alpha
    anorm2 = 0.0
    damped2 = 0.0
    arnorm = alpha * beta
    t = 0.0
    w = xp.zeros_like(x)
    aw = xp.zeros_like(r)

    def out():
        return xp.asarray([arnorm], dtype=prob.real_dtype, device=prob.device)

    if not mon.any_active():
        return x, rnorm, out()
    r = xp.asarray(r, copy=True)
    r1 = r[0, ...]
    while mon.k < prob.maxiter:
        av = prob.mv(v)
        w = v - t * w
        aw = av - t * aw
        u = av - alpha * u
        beta = fnorm(u)
        u = fdiv(1.0, beta) * u
        anorm2 = anorm2 + alpha**2 + beta**2 + damp**2
        v_next = prob.rmv(u) - beta * v
        alpha_next = fnorm(v_next)
        v = fdiv(1.0, alpha_next) * v_next

        if damp:
            rhobar1 = math.hypot(rhobar, damp)
            damped2 = damped2 + (fdiv(damp * phibar, rhobar1)) ** 2
            phibar = fdiv(rhobar * phibar, rhobar1)
        else:
            rhobar1 = rhobar
        rho = math.hypot(rhobar1, beta)
        live = rho > 0.0
        c = fdiv(rhobar1, rho) if live else 1.0
        s = fdiv(beta, rho)
        theta = s * alpha_next
        if live:
            rhobar = -c * alpha_next
            phi = c * phibar
            phibar = s * phibar
        else:
            phi = 0.0
        step = fdiv(phi, rho)
        t = fdiv(theta, rho)
        alpha = alpha_next

        active = bool(mon.active[0])
        if active:
            x = xp.asarray(x, copy=True)
            axpy(step, w[0, ...], x[0, ...])
            axpy(-step, aw[0, ...], r1)
            rnorm = xp.sqrt(sq_norm(xp, r))
            arnorm = alpha_next * abs(c * phibar)
        if not prob.fixed_budget and active:
            # The least-squares test, on the damped residual ||[r; -damp x]||.
            r2norm = math.sqrt(phibar**2 + damped2)
            ls = math.sqrt(anorm2) * r2norm * ls_tol
            if arnorm <= ls and not (float(rnorm[0]) <= float(mon.threshold[0])):
                mon.flag(mon.active, LEAST_SQUARES)
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm, out()
