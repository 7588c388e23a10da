"""The DEQ layer: :func:`fixed_point` as an :class:`torch.nn.Module` that holds its configuration.

:class:`DEQ` keeps what a training script would otherwise pass at every call: the forward solver
and its budget for training and for evaluation, the backward (adjoint) method, the failure
policy, the layer's own :class:`WarmStart`; it draws one :class:`VariationalDropout` mask per
call, returns the regularisers of the ``penalties`` module on request, and
records per-call statistics (iterations, residuals, statuses, products, times) that a training
loop logs with ``DEQ.stats`` and ``DEQ.summary``.

References
----------
S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019.

S. Bai, V. Koltun, J. Z. Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
ICML 2021.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from ..._validate import ArgumentTypeError, boolean, check_common, choice, nonnegative_real, positive_int
from ._checks import check_policy
from ._tree import detached, tensors
from .dropout import VariationalDropout
from .forward import check_forward
from .jacobian import under_transform
from .layer import FixedPointInfo, WarmStart, check_backward, fixed_point
from .penalties import (
    PROBE_DISTRIBUTIONS,
    column_norm_penalty,
    gershgorin_penalty,
    jacobian_matrix,
    jacobian_penalty,
)

__all__ = ["DEQ", "DEQCall", "PENALTIES"]

#: The regularisers :class:`DEQ` returns on request, with their options and defaults.
PENALTIES = MappingProxyType({
    "jacobian": MappingProxyType({"probes": 1, "distribution": "gaussian"}),
    "column_norm": MappingProxyType({"mu": 0.9}),
    "gershgorin": MappingProxyType({"margin": 0.1}),
})


class _AsTraining:
    """The default of ``eval_forward_tol``: the training value (shown as its name)."""

    def __repr__(self):
        return "forward_tol"


_SAME = _AsTraining()


def _check_forward(value, name):
    """``value`` as given (a name or ``{"method": name, **options}``), validated now rather
    than at the first call."""
    check_forward(value, name)
    return dict(value) if isinstance(value, dict) else value


class _LayerWarmStart(WarmStart):
    """The layer's store: a :class:`WarmStart` that also times the adjoint solves it serves
    (from the moment the solve asks for its start to the moment it stores its solution) and
    that, when warm starts are off, serves none."""

    def __init__(self, enabled=True, timing=True):
        super().__init__()
        self.enabled = enabled
        self.timing = timing
        self._started = None
        self.solve_times = {}  # id(result) -> seconds, for the records of the layer's calls

    def get(self, b):
        self._started = time.perf_counter() if self.timing else None
        if not self.enabled:
            self.misses += 1
            return None
        return super().get(b)

    def store(self, x) -> None:
        if self._started is not None and self.last_result is not None:
            self.solve_times[id(self.last_result)] = time.perf_counter() - self._started
        self._started = None
        if self.enabled:
            super().store(x)


def _check_backward(backward, batch_dims):
    """``backward`` (None or a dict of options) validated now, as :func:`fixed_point` would at
    the first call: the method, its options, the options the layer sets."""
    if backward is None:
        return None
    check_backward(backward, batch_dims, "the layer sets it (use the layer's warm_start, "
                   "batch_dims and on_failure instead)")
    return dict(backward)


def _worst(value):
    """The largest entry of a per-sample residual (a float stays a float); None for None."""
    if value is None:
        return None
    return float(np.max(np.asarray(value, dtype=float)))


@dataclass
class DEQCall:
    """What one call of a :class:`DEQ` layer did.

    Attributes
    ----------
    mode : {"train", "eval"}
        The layer's mode at the call (which forward budget it ran).
    info : FixedPointInfo
        The call's forward result, and its adjoint result once a backward pass has run.
    forward_time_s : float or None
        Wall time of the forward solve (with the final differentiable evaluation of ``f``);
        None with ``timing=False``.
    penalties : dict
        The regularisers returned by the call (name -> float, detached), and ``"vjps"``, the
        vector-Jacobian products they took.
    """

    mode: str
    info: FixedPointInfo
    forward_time_s: float | None = None
    penalties: dict = field(default_factory=dict)
    _store: _LayerWarmStart | None = field(default=None, init=False, repr=False, compare=False)
    _expects_backward: bool = field(default=True, init=False, repr=False, compare=False)

    @property
    def backward_time_s(self):
        """Wall time of the adjoint solve of the latest backward pass through the call (None
        before one, with ``timing=False``, or when the backward method does not solve:
        ``"phantom"`` and ``"jfb"``)."""
        b = self.info.backward
        if b is None or self._store is None:
            return None
        return self._store.solve_times.get(id(b))

    def stats(self) -> dict:
        """The call as a flat dict of numbers and strings, ready for a logger.

        Keys: ``mode``; ``forward_method``, ``forward_status`` (a :class:`~linsolve_rbp.Status`
        name), ``forward_iterations``, ``forward_residual`` (the last step norm, largest over
        the samples), ``forward_time_s``; ``backward_method``, ``backward_status``,
        ``backward_iterations``, ``backward_matvecs``, ``backward_rmatvecs``,
        ``backward_residual``, ``backward_time_s`` (None until a backward pass has run);
        ``penalty_<name>`` for each regulariser returned and ``penalty_vjps``.
        """
        fwd, bwd = self.info.forward, self.info.backward
        out = {
            "mode": self.mode,
            "forward_method": fwd.method,
            "forward_status": fwd.status.name,
            "forward_iterations": int(fwd.iterations),
            "forward_residual": _worst(fwd.residual_norm),
            "forward_time_s": self.forward_time_s,
            "backward_method": None if bwd is None else bwd.method,
            "backward_status": None if bwd is None else bwd.status.name,
            "backward_iterations": None if bwd is None else int(bwd.iterations),
            "backward_matvecs": None if bwd is None else int(bwd.matvecs),
            "backward_rmatvecs": None if bwd is None else int(bwd.rmatvecs),
            "backward_residual": None if bwd is None else _worst(bwd.residual_norm),
            "backward_time_s": self.backward_time_s,
        }
        for name, value in self.penalties.items():
            out[f"penalty_{name}"] = value
        return out


def _check_penalties(penalties):
    """``penalties`` (a name, a sequence of names, or a dict name -> options) as a dict name ->
    full options, validated."""
    if penalties is None:
        return {}
    if isinstance(penalties, str):
        penalties = {penalties: {}}
    elif isinstance(penalties, (list, tuple)):
        penalties = {name: {} for name in penalties}
    elif not isinstance(penalties, dict):
        raise ArgumentTypeError(
            "penalties must be a name, a sequence of names or a dict name -> options (names: "
            f"{', '.join(PENALTIES)}), got {type(penalties).__name__}"
        )
    out = {}
    for name, options in penalties.items():
        choice(name, "penalties", tuple(PENALTIES))
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ArgumentTypeError(
                f"penalties[{name!r}] must be a dict of options, got {type(options).__name__}"
            )
        unknown = set(options) - set(PENALTIES[name])
        if unknown:
            raise TypeError(
                f"penalties[{name!r}] got unknown option(s) {sorted(unknown)}; accepted: "
                f"{sorted(PENALTIES[name])}"
            )
        full = dict(PENALTIES[name], **options)
        where = f"penalties[{name!r}]"
        if name == "jacobian":
            full["probes"] = positive_int(full["probes"], f"{where}['probes']")
            full["distribution"] = choice(full["distribution"], f"{where}['distribution']",
                                          PROBE_DISTRIBUTIONS)
        elif name == "column_norm":
            full["mu"] = nonnegative_real(full["mu"], f"{where}['mu']", allow_inf=False)
        else:
            m = full["margin"]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m):
                raise ArgumentTypeError(
                    f"{where}['margin'] must be a finite real number, got {m!r}")
            full["margin"] = float(m)
        out[name] = full
    return out


class DEQ(torch.nn.Module):
    """A deep equilibrium layer: ``h* = f(h*, *inputs)`` found by a forward solver and
    differentiated by recurrent back-propagation (an adjoint solve) or an approximate
    backward method, as an :class:`torch.nn.Module`.

    ``layer(h0, *inputs)`` runs :func:`fixed_point` on ``h -> f(h, *inputs)`` from ``h0`` with
    the layer's configuration: the training budget in training mode, the evaluation budget
    after ``layer.eval()``.

    Parameters
    ----------
    f : callable
        ``f(h, *inputs)`` -> a state of the same structure as ``h``. An
        :class:`torch.nn.Module` is registered as a submodule: its parameters are the layer's,
        and ``layer.train()`` / ``layer.eval()`` reach it (and its dropout).
    forward : str or dict
        The forward solver in training mode, as :func:`fixed_point`'s ``forward``:
        ``"iterate"`` (default), ``"anderson"``, ``"broyden"``, ``"newton"``, or
        ``{"method": name, **options}``.
    forward_maxiter : int
        Forward budget in training mode.
    forward_tol : float or None
        Forward tolerance in training mode (None: exactly ``forward_maxiter`` iterations).
    backward : dict, optional
        The backward method and its options, as :func:`fixed_point`'s ``backward`` (an exact
        adjoint solve by any method of :func:`linsolve_rbp.methods`, or an approximate
        gradient where :func:`fixed_point` offers one), validated when the layer is built.
        Default: :func:`fixed_point`'s.
    eval_forward, eval_forward_maxiter, eval_forward_tol
        The forward solver, budget and tolerance in evaluation mode; each defaults to its
        training value. A larger evaluation budget is torchdeq's ``eval_factor``.
    batch_dims : {0, 1}
        1: the leading axis indexes samples that do not interact (a mini-batch): per-sample
        tests and solves, and per-sample regularisers averaged over the batch.
    on_failure : {"warn", "raise", "ignore"}
        The failure policy of the forward and backward solves (see :func:`fixed_point`).
    warm_start : bool
        Start each adjoint solve from the previous one's solution (the layer's own
        :class:`WarmStart`, ``layer.warm_start``; it is never shared with another layer).
        With a fixed-budget backward (``neumann`` or ``fixed_point`` with ``rtol=None,
        atol=None``) the gradient then depends on the previous solve: pass False for the
        ``K``-term series of every call.
    timing : bool
        Record wall times. On CUDA the forward time is read after synchronising the device
        (once per call); the adjoint solve's time is read when it stores its solution, after
        it has read its residuals on the host.

    Attributes
    ----------
    warm_start : WarmStart
        The layer's store (``hits``, ``misses``, ``last_result``).
    last : DEQCall or None
        The latest call: its :class:`FixedPointInfo`, time and regularisers.

    Notes
    -----
    *Regularisers on request*: ``h, reg = layer(h0, x, penalties=...)`` also returns a dict of
    differentiable scalars evaluated at the layer's output ``f(h*)``, to add to the loss:

    ``"jacobian"``
        The Hutchinson estimate of ``||J||_F^2`` (Bai, Koltun and Kolter, ICML 2021), options
        ``probes`` (default 1) and ``distribution``; cost: one evaluation of ``f`` and
        ``probes`` vector-Jacobian products with the graph kept
        (:func:`jacobian_penalty`).
    ``"column_norm"``, ``"gershgorin"``
        Penalties keeping ``I - J`` invertible (the second condition of the implicit function
        theorem; Liao et al., ICML 2018), options ``mu`` and ``margin``, on the dense Jacobian:
        ``n`` vector-Jacobian products for ``n`` entries of one sample's state, shared by the
        two (:func:`jacobian_matrix`).

    With ``batch_dims=1`` each is the mean over the samples of the per-sample value. The
    products are counted in the call's statistics (``penalty_vjps``).

    *Dropout*: every :class:`VariationalDropout` inside ``f`` (an :class:`torch.nn.Module`)
    draws one mask per call, used by every forward iteration, by the backward pass of that call
    and by its regularisers.

    *Statistics*: :meth:`stats` gives the latest call, :meth:`summary` the calls since the last
    ``summary(reset=True)``; backward entries are filled in once ``loss.backward()`` has run.
    Under :func:`torch.compile` and inside ``torch.func`` transforms the layer records nothing
    and keeps no warm start (it calls :func:`fixed_point` only, which needs fixed budgets
    there).

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> _ = torch.manual_seed(0)
    >>> cell = torch.nn.Linear(4, 4)
    >>> with torch.no_grad():
    ...     _ = cell.weight.mul_(0.3)
    >>> layer = lrt.DEQ(lambda h, x: torch.tanh(cell(h) + x), forward_maxiter=100,
    ...                 eval_forward_maxiter=200, batch_dims=1)
    >>> x = torch.randn(8, 4)
    >>> h, reg = layer(torch.zeros(8, 4), x, penalties="jacobian")
    >>> (h.sum() + 0.1 * reg["jacobian"]).backward()
    >>> s = layer.stats()
    >>> s["forward_status"], s["backward_status"], s["mode"]
    ('CONVERGED', 'CONVERGED', 'train')
    >>> layer.summary()["calls"]
    1
    """

    def __init__(self, f, *, forward="iterate", forward_maxiter: int = 50,
                 forward_tol: float | None = 1e-6, backward: dict | None = None,
                 eval_forward=None, eval_forward_maxiter: int | None = None,
                 eval_forward_tol=_SAME, batch_dims: int = 0, on_failure: str = "warn",
                 warm_start: bool = True, timing: bool = True):
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        self.f = f
        self.forward_method = _check_forward(forward, "forward")
        self.forward_maxiter = positive_int(forward_maxiter, "forward_maxiter")
        self.forward_tol = nonnegative_real(forward_tol, "forward_tol", allow_none=True)
        self.eval_forward_method = (
            self.forward_method if eval_forward is None
            else _check_forward(eval_forward, "eval_forward")
        )
        self.eval_forward_maxiter = (
            self.forward_maxiter if eval_forward_maxiter is None
            else positive_int(eval_forward_maxiter, "eval_forward_maxiter")
        )
        self.eval_forward_tol = (
            self.forward_tol if eval_forward_tol is _SAME
            else nonnegative_real(eval_forward_tol, "eval_forward_tol", allow_none=True)
        )
        # Judged as linsolve_rbp.solve judges it (1.0 and True are refused, with the reason).
        self.batch_dims = check_common({"batch_dims": batch_dims})["batch_dims"]
        self.backward_options = _check_backward(backward, self.batch_dims)
        self.on_failure = check_policy(on_failure)
        self.timing = boolean(timing, "timing")
        self.warm_start = _LayerWarmStart(enabled=boolean(warm_start, "warm_start"),
                                          timing=self.timing)
        self.last = None
        self._pending = []   # DEQCall records not yet folded into _folded
        self._folded = []    # their stats dicts

    def extra_repr(self):
        parts = [f"forward={self.forward_method!r}", f"forward_maxiter={self.forward_maxiter}",
                 f"forward_tol={self.forward_tol}"]
        if (self.eval_forward_method, self.eval_forward_maxiter, self.eval_forward_tol) != (
                self.forward_method, self.forward_maxiter, self.forward_tol):
            parts += [f"eval_forward={self.eval_forward_method!r}",
                      f"eval_forward_maxiter={self.eval_forward_maxiter}",
                      f"eval_forward_tol={self.eval_forward_tol}"]
        parts.append(f"backward={self.backward_options!r}")
        if self.batch_dims:
            parts.append("batch_dims=1")
        return ", ".join(parts)

    # -- the call -------------------------------------------------------------------------
    def _options(self):
        if self.training:
            method, maxiter, tol = self.forward_method, self.forward_maxiter, self.forward_tol
        else:
            method, maxiter, tol = (self.eval_forward_method, self.eval_forward_maxiter,
                                    self.eval_forward_tol)
        kw = dict(forward_maxiter=maxiter, forward_tol=tol, on_failure=self.on_failure,
                  batch_dims=self.batch_dims, warm_start=self.warm_start)
        if self.backward_options is not None:
            kw["backward"] = dict(self.backward_options)
        kw["forward"] = dict(method) if isinstance(method, dict) else method
        return kw

    def _bound_map(self, inputs):
        """``h -> f(h, *inputs)``, with the variational-dropout masks of this call."""
        f = self.f
        drops = ([m for m in f.modules() if isinstance(m, VariationalDropout)]
                 if isinstance(f, torch.nn.Module) else [])
        if not drops:
            return lambda h: f(h, *inputs)
        for d in drops:
            d.reset_mask()
        masks = {}

        def g(h):
            # Every evaluation of this call, the backward pass's included, uses the masks
            # drawn at its first evaluation, whatever other calls drew in between.
            for d in drops:
                d.mask = masks.get(d)
            out = f(h, *inputs)
            for d in drops:
                masks[d] = d.mask
            return out

        return g

    def forward(self, h0, *inputs, penalties=None):
        """Solve ``h* = f(h*, *inputs)`` from ``h0``.

        Parameters
        ----------
        h0 : torch.Tensor or tuple, list or dict of tensors
            The starting state (gets a zero gradient).
        *inputs
            Passed to ``f`` after the state (the input injection, say).
        penalties : str, sequence of str or dict, optional
            Regularisers to return as well: ``"jacobian"``, ``"column_norm"``,
            ``"gershgorin"``, or a dict name -> options (see the class notes).

        Returns
        -------
        h : torch.Tensor, or a structure like ``h0``
            The state ``f(h*)``, differentiable (see :func:`fixed_point`).
        penalties : dict of str to torch.Tensor
            Only when ``penalties`` is given: each regulariser, differentiable when gradients
            are enabled.
        """
        spec = _check_penalties(penalties)
        g = self._bound_map(inputs)
        kw = self._options()
        if torch.compiler.is_compiling() or under_transform():
            # torch.compile / torch.func: nothing is measured or kept (fixed budgets, no host
            # reads; fixed_point says which options work there).
            if spec and under_transform():
                raise RuntimeError(
                    "DEQ: penalties need torch.autograd, which torch.func transforms (vmap, "
                    "grad) do not allow inside them; request them outside the transform"
                )
            kw["warm_start"] = None
            out = fixed_point(g, h0, **kw)
            return (out, self._penalties(g, out, spec)[0]) if spec else out
        mode = "train" if self.training else "eval"
        t0 = time.perf_counter() if self.timing else None
        out, info = fixed_point(g, h0, return_info=True, **kw)
        elapsed = None
        if self.timing:
            self._synchronize(out)
            elapsed = time.perf_counter() - t0
        record = DEQCall(mode=mode, info=info, forward_time_s=elapsed)
        record._store = self.warm_start
        reg = {}
        if spec:
            reg, vjps = self._penalties(g, out, spec)
            record.penalties = {name: float(v.detach()) for name, v in reg.items()}
            record.penalties["vjps"] = vjps
        self._remember(record, any(t.requires_grad for t in tensors(out)))
        return (out, reg) if spec else out

    def _synchronize(self, out):
        leaves = tensors(out)
        if leaves and leaves[0].is_cuda:
            torch.cuda.synchronize(leaves[0].device)

    def _penalties(self, g, out, spec):
        at = detached(out)
        graph = torch.is_grad_enabled()
        reduce = (lambda v: v.mean()) if self.batch_dims == 1 else (lambda v: v)
        reg, vjps = {}, 0
        if "jacobian" in spec:
            o = spec["jacobian"]
            reg["jacobian"] = reduce(jacobian_penalty(
                g, at, probes=o["probes"], batch_dims=self.batch_dims,
                distribution=o["distribution"], create_graph=graph))
            vjps += o["probes"]
        if "column_norm" in spec or "gershgorin" in spec:
            J = jacobian_matrix(g, at, batch_dims=self.batch_dims, create_graph=graph)
            vjps += J.shape[-1]
            if "column_norm" in spec:
                reg["column_norm"] = reduce(column_norm_penalty(J, mu=spec["column_norm"]["mu"]))
            if "gershgorin" in spec:
                reg["gershgorin"] = reduce(
                    gershgorin_penalty(J, margin=spec["gershgorin"]["margin"]))
        return reg, vjps

    # -- statistics -----------------------------------------------------------------------
    def _remember(self, record, expects_backward):
        # A record holds its call's solutions (h* and the adjoint z, in ``info``): fold the
        # finished ones into plain numbers at once, so that the layer keeps the tensors of the
        # latest call and of the calls still awaiting their backward pass only. A call is
        # finished when its backward pass has run, or when none can (its output has no graph).
        record._expects_backward = expects_backward
        finished, waiting = [], []
        for r in self._pending:
            (waiting if r._expects_backward and r.info.backward is None else finished).append(r)
        self._pending = waiting
        self._fold(finished)
        self.last = record
        self._pending.append(record)
        if len(self._pending) > 256:
            # The backward pass of a call runs before a few more calls at most: fold the
            # oldest records into plain numbers, so that memory does not grow with the epoch.
            old, self._pending = self._pending[:128], self._pending[128:]
            self._fold(old)

    def _fold(self, records):
        for r in records:
            self._folded.append(r.stats())
            self.warm_start.solve_times.pop(id(r.info.backward), None)

    def stats(self) -> dict:
        """The latest call's statistics (:meth:`DEQCall.stats`); an empty dict before any."""
        return {} if self.last is None else self.last.stats()

    def summary(self, reset: bool = False) -> dict:
        """Statistics of the calls since the last reset, for one line of a training log.

        Parameters
        ----------
        reset : bool
            Start a new period after this summary (at the end of an epoch, say).

        Returns
        -------
        dict
            ``calls`` (and ``train_calls``, ``eval_calls``); ``forward_iterations_mean`` and
            ``_max``, ``forward_residual_max``, ``forward_time_s`` (total),
            ``forward_statuses`` (status name -> count); for the calls a backward pass ran
            through, ``backward_calls``, ``backward_iterations_mean`` and ``_max``,
            ``backward_products`` (matvecs + rmatvecs, total), ``backward_residual_max``,
            ``backward_time_s`` (total over the timed solves), ``backward_statuses``; and
            ``penalty_<name>_mean`` for each regulariser returned.
        """
        reset = boolean(reset, "reset")
        rows = self._folded + [r.stats() for r in self._pending]
        if reset:
            self.warm_start.solve_times.clear()
            self._pending, self._folded = [], []
        return _aggregate(rows)


def _aggregate(rows):
    out = {"calls": len(rows),
           "train_calls": sum(r["mode"] == "train" for r in rows),
           "eval_calls": sum(r["mode"] == "eval" for r in rows)}
    for side in ("forward", "backward"):
        done = [r for r in rows if r[f"{side}_status"] is not None]
        if side == "backward":
            out["backward_calls"] = len(done)
        its = [r[f"{side}_iterations"] for r in done]
        res = [r[f"{side}_residual"] for r in done if r[f"{side}_residual"] is not None]
        times = [r[f"{side}_time_s"] for r in done if r[f"{side}_time_s"] is not None]
        out[f"{side}_iterations_mean"] = float(np.mean(its)) if its else None
        out[f"{side}_iterations_max"] = int(max(its)) if its else None
        out[f"{side}_residual_max"] = float(max(res)) if res else None
        out[f"{side}_time_s"] = float(sum(times)) if times else None
        if side == "backward":
            out["backward_products"] = int(sum(r["backward_matvecs"] + r["backward_rmatvecs"]
                                               for r in done))
        out[f"{side}_statuses"] = dict(Counter(r[f"{side}_status"] for r in done))
    names = sorted({k for r in rows for k in r if k.startswith("penalty_")})
    for k in names:
        values = [r[k] for r in rows if k in r]
        out[f"{k}_mean"] = float(np.mean(values))
    return out
