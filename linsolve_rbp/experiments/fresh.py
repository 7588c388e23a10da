"""Time and peak memory of one call, measured in a fresh Python process.

A fresh process keeps the measurement clear of whatever the caller has allocated, cached or
warmed up. :func:`run_fresh` starts it with the ``spawn`` method of :mod:`multiprocessing`
(a new interpreter, not a fork of the caller), runs a module-level function there and sends
back its value, its wall time and how much the peak memory of the process grew during it.

Peak memory is the resident set size (RSS) of the process, from the kernel, not
:mod:`tracemalloc`: tracemalloc sees only memory allocated through Python's allocator, and
the tensors of numpy and torch are allocated by their own C and C++ allocators, which it
does not see. On Linux the peak (``VmHWM``) is reset to the current RSS just before the call
(writing ``5`` to ``/proc/self/clear_refs``), so the figure is the peak during the call minus
the RSS at its start, not hidden by an earlier, larger peak (making data, say). Elsewhere
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the lifetime peak, stands in; a growth below
an earlier peak then reads as zero.

With glibc's default, adaptive mmap threshold, freed large blocks stay in the heap and the
RSS follows the memory ever allocated rather than the memory in use; a fixed threshold
(:data:`MEMORY_ENV`) makes every block of 128 KiB or more a mapping of its own, returned to
the system when freed. Pass ``env=MEMORY_ENV`` for memory figures; it slows large
allocations, so take times from a process without it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any, Callable, NamedTuple

from .._validate import positive_int

__all__ = ["FreshRun", "MEMORY_ENV", "run_fresh"]

#: Environment of a process whose peak RSS should follow the memory in use (see above).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class FreshRun(NamedTuple):
    """What :func:`run_fresh` returns."""

    value: Any
    """The return value of the (first) call."""
    seconds: float
    """Wall time of the call (the smallest of ``repeats`` calls)."""
    peak_bytes: int
    """Growth of the peak resident set size during the first call, in bytes."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _peak_probe():
    """``(rss_kib_now, peak_kib)``: the current RSS after resetting the peak, and a function
    that reads the peak since then (Linux); else the lifetime peak twice."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        import resource

        def lifetime():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

        return lifetime(), lifetime


def _child(conn, setup, fn, args, kwargs, repeats):
    try:
        if setup is not None:
            args = (setup(),) + tuple(args)
        base, peak = _peak_probe()
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        times = [time.perf_counter() - t0]
        grown = max(0, peak() - base) * 1024
        for _ in range(repeats - 1):
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            times.append(time.perf_counter() - t0)
        conn.send(("ok", FreshRun(value, min(times), grown)))
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it with the child's traceback
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_fresh(fn: Callable, *args, setup: Callable | None = None, repeats: int = 1,
              env: dict | None = None, timeout: float | None = None, **kwargs) -> FreshRun:
    """Call ``fn(*args, **kwargs)`` in a fresh process; return its value, time and peak memory.

    Parameters
    ----------
    fn : callable
        A module-level function (the child imports it by name; lambdas and closures cannot
        be sent). Its arguments and return value must pickle.
    *args, **kwargs
        Passed to ``fn``.
    setup : callable, optional
        A module-level function of no arguments (a :func:`functools.partial` of one works),
        run in the child first, outside the measurement (making data, warming up kernels);
        its return value is passed to ``fn`` as the first positional argument.
    repeats : int
        Calls of ``fn``; ``seconds`` is the smallest time, ``peak_bytes`` and ``value`` come
        from the first call.
    env : dict, optional
        Environment variables set for the child only, before it starts (the C library and
        BLAS read theirs at start-up): :data:`MEMORY_ENV` for memory figures,
        ``OMP_NUM_THREADS`` and the like for thread counts.
    timeout : float, optional
        Seconds to wait for the child's answer; default without limit.

    Returns
    -------
    FreshRun
        ``value``, ``seconds``, ``peak_bytes``.

    Raises
    ------
    RuntimeError
        The call raised in the child (the message holds the child's traceback), the child
        died without answering, or ``timeout`` passed.

    Examples
    --------
    >>> import math
    >>> from linsolve_rbp.experiments.fresh import run_fresh
    >>> run = run_fresh(math.factorial, 20)
    >>> run.value, run.seconds >= 0, run.peak_bytes >= 0
    (2432902008176640000, True, True)
    """
    repeats = positive_int(repeats, "repeats")
    ctx = mp.get_context("spawn")
    parent, conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(conn, setup, fn, args, kwargs, repeats), daemon=True)
    env = {k: str(v) for k, v in (env or {}).items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned child takes the parent's environment at its start
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    conn.close()
    name = getattr(fn, "__name__", repr(fn))
    try:
        if not parent.poll(timeout):
            proc.terminate()
            raise RuntimeError(f"{name} did not finish in {timeout} s in its fresh process")
        status, payload = parent.recv()
    except EOFError:
        raise RuntimeError(f"the fresh process running {name} died without an answer") from None
    finally:
        proc.join()
        parent.close()
    if status != "ok":
        raise RuntimeError(f"{name} failed in its fresh process: {payload}")
    return payload
