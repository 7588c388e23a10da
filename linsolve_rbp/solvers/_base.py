"""What every solver shares: the validated :class:`Problem`, the :class:`Monitor` that applies
the stopping, divergence and non-finite tests per system, and the :class:`Solver` base class.

Solvers are written once, for a batch: ``prob.b`` always has shape ``(B, n)`` (``B = 1`` for an
ordinary solve) and ``prob.mv`` / ``prob.rmv`` / ``prob.psolve`` act on ``(B, n)`` arrays. Inner
products and norms are per row (:func:`dot`, :func:`norm`). Solvers get array functions only
from ``prob.xp``, never from numpy, torch or cupy. They never write into ``prob.b`` or
``prob.x0``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from .._result import Status

__all__ = ["Problem", "Monitor", "Outcome", "Solver", "dot", "norm", "RUNNING"]

RUNNING = -1
CONVERGED = Status.CONVERGED.code
COMPLETED = Status.COMPLETED.code
MAX_ITERATIONS = Status.MAX_ITERATIONS.code
BREAKDOWN = Status.BREAKDOWN.code
DIVERGED = Status.DIVERGED.code
NONFINITE = Status.NONFINITE.code
LEAST_SQUARES = Status.LEAST_SQUARES.code


def dot(xp, u, v):
    """Per-row inner products ``<u_i, v_i> = sum conj(u_i) v_i`` of ``(B, n)`` arrays."""
    if xp.isdtype(u.dtype, "complex floating"):
        u = xp.conj(u)
    return xp.sum(u * v, axis=-1)


def norm(xp, v):
    """Per-row 2-norms of a ``(B, n)`` array."""
    return xp.linalg.vector_norm(v, axis=-1)


@dataclass
class Problem:
    """A validated linear system (or batch of systems), as solvers see it.

    Attributes
    ----------
    xp : namespace
        The array namespace of ``b``.
    A : LinearOperator
        The operator (for methods that need more than products, e.g. a scipy bridge).
    mv, rmv : callable
        ``(B, n) -> (B, m)`` products with ``A`` and ``A^H`` (counted on ``A``).
    psolve : callable or None
        The preconditioner ``M`` applied to a ``(B, n)`` array; ``None`` means no
        preconditioner.
    b : array, shape (B, m)
    x0 : array, shape (B, n), or None
    rtol, atol : float or None
        Both None means fixed-budget mode.
    maxiter : int
    callback : callable or None
        ``callback(iteration, x, residual_norm)`` with ``x`` and ``residual_norm`` in the
        shape of the user's ``b`` (leading batch axis only for batched solves).
    check_every : int
    divtol : float or None
    batched : bool
    options : dict
        The method's options, defaults filled in.
    """

    xp: Any
    A: Any
    mv: Callable
    rmv: Callable | None
    psolve: Callable | None
    b: Any
    x0: Any
    rtol: float | None
    atol: float | None
    maxiter: int
    callback: Callable | None
    check_every: int
    divtol: float | None
    batched: bool
    options: dict
    dtype: Any = None
    real_dtype: Any = None
    device: Any = None

    @property
    def fixed_budget(self) -> bool:
        return self.rtol is None and self.atol is None

    @property
    def nsys(self) -> int:
        return self.b.shape[0]

    def zeros_x(self):
        """A zero iterate of shape ``(B, n)``."""
        return self.xp.zeros((self.b.shape[0], self.A.shape[1]), dtype=self.dtype, device=self.device)

    def initial_x(self):
        """``x0`` (a fresh copy, safe to update in place), or zeros."""
        if self.x0 is None:
            return self.zeros_x()
        return self.xp.asarray(self.x0, copy=True)

    def thresholds(self):
        """Per-system stopping thresholds ``max(rtol ||b||, atol)``, or None in fixed-budget
        mode."""
        if self.fixed_budget:
            return None
        xp = self.xp
        bnorm = norm(xp, self.b)
        rtol = 0.0 if self.rtol is None else self.rtol
        atol = 0.0 if self.atol is None else self.atol
        return xp.maximum(rtol * bnorm, xp.asarray(atol, dtype=bnorm.dtype, device=self.device))


@dataclass
class Outcome:
    """What a solver returns to the facade."""

    x: Any
    codes: Any
    iterations: int
    residual_norm: Any
    history: list
    info: dict = field(default_factory=dict)
    #: LEAST_SQUARES counts as a success (the user asked for a least-squares solution).
    accept_least_squares: bool = False


class Monitor:
    """Per-system bookkeeping of a solve: stopping, divergence and non-finite tests, residual
    history, best iterate, callback, and how often the host is synchronised.

    A solver calls :meth:`update` once per iteration with the residual norms ``(B,)`` (and the
    iterate, where it has one) and stops when it returns True or after ``maxiter`` iterations;
    it keeps systems whose ``active`` flag is False unchanged. It ends with :meth:`finish`.
    """

    def __init__(self, prob: Problem, r0norm, x0=None):
        xp = self.xp = prob.xp
        self.prob = prob
        self.k = 0
        self._dirty = False
        self.threshold = prob.thresholds()
        self.r0 = r0norm
        self.history = [r0norm]
        B = prob.nsys
        self.codes = xp.full((B,), RUNNING, dtype=xp.int64, device=prob.device)
        self.active = xp.ones((B,), dtype=xp.bool, device=prob.device)
        self.best_r = xp.where(xp.isfinite(r0norm), r0norm, xp.asarray(float("inf"), dtype=r0norm.dtype, device=prob.device))
        # Copies: solvers may update their iterate in place (neumann accumulates its sum).
        self.best_x = None if x0 is None else xp.asarray(x0, copy=True)
        # The status codes as device arrays, made once.
        self._code = {
            c: xp.asarray(c, dtype=xp.int64, device=prob.device)
            for c in (RUNNING, CONVERGED, COMPLETED, MAX_ITERATIONS, BREAKDOWN, DIVERGED, NONFINITE)
        }
        # The divergence limit, kept finite so that ``r <= limit`` also rejects inf and NaN.
        self._divlim = None
        if prob.divtol is not None:
            self._divlim = xp.minimum(prob.divtol * r0norm, xp.asarray(xp.finfo(r0norm.dtype).max, dtype=r0norm.dtype, device=prob.device))
        self._single = B == 1
        self._stop_r = r0norm
        self._test(r0norm)

    # The tests run every iteration and only decide which systems go on (``active``); the
    # status code of a system that stopped in a test follows from the residual norm it
    # stopped at (``_stop_r``), and is written when the codes are next read or the threshold
    # changes. This keeps the per-iteration work to a few elementwise operations.
    @property
    def codes(self):
        """Per-system status codes ``(B,)`` (``RUNNING`` = -1 while running)."""
        if self._dirty:
            self._flush()
        return self._codes

    @codes.setter
    def codes(self, value):
        if self._dirty:
            self._flush()
        self._codes = value

    @property
    def threshold(self):
        """Per-system stopping thresholds ``(B,)`` applied to the residual norms passed to
        :meth:`update`, or None in fixed-budget mode."""
        return self._threshold

    @threshold.setter
    def threshold(self, value):
        if self._dirty:
            self._flush()
        self._threshold = value

    def _flush(self):
        """Write the codes of the systems that stopped in a test since the last flush: ranked
        NONFINITE, CONVERGED, DIVERGED, as the tests are."""
        self._dirty = False
        xp = self.xp
        code = self._code
        r = self._stop_r
        pending = (self._codes == RUNNING) & ~self.active
        if self._threshold is None:
            new = code[DIVERGED]
        else:
            new = xp.where(r <= self._threshold, code[CONVERGED], code[DIVERGED])
        new = xp.where(xp.isfinite(r), new, code[NONFINITE])
        self._codes = xp.where(pending, new, self._codes)

    def _set(self, mask, code):
        xp = self.xp
        c = self._code.get(code)
        if c is None:
            c = xp.asarray(code, dtype=xp.int64, device=self.prob.device)
        # Systems in mask are running (not pending a code from a test), so no flush is needed.
        self._codes = xp.where(mask, c, self._codes)
        self.active = self.active & ~mask

    def _test(self, rnorm):
        # A system goes on while its residual norm is finite, above the threshold and (after
        # the first iteration) at most the divergence limit.
        xp = self.xp
        thr = self._threshold
        div = self._divlim is not None and self.k > 0
        if thr is not None:
            go = rnorm > thr
            go = go & (rnorm <= self._divlim) if div else go & xp.isfinite(rnorm)
        elif div:
            go = rnorm <= self._divlim
        else:
            go = xp.isfinite(rnorm)
        self._stop_r = xp.where(self.active, rnorm, self._stop_r)
        self.active = self.active & go
        self._dirty = True

    def flag(self, mask, code: int) -> None:
        """Mark systems in ``mask`` (still active) as stopped with ``code`` (e.g. BREAKDOWN)."""
        self._set(self.active & mask, code)

    def update(self, rnorm, x=None) -> bool:
        """Record iteration ``k + 1``; return True when the solver should stop."""
        xp = self.xp
        self.k += 1
        was_active = self.active
        self.history.append(rnorm)
        self._test(rnorm)
        if x is not None:
            better = was_active & xp.isfinite(rnorm) & (rnorm <= self.best_r)
            self.best_r = xp.where(better, rnorm, self.best_r)
            if self.best_x is None:
                self.best_x = xp.asarray(x, copy=True)
            else:
                self.best_x = xp.where(better[:, None], x, self.best_x)
        cb = self.prob.callback
        if cb is not None:
            if self.prob.batched:
                cb(self.k, x, rnorm)
            else:
                cb(self.k, None if x is None else x[0, ...], rnorm[0])
        if self.k % self.prob.check_every == 0:
            return not self.any_active()
        return False

    def any_active(self) -> bool:
        """Whether any system is still running (one host synchronisation)."""
        if self._single:
            # Same answer for a batch of one, without the cost of a reduction.
            return bool(self.active[0])
        return bool(self.xp.any(self.active))

    def finish(self, x, rnorm=None, info=None) -> Outcome:
        """Close the solve: statuses of systems still running, best iterates where the
        iteration diverged or became non-finite."""
        xp = self.xp
        prob = self.prob
        if rnorm is None:
            rnorm = self.history[-1]
        running = self.codes == RUNNING
        if prob.fixed_budget:
            # A fixed budget is a success unless the residual grew over the run.
            grew = running & xp.isfinite(rnorm) & (rnorm > self.r0) & (self.r0 > 0)
            self.codes = xp.where(grew, self._code[DIVERGED], self.codes)
            running = self.codes == RUNNING
            self.codes = xp.where(running, self._code[COMPLETED], self.codes)
        else:
            self.codes = xp.where(running, self._code[MAX_ITERATIONS], self.codes)
        bad = (self.codes == DIVERGED) | (self.codes == NONFINITE)
        bad = bad | ~xp.all(xp.isfinite(x), axis=-1)
        if self.best_x is not None:
            x = xp.where(bad[:, None], self.best_x, x)
            rnorm = xp.where(bad, self.best_r, rnorm)
        # Anything still non-finite (no finite iterate was ever seen) is zeroed, never NaN.
        x = xp.where(xp.isfinite(x), x, xp.zeros_like(x))
        return Outcome(x=x, codes=self.codes, iterations=self.k, residual_norm=rnorm,
                       history=self.history, info=info or {})


class Solver:
    """Base class of the methods. Subclasses set the class attributes and implement
    :meth:`run`.

    Attributes
    ----------
    name : str
        The method name used by :func:`linsolve_rbp.solve`.
    needs_rmatvec : bool
        The method applies ``A^H`` (a vector-Jacobian and a Jacobian-vector product per
        iteration for an adjoint system).
    needs_symmetric : bool
        The method assumes ``A`` is Hermitian (it is not checked: a non-symmetric ``A`` gives a
        wrong answer or a breakdown).
    needs_square : bool
        The method solves square systems only.
    accepts_preconditioner : bool
        ``M`` may be given.
    batched_products : bool
        With ``batch_dims=1`` the method hands the operator ``(B, n)`` arrays, one row per
        system, as :func:`linsolve_rbp.solve` promises. False for methods that solve the
        systems one at a time with ``(n,)`` vectors (the scipy bridges), which therefore
        cannot serve operators whose products are per system.
    options : dict
        Method-specific keyword options and their defaults.
    option_kinds : dict
        Option name -> ``"nonnegative"`` or ``"positive_int"``, validated by
        :meth:`check_options`.
    """

    name = "?"
    needs_rmatvec = False
    needs_symmetric = False
    needs_square = True
    accepts_preconditioner = False
    batched_products = True
    options: dict = {}
    #: How ``check_options`` validates an option: ``"nonnegative"`` (a real >= 0, as float)
    #: or ``"positive_int"``.
    option_kinds: dict = {}

    def default_maxiter(self, n: int) -> int:
        """``min(10 n, 10000)``: enough for any well-posed Krylov solve, bounded for huge n."""
        return max(1, min(10 * n, 10_000))

    def check_options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise TypeError(
                f"method {self.name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"it accepts: {accepted}"
            )
        out = dict(self.options)
        out.update(options)
        for name, kind in self.option_kinds.items():
            value = out[name]
            if kind == "nonnegative":
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                    raise ValueError(f"{name} must be a non-negative real number, got {value!r}")
                out[name] = float(value)
            elif kind == "positive_int":
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
                out[name] = int(value)
        return out

    def run(self, prob: Problem) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError
