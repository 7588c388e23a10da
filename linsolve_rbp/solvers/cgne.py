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

from ._base import Monitor, Problem, Solver, dot, norm, verified_rounds
from ._krylov import real_part
from .cg import conjugate_gradients

__all__ = ["CGNE"]


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
    options = {"eta": 0.0}
    option_kinds = {"eta": "nonnegative"}

    def run(self, prob: Problem):
        xp = prob.xp
        eta = prob.options["eta"]
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        mon = Monitor(prob, norm(xp, r), x0=x)

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
