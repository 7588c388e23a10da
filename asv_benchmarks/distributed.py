"""Sharded solves on one and two gloo ranks of one machine (issue 14, item 7): collectives per
iteration and time per iteration on the same global problem, with the cost of one gloo
all-reduce measured in the same run.

Problem: the 2-D Poisson matrix (5-point stencil) on an ``m x m`` grid (``n = m^2``), the
grid rows split between the ranks; the product exchanges one halo row with each neighbour
(an all-gather of the two boundary rows of every rank), the solver sums its inner products
with :class:`linsolve_rbp.distributed.TorchDistributed`. ``b = ones``, ``rtol = 1e-8``,
float64, torch CPU tensors, one thread per rank. The 1-rank row is the same problem solved
by one process without a reduction (its collectives per iteration counted with
:class:`~linsolve_rbp.distributed.Local`: what two ranks would make).

The ranks are processes started the way ``torchrun`` starts them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` in the environment, ``init_method="env://"``).

Run it with ``python -m asv_benchmarks.distributed`` (``--m 64``, ``--repeat 3``); asv runs
the ``track_*`` benchmarks of :class:`ShardedSolve` from one such run (``setup_cache``).
On one machine two ranks share its memory bandwidth and pay a loopback round trip per
collective, so the 2-rank time per iteration measures the overhead of the collectives
rather than a speed-up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

#: (label, method, options): the textbook recurrences and, where the method has them, the
#: variants that fuse an iteration's inner products into fewer collectives.
VARIANTS = (
    ("cg", "cg", {}),
    ("cg (chronopoulos-gear)", "cg", {"variant": "chronopoulos-gear"}),
    ("gmres", "gmres", {}),
    ("gmres (cgs)", "gmres", {"orthogonalization": "cgs"}),
)
RTOL = 1e-8


def variants():
    """The entries of :data:`VARIANTS` this version of the package has."""
    import linsolve_rbp as lr

    out = []
    for label, method, opts in VARIANTS:
        own = lr.get_method(method).options
        if all(k in own for k in opts):
            out.append((label, method, opts))
    return out


# -- the sharded operator: a 5-point stencil over grid rows, with a halo exchange ----------------
def poisson_halo(red, m: int, rows: tuple[int, int]):
    """This rank's part of the 2-D Poisson operator on an ``m x m`` grid: grid rows
    ``rows[0] .. rows[1] - 1`` (``k`` rows, ``k m`` unknowns). The product all-gathers the
    first and last grid row of every rank (``2 m`` values each) and takes its neighbours'."""
    import torch

    import linsolve_rbp as lr

    lo, hi = rows
    k = hi - lo
    like = torch.zeros(k * m, dtype=torch.float64)

    def matvec(x):
        X = x.reshape(k, m)
        edges = red.allgather(torch, torch.cat([X[0], X[-1]]), sizes=[2 * m] * red.size)
        edges = edges.reshape(red.size, 2, m)
        up = edges[red.rank - 1, 1] if red.rank > 0 else torch.zeros(m, dtype=x.dtype)
        down = edges[red.rank + 1, 0] if red.rank + 1 < red.size else torch.zeros(m, dtype=x.dtype)
        Y = 4 * X
        Y[:, 1:] -= X[:, :-1]
        Y[:, :-1] -= X[:, 1:]
        Y[1:] -= X[:-1]
        Y[:-1] -= X[1:]
        Y[0] -= up
        Y[-1] -= down
        return Y.reshape(-1)

    n = k * m
    return lr.LinearOperator((n, n), matvec=matvec, rmatvec=matvec, like=like, symmetric=True)


def _split(m: int, size: int, rank: int):
    base, extra = divmod(m, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _best(f, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def worker(m: int, repeat: int, out_path: str):
    """One rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)."""
    import torch
    import torch.distributed as dist

    import linsolve_rbp as lr
    from linsolve_rbp import distributed as lrd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, size = dist.get_rank(), dist.get_world_size()
    red = lrd.TorchDistributed()
    rows = []

    # The cost of one gloo all-reduce of a small buffer (what a fused CG iteration makes).
    for nvals in (2, 32):
        buf = torch.zeros(nvals, dtype=torch.float64)
        for _ in range(20):
            dist.all_reduce(buf)
        reps = 200
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(buf)
        rows.append({"kind": "allreduce", "values": nvals, "seconds": (time.perf_counter() - t) / reps})

    op = poisson_halo(red, m, _split(m, size, rank))
    b = torch.ones(op.shape[0], dtype=torch.float64)
    for label, method, opts in variants():
        secs, res = _best(lambda: lr.solve(op, b, method=method, rtol=RTOL, reduction=red, **opts), repeat)
        rows.append({"kind": "solve", "ranks": size, "method": label, "iterations": res.iterations,
                     "seconds": secs, "allreduces": res.info["allreduces"],
                     "converged": bool(res.converged)})
    dist.barrier()
    if rank == 0:
        # One rank, the whole grid, no reduction; the collectives it would make, by Local.
        whole = poisson_halo(lrd.LOCAL, m, (0, m))
        bw = torch.ones(m * m, dtype=torch.float64)
        for label, method, opts in variants():
            secs, res = _best(lambda: lr.solve(whole, bw, method=method, rtol=RTOL, **opts), repeat)
            counted = lr.solve(whole, bw, method=method, rtol=RTOL, reduction=lrd.Local(), **opts)
            rows.append({"kind": "solve", "ranks": 1, "method": label, "iterations": res.iterations,
                         "seconds": secs, "allreduces": counted.info["allreduces"],
                         "converged": bool(res.converged)})
        with open(out_path, "w") as fh:
            json.dump(rows, fh)
    dist.barrier()
    dist.destroy_process_group()


def measure(m: int = 64, repeat: int = 3, timeout: float = 600.0) -> list[dict]:
    """Start two ranks on 127.0.0.1 and return their measurements (rank 0's view)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd, out_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "asv_benchmarks.distributed", "--worker", "--m", str(m),
             "--repeat", str(repeat), "--out", out_path], env=env, cwd=root))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise RuntimeError(f"the ranks exited with {codes}")
    with open(out_path) as fh:
        rows = json.load(fh)
    os.unlink(out_path)
    return rows


def table(rows) -> str:
    red = {r["values"]: r["seconds"] for r in rows if r["kind"] == "allreduce"}
    lines = [
        f"one gloo all-reduce (127.0.0.1): {red.get(2, float('nan')) * 1e6:.1f} us for 2 float64, "
        f"{red.get(32, float('nan')) * 1e6:.1f} us for 32",
        "",
        "| method | ranks | iterations | all-reduces / iteration | time / iteration (us) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted((r for r in rows if r["kind"] == "solve"), key=lambda r: (r["method"], r["ranks"])):
        lines.append(f"| {r['method']} | {r['ranks']} | {r['iterations']} | "
                     f"{r['allreduces'] / r['iterations']:.2f} | {r['seconds'] / r['iterations'] * 1e6:.1f} |")
    return "\n".join(lines)


class ShardedSolve:
    """asv: 2-D Poisson (m = 48) on 1 and 2 gloo ranks; the numbers of one run of
    :func:`measure`, made once (``setup_cache``)."""

    params = [[v[0] for v in VARIANTS], [1, 2]]
    param_names = ["method", "ranks"]
    timeout = 600

    def setup_cache(self):
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch is optional
            return None
        if not dist.is_available():  # pragma: no cover
            return None
        return measure(m=48, repeat=2)

    def setup(self, rows, method, ranks):
        if rows is None:
            raise NotImplementedError("torch.distributed is not available")
        if not any(r["kind"] == "solve" and r["method"] == method for r in rows):
            raise NotImplementedError(f"{method}: not in this version of the package")

    @staticmethod
    def _row(rows, method, ranks):
        return next(r for r in rows if r["kind"] == "solve" and r["method"] == method and r["ranks"] == ranks)

    def track_time_per_iteration(self, rows, method, ranks):
        r = self._row(rows, method, ranks)
        return r["seconds"] / r["iterations"]

    track_time_per_iteration.unit = "seconds"

    def track_allreduces_per_iteration(self, rows, method, ranks):
        r = self._row(rows, method, ranks)
        return r["allreduces"] / r["iterations"]

    track_allreduces_per_iteration.unit = "collectives"

    def track_gloo_allreduce(self, rows, method, ranks):
        """The time of one all-reduce of two float64 between the two ranks (the same for
        every parameter combination: measured once per run)."""
        return next(r["seconds"] for r in rows if r["kind"] == "allreduce" and r["values"] == 2)

    track_gloo_allreduce.unit = "seconds"


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=64, help="grid side (n = m^2), default 64")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.m, a.repeat, a.out)
        return
    print(table(measure(a.m, a.repeat)))


if __name__ == "__main__":
    main()
