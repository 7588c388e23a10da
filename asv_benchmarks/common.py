"""What the benchmark modules share: backends, method applicability and the solve call.

Conventions (as in scipy's ``benchmarks/benchmarks/common.py``): ``setup`` builds the problem
and raises ``NotImplementedError`` to skip a combination that does not apply (asv's way to
skip), ``time_*`` only solves, ``peakmem_*`` records the peak resident memory of the process,
``track_*`` returns iteration and product counts. GPU timings synchronise the device.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import time

import numpy as np

import linsolve_rbp as lr
from linsolve_rbp import backend as _b

try:
    # Imported here so that asv's forked benchmark processes inherit it instead of each
    # paying the import (seconds) again.
    import torch
except ImportError:  # pragma: no cover - torch is an optional extra
    torch = None

#: Stopping test of every timed solve, ``||b - A x|| <= RTOL ||b||``.
RTOL = 1e-6
#: Iteration cap, so that a method that stalls on a problem costs a bounded time.
MAXITER = 2000

#: Set ``LINSOLVE_RBP_BENCH_FULL=1`` to benchmark the full grid (sizes up to n = 4000, every
#: batch size); the default grid is small so that ``asv run --quick`` of the whole suite
#: finishes in minutes on a 2-core machine.
FULL = os.environ.get("LINSOLVE_RBP_BENCH_FULL", "").strip().lower() not in ("", "0", "false", "no")


def grid(small: list, full: list) -> list:
    """``full`` when :data:`FULL` is set, ``small`` otherwise."""
    return list(full) if FULL else list(small)


#: ``numpy``, torch on the CPU, torch on a CUDA device (skipped without one).
BACKENDS = ["numpy", "torch-cpu", "torch-cuda"]


def poisson2d(m: int):
    """The 2-D Poisson matrix ``kron(I, T) + kron(T, I)``, ``T = tridiag(-1, 2, -1)`` of size
    ``m``, as a scipy CSR matrix (n = m^2)."""
    import scipy.sparse as sp

    T = sp.diags([-np.ones(m - 1), 2 * np.ones(m), -np.ones(m - 1)], [-1, 0, 1])
    I = sp.identity(m)
    return (sp.kron(I, T) + sp.kron(T, I)).tocsr()


def all_methods() -> list[str]:
    """The methods :func:`linsolve_rbp.methods` lists when the benchmarks are discovered."""
    return list(lr.methods())


def has_torch() -> bool:
    return torch is not None


def torch_device(backend: str):
    """The torch device of ``backend`` (``torch-cpu`` or ``torch-cuda``); skips when torch or
    the device is missing."""
    if not has_torch():
        raise NotImplementedError("torch is not installed")
    if backend == "torch-cuda":
        if not torch.cuda.is_available():
            raise NotImplementedError("no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def to_backend(a, backend: str):
    """A numpy array (or scipy sparse matrix) moved to ``backend`` (a name of
    :data:`BACKENDS`; sparse matrices become torch sparse CSR tensors)."""
    if backend == "numpy":
        return a
    return _b.to_backend(a, "torch", device=torch_device(backend))


def method_or_skip(name: str):
    """The solver behind ``name``; skips when its module is missing or does not import."""
    if name not in lr.methods():
        raise NotImplementedError(f"method {name!r} is not available")
    try:
        return lr.get_method(name)
    except (ImportError, AttributeError) as exc:
        raise NotImplementedError(f"method {name!r} does not import: {exc}") from exc


def check_applies(name: str, A, b, *, symmetric: bool, contractive: bool, **kwargs):
    """Skip (``NotImplementedError``) methods that do not apply to the problem: symmetric
    methods on nonsymmetric operators, series methods (``neumann``, ``fixed_point``) where the
    spectral radius of ``I - A`` is not below 1, methods that need ``A^H`` where it is
    missing, and combinations the facade rejects (for example a bridge that takes numpy data
    only), found by a one-iteration solve."""
    solver = method_or_skip(name)
    if solver.needs_symmetric and not symmetric:
        raise NotImplementedError(f"{name} needs a symmetric operator")
    if name in ("neumann", "fixed_point") and not contractive:
        raise NotImplementedError(f"{name} diverges: the spectral radius of I - A exceeds 1")
    try:
        lr.solve(A, b, method=name, **{"rtol": RTOL, **kwargs, "maxiter": 1})
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise NotImplementedError(f"{name} does not apply: {exc}") from exc


def run_solve(name: str, A, b, **kwargs):
    """One timed solve, the device synchronised at the end (``kwargs`` may override ``rtol``
    and ``maxiter``)."""
    kwargs = {"rtol": RTOL, "maxiter": MAXITER, **kwargs}
    res = lr.solve(A, b, method=name, **kwargs)
    _b.synchronize(res.x)
    return res


class SolveBenchmark(abc.ABC):
    """Base of the solve benchmarks: subclasses' ``setup`` sets ``self.A``, ``self.b``,
    ``self.method``, ``self.backend`` and ``self.kwargs`` (e.g. ``batch_dims``). Abstract, so
    that asv, which finds it in every module that imports it, does not run it on its own."""

    timeout = 600
    kwargs: dict = {}

    @abc.abstractmethod
    def setup(self, *params):
        """Build the problem of ``params``; raise ``NotImplementedError`` to skip it."""

    def _solve(self):
        return run_solve(self.method, self.A, self.b, **self.kwargs)

    def time_solve(self, *params):
        self._solve()

    def peakmem_solve(self, *params):
        self._solve()

    def track_iterations(self, *params):
        return self._solve().iterations

    track_iterations.unit = "iterations"

    def track_products(self, *params):
        res = self._solve()
        return res.matvecs + res.rmatvecs

    track_products.unit = "products"

    def track_converged_fraction(self, *params):
        return float(np.mean(np.asarray(self._solve().converged, dtype=float)))

    track_converged_fraction.unit = "fraction of systems"


@dataclasses.dataclass
class Row:
    """One line of a side-by-side comparison (``asv_benchmarks/peers.py`` and the ``lean*``
    scripts): a workload, this package's time, a peer and its time in the same run, the
    products each side took and a free-form note (gradient error, status, ...). Times are in
    milliseconds (min of repeats); ``peer``/``peer_ms`` may be ``None`` (no peer installed) and
    ``products`` an int, a string such as ``"306 / 306"`` or ``None``."""

    workload: str
    ours_ms: float | None
    peer: str | None = None
    peer_ms: float | None = None
    products: object = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``ours_ms / peer_ms`` (below 1: this package is faster)."""
        if self.ours_ms is None or not self.peer_ms:
            return None
        return self.ours_ms / self.peer_ms


def _fmt_ms(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def format_rows(rows, *, title: str | None = None) -> str:
    """A markdown table of :class:`Row` objects: workload, ours (ms), peer, peer (ms),
    ours / peer, products, note."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| workload | ours (ms) | peer | peer (ms) | ours / peer | products | note |")
    lines.append("| --- | ---: | --- | ---: | ---: | --- | --- |")
    for r in rows:
        ratio = r.ratio
        lines.append(
            "| " + " | ".join([
                str(r.workload), _fmt_ms(r.ours_ms), r.peer or "-", _fmt_ms(r.peer_ms),
                "-" if ratio is None else f"{ratio:.2f}",
                "-" if r.products is None else str(r.products), str(r.note or ""),
            ]) + " |"
        )
    return "\n".join(lines) + "\n"


def best_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """Smallest time of ``repeats`` calls of ``fn`` by ``clock`` (wall time by default; pass
    ``time.process_time`` for CPU time), the figure least disturbed by other processes."""
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def best_pair(f, g, repeats: int, clock=time.perf_counter):
    """Smallest times of ``f`` and of ``g``, timed in turns so that load from other processes
    falls on both alike."""
    tf = tg = float("inf")
    for _ in range(repeats):
        tf = min(tf, best_time(f, 1, clock))
        tg = min(tg, best_time(g, 1, clock))
    return tf, tg
