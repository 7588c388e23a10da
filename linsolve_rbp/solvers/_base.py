"""What every solver shares: the validated :class:`Problem`, the :class:`Monitor` that applies
the stopping, divergence and non-finite tests per system, and the :class:`Solver` base class.

Solvers are written once, for a batch: ``prob.b`` always has shape ``(B, n)`` (``B = 1`` for an
ordinary solve) and ``prob.mv`` / ``prob.rmv`` / ``prob.psolve`` act on ``(B, n)`` arrays. Inner
products and norms are per row (:func:`dot`, :func:`norm`). Solvers get array functions only
from ``prob.xp``, never from numpy, torch or cupy. They never write into ``prob.b`` or
``prob.x0``.

Inner products and norms go through the reduction of the solve (see
:mod:`linsolve_rbp.distributed`): :func:`dot`, :func:`norm`, :func:`safe_norm` and
:func:`allreduce_sum` return global values when the vectors are shards of global ones, so a
solver written with them runs unchanged on a vector split across processes. Without a
reduction (the default) they are the local computations, with no extra cost.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import backend as _b
from .._result import Status
from .._validate import COMMON_OPTIONS, check_kind, unknown_option

__all__ = [
    "Problem", "Monitor", "Outcome", "Solver", "dot", "is_host", "norm", "safe_norm", "run_scaled", "verified_rounds",
    "RUNNING", "local_dot", "allreduce_sum", "allreduce_max", "all_ranks", "current_reduction",
    "using_reduction",
]

RUNNING = -1
CONVERGED = Status.CONVERGED.code
COMPLETED = Status.COMPLETED.code
MAX_ITERATIONS = Status.MAX_ITERATIONS.code
BREAKDOWN = Status.BREAKDOWN.code
DIVERGED = Status.DIVERGED.code
NONFINITE = Status.NONFINITE.code
LEAST_SQUARES = Status.LEAST_SQUARES.code


_VECDOT: dict = {}


def _vecdot_of(xp):
    """The fastest per-row ``vecdot(u, v)`` of a namespace, found once: torch's own
    ``torch.linalg.vecdot`` for the ``array_api_compat.torch`` wrapper (whose generic
    ``vecdot`` broadcasts and moves axes in Python, ten times the cost of the kernel),
    ``xp.vecdot`` elsewhere, None without one."""
    key = id(xp)
    try:
        return _VECDOT[key][1]
    except KeyError:
        pass
    f = getattr(xp, "vecdot", None)
    if f is not None:
        f = (lambda f: lambda u, v: f(u, v, axis=-1))(f)
    if getattr(xp, "__name__", "") == "array_api_compat.torch":
        import torch

        def f(u, v):
            return torch.linalg.vecdot(u, v, dim=-1)
    _VECDOT[key] = (xp, f)  # xp kept alive, so that its id is not reused
    return f


# -- the reduction of the running solve ------------------------------------------------------
# Solves given a reduction (``solve(..., reduction=...)``) run inside :func:`using_reduction`,
# which records it for the calling thread. ``_GIVEN`` counts those solves over all threads:
# while it is zero (every solve without a reduction) the functions below test one module
# global and do the local computation, nothing more.
_GIVEN = 0
_GIVEN_LOCK = threading.Lock()
_TLS = threading.local()


def _given():
    """The reduction given to the solve running in this thread, or None."""
    if _GIVEN:
        return getattr(_TLS, "reduction", None)
    return None


def current_reduction():
    """The reduction of the solve running now in this thread: the one given to
    :func:`linsolve_rbp.solve` as ``reduction=``, or :data:`linsolve_rbp.distributed.LOCAL`
    (one process, no communication) when none was given."""
    red = _given()
    if red is None:
        from ..distributed import LOCAL

        return LOCAL
    return red


class using_reduction:
    """Context manager: run the code inside with ``reduction`` as the reduction of this
    thread (None: none, the local computations). Nests; restores the previous one on exit."""

    __slots__ = ("reduction", "_prev")

    def __init__(self, reduction):
        self.reduction = reduction

    def __enter__(self):
        global _GIVEN
        self._prev = getattr(_TLS, "reduction", None)
        _TLS.reduction = self.reduction
        with _GIVEN_LOCK:
            _GIVEN += 1
        return self.reduction

    def __exit__(self, *exc):
        global _GIVEN
        _TLS.reduction = self._prev
        with _GIVEN_LOCK:
            _GIVEN -= 1
        return False


def local_dot(xp, u, v):
    """Per-row inner products ``<u_i, v_i> = sum conj(u_i) v_i`` of ``(B, n)`` arrays, of the
    entries held here (no reduction).

    One fused call (``vecdot``: BLAS on numpy, one kernel on torch) where the namespace has
    it, no temporary ``(B, n)`` product."""
    vecdot = _vecdot_of(xp)
    if vecdot is not None:
        return vecdot(u, v)
    if xp.isdtype(u.dtype, "complex floating"):
        u = xp.conj(u)
    return xp.sum(u * v, axis=-1)


def dot(xp, u, v):
    """Per-row inner products ``<u_i, v_i> = sum conj(u_i) v_i`` of ``(B, n)`` arrays, summed
    over the ranks of the solve's reduction (one collective); :func:`local_dot` without
    one."""
    # local_dot's body, not a call to it: one call level fewer on the local path.
    vecdot = _vecdot_of(xp)
    if vecdot is not None:
        d = vecdot(u, v)
    else:
        d = xp.sum((xp.conj(u) if xp.isdtype(u.dtype, "complex floating") else u) * v, axis=-1)
    if _GIVEN:
        red = getattr(_TLS, "reduction", None)
        if red is not None:
            (d,) = red.allreduce_sum(xp, (d,))
    return d


def allreduce_sum(xp, *arrays) -> tuple:
    """The elementwise sums over the ranks of the solve's reduction of each array, made by
    ONE collective (the arrays are packed into one buffer); the arrays themselves, as a
    tuple, without a reduction. For a method that fuses the inner products of an iteration:
    ``rr, rw = allreduce_sum(xp, local_dot(xp, r, r), local_dot(xp, r, w))``."""
    if _GIVEN:
        red = getattr(_TLS, "reduction", None)
        if red is not None:
            return tuple(red.allreduce_sum(xp, arrays))
    return arrays


def allreduce_max(xp, *arrays) -> tuple:
    """As :func:`allreduce_sum`, with the elementwise maximum (real arrays)."""
    if _GIVEN:
        red = getattr(_TLS, "reduction", None)
        if red is not None:
            return tuple(red.allreduce_max(xp, arrays))
    return arrays


def all_ranks(xp, mask, *masks):
    """``mask`` (an array of bools) where it holds on every rank of the solve's reduction:
    for decisions taken on local data (is every entry of this row finite?), so that all
    ranks take the same one. ``mask`` itself without a reduction. Given several masks, the
    tuple of theirs, from one collective."""
    red = _given()
    if red is None:
        return (mask, *masks) if masks else mask
    # One collective: the largest "does not hold" over the ranks.
    bad = red.allreduce_max(xp, [xp.astype(~m, xp.float32) for m in (mask, *masks)])
    out = tuple(v == 0 for v in bad)
    return out if masks else out[0]


def is_host(xp) -> bool:
    """Whether arrays of ``xp`` live in host memory, so that reading one of their scalars
    costs no device synchronisation (numpy). Decided once per solve from the namespace."""
    # numpy itself, or array_api_compat's wrapper of it; not jax.numpy, whose arrays are
    # immutable and may live on a device.
    return getattr(xp, "__name__", "") in ("numpy", "array_api_compat.numpy")


def norm(xp, v):
    """Per-row 2-norms of a ``(B, n)`` array.

    Not guarded against overflow or underflow: the solvers run on right-hand sides scaled to
    a largest magnitude in [1, 2) (:func:`run_scaled`), where it is exact enough and one
    pass. Use :func:`safe_norm` on data of any scale. Reduced over the ranks of the solve's
    reduction (one collective)."""
    if _GIVEN:
        red = getattr(_TLS, "reduction", None)
        if red is not None:
            sq = local_dot(xp, v, v)
            if xp.isdtype(sq.dtype, "complex floating"):
                sq = xp.real(sq)
            (sq,) = red.allreduce_sum(xp, (sq,))
            return xp.sqrt(sq)
    return xp.linalg.vector_norm(v, axis=-1)


def safe_norm(xp, v):
    """Per-row 2-norms of a ``(B, n)`` array of any scale: the rows are divided by their
    largest magnitude first, so no square overflows or underflows (LAPACK's ``dnrm2``
    idea). Reduced over the ranks of the solve's reduction (two collectives: the largest local
    norm, then the sum of the local norms' squares relative to it)."""
    big = xp.max(xp.abs(v), axis=-1) if v.shape[-1] else xp.zeros(v.shape[:-1], dtype=xp.abs(v).dtype)
    usable = xp.isfinite(big) & (big > 0)
    s = xp.where(usable, big, xp.ones_like(big))
    # Rows of zeros, inf or NaN: their largest magnitude is their norm (0, inf or NaN).
    out = xp.where(usable, s * xp.linalg.vector_norm(v / s[..., None], axis=-1), big)
    if _GIVEN:
        red = getattr(_TLS, "reduction", None)
        if red is not None:
            return _reduced_norm(xp, red, out)
    return out


def _reduced_norm(xp, red, local):
    """The 2-norms over the ranks of per-rank norms ``local`` (B,), scale-safe: each is
    divided by the largest over the ranks before it is squared. Rows with a NaN anywhere
    give NaN, rows with an infinity inf, as :func:`safe_norm` does on one process."""
    (big,) = red.allreduce_max(xp, (xp.where(xp.isnan(local), xp.full_like(local, float("inf")), local),))
    usable = xp.isfinite(big) & (big > 0)
    s = xp.where(usable, big, xp.ones_like(big))
    q = local / s
    (sq,) = red.allreduce_sum(xp, (q * q,))
    return xp.where(usable, s * xp.sqrt(sq), xp.where(xp.isnan(sq), sq, big))


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
    #: ``(B,)`` powers of two the systems were divided by (see :func:`run_scaled`), or None.
    scale: Any = None
    #: The reduction given to :func:`linsolve_rbp.solve` (``reduction=``), or None: the
    #: vectors are whole, inner products local (see :mod:`linsolve_rbp.distributed`).
    #: :func:`run_scaled` makes it the current one while the solver runs.
    reduction: Any = None
    #: ``compile=True``: the method compiles its per-iteration work with ``torch.compile``
    #: (see ``linsolve_rbp.solvers._compile``); only methods with ``compiles = True``.
    compile: bool = False

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
        cached = self.__dict__.get("_thresholds")
        if cached is not None and cached[0] is self.b and cached[1] == (self.rtol, self.atol) and cached[2] is self.scale:
            return cached[3]
        xp = self.xp
        bnorm = safe_norm(xp, self.b)
        rtol = 0.0 if self.rtol is None else self.rtol
        atol = xp.asarray(0.0 if self.atol is None else self.atol, dtype=bnorm.dtype, device=self.device)
        if self.scale is not None:
            atol = atol / self.scale
        thr = xp.maximum(rtol * bnorm, atol)
        # Computed once per problem (the monitor and the claim checks ask for it again).
        self.__dict__["_thresholds"] = (self.b, (self.rtol, self.atol), self.scale, thr)
        return thr


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
    #: A sentence added to the result's message (for example: the terms of a fixed budget
    #: grew).
    note: str = ""


class Monitor:
    """Per-system bookkeeping of a solve: stopping, divergence and non-finite tests, residual
    history, best iterate, callback, how often the host is synchronised, and the check of
    every convergence claim against the true residual.

    A solver calls :meth:`update` once per iteration with its residual norms ``(B,)`` (and
    the iterate, where it has one) and stops when it returns True or after ``maxiter``
    iterations; it keeps systems whose ``active`` flag is False unchanged. The norms given to
    :meth:`update` may be estimates (a recurrence, a rotated right-hand side, the newest
    Neumann term); ``threshold`` is the test applied to them. ``target`` keeps the user's
    ``max(rtol ||b||, atol)``, which only the true residual ``||b - A x||`` can meet: in
    tolerance mode a solver ends every round of iterations with :meth:`verify` (one product),
    which withdraws claims the true residual does not back and reopens those systems, and
    it ends the solve with :meth:`finish`.
    """

    def __init__(self, prob: Problem, r0norm, x0=None):
        xp = self.xp = prob.xp
        self.prob = prob
        self.k = 0
        self._dirty = False
        self.threshold = prob.thresholds()
        self.target = self._threshold
        self.r0 = r0norm
        self.history = [r0norm]
        self.note = ""
        B = prob.nsys
        self.codes = xp.full((B,), RUNNING, dtype=xp.int64, device=prob.device)
        self.active = xp.ones((B,), dtype=xp.bool, device=prob.device)
        inf = xp.asarray(float("inf"), dtype=r0norm.dtype, device=prob.device)
        self._inf = inf
        # The best iterate by the residuals given to update (estimates for most methods).
        self.best_r = xp.where(xp.isfinite(r0norm), r0norm, inf)
        # Copies: solvers may update their iterate in place (neumann accumulates its sum).
        self.best_x = None if x0 is None else xp.asarray(x0, copy=True)
        # The best iterate by true residuals (x0, whose residual r0norm is true, and every
        # iterate passed to check): what a failed solve falls back to.
        self.ver_r = self.best_r
        self.ver_x = self.best_x
        self._verified = False
        # (iteration, true residual norms) of the last check made by settle.
        self._settled = (None, None)
        # The status codes as device arrays, made once.
        self._code = {
            c: xp.asarray(c, dtype=xp.int64, device=prob.device)
            for c in (RUNNING, CONVERGED, COMPLETED, LEAST_SQUARES, MAX_ITERATIONS, BREAKDOWN,
                      DIVERGED, NONFINITE)
        }
        # The divergence limit, kept finite so that ``r <= limit`` also rejects inf and NaN.
        self._divlim = None
        if prob.divtol is not None:
            self._divlim = xp.minimum(prob.divtol * r0norm, xp.asarray(xp.finfo(r0norm.dtype).max, dtype=r0norm.dtype, device=prob.device))
        self._single = B == 1
        #: A single system whose scalars can be read on the host without a device
        #: synchronisation (numpy), or with the one synchronisation per iteration that
        #: ``check_every=1`` allows anyway: :meth:`update` then takes its decisions on host
        #: floats, with the same outcome as the array tests (see :meth:`_update_single`).
        self.host_single = B == 1 and (is_host(xp) or prob.check_every == 1)
        self._host_key = self._best_key = self  # nothing read yet
        self._thr_f = self._lim_f = self._best_f = None
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

    def flag(self, mask, status) -> None:
        """Mark systems in ``mask`` (still active) as stopped with ``status``: a
        :class:`~linsolve_rbp.Status` (e.g. ``Status.BREAKDOWN``) or its integer code."""
        code = status.code if isinstance(status, Status) else status
        self._set(self.active & mask, code)

    def update(self, rnorm, x=None, of=None, fresh: bool = False) -> bool:
        """Record iteration ``k + 1``; return True when the solver should stop.

        ``x`` is the new iterate (for the callback); ``of`` is the iterate whose residual
        ``rnorm`` is, when that is not ``x`` (``neumann`` and ``fixed_point`` know the
        residual of the previous iterate), for the choice of the best iterate.

        ``fresh=True`` promises that the solver will not write into that iterate later (it
        makes a new array each iteration): the monitor then keeps a reference to it as the
        best iterate instead of a copy. Without it the monitor copies, since solvers may
        update their iterate in place."""
        if self.host_single:
            return self._update_single(rnorm, x, of, fresh)
        xp = self.xp
        self.k += 1
        was_active = self.active
        self.history.append(rnorm)
        self._test(rnorm)
        cand = x if of is None else of
        if cand is not None:
            better = was_active & xp.isfinite(rnorm) & (rnorm <= self.best_r)
            self.best_r = xp.where(better, rnorm, self.best_r)
            if self.best_x is None:
                self.best_x = cand if fresh else xp.asarray(cand, copy=True)
            else:
                self.best_x = xp.where(better[:, None], cand, self.best_x)
        if self.prob.callback is not None:
            self._call_back(x, rnorm)
        if self.k % self.prob.check_every == 0:
            return not self.any_active()
        return False

    def _update_single(self, rnorm, x, of, fresh) -> bool:
        """:meth:`update` for one system, on host floats: the same tests, best iterate,
        history and callback as the array path (``_test`` and the ``better`` mask), with one
        scalar read instead of a dozen ``(1,)`` array operations and no copy of the iterate
        when it is ``fresh``."""
        self.k += 1
        self.history.append(rnorm)
        r = float(rnorm[0])
        was = bool(self.active[0])
        if was:
            self._stop_r = rnorm
            thr = self._threshold
            if self._host_key is not thr:
                # The threshold changed (or this is the first update): read the thresholds
                # once, not every iteration.
                self._host_key = thr
                self._thr_f = None if thr is None else float(thr[0])
                self._lim_f = None if self._divlim is None else float(self._divlim[0])
            thr, lim = self._thr_f, self._lim_f
            if thr is not None:
                go = r > thr and (r <= lim if lim is not None else math.isfinite(r))
            elif lim is not None:
                go = r <= lim
            else:
                go = math.isfinite(r)
            if not go:
                xp = self.xp
                self.active = xp.zeros((1,), dtype=xp.bool, device=self.prob.device)
                self._dirty = True
        cand = x if of is None else of
        if cand is not None:
            if self._best_key is not self.best_r:
                self._best_key = self.best_r
                self._best_f = float(self.best_r[0])
            better = was and math.isfinite(r) and r <= self._best_f
            if better:
                self.best_r = self._best_key = rnorm
                self._best_f = r
            if better or self.best_x is None:
                self.best_x = cand if fresh else self.xp.asarray(cand, copy=True)
        if self.prob.callback is not None:
            self._call_back(x, rnorm)
        if self.k % self.prob.check_every == 0:
            return not bool(self.active[0])
        return False

    def _call_back(self, x, rnorm):
        """The user's callback with iteration ``k``: the batch as it is, or one system's."""
        cb = self.prob.callback
        if self.prob.batched:
            cb(self.k, x, rnorm)
        else:
            cb(self.k, None if x is None else x[0, ...], rnorm[0])

    def any_active(self) -> bool:
        """Whether any system is still running (one host synchronisation)."""
        if self._single:
            # Same answer for a batch of one, without the cost of a reduction.
            return bool(self.active[0])
        return bool(self.xp.any(self.active))

    # -- claims against the true residual -----------------------------------------------------
    def check(self, x, rtrue):
        """Judge the iterate ``x`` by its true residual norms ``rtrue = ||b - A x||``.

        Records ``x`` as the best verified iterate where it is; marks running systems whose
        true residual is not finite NONFINITE; in tolerance mode, marks CONVERGED every system
        whose true residual meets ``target`` (whatever its estimate said), marks DIVERGED the
        running or claimed systems whose true residual is past the divergence limit, and
        reopens (sets running again) the systems that claimed CONVERGED on an estimate the
        true residual does not back.

        Returns
        -------
        array of bool, shape (B,), or None
            The reopened systems; None in fixed-budget mode (there is no target).
        """
        xp = self.xp
        self._verified = True
        fin = xp.isfinite(rtrue)
        better = fin & (rtrue <= self.ver_r)
        self.ver_r = xp.where(better, rtrue, self.ver_r)
        if self.ver_x is None:
            self.ver_x = xp.asarray(x, copy=True)
        else:
            self.ver_x = xp.where(better[:, None], x, self.ver_x)
        self._set(self.active & ~fin, NONFINITE)
        if self.target is None:
            return None
        ok = fin & (rtrue <= self.target)
        codes = self.codes
        reopen = (codes == CONVERGED) & ~ok
        if self._divlim is not None:
            div = (self.active | reopen) & fin & ~ok & (rtrue > self._divlim)
            reopen = reopen & ~div
            self._codes = xp.where(div, self._code[DIVERGED], self._codes)
            self.active = self.active & ~div
        self._codes = xp.where(ok, self._code[CONVERGED], xp.where(reopen, self._code[RUNNING], self._codes))
        self.active = (self.active | reopen) & ~ok
        return reopen

    def verify(self, x):
        """Compute the true residual of ``x`` (one product) and :meth:`check` it.

        Returns
        -------
        r, rtrue, reopened
            ``b - A x``, its norms, and the reopened systems (None in fixed-budget mode).
        """
        prob = self.prob
        r = prob.b - prob.mv(x)
        # Scale-safe: a tiny tolerance (atol far below the largest entry of b) must not be
        # met by a residual whose squares underflow.
        rtrue = safe_norm(self.xp, r)
        return r, rtrue, self.check(x, rtrue)

    def settle(self, x):
        """For methods whose claim check also yields their next step (``neumann``,
        ``fixed_point``): call when :meth:`update` returned True. Checks the claims on ``x``
        (tolerance mode) and returns ``(r, rtrue)``, the true residual to go on with, when
        reopened systems remain and iterations are left; None when the solve ends."""
        if self.prob.fixed_budget:
            return None
        r, rtrue, reopened = self.verify(x)
        self._settled = (self.k, rtrue)
        if self.k >= self.prob.maxiter or not self.any_active():
            return None
        self.tighten(reopened, rtrue)
        return r, rtrue

    def close(self, x, rnorm) -> Outcome:
        """:meth:`finish` for methods that use :meth:`settle`: in tolerance mode the
        returned ``x`` is checked (one product) unless :meth:`settle` just did."""
        if not self.prob.fixed_budget:
            k, rtrue = self._settled
            rnorm = rtrue if k == self.k else self.verify(x)[1]
        return self.finish(x, rnorm)

    def tighten(self, reopened, rtrue, factor: float = 0.5):
        """Ask the estimate of reopened systems to go as far below the target as their true
        residual was above it (times ``factor``), so that the next claim is more likely to be
        backed by the true residual."""
        xp = self.xp
        safe = xp.where(rtrue > 0, rtrue, xp.ones_like(rtrue))
        tighter = self._threshold * xp.minimum(self.target / safe, xp.ones_like(safe)) * factor
        self.threshold = xp.where(reopened, tighter, self._threshold)

    def finish(self, x, rnorm=None, info=None) -> Outcome:
        """Close the solve: statuses of systems still running, and the iterate returned where
        the iteration failed.

        A system that diverged or became non-finite gets its best finite iterate; after
        :meth:`check` has been used, "best" means smallest true residual (the iterate with
        the smallest estimate is verified with one product and taken when it is better), and
        a system that ran out of iterations with a true residual worse than its best verified
        iterate's gets that iterate."""
        xp = self.xp
        prob = self.prob
        if rnorm is None:
            rnorm = self.history[-1]
        running = self.codes == RUNNING
        if prob.fixed_budget:
            grew = running & xp.isfinite(rnorm) & (rnorm > self.r0) & (self.r0 > 0)
            if prob.divtol is not None:
                # A fixed budget is a success unless the residual grew over the run.
                self.codes = xp.where(grew, self._code[DIVERGED], self.codes)
                running = self.codes == RUNNING
            elif bool(xp.any(grew)):
                self.note = (
                    "the residual grew over the budget (from {:.3e} to {:.3e}, largest over the "
                    "systems): the iteration is not contracting, and x is the last iterate, as "
                    "divtol=None asks".format(float(xp.max(self.r0)), float(xp.max(xp.where(grew, rnorm, xp.zeros_like(rnorm)))))
                )
            self.codes = xp.where(running, self._code[COMPLETED], self.codes)
        else:
            self.codes = xp.where(running, self._code[MAX_ITERATIONS], self.codes)
        codes = self.codes
        bad = (codes == DIVERGED) | (codes == NONFINITE)
        bad = bad | ~all_ranks(xp, xp.all(xp.isfinite(x), axis=-1))
        back = bad
        if self._verified:
            # rnorm is the true residual of x: an x worse than the best verified is not kept.
            fin_r = xp.where(xp.isfinite(rnorm), rnorm, self._inf)
            back = bad | ((codes == MAX_ITERATIONS) & (fin_r > self.ver_r))
        if bool(xp.any(back)):
            if self.best_x is not None:
                # The iterate with the smallest residual estimate (the estimates may be a
                # step stale, or drift) is verified with one product and taken where it is
                # better than the best verified iterate (x0 at least).
                rb = safe_norm(xp, prob.b - prob.mv(self.best_x))
                take = back & xp.isfinite(rb) & (rb < self.ver_r) & all_ranks(xp, xp.all(xp.isfinite(self.best_x), axis=-1))
                self.ver_r = xp.where(take, rb, self.ver_r)
                self.ver_x = self.best_x if self.ver_x is None else xp.where(take[:, None], self.best_x, self.ver_x)
            if self.ver_x is not None:
                x = xp.where(back[:, None], self.ver_x, x)
                rnorm = xp.where(back, self.ver_r, rnorm)
        # Anything still non-finite (no finite iterate was ever seen) is zeroed, never NaN.
        x = xp.where(xp.isfinite(x), x, xp.zeros_like(x))
        return Outcome(x=x, codes=self.codes, iterations=self.k, residual_norm=rnorm,
                       history=self.history, info=info or {}, note=self.note)


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
    needs_contraction : bool
        The method converges only when the spectral radius of ``I - A`` is below one (fixed-point
        iteration and the Neumann series); on other systems it reports a non-success status.
    accepts_callback : bool
        A ``callback`` may be given (called with each iterate).
    accepts_fixed_budget : bool
        The method can run a fixed budget of ``maxiter`` iterations with no tolerance
        (``rtol=None, atol=None``).
    outer_iterations : dict
        Empty for methods whose ``maxiter`` counts products; for methods whose ``maxiter``
        counts outer iterations, each of several products, the options that make one outer
        iteration as small as the method allows (used where a test needs ``maxiter`` to bind).
    checks_claims : bool
        The method itself checks every CONVERGED it reports against the true residual
        ``||b - A x||`` (with :meth:`Monitor.verify` or :func:`verified_rounds`). A method
        that leaves it False has its claims checked after it returns (one product), and a
        claim the true residual does not back becomes MAX_ITERATIONS.
    accepts_reduction : bool
        The method takes its inner products and norms from the solve's reduction
        (:func:`dot`, :func:`norm`, :func:`allreduce_sum`), so it solves systems whose vectors
        are sharded over ranks (``solve(..., reduction=...)``). False for the scipy bridges,
        which refuse a reduction over more than one rank.
    batched_products : bool
        With ``batch_dims=1`` the method hands the operator ``(B, n)`` arrays, one row per
        system, as :func:`linsolve_rbp.solve` promises. False for methods that solve the
        systems one at a time with ``(n,)`` vectors (the scipy bridges), which therefore
        cannot serve operators whose products are per system.
    options : dict
        Method-specific keyword options and their defaults.
    option_kinds : dict
        Option name -> its kind: ``"nonnegative"`` (a finite real >= 0), ``"nonnegative_or_inf"``, ``"nonnegative_or_none"``,
        ``"positive_int"``, ``"nonnegative_int"``, ``"positive_int_or_none"``, ``"bool"``, or
        a tuple of the allowed values; validated by :meth:`check_options`.
    """

    name = "?"
    needs_rmatvec = False
    needs_symmetric = False
    needs_square = True
    accepts_preconditioner = False
    needs_contraction = False
    accepts_callback = True
    accepts_fixed_budget = True
    outer_iterations: dict = {}
    accepts_reduction = True
    batched_products = True
    #: The method checks every CONVERGED it reports against the true residual (all of the
    #: package's methods do). When False, :func:`run_scaled` checks the claims of the
    #: returned ``x`` itself, with one product.
    checks_claims = False
    options: dict = {}
    #: How ``check_options`` validates an option (see the class docstring).
    option_kinds: dict = {}

    def default_maxiter(self, n: int) -> int:
        """``min(10 n, 10000)``: enough for any well-posed Krylov solve, bounded for huge n."""
        return max(1, min(10 * n, 10_000))

    def check_options(self, options: dict) -> dict:
        """Validate this method's own options and fill in the defaults.

        Parameters
        ----------
        options : dict
            Method-specific options only (the common ones, ``rtol`` ..., are validated by
            :func:`linsolve_rbp.solve.check_options`).

        Returns
        -------
        dict
            Every option of :attr:`options`, given or default, each validated by its kind in
            :attr:`option_kinds` (``"nonnegative"``, ``"nonnegative_or_none"``,
            ``"positive_int"``, ``"nonnegative_int"``, ``"positive_int_or_none"``,
            ``"bool"``, or a tuple of allowed values) and normalised.

        Raises
        ------
        TypeError
            For an unknown option: the message lists every accepted option, common and
            method-specific, and suggests the closest name.
        ValueError
            For a value of the wrong kind, naming the option.
        """
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise unknown_option(self.name, unknown, set(self.options) | set(COMMON_OPTIONS))
        out = dict(self.options)
        out.update(options)
        for name, kind in self.option_kinds.items():
            if name in out:
                out[name] = check_kind(out[name], name, kind)
        return out

    def run(self, prob: Problem) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError


def verified_rounds(prob: Problem, mon: Monitor, x, r, rnorm, iterate):
    """Run a method in rounds, each ended by a check of its claims against the true residual.

    ``iterate(x, r, rnorm) -> (x, rnorm)`` runs the method's recurrence from the iterate
    ``x`` with true residual ``r`` (norms ``rnorm``) until the monitor stops every system or
    ``maxiter`` is reached. In tolerance mode each round that ran at least one iteration is
    followed by one product, ``b - A x``, which :meth:`Monitor.check` judges: systems whose
    claim the true residual does not back are reopened, with a tighter internal threshold,
    and the next round restarts the recurrence from their true residual (residual
    replacement). In fixed-budget mode there is no claim to check and one round runs.

    Returns
    -------
    x, rnorm
        The last iterate and its residual norms: true residuals in tolerance mode.
    """
    while True:
        k = mon.k
        if k < prob.maxiter and mon.any_active():
            x, rnorm = iterate(x, r, rnorm)
        if prob.fixed_budget or mon.k == k:
            # No iteration ran: the statuses rest on the residual of x0, which is true.
            return x, rnorm
        r, rnorm, reopened = mon.verify(x)
        if mon.k >= prob.maxiter or not mon.any_active():
            return x, rnorm
        mon.tighten(reopened, rnorm)


def refuse_reduction(solver: Solver, reduction) -> None:
    """ValueError if ``solver`` cannot take ``reduction`` (a reduction over more than one rank
    given to a method with ``accepts_reduction = False``); nothing otherwise."""
    if reduction is not None and reduction.size > 1 and not solver.accepts_reduction:
        raise ValueError(
            f"method {solver.name!r} cannot solve a system sharded over {reduction.size} ranks "
            f"(reduction={reduction!r}): it hands the vectors to a library that sees only the local "
            "shard; use one of the package's own methods (cg, gmres, bicgstab, minres, lsqr, "
            "cgne, neumann, fixed_point), or gather the system on one process"
        )


def run_scaled(solver: Solver, prob: Problem) -> Outcome:
    """Run ``solver`` on ``prob`` with each system divided by a power of two near the largest
    magnitude of its right-hand side, and scale the outcome back.

    Linear systems are homogeneous: ``A (x / s) = b / s``. Dividing by ``s = 2^e`` is exact
    in binary floating point, so a right-hand side of 1e-300 or 1e300 (1e-30 or 1e30 in
    float32) runs the very same arithmetic as one of norm about 1: no norm, inner product or
    threshold overflows or underflows because of the scale of ``b``, and statuses and
    iteration counts do not depend on it. ``atol`` is divided by the same ``s`` (see
    :meth:`Problem.thresholds`); the callback, the history, ``x`` and the residual norms are
    scaled back, so nothing outside the solver sees the scaling.

    With a reduction (``prob.reduction``) the solver runs with it as the current reduction
    (:func:`using_reduction`), the scale is the largest magnitude over all ranks, and the
    outcome reports ``info["allreduces"]``, the collectives the solve made.
    """
    red = prob.reduction
    if red is None:
        if _GIVEN and getattr(_TLS, "reduction", None) is not None:
            # A solve without a reduction inside one with (a product or preconditioner that
            # solves a local system): its inner products are its own.
            with using_reduction(None):
                return _run_scaled(solver, prob)
        return _run_scaled(solver, prob)
    refuse_reduction(solver, red)
    if getattr(prob, "compile", False) and red.size > 1:
        raise ValueError(
            f"compile=True cannot be combined with a reduction over {red.size} ranks "
            f"(reduction={red!r}): the compiled loops take no collectives; drop compile=True"
        )
    before = red.allreduces
    with using_reduction(red):
        out = _run_scaled(solver, prob)
    out.info = dict(out.info)
    out.info["allreduces"] = red.allreduces - before
    return out


def _run_scaled(solver: Solver, prob: Problem) -> Outcome:
    xp = prob.xp
    if prob.nsys == 0:
        return solver.run(prob)
    mag = xp.max(xp.abs(prob.b), axis=-1) if prob.b.shape[-1] else xp.zeros((prob.nsys,), dtype=prob.real_dtype, device=prob.device)
    if _GIVEN:
        # One scale for all ranks: the largest magnitude over them (NaN kept as NaN).
        nan = xp.isnan(mag)
        mag, anynan = allreduce_max(xp, xp.where(nan, xp.full_like(mag, float("inf")), mag), xp.astype(nan, mag.dtype))
        mag = xp.where(anynan > 0, xp.full_like(mag, float("nan")), mag)
    usable = xp.isfinite(mag) & (mag > 0)
    one = xp.ones_like(mag)
    s = 2.0 ** xp.floor(xp.log2(xp.where(usable, mag, one)))
    s_host = np.asarray(_b.to_numpy(s), dtype=float)
    if bool(np.all(s_host == 1.0)):
        return _audited(solver, prob, solver.run(prob))
    col = s[:, None]
    cb = prob.callback
    if cb is not None:
        sc, sr = (col, s) if prob.batched else (s[0], s[0])

        def callback(k, x, r):
            cb(k, None if x is None else x * sc, r * sr)
    else:
        callback = None
    scaled = dataclasses.replace(
        prob,
        b=prob.b / col,
        x0=None if prob.x0 is None else prob.x0 / col,
        callback=callback,
        scale=s,
    )
    out = _audited(solver, scaled, solver.run(scaled))

    def back(a):
        if isinstance(a, np.ndarray) or np.isscalar(a):
            return np.asarray(a) * s_host
        return a * s

    x = out.x * col
    out.residual_norm = back(out.residual_norm)
    hist = out.history
    shape = hist[0].shape if hist and type(hist[0]) is np.ndarray else None
    if shape is not None and all(type(h) is np.ndarray and h.shape == shape for h in hist):
        # numpy norms (the host paths): one product for the whole history, not one per entry.
        out.history = list(np.stack(hist) * s_host)
    else:
        out.history = [back(h) for h in hist]
    fin, fin_scaled = all_ranks(xp, xp.all(xp.isfinite(x), axis=-1), xp.all(xp.isfinite(out.x), axis=-1))
    over = ~fin & fin_scaled
    if bool(xp.any(over)):
        # The scaled solve ended with an x whose scaled-back entries overflow: the solution
        # (or the iterate) is beyond the dtype's range. Say so and return x0 (or zero).
        start = xp.zeros_like(x) if prob.x0 is None else prob.x0
        x = xp.where(over[:, None], start, x)
        over_h = np.asarray(_b.to_numpy(over), dtype=bool)
        codes = out.codes
        if isinstance(codes, np.ndarray):
            out.codes = np.where(over_h, NONFINITE, codes)
        else:
            out.codes = xp.where(over, xp.asarray(NONFINITE, dtype=codes.dtype, device=prob.device), codes)
        r0 = out.history[0]
        rn = out.residual_norm
        out.residual_norm = np.where(over_h, np.asarray(_b.to_numpy(r0) if not isinstance(r0, np.ndarray) else r0), np.asarray(_b.to_numpy(rn) if not isinstance(rn, np.ndarray) else rn))
        extra = "x overflows the dtype when scaled back to the right-hand side's magnitude"
        out.note = f"{out.note}; {extra}" if out.note else extra
    out.x = x
    return out


def _audited(solver: Solver, prob: Problem, out: Outcome) -> Outcome:
    """Check the CONVERGED claims of a method that does not check them itself
    (``checks_claims = False``) against the true residual of the ``x`` it returned."""
    if solver.checks_claims or prob.fixed_budget:
        return out
    xp = prob.xp
    codes = xp.asarray(out.codes, device=prob.device)
    claimed = codes == CONVERGED
    if not bool(xp.any(claimed)):
        return out
    rtrue = safe_norm(xp, prob.b - prob.mv(out.x))
    false = claimed & ~(rtrue <= prob.thresholds())
    if bool(xp.any(false)):
        out.codes = xp.where(false, xp.asarray(MAX_ITERATIONS, dtype=codes.dtype, device=prob.device), codes)
        extra = (
            f"method {solver.name!r} claimed convergence for x whose true residual misses the "
            "tolerance; it is reported as not converged"
        )
        out.note = f"{out.note}; {extra}" if out.note else extra
    out.residual_norm = xp.where(claimed, rtrue, xp.asarray(out.residual_norm, device=prob.device))
    return out
