"""Preconditioned conjugate gradients (CG).

Needs: a Hermitian positive-definite ``A``; one product with ``A`` per iteration and, when a
preconditioner ``M ~ A^{-1}`` (itself Hermitian positive definite) is given, one application
of ``M``. Memory: five vectors (``x``, ``r``, ``M r``, ``p``, ``A p``).

The iteration itself, :func:`conjugate_gradients`, is shared with ``cgne`` (CG on the normal
equations), which differs only in how the search direction is seeded and how its curvature
is measured. :func:`single_reduction_cg` is the variant of Chronopoulos and Gear, whose inner
products of an iteration are one collective when the vectors are shards of global ones.

References: M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving linear
systems", J. Res. Natl. Bur. Stand. 49(6), 409-436, 1952. A. T. Chronopoulos and C. W. Gear,
"s-step iterative methods for symmetric linear systems", J. Comput. Appl. Math. 25(2),
153-168, 1989.
"""

from __future__ import annotations

from ._base import (BREAKDOWN, Monitor, Problem, Solver, allreduce_sum, dot, is_host, local_dot, norm,
                    verified_rounds)
from ._compile import compiled, requested
from ._krylov import host_axpy, real_part, safe_div, where_of

__all__ = ["CG", "conjugate_gradients", "single_reduction_cg"]

#: The values of cg's ``variant`` option: the textbook recurrence, and the single-reduction
#: one.
VARIANTS = ("hestenes-stiefel", "chronopoulos-gear")


def conjugate_gradients(prob: Problem, mon: Monitor, x, r, rnorm, seed, curvature, fused: bool = False,
                        step=None):
    """Run the conjugate-gradient recurrence from iterate ``x`` with residual ``r = b - A x``
    (norms ``rnorm``) until the monitor stops every system or ``maxiter`` is reached.

    Parameters
    ----------
    prob : Problem
    mon : Monitor
        Built on ``||r||``; updated once per iteration with the residual norm and ``x``.
    x : array, shape (B, n)
    r : array, shape (B, m)
        The residual of the user's system, kept by recurrence (``r <- r - alpha A p``).
    seed : callable
        ``seed(r, x) -> (z, rho)``: the vector that seeds the next search direction and the
        real ``(B,)`` numerator ``rho`` of the step (``z = M r``, ``rho = <r, M r>`` for CG;
        ``z = A^H r - eta x``, ``rho = ||z||^2`` for CGLS).
    curvature : callable
        ``curvature(p, q) -> (B,)`` with ``q = A p``: the step's denominator
        (``<p, A p>`` for CG; ``||A p||^2 + eta ||p||^2`` for CGLS).
    fused : bool
        ``seed`` is ``(r, <r, r>)`` (CG without a preconditioner): the inner product that
        gives the residual norm of one iteration is the numerator of the next, computed once.
    step : callable or None
        :func:`_cg_step` compiled (``compile=True``): the iterations after the first run
        through it, the monitor's tests between calls.

    Returns
    -------
    x, rnorm
        The last iterate and its recurred residual norms (systems that stopped keep theirs).

    Notes
    -----
    A zero numerator or denominator in a system whose residual is not zero is a breakdown
    (singular or indefinite ``A``, or an indefinite ``M``) and that system stops with
    BREAKDOWN; a zero residual (an exact solve in fixed-budget mode) just stops changing.

    Each iteration makes a new ``x`` (the monitor keeps a reference to the best one, no
    copy) and updates ``r`` and ``p`` in place where the namespace allows it (augmented
    assignment; on immutable arrays it rebinds). A single system on the host (numpy) takes
    its decisions on host scalars and applies no masks: a stopped system is not updated.
    """
    xp = prob.xp
    if mon.host_single and is_host(xp):
        return _cg_host(prob, mon, x, r, rnorm, seed, curvature, fused)
    where = where_of(xp)
    p = rho_old = rr = None
    while mon.k < prob.maxiter:
        if step is not None and p is not None:
            x, r, p, rho_old, rr, rnorm, broke = step(
                xp, prob.mv, seed, curvature, fused, x, r, p, rho_old, rr, rnorm, mon.active)
            mon.flag(broke, BREAKDOWN)
            if mon.update(rnorm, x, fresh=True):
                break
            continue
        if fused and rr is not None:
            z, rho = r, rr
        else:
            z, rho = seed(r, x)
        if p is None:
            p = xp.asarray(z, copy=True)
        else:
            p *= safe_div(xp, rho, rho_old)[:, None]
            p += z
        q = prob.mv(p)
        den = curvature(p, q)
        mon.flag(((rho == 0) | (den == 0)) & (rnorm > 0), BREAKDOWN)
        active = mon.active
        alpha = where(active, safe_div(xp, rho, den), xp.zeros_like(rho))
        # Stopped systems keep x and r exactly, even where their p or q hold NaN.
        col = active[:, None]
        x = where(col, x + alpha[:, None] * p, x)
        r = where(col, r - alpha[:, None] * q, r)
        if fused:
            rr = real_part(xp, dot(xp, r, r))
            rnorm = where(active, xp.sqrt(rr), rnorm)
        else:
            rnorm = where(active, norm(xp, r), rnorm)
        rho_old = rho
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm


def compiled_step(method: str, prob: Problem, step):
    """``step`` compiled with :func:`torch.compile` when the solve asked for it
    (``compile=True``), else None. A compiled step takes its inner products locally, so it
    is refused with a reduction (``reduction=``), naming both options. The product counts
    of the operator and of the preconditioner are kept out of the graph's guards (see
    :func:`~linsolve_rbp.solvers._compile.compiled`): without that, each call would see new
    counts and compile the step again."""
    if not requested(prob):
        return None
    if prob.reduction is not None:
        raise ValueError(
            f"method {method!r} cannot combine compile=True with reduction={prob.reduction!r}: the "
            "compiled iteration takes its inner products on this process only; drop one of them"
        )
    return compiled(step, counts=(prob.A, prob.mv, prob.psolve))


def _cg_step(xp, mv, seed, curvature, fused, x, r, p, rho_old, rr, rnorm, active):
    """One iteration of :func:`conjugate_gradients` after the first, as a function of arrays
    with no host read, for ``compile=True``: the same arithmetic (``p`` is a new array rather
    than updated in place). Returns the new state and the systems that broke down, which the
    caller flags on the monitor."""
    where = where_of(xp)
    if fused:
        z, rho = r, rr
    else:
        z, rho = seed(r, x)
    p = p * safe_div(xp, rho, rho_old)[:, None] + z
    q = mv(p)
    den = curvature(p, q)
    broke = active & ((rho == 0) | (den == 0)) & (rnorm > 0)
    active = active & ~broke
    alpha = where(active, safe_div(xp, rho, den), xp.zeros_like(rho))
    col = active[:, None]
    x = where(col, x + alpha[:, None] * p, x)
    r = where(col, r - alpha[:, None] * q, r)
    if fused:
        rr = real_part(xp, dot(xp, r, r))
        rnorm = where(active, xp.sqrt(rr), rnorm)
    else:
        rnorm = where(active, norm(xp, r), rnorm)
    return x, r, p, rho, rr, rnorm, broke


def _cg_host(prob: Problem, mon: Monitor, x, r, rnorm, seed, curvature, fused):
    """:func:`conjugate_gradients` for one system on the host (numpy): the step sizes are
    host floats (a float32 quotient computed in float64 and rounded to float32 is the
    float32 quotient), a stopped system is simply not updated (no masks), ``r`` and ``p``
    are updated in place and ``x`` is a new array each iteration, all with BLAS ``axpy``."""
    xp = prob.xp
    axpy = host_axpy(xp, prob.b)
    p = None
    # r is updated in place: a copy of the one given (it may be prob.b).
    r = xp.asarray(r, copy=True)
    r1 = r[0, ...]
    rho_old = rr = 0.0
    rn = float(rnorm[0])
    while mon.k < prob.maxiter:
        if fused and p is not None:
            z, rho = r, rr
        else:
            z, rho_a = seed(r, x)
            rho = float(rho_a[0])
        if p is None:
            p = xp.asarray(z, copy=True)
            p1 = p[0, ...]
        else:
            p *= rho / rho_old if rho_old != 0.0 else 0.0
            p += z
        q = prob.mv(p)
        den = float(curvature(p, q)[0])
        if (rho == 0.0 or den == 0.0) and rn > 0.0:
            mon.flag(mon.active, BREAKDOWN)
        if bool(mon.active[0]):
            alpha = rho / den if den != 0.0 else 0.0
            x = xp.asarray(x, copy=True)
            axpy(alpha, p1, x[0, ...])
            axpy(-alpha, q[0, ...], r1)
            if fused:
                rr_a = real_part(xp, dot(xp, r, r))
                rr = float(rr_a[0])
                rnorm = xp.sqrt(rr_a)
            else:
                rnorm = norm(xp, r)
            rn = float(rnorm[0])
        rho_old = rho
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm


def single_reduction_cg(prob: Problem, mon: Monitor, x, r, rnorm, psolve, step=None):
    """Run the conjugate-gradient recurrence of Chronopoulos and Gear (1989) from iterate
    ``x`` with residual ``r = b - A x`` (norms ``rnorm``) until the monitor stops every system
    or ``maxiter`` is reached: the inner products of an iteration are taken together, after
    its product, so that they are one collective (:func:`allreduce_sum`) for all the systems
    of a batch.

    With ``u = M r`` and ``w = A u``, the numerator ``gamma = <r, u>`` and ``delta = <w, u>``
    (and ``<r, r>`` for the residual norm when ``M`` is given) are reduced together, and the
    step's denominator ``<p, A p>`` follows from them by the recurrence
    ``delta - beta gamma / alpha_old``; ``A p`` itself is kept by recurrence
    (``s <- w + beta s``), so each iteration applies ``A`` once (to ``u``), plus once at the
    start of each round. ``step`` is :func:`_cg1_step` (compiled with ``compile=True``).

    Returns
    -------
    x, rnorm
        The last iterate and its recurred residual norms (systems that stopped keep theirs).

    Notes
    -----
    A zero numerator or denominator in a system whose residual is not zero is a breakdown,
    as in :func:`conjugate_gradients`. Memory: six vectors (``x``, ``r``, ``u``, ``w``,
    ``p``, ``s``; ``u`` is ``r`` without a preconditioner).
    """
    xp = prob.xp
    u = r if psolve is None else psolve(r)
    w = prob.mv(u)
    gamma, delta, _ = _cg1_dots(xp, psolve, r, u, w)
    # The first iteration is the general one with p = s = 0, beta = 0 and alpha = 1 (its
    # denominator is delta, its direction u), run eagerly: it holds the first product.
    zeros = xp.zeros_like(r)
    beta = xp.zeros_like(gamma)
    alpha = xp.ones_like(gamma)
    p = s = zeros
    first = True
    while mon.k < prob.maxiter:
        f = _cg1_step if first or step is None else step
        first = False
        x, r, u, w, p, s, gamma, delta, alpha, beta, rnorm, broke = f(
            xp, prob.mv, psolve, x, r, u, w, p, s, gamma, delta, alpha, beta, rnorm, mon.active)
        mon.flag(broke, BREAKDOWN)
        if mon.update(rnorm, x, fresh=True):
            break
    return x, rnorm


def _cg1_dots(xp, psolve, r, u, w):
    """``<r, M r>``, ``<A M r, M r>`` and ``<r, r>`` (real), reduced in one collective for all
    the systems."""
    if psolve is None:
        g, d = allreduce_sum(xp, real_part(xp, local_dot(xp, r, r)), real_part(xp, local_dot(xp, w, r)))
        return g, d, g
    return allreduce_sum(
        xp, real_part(xp, local_dot(xp, r, u)), real_part(xp, local_dot(xp, w, u)),
        real_part(xp, local_dot(xp, r, r)))


def _cg1_step(xp, mv, psolve, x, r, u, w, p, s, gamma, delta, alpha, beta, rnorm, active):
    """One iteration of :func:`single_reduction_cg`, a function of arrays with no host read
    (compiled with ``compile=True``). Returns the new state and the systems that broke
    down."""
    where = where_of(xp)
    den = delta - beta * safe_div(xp, gamma, alpha)
    bc = beta[:, None]
    p = p * bc + u
    s = s * bc + w
    broke = active & ((gamma == 0) | (den == 0)) & (rnorm > 0)
    active = active & ~broke
    alpha = where(active, safe_div(xp, gamma, den), xp.zeros_like(gamma))
    # Stopped systems keep x and r exactly, even where their p or s hold NaN.
    col = active[:, None]
    x = where(col, x + alpha[:, None] * p, x)
    r = where(col, r - alpha[:, None] * s, r)
    u = r if psolve is None else psolve(r)
    w = mv(u)
    g_new, delta, rr = _cg1_dots(xp, psolve, r, u, w)
    rnorm = where(active, xp.sqrt(rr), rnorm)
    beta = safe_div(xp, g_new, gamma)
    return x, r, u, w, p, s, g_new, delta, alpha, beta, rnorm, broke


class CG(Solver):
    """Preconditioned conjugate gradients for Hermitian positive-definite ``A``.

    Needs
        ``A`` Hermitian positive definite (not checked); one product with ``A`` per
        iteration. An optional preconditioner ``M ~ A^{-1}``, also Hermitian positive
        definite, is applied once per iteration.
    Converges
        In at most ``n`` iterations in exact arithmetic; the ``A``-norm of the error falls at
        least like ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k`` with ``kappa`` the condition
        number of ``M A``.
    Stops
        When the residual ``r = b - A x``, kept by recurrence (no extra product), meets
        ``max(rtol ||b||, atol)`` and then the true residual, computed with one product,
        meets it too (in finite precision the recurred residual drifts from the true one:
        by 25x in float32 on the 1-D Poisson matrix of order 100). When the true residual
        misses the tolerance, CG restarts from it (residual replacement) with a tighter
        internal tolerance. After ``maxiter`` iterations (COMPLETED in fixed-budget
        mode); BREAKDOWN on a zero step denominator ``<p, A p>`` or ``<r, M r>`` (singular or
        indefinite ``A`` or ``M``); DIVERGED / NONFINITE as for every method.

    The callback sees every iterate.

    With ``compile=True`` (torch tensors; not with ``reduction=``) each iteration after the
    first of a round is one step compiled with :func:`torch.compile` (``fullgraph``, no
    host read inside it), the monitor's tests running between steps as without it; the
    results are those of the eager iteration to rounding.

    Options
        ``variant`` (default ``"hestenes-stiefel"``): the recurrence. ``"hestenes-stiefel"``
        is the textbook one; its iteration takes two inner products one after the other
        (``<p, A p>``, then ``<r, r>``; three with ``M``: ``<r, M r>`` too), each a collective
        when the vectors are shards over several processes (``reduction=``).
        ``"chronopoulos-gear"`` (Chronopoulos and Gear, 1989) takes all of them together,
        after the product, so that an iteration makes exactly one collective for all the
        systems of a batch; it applies ``A`` to ``M r`` and keeps ``A p`` by recurrence
        (one more vector of memory, and one more product per round: ``k + 1`` products for
        ``k`` iterations), and gets ``<p, A p>`` from the recurrence
        ``<A M r, M r> - beta <r, M r> / alpha_old``. Use it where a collective costs more
        than the arithmetic of an iteration (many processes, a fast product).

    Caveat of the single-reduction variant
        In exact arithmetic both variants give the same iterates. In floating point the
        single-reduction recurrence for ``<p, A p>`` accumulates its rounding errors
        differently: on ill-conditioned systems the recurred residual can drift further
        from the true one and convergence can be delayed (Carson et al., 2018, analyse this
        variant with the pipelined ones: its attainable accuracy and its delay of
        convergence can be worse than the textbook form's). Measured here on the 1-D
        Poisson matrix of order 100 in float32 with ``rtol=1e-5`` and ``b`` drawn from
        ``numpy.random.default_rng(0)``: 952 iterations against 484 (the system of
        ``tests/test_fused.py::test_single_reduction_cg_stays_honest_when_ill_conditioned``).
        A drifted residual never yields a false CONVERGED: the claim is checked against
        the true residual and a failed check restarts the recurrence from it, at the cost of
        more iterations. On well-conditioned systems the two variants take the same number
        of iterations to rounding.

    References
    ----------
    M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving linear
    systems", J. Res. Natl. Bur. Stand. 49(6), 409-436, 1952.

    A. T. Chronopoulos and C. W. Gear, "s-step iterative methods for symmetric linear
    systems", J. Comput. Appl. Math. 25(2), 153-168, 1989.

    E. Carson, M. Rozlozník, Z. Strakos, P. Tichý and M. Tuma, "The numerical stability
    analysis of pipelined conjugate gradient methods: historical context and methodological
    concerns", SIAM J. Sci. Comput. 40(5), A3549-A3580, 2018.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = lr.solve(A, np.array([1.0, 2.0]), method="cg", rtol=1e-10)
    >>> res.status.name, res.iterations, np.allclose(A @ res.x, [1.0, 2.0])
    ('CONVERGED', 2, True)
    """

    name = "cg"
    checks_claims = True
    needs_symmetric = True
    accepts_preconditioner = True
    compiles = True
    options = {"variant": VARIANTS[0]}
    option_kinds = {"variant": VARIANTS}

    def run(self, prob: Problem):
        xp = prob.xp
        single = prob.options.get("variant", VARIANTS[0]) == "chronopoulos-gear"
        step = compiled_step(self.name, prob, _cg1_step if single else _cg_step)
        x = prob.initial_x()
        r = prob.b if prob.x0 is None else prob.b - prob.mv(x)
        mon = Monitor(prob, norm(xp, r), x0=x)
        psolve = prob.psolve
        if single:
            def iterate(x, r, rnorm):
                return single_reduction_cg(prob, mon, x, r, rnorm, psolve, step)

            x, rnorm = verified_rounds(prob, mon, x, r, mon.history[0], iterate)
            return mon.finish(x, rnorm)

        def seed(r, x):
            z = r if psolve is None else psolve(r)
            return z, real_part(xp, dot(xp, r, z))

        def curvature(p, q):
            return real_part(xp, dot(xp, p, q))

        def iterate(x, r, rnorm):
            return conjugate_gradients(prob, mon, x, r, rnorm, seed, curvature, fused=psolve is None,
                                       step=step)

        x, rnorm = verified_rounds(prob, mon, x, r, mon.history[0], iterate)
        return mon.finish(x, rnorm)
