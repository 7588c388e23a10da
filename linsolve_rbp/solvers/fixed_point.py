"""Fixed-point (Richardson) iteration: the original recurrent back-propagation (RBP).

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per
iteration). No preconditioner.

Reference: Almeida (1987), Pineda (1987); Algorithm 1 of R. Liao et al., "Reviving and
Improving Recurrent Back-Propagation", ICML 2018.
"""

from __future__ import annotations

from ._base import Monitor, Problem, Solver, norm
from ._compile import compiled, requested
from .neumann import _track, always_active, lean_budget, run_budget, run_budget_compiled


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
        When ``||x_{k+1} - x_k|| = ||b - A x_k||`` meets ``max(rtol ||b||, atol)`` and then
        the true residual of the ``x_{k+1}`` returned meets it too (one product, which is
        the next iteration's product when it does not). In tolerance mode the reported
        residual is the true one of ``x``; in fixed-budget mode it is that of ``x_k``
        (free). After ``maxiter`` iterations (COMPLETED in fixed-budget mode); DIVERGED when the residual
        grows past ``divtol`` times the initial one; NONFINITE on NaN/inf, returning the best
        finite iterate.

    The callback sees every iterate.

    With ``compile=True`` (torch tensors) a fixed budget without a callback runs as compiled
    graphs of up to ``UNROLL`` (``linsolve_rbp.solvers._compile``) iterations each
    (``fullgraph``: no host read until the end; see
    ``linsolve_rbp.solvers.neumann.run_budget_compiled``), and otherwise each iteration
    with a product is one compiled step, the stopping tests running between steps as without
    it. The first two iterations (the first product) run eagerly.
    """

    name = "fixed_point"
    checks_claims = True
    needs_contraction = True
    compiles = True

    def run(self, prob: Problem):
        xp = prob.xp
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        r0 = norm(xp, r)
        if requested(prob) and prob.fixed_budget and prob.callback is None:
            return run_budget_compiled(prob, x, r0, x, _fixed_point_chunk, (r,), eager=2)
        if lean_budget(prob, r0):
            b, mv = prob.b, prob.mv
            # The same arithmetic as the loop below, without the masks and the monitor.
            state = [r, x, True]

            def step():
                r, x, have_r = state
                if not have_r:
                    r = b - mv(x)
                x_new = x + r
                state[:] = None, x_new, False
                return x_new, x, norm(xp, r)

            return run_budget(prob, x, r0, x, step)
        mon = Monitor(prob, r0, x0=x)
        rnorm = mon.history[0]
        # One system decided on host floats every iteration: the masks are the identity.
        unmasked = always_active(mon, prob)
        step = compiled(_fixed_point_step, counts=prob.A) if requested(prob) else None
        have_r = True  # r is the residual of the current x
        while mon.k < prob.maxiter:
            # Compiled: the product and the masked update of the loop below, in one step
            # (after the first product, made eagerly).
            stepped = step is not None and not have_r and mon.k > 1
            if stepped:
                x_prev = x
                x, rnorm = step(xp, prob.mv, prob.b, x, rnorm, mon.active)
            elif not have_r:
                r = prob.b - prob.mv(x)
            have_r = False
            if stepped:
                pass
            elif unmasked:
                x_prev, x = x, x + r
                rnorm = norm(xp, r)
            else:
                active = mon.active
                x_prev, x = x, xp.where(active[:, None], x + r, x)
                rnorm = xp.where(active, norm(xp, r), rnorm)
            # x is a new array every iteration (never written into): the monitor may keep it.
            if mon.update(rnorm, x, of=x_prev, fresh=True):
                # The residual of the new iterate: the claim's check, and the next
                # iteration's product if the claim fails.
                go_on = mon.settle(x)
                if go_on is None:
                    break
                r, rnorm = go_on
                have_r = True
        return mon.close(x, rnorm)


def _fixed_point_step(xp, mv, b, x, rnorm, active):
    """One masked iteration with its product, as in :meth:`FixedPoint.run` (compiled with
    ``compile=True``)."""
    r = b - mv(x)
    return xp.where(active[:, None], x + r, x), xp.where(active, norm(xp, r), rnorm)


def _fixed_point_chunk(xp, mv, b, steps, state, x, rnorm, track):
    """``steps`` masked iterations with the monitor's fixed-budget tests
    (:func:`~linsolve_rbp.solvers.neumann._track`); ``state = (r,)``, the residual of ``x``
    or None when it is to be computed."""
    (r,) = state
    hist = []
    for _ in range(steps):
        if r is None:
            r = b - mv(x)
        active = track[0]
        x_prev, x = x, xp.where(active[:, None], x + r, x)
        rnorm = xp.where(active, norm(xp, r), rnorm)
        track = _track(xp, rnorm, x_prev, track)
        hist.append(rnorm)
        r = None
    return (r,), x, rnorm, track, xp.stack(hist)
