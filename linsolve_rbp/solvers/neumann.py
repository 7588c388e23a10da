"""Truncated Neumann series: Neumann-RBP.

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per term).
Memory: two work vectors, whatever the number of terms.

Reference: Algorithm 2 and Propositions 2-3 of R. Liao et al., "Reviving and Improving
Recurrent Back-Propagation", ICML 2018.
"""

from __future__ import annotations

from ._base import Monitor, Problem, Solver, norm


class Neumann(Solver):
    """Truncated Neumann series ``x = x0 + sum_{k=0..K} (I - A)^k r0`` with ``r0 = b - A x0``.

    For ``A = I - J^T`` and ``x0 = 0`` this is Neumann-RBP, ``z = sum_k (J^T)^k b``
    (Algorithm 2 of Liao et al., 2018). ``maxiter = K`` adds ``K`` terms after the first, at
    ``K`` products.

    Needs
        ``A x`` only, one product per term; memory for two vectors (the partial sum is
        accumulated in place).
    Converges
        When the spectral radius of ``I - A`` (of ``J``) is below 1; the error after ``K`` terms
        is bounded by Proposition 2 of the paper (see
        :func:`linsolve_rbp.diagnostics.neumann_error_bound`).
    Stops
        When the newest term ``v_k = (I - A)^k r0``, which is exactly the residual
        ``b - A x_{k-1}`` of the previous partial sum, meets ``max(rtol ||b||, atol)``; that
        norm is the reported residual (free of extra products); after ``maxiter`` terms
        (COMPLETED in fixed-budget mode); DIVERGED when the terms grow past ``divtol`` times the
        first; NONFINITE on NaN/inf, returning the best finite partial sum.

    The callback sees every partial sum.
    """

    name = "neumann"

    def run(self, prob: Problem):
        xp = prob.xp
        if prob.x0 is None:
            v = prob.b
            g = xp.asarray(prob.b, copy=True)
        else:
            x0 = prob.initial_x()
            v = prob.b - prob.mv(x0)
            g = x0 + v
        mon = Monitor(prob, norm(xp, v), x0=g)
        rnorm = mon.history[0]
        for _ in range(prob.maxiter):
            v = v - prob.mv(v)
            active = mon.active[:, None]
            v = xp.where(active, v, xp.zeros_like(v))
            g += v  # in place: memory stays two vectors
            rnorm = xp.where(mon.active, norm(xp, v), rnorm)
            if mon.update(rnorm, g):
                break
        return mon.finish(g, rnorm)
