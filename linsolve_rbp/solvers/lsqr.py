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

from ._base import CONVERGED, Monitor, Problem, Solver, norm
from ._krylov import any_active, column, safe_div, scalars

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
        CONVERGED when ``||b - A x|| <= max(rtol ||b||, atol)`` (the residual of the user's
        system, kept by recurrence at no extra product), or, for an inconsistent
        least-squares problem, when ``||A^H r - damp^2 x|| <= rtol ||A||_F ||r||`` (with the
        norms estimated by the bidiagonalisation, as in the paper; ``r`` here includes the
        damping rows). Systems stopped by the second test have ``info["least_squares"]``
        True. Then after ``maxiter`` iterations (COMPLETED in fixed-budget mode);
        DIVERGED / NONFINITE as for every method. An exact solution found early
        (bidiagonalisation ended) is not a breakdown: the iterate then stops changing.

    For ``damp=0`` and ``atol=0`` the first test is that of
    ``scipy.sparse.linalg.lsqr(atol=0, btol=rtol)`` (which tests its estimate of ``||r||``
    where we test the recurred residual); the second is scipy's ``atol`` test with
    ``atol=rtol``. There is no test on the condition number (scipy's ``conlim``).

    The callback sees every iterate.

    Options
        ``damp`` (float, default 0.0): damping; minimise
        ``||b - A x||^2 + damp^2 ||x||^2``.

    ``info`` holds ``least_squares`` (bool, per system for batched solves: stopped by the
    least-squares test) and ``normal_residual_norm`` (the estimate of
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
    >>> res = lr.solve(A, b, method="lsqr", rtol=1e-8)
    >>> res.status.name, res.info["least_squares"]
    ('CONVERGED', True)
    >>> np.allclose(res.x, np.linalg.lstsq(A, b, rcond=None)[0])
    True
    """

    name = "lsqr"
    needs_rmatvec = True
    needs_square = False
    options = {"damp": 0.0}
    option_kinds = {"damp": "nonnegative"}

    def run(self, prob: Problem):
        xp = prob.xp
        damp = prob.options["damp"]
        one, zero = scalars(prob, 1.0), scalars(prob, 0.0)
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        beta = norm(xp, r)
        mon = Monitor(prob, beta, x0=x)
        rnorm = beta

        # Golub-Kahan start: beta u = r, alpha v = A^H u.
        u = column(safe_div(xp, one, beta)) * r
        v = prob.rmv(u)
        alpha = norm(xp, v)
        v = column(safe_div(xp, one, alpha)) * v
        # x is zero-residual already, or A^H r = 0: x is a least-squares solution.
        if prob.fixed_budget:
            least_squares = xp.zeros_like(mon.active)
        else:
            least_squares = mon.active & (alpha == 0) & (beta > 0)
            mon.flag(least_squares, CONVERGED)
        rtol = 0.0 if prob.rtol is None else prob.rtol

        phibar, rhobar = beta, alpha
        anorm2 = zero            # estimate of ||[A; damp I]||_F^2 (Frobenius of B_k)
        damped2 = zero           # squared norm of the damping part of the residual
        arnorm = alpha * beta
        # w is the search direction, w = v_k - t w_{k-1}; aw = A w is kept alongside from
        # A v_k (which the bidiagonalisation computes) for the residual recurrence.
        t = zero
        w = xp.zeros_like(x)
        aw = xp.zeros_like(r)

        if any_active(mon):
            for _ in range(prob.maxiter):
                av = prob.mv(v)
                w = v - column(t) * w
                aw = av - column(t) * aw
                u = av - column(alpha) * u
                beta = norm(xp, u)
                u = column(safe_div(xp, one, beta)) * u
                anorm2 = anorm2 + alpha**2 + beta**2 + damp**2
                v_next = prob.rmv(u) - column(beta) * v
                alpha_next = norm(xp, v_next)
                v = column(safe_div(xp, one, alpha_next)) * v_next

                # Eliminate the damping row, then the subdiagonal beta (plane rotations).
                if damp:
                    rhobar1 = xp.sqrt(rhobar**2 + damp**2)
                    damped2 = damped2 + (safe_div(xp, damp * phibar, rhobar1)) ** 2
                    phibar = safe_div(xp, rhobar * phibar, rhobar1)
                else:
                    rhobar1 = rhobar
                rho = xp.sqrt(rhobar1**2 + beta**2)
                # rho = 0 only after the bidiagonalisation has ended: keep everything as is.
                live = rho > 0
                c = xp.where(live, safe_div(xp, rhobar1, rho), one)
                s = safe_div(xp, beta, rho)
                theta = s * alpha_next
                rhobar = xp.where(live, -c * alpha_next, rhobar)
                phi = xp.where(live, c * phibar, zero)
                phibar = xp.where(live, s * phibar, phibar)
                step = safe_div(xp, phi, rho)
                t = safe_div(xp, theta, rho)
                alpha = alpha_next

                active = mon.active
                x = xp.where(column(active), x + column(step) * w, x)
                r = xp.where(column(active), r - column(step) * aw, r)
                rnorm = xp.where(active, norm(xp, r), rnorm)
                arnorm = xp.where(active, alpha_next * xp.abs(c * phibar), arnorm)
                if not prob.fixed_budget:
                    # The least-squares test, on the damped residual ||[r; -damp x]||.
                    r2norm = xp.sqrt(phibar**2 + damped2)
                    ls = xp.sqrt(anorm2) * r2norm * rtol
                    ls = active & (arnorm <= ls) & ~(rnorm <= mon.threshold)
                    mon.flag(ls, CONVERGED)
                    least_squares = least_squares | ls
                if mon.update(rnorm, x):
                    break

        if prob.batched:
            info = {"least_squares": least_squares, "normal_residual_norm": arnorm}
        else:
            info = {
                "least_squares": bool(least_squares[0]),
                "normal_residual_norm": float(arnorm[0]),
            }
        return mon.finish(x, rnorm, info=info)
