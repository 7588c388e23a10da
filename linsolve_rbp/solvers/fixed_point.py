"""Fixed-point (Richardson) iteration: the original recurrent back-propagation (RBP).

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per
iteration). No preconditioner.

Reference: Almeida (1987), Pineda (1987); Algorithm 1 of R. Liao et al., "Reviving and
Improving Recurrent Back-Propagation", ICML 2018.
"""

from __future__ import annotations

from ._base import Monitor, Problem, Solver, norm


class FixedPoint(Solver):
    """Fixed-point iteration ``x <- x + (b - A x)``.

    For ``A = I - J^T`` this is RBP's ``z <- J^T z + b`` (Algorithm 1 of Liao et al., 2018).

    Needs
        ``A x`` only, one product per iteration; the first iteration from ``x0 = 0`` is free
        (``x_1 = b``), so ``K + 1`` iterations from zero cost ``K`` products and equal ``K``
        iterations of ``neumann`` (Proposition 3 of the paper).
    Converges
        When the spectral radius of ``I - A`` (of ``J``) is below 1, linearly at that rate.
    Stops
        When ``||x_{k+1} - x_k|| = ||b - A x_k||`` meets ``max(rtol ||b||, atol)`` (the
        reported residual of ``x_{k+1}`` is that of ``x_k``, available at no extra product);
        after ``maxiter`` iterations (COMPLETED in fixed-budget mode); DIVERGED when the residual
        grows past ``divtol`` times the initial one; NONFINITE on NaN/inf, returning the best
        finite iterate.

    The callback sees every iterate.
    """

    name = "fixed_point"

    def run(self, prob: Problem):
        xp = prob.xp
        active_mask = None
        if prob.x0 is None:
            x = prob.zeros_x()
            r = prob.b
        else:
            x = prob.initial_x()
            r = prob.b - prob.mv(x)
        mon = Monitor(prob, norm(xp, r), x0=x)
        rnorm = mon.history[0]
        for k in range(prob.maxiter):
            if k > 0:
                r = prob.b - prob.mv(x)
            active_mask = mon.active[:, None]
            x = xp.where(active_mask, x + r, x)
            rnorm = xp.where(mon.active, norm(xp, r), rnorm)
            if mon.update(rnorm, x):
                break
        return mon.finish(x, rnorm)
