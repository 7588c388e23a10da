"""Truncated Neumann series: Neumann-RBP.

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per term).
Memory: four vectors (term, two partial sums, best partial sum), whatever the number of terms.

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
        ``A x`` only, one product per term, plus one at the end in tolerance mode to check
        the partial sum returned; memory for four vectors (the term, two partial sums, and
        the best one).
    Converges
        When the spectral radius of ``I - A`` (of ``J``) is below 1; the error after ``K`` terms
        is bounded by Proposition 2 of the paper (see
        :func:`linsolve_rbp.diagnostics.neumann_error_bound`).
    Stops
        When the newest term ``v_k = (I - A)^k r0``, which in exact arithmetic is the
        residual ``b - A x_{k-1}`` of the previous partial sum, meets
        ``max(rtol ||b||, atol)``, and then the true residual of the partial sum ``x_k``
        returned (one product) meets it too. The terms are a recurrence and, for a
        non-normal ``J``, can be far from the true residual; when the true residual misses
        the tolerance it becomes the next term (so the check costs no extra product) and the
        series goes on. After ``maxiter`` terms: MAX_ITERATIONS (the last partial sum is
        checked, one product), or COMPLETED in fixed-budget mode, which adds exactly
        ``maxiter`` terms; DIVERGED when the terms grow past ``divtol`` times the first;
        NONFINITE on NaN/inf, returning the best finite partial sum. With
        ``rtol=None, atol=None, divtol=None`` the sum of all ``maxiter + 1`` terms is
        returned, COMPLETED, as Neumann-RBP defines it, even when the terms grow (the
        message then says so). The reported residual is the true one in tolerance mode and
        the newest term in fixed-budget mode.

    The callback sees every partial sum.
    """

    name = "neumann"
    checks_claims = True
    needs_contraction = True

    def run(self, prob: Problem):
        xp = prob.xp
        x0 = prob.initial_x()
        v = prob.b if prob.x0 is None else prob.b - prob.mv(x0)
        mon = Monitor(prob, norm(xp, v), x0=x0)
        rnorm = mon.history[0]
        zeros = xp.zeros_like(v)
        # A system whose x0 already meets the tolerance keeps x0, whose residual is known.
        g = xp.where(mon.active[:, None], x0 + v, x0)
        r_next = None
        while mon.k < prob.maxiter:
            if r_next is None:
                v = v - prob.mv(v)
            else:
                # The true residual of the partial sum is the next term, exactly.
                v, r_next = r_next, None
            active = mon.active
            v = xp.where(active[:, None], v, zeros)
            # The new term is the residual of the previous partial sum, which is the
            # candidate for the best iterate.
            g_prev, g = g, g + v
            rnorm = xp.where(active, norm(xp, v), rnorm)
            if mon.update(rnorm, g, of=g_prev):
                go_on = mon.settle(g)
                if go_on is None:
                    break
                r_next, rnorm = go_on
        return mon.close(g, rnorm)
