"""Truncated Neumann series: Neumann-RBP.

Needs: products with ``A`` only (for ``A = I - J^T``, one vector-Jacobian product per term).
Memory: four vectors (term, two partial sums, best partial sum), whatever the number of terms.

Reference: Algorithm 2 and Propositions 2-3 of R. Liao et al., "Reviving and Improving
Recurrent Back-Propagation", ICML 2018.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend as _b
from ._base import COMPLETED, Monitor, Outcome, Problem, Solver, norm
from . import _compile
from ._compile import compiled, requested


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

    With ``compile=True`` (torch tensors) a fixed budget without a callback runs as compiled
    graphs of up to ``UNROLL`` (``linsolve_rbp.solvers._compile``) terms each (``fullgraph``:
    no host read until the end; see ``run_budget_compiled``), and otherwise each term is
    one compiled step, the stopping tests running between steps as without it. The first term
    is computed eagerly (it carries the check of the first product).
    """

    name = "neumann"
    checks_claims = True
    needs_contraction = True
    compiles = True

    def run(self, prob: Problem):
        xp = prob.xp
        x0 = prob.initial_x()
        v = prob.b if prob.x0 is None else prob.b - prob.mv(x0)
        r0 = norm(xp, v)
        if requested(prob) and prob.fixed_budget and prob.callback is None:
            # As the loop below starts: a system stopped at x0 (non-finite r0) keeps x0.
            g = xp.where(xp.isfinite(r0)[:, None], x0 + v, x0)
            return run_budget_compiled(prob, x0, r0, g, _neumann_chunk, (v,), eager=1)
        if lean_budget(prob, r0):
            mv = prob.mv
            # The same arithmetic as the loop below, without the masks and the monitor.
            state = [v, x0 + v]

            def step():
                v, g = state
                v = v - mv(v)
                state[:] = v, g + v
                return state[1], g, norm(xp, v)

            return run_budget(prob, x0, r0, state[1], step)
        mon = Monitor(prob, r0, x0=x0)
        rnorm = mon.history[0]
        zeros = xp.zeros_like(v)
        # A system whose x0 already meets the tolerance keeps x0, whose residual is known.
        g = xp.where(mon.active[:, None], x0 + v, x0)
        # One system decided on host floats with a check every iteration: whenever the loop
        # body runs the system is active (update returned False, or settle reopened it), so
        # the masks below would select the new values anyway; skip them.
        unmasked = always_active(mon, prob)
        step = compiled(_neumann_step, counts=prob.A) if requested(prob) else None
        r_next = None
        while mon.k < prob.maxiter:
            # Compiled: the product and the masked update of the loop below, in one step.
            stepped = step is not None and r_next is None and mon.k > 0
            if stepped:
                g_prev = g
                v, g, rnorm = step(xp, prob.mv, v, g, rnorm, mon.active)
            elif r_next is None:
                v = v - prob.mv(v)
            else:
                # The true residual of the partial sum is the next term, exactly.
                v, r_next = r_next, None
            if stepped:
                pass
            elif unmasked:
                g_prev, g = g, g + v
                rnorm = norm(xp, v)
            else:
                active = mon.active
                v = xp.where(active[:, None], v, zeros)
                # The new term is the residual of the previous partial sum, which is the
                # candidate for the best iterate.
                g_prev, g = g, g + v
                rnorm = xp.where(active, norm(xp, v), rnorm)
            # g is a new array every iteration (never written into): the monitor may keep it.
            if mon.update(rnorm, g, of=g_prev, fresh=True):
                go_on = mon.settle(g)
                if go_on is None:
                    break
                r_next, rnorm = go_on
        return mon.close(g, rnorm)


def _neumann_step(xp, mv, v, g, rnorm, active):
    """One masked term of the loop of :meth:`Neumann.run` (compiled with ``compile=True``)."""
    v = xp.where(active[:, None], v - mv(v), xp.zeros_like(v))
    return v, g + v, xp.where(active, norm(xp, v), rnorm)


def _neumann_chunk(xp, mv, b, steps, state, g, rnorm, track):
    """``steps`` masked terms of the Neumann series with the monitor's fixed-budget tests
    (:func:`_track`); ``state = (v,)``, ``g`` the partial sum."""
    (v,) = state
    hist = []
    for _ in range(steps):
        active = track[0]
        v = xp.where(active[:, None], v - mv(v), xp.zeros_like(v))
        g_prev, g = g, g + v
        rnorm = xp.where(active, norm(xp, v), rnorm)
        track = _track(xp, rnorm, g_prev, track)
        hist.append(rnorm)
    return (v,), g, rnorm, track, xp.stack(hist)


def _track(xp, rnorm, cand, track):
    """What :meth:`Monitor.update` does in fixed-budget mode, on device arrays only:
    ``track = (active, stop_r, best_r, best_x, divlim)``; a system goes on while its residual
    norm is at most ``divlim`` (the monitor's divergence limit, or the largest finite value
    without ``divtol``: a test of finiteness), and ``cand`` (the iterate
    whose residual ``rnorm`` is) becomes its best iterate where that norm is the smallest yet."""
    active, stop_r, best_r, best_x, divlim = track
    # divlim is finite: the test also rejects inf and NaN.
    go = rnorm <= divlim
    stop_r = xp.where(active, rnorm, stop_r)
    better = active & xp.isfinite(rnorm) & (rnorm <= best_r)
    best_r = xp.where(better, rnorm, best_r)
    best_x = xp.where(better[:, None], cand, best_x)
    return active & go, stop_r, best_r, best_x, divlim


def run_budget_compiled(prob: Problem, x0, r0, x, chunk, state, eager: int) -> Outcome:
    """A fixed budget of ``prob.maxiter`` iterations, compiled (``compile=True``): the loop
    and the monitor's tests (:func:`_track`) run as graphs of up to ``UNROLL`` iterations
    (``torch.compile(fullgraph=True)``) with no host read between them; the monitor closes
    the solve from the arrays they return (statuses, best iterate, history), as it closes
    the uncompiled loop.

    ``chunk(xp, mv, b, steps, state, x, rnorm, track) -> (state, x, rnorm, track, hist)`` runs
    ``steps`` masked iterations from the iterate ``x`` (the first one, before any product, at
    the first call) and the method's ``state`` (``hist``: the ``(steps, B)`` residual
    norms). The first ``eager`` iterations run uncompiled: they carry the facade's
    check of the first product, which would otherwise be traced into a graph of its own.

    Unlike the uncompiled loop, which stops when every system has failed (it reads the host
    every ``check_every`` iterations to know), this one always runs ``maxiter`` iterations:
    failed systems are frozen, with the same statuses and returned iterates, and
    ``iterations`` is ``maxiter``.
    """
    xp = prob.xp
    mon = Monitor(prob, r0, x0=x0)
    divlim = mon._divlim
    if divlim is None:
        # No divergence test: only the finiteness test, which ``r <= finfo.max`` is.
        divlim = xp.full(r0.shape, xp.finfo(r0.dtype).max, dtype=r0.dtype, device=prob.device)
    track = (mon.active, mon._stop_r, mon.best_r, mon.best_x, divlim)
    rnorm = mon.history[0]
    hists = []
    done = 0
    while done < prob.maxiter:
        if done == 0 and eager:
            steps, run = min(eager, prob.maxiter), chunk
        else:
            # One graph for the whole budget when it fits, else graphs of UNROLL and one for
            # the rest.
            steps, run = min(_compile.UNROLL, prob.maxiter - done), compiled(chunk, counts=prob.A)
        state, x, rnorm, track, hist = run(xp, prob.mv, prob.b, steps, state, x, rnorm, track)
        hists.append(hist)
        done += steps
    active, stop_r, best_r, best_x, _ = track
    H = xp.concat(hists, axis=0) if len(hists) > 1 else hists[0]
    mon.k = done
    mon.history.extend(H[i] for i in range(done))
    mon.best_r, mon.best_x = best_r, best_x
    mon.active, mon._stop_r, mon._dirty = active, stop_r, True
    return mon.close(x, rnorm)


def always_active(mon: Monitor, prob: Problem) -> bool:
    """Whether the monitor decides one system on host floats and stops the loop the
    iteration it goes inactive (``check_every=1``): then every iteration a solver runs is one
    of an active system, and its masks ``where(active, new, old)`` are the identity. (Call
    it before the loop: a system that stops at ``x0`` runs one masked iteration.)"""
    return bool(getattr(mon, "host_single", False)) and prob.check_every == 1 and bool(mon.active[0])



def lean_budget(prob: Problem, r0) -> bool:
    """Whether a fixed-budget solve can run :func:`run_budget`: one system, no callback, a
    check every iteration, and a finite initial residual (a system stopped at ``x0`` takes the
    monitor's path)."""
    return (
        prob.fixed_budget and prob.nsys == 1 and prob.callback is None and prob.check_every == 1
        and math.isfinite(float(r0[0]))
    )


def run_budget(prob: Problem, x0, r0, x, step) -> Outcome:
    """A fixed budget of ``prob.maxiter`` iterations of one system, decided on host floats.

    ``x`` is the first iterate (before any product); ``step()`` runs one iteration and returns
    ``(x_new, of, rnorm)``: the new iterate, the iterate whose residual norm ``rnorm`` is, and
    that norm as a ``(1,)`` array. What the monitor would do costs one scalar read per
    iteration here: the divergence and non-finite tests, and which iterate is the best. As
    long as nothing fails, the outcome is the monitor's (COMPLETED, the last iterate, the
    newest residual norm, the history) without the monitor's array work. When a test fails,
    the last residual grew past the first, or the last iterate is not finite (the cases where
    the monitor stops early, marks DIVERGED, notes growth or falls back to the best iterate),
    the iterations run are replayed into a :class:`Monitor` (host work only, no product) and
    it closes the solve, so those outcomes are the monitor's own.
    """
    xp = prob.xp
    r0f = float(r0[0])
    lim = math.inf
    if prob.divtol is not None:
        # The monitor's divergence limit, computed as it computes it (in r0's dtype).
        big = xp.asarray(xp.finfo(r0.dtype).max, dtype=r0.dtype, device=prob.device)
        lim = float(xp.minimum(prob.divtol * r0, big)[0])
    hist = [r0f]
    best_r, best_k, best_of = r0f, 0, None
    rnorm = r0
    failed = False
    k = 0
    while k < prob.maxiter:
        x, of, rnorm = step()
        k += 1
        r = float(rnorm[0])
        hist.append(r)
        fin = math.isfinite(r)
        if fin and r <= best_r:
            best_r, best_k, best_of = r, k, of
        # The monitor's test: finite, and within the divergence limit when there is one.
        if not (r <= lim if prob.divtol is not None else fin):
            failed = True
            break
    last = hist[-1]
    grew = math.isfinite(last) and last > r0f and r0f > 0
    if failed or grew or not _finite(xp, x):
        mon = Monitor(prob, r0, x0=x0)
        dtype = r0.dtype
        for i in range(1, k + 1):
            ri = xp.asarray([hist[i]], dtype=dtype, device=prob.device)
            mon.update(ri, None, of=best_of if i == best_k else None, fresh=True)
        return mon.close(x, rnorm)
    rows = np.asarray(hist, dtype=np.asarray(_b.to_numpy(r0)).dtype)[:, None]
    return Outcome(
        x=x, codes=np.full((1,), COMPLETED, dtype=np.int64), iterations=k,
        residual_norm=rows[-1], history=list(rows),
    )


def _finite(xp, x) -> bool:
    """Whether every entry of ``x`` is finite, by the sum where that decides it (one pass)."""
    if bool(xp.isfinite(xp.sum(x))):
        return True
    return bool(xp.all(xp.isfinite(x)))
