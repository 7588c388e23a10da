"""Measure linsolve_rbp side by side with its peers, in one run, and write the table.

    python -m asv_benchmarks.peers --out docs/benchmarks_table.md

(from the repository root; or ``from asv_benchmarks.peers import main; main([...])``)

writes a markdown table to ``--out`` and the same table as reStructuredText next to it (same
name, suffix ``.inc``, so that Sphinx does not take it for a page of its own;
``docs/benchmarks.rst`` includes it). ``--quick`` runs every measurement
at toy sizes in seconds (a smoke test of the script; its figures mean nothing).

What is measured (each row gives a target, the measured figure and PASS/MISS):

* solver overhead of every method of the package: wall time of a solve divided by (number
  of products x time of one product), on a dense operator whose product costs about a
  millisecond or more;
* ``gmres`` against ``scipy.sparse.linalg.gmres`` on the same operator, restart and
  tolerance: products and wall time;
* 256 independent systems in one batched call against a Python loop of scipy's gmres;
* Neumann-RBP against BPTT for the meta-gradient of the paper's hyperparameter-optimisation
  experiment (Liao et al., ICML 2018, Table 3): time and peak memory, each method in a fresh
  process (:func:`linsolve_rbp.experiments.fresh.run_fresh`, the helper behind the
  experiment's own cost table).

BLAS and torch run on ``--threads`` threads (default 1) so that figures do not depend on how
busy the other cores are.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse.linalg as spla

import linsolve_rbp as lr
from linsolve_rbp.experiments.fresh import MEMORY_ENV, run_fresh
from linsolve_rbp.problems import random_contractive

__all__ = ["CONFIGS", "Row", "main", "to_markdown", "to_rst"]

#: Sizes of the full run and of the ``--quick`` smoke run.
CONFIGS = {
    "full": dict(overhead_n=2000, overhead_iters=100, repeats=3, gmres_n=200, batch=256,
                 batch_n=100, steps=1000, truncations=(10, 50, 100), data_n=10_000,
                 batch_size=200, variants=(None, False)),
    "quick": dict(overhead_n=200, overhead_iters=10, repeats=1, gmres_n=50, batch=8,
                  batch_n=20, steps=4, truncations=(1, 2), data_n=200, batch_size=20,
                  variants=(None,)),
}
#: Paper's Table 3 (BPTT / Neumann-RBP run time, per truncation K).
PAPER_TIME_RATIO = {10: 3.02, 50: 2.87, 100: 2.68}
RESTART = 20
RTOL = 1e-8


@dataclass
class Row:
    section: str
    what: str
    target: str
    measured: str
    ok: bool | None  # None: informative row without a target

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


def best_time(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def product_time(f, x, calls: int = 20, blocks: int = 5) -> float:
    """Time of one product ``f(x)``: the smallest mean over ``blocks`` blocks of ``calls``."""
    f(x)
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(calls):
            f(x)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


# -- machine ----------------------------------------------------------------------------------

def machine_info(threads: int) -> list[tuple[str, str]]:
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    blas = "; ".join(
        f"{p.get('internal_api')} {p.get('version') or ''} ({p.get('num_threads')} threads)".replace("  ", " ")
        for p in threadpool_info()
    )
    info = [
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("numpy / scipy", f"{np.__version__} / {scipy.__version__}"),
    ]
    try:
        import torch

        info.append(("torch", f"{torch.__version__} ({torch.get_num_threads()} threads)"))
    except ImportError:
        info.append(("torch", "not installed"))
    info += [("BLAS (threadpoolctl)", blas or "none found"), ("threads asked", str(threads)),
             ("linsolve_rbp", lr.__version__)]
    return info


# -- solver overhead ---------------------------------------------------------------------------

def overhead_rows(cfg) -> list[Row]:
    n, iters, repeats = cfg["overhead_n"], cfg["overhead_iters"], cfg["repeats"]
    rng = np.random.default_rng(0)
    # Nonsymmetric I - J^T for the general methods, symmetric positive definite I - S (spectrum
    # in [0.1, 1.9]) for those that assume symmetry.
    A_ns = np.eye(n) - random_contractive(n, rho=0.9, seed=0).T
    G = rng.standard_normal((n, n))
    S = (G + G.T) / 2
    S *= 0.9 / np.max(np.abs(np.linalg.eigvalsh(S)))
    A_sym = np.eye(n) - S
    b = rng.standard_normal(n)
    rows = []
    for method in lr.methods():
        if method.startswith("scipy."):
            continue
        solver = lr.get_method(method)
        A = lr.aslinearoperator(A_sym if solver.needs_symmetric else A_ns)
        # A product as a solver applies it: a (n,) vector through the unvalidated product.

        def run():
            # rtol below reach: every method runs its full budget of iterations.
            return lr.solve(A, b, method=method, rtol=1e-14, maxiter=iters)

        res = run()
        # Products and solves timed in turns, each figure the smallest seen, so that a burst of
        # load from other processes inflates neither side of the ratio alone.
        t_mv = t_rmv = wall = float("inf")
        for _ in range(repeats):
            t_mv = min(t_mv, product_time(A._matvec, b))
            if solver.needs_rmatvec:
                t_rmv = min(t_rmv, product_time(A._rmatvec, b))
            wall = min(wall, best_time(run, 1))
        if not solver.needs_rmatvec:
            t_rmv = 0.0
        ideal = res.matvecs * t_mv + res.rmatvecs * t_rmv
        ratio = wall / ideal
        products = res.matvecs + res.rmatvecs
        rows.append(Row(
            "Solver overhead", f"`{method}`, dense n = {n}, {res.iterations} iterations",
            "<= 1.05",
            f"{ratio:.3f} ({products} products of {1e3 * t_mv:.2f} ms; {1e3 * wall:.0f} ms in all)",
            ratio <= 1.05,
        ))
    return rows


# -- gmres against scipy -----------------------------------------------------------------------

def gmres_rows(cfg) -> list[Row]:
    n, repeats = cfg["gmres_n"], max(3, cfg["repeats"])
    M = np.eye(n) - random_contractive(n, rho=0.95, seed=1).T
    b = np.random.default_rng(1).standard_normal(n)
    A = lr.aslinearoperator(M)
    maxiter = 100 * n

    def ours():
        return lr.solve(A, b, method="gmres", rtol=RTOL, atol=0.0, restart=RESTART, maxiter=maxiter)

    def theirs(op):
        return spla.gmres(op, b, rtol=RTOL, atol=0.0, restart=RESTART, maxiter=maxiter)

    res = ours()
    counted = lr.aslinearoperator(M)
    x_sp, info = theirs(counted.to_scipy())
    n_sp = counted.matvec_count
    t_ours = best_time(ours, repeats)
    t_sp = best_time(lambda: theirs(M), repeats)
    diff = abs(res.matvecs - n_sp) / n_sp
    both = res.converged and info == 0
    where = f"n = {n}, restart {RESTART}, rtol {RTOL:g}"
    return [
        Row("gmres vs scipy", f"products, `gmres` vs `scipy.sparse.linalg.gmres` ({where})",
            "within 5%, both converged",
            f"{res.matvecs} vs {n_sp} ({100 * diff:.1f}%); converged: {res.converged} / {info == 0}",
            diff <= 0.05 and both),
        Row("gmres vs scipy", f"wall time, scipy / ours ({where})", ">= 3x",
            f"{t_sp / t_ours:.1f}x ({1e3 * t_ours:.2f} ms vs {1e3 * t_sp:.2f} ms)",
            t_sp / t_ours >= 3.0),
    ]


# -- batched solves ----------------------------------------------------------------------------

def batched_rows(cfg) -> list[Row]:
    """One batched gmres call against a Python loop of scipy's gmres, for (a) one matrix with
    B right-hand sides (a product is one matrix-matrix product) and (b) B different matrices
    (the block-diagonal per-sample Jacobian of a mini-batch; a product reads all B matrices,
    so it is memory-bound and bounds the speed-up from below by its own cost)."""
    B, n, repeats = cfg["batch"], cfg["batch_n"], cfg["repeats"]
    bs = np.random.default_rng(2).standard_normal((B, n))
    rows = []
    shared = np.eye(n) - random_contractive(n, rho=0.9, seed=100).T
    Ms = np.stack([np.eye(n) - random_contractive(n, rho=0.9, seed=100 + i).T for i in range(B)])
    variants = [
        ("one matrix, B right-hand sides", lambda X: X @ shared.T, lambda i: shared),
        # Row i of a batch goes through system i's own matrix: a block-diagonal operator.
        ("B matrices (block-diagonal)", lambda X: (Ms @ X[..., None])[..., 0], lambda i: Ms[i]),
    ]
    for label, matvec, matrix in variants:
        op = lr.LinearOperator((n, n), matvec=matvec, like=bs[0])

        def ours():
            return lr.solve(op, bs, method="gmres", rtol=RTOL, atol=0.0, restart=RESTART, batch_dims=1)

        def loop():
            return [spla.gmres(matrix(i), bs[i], rtol=RTOL, atol=0.0, restart=RESTART)[1] for i in range(B)]

        res = ours()
        infos = loop()
        t_ours = best_time(ours, repeats)
        t_loop = best_time(loop, repeats)
        ok_ours = int(np.sum(res.converged))
        ok_sp = sum(i == 0 for i in infos)
        speed = t_loop / t_ours
        # The batched products alone bound the speed-up, whatever the solver does.
        t_products = res.matvecs * product_time(matvec, bs)
        where = f"{B} systems of n = {n}, {label}, restart {RESTART}, rtol {RTOL:g}"
        rows.append(Row(
            "Batched", f"one `gmres` call with `batch_dims=1` vs a loop of scipy's gmres ({where})",
            ">= 20x, every system converged",
            f"{speed:.1f}x ({1e3 * t_ours:.1f} ms vs {1e3 * t_loop:.1f} ms, of which {res.matvecs} "
            f"batched products {1e3 * t_products:.1f} ms, so at most {t_loop / t_products:.0f}x); "
            f"converged {ok_ours}/{B} vs {ok_sp}/{B}",
            speed >= 20 and ok_ours == B,
        ))
    return rows


# -- Neumann-RBP against BPTT ------------------------------------------------------------------

def _child(method, K, cfg, threads, full_batch_last=None) -> dict:
    """Time and memory of one meta-gradient, each from its own fresh process."""
    from linsolve_rbp.experiments import hyperopt

    setup = partial(hyperopt.cost_data, cfg["data_n"], 0, threads)
    kw = dict(steps=cfg["steps"], truncate=K, batch_size=cfg["batch_size"], full_batch_last=full_batch_last)
    env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    timed = run_fresh(hyperopt.cost_meta_gradient, method, setup=setup, repeats=min(2, cfg["repeats"]),
                      env=env, **kw)
    # Memory in a second process with a fixed mmap threshold, which makes glibc hand freed
    # large blocks back to the system; with its default, adaptive threshold the heap keeps
    # them and the resident set creeps up with the number of products although the memory in
    # use does not. The fixed threshold also makes every large allocation a fresh mapping,
    # which slows the call, so the time comes from the first process.
    measured = run_fresh(hyperopt.cost_meta_gradient, method, setup=setup, env=dict(env, **MEMORY_ENV), **kw)
    return dict(timed.value, time_s=timed.seconds, memory_mib=measured.peak_bytes / 2**20)


def rbp_rows(cfg, threads) -> list[Row]:
    T, Ks = cfg["steps"], cfg["truncations"]
    bptt = _child("bptt", None, cfg, threads)
    rows = [Row("Neumann-RBP vs BPTT", f"BPTT, T = {T} (all {bptt['graph_steps']} steps kept)", "",
                f"{bptt['time_s']:.2f} s, {bptt['memory_mib']:.0f} MiB", None)]
    labels = {None: "last step on all training images (paper)",
              False: f"last step on a batch of {cfg['batch_size']}"}
    for last in cfg["variants"]:
        label = labels[last]
        mem = {}
        for K in Ks:
            r = _child("neumann", K, cfg, threads, full_batch_last=last)
            mem[K] = r["memory_mib"]
            tr = bptt["time_s"] / r["time_s"]
            mr = bptt["memory_mib"] / max(r["memory_mib"], 1e-3)
            target = PAPER_TIME_RATIO.get(K, PAPER_TIME_RATIO[10])
            what = f"Neumann-RBP K = {K}, {label}"
            rows.append(Row("Neumann-RBP vs BPTT", f"time, BPTT / {what}",
                            f">= {target} (paper)",
                            f"{tr:.2f} ({r['time_s']:.2f} s, {r['iterations']} products)", tr >= target))
            rows.append(Row("Neumann-RBP vs BPTT", f"peak memory, BPTT / {what}", ">= 10",
                            f"{mr:.1f} ({r['memory_mib']:.1f} MiB)", mr >= 10))
        k0, k1 = min(Ks), max(Ks)
        growth = mem[k1] / max(mem[k0], 1e-3) - 1.0
        rows.append(Row("Neumann-RBP vs BPTT",
                        f"Neumann-RBP peak memory growth from K = {k0} to K = {k1}, {label}",
                        "< 5%", f"{100 * growth:+.1f}% ({mem[k0]:.1f} -> {mem[k1]:.1f} MiB)",
                        growth < 0.05))
    return rows


# -- output ------------------------------------------------------------------------------------

NOTES = [
    "Solver overhead: wall time of one solve divided by (products x time of one product), the "
    "product timed alone as the solver applies it; 1.00 would mean the method costs nothing "
    "but its products.",
    "Neumann-RBP vs BPTT: one meta-gradient of the 16 hyperparameters of the 784-50-50-50-10 "
    "tanh MLP after T steps of SGD with momentum (batch 200) by "
    "`linsolve_rbp.experiments.hyperopt.hypergradient`, on random data of MNIST's shape "
    "(10,000 images; the cost depends only on the shapes). Neumann-RBP runs exactly K products "
    "(no divergence stop). Time is the best of two calls in a fresh process with the default "
    "allocator settings.",
    "Memory: the peak resident set size of the process during the first call (Linux `VmHWM`, "
    "reset just before the call through `/proc/self/clear_refs`) minus the resident set size "
    "at its start; it counts everything the call allocates, chiefly the graph kept for "
    "back-propagation, measured in a second fresh process run with "
    "`MALLOC_MMAP_THRESHOLD_=131072` (glibc's adaptive mmap threshold off), so that the figure "
    "counts memory in use rather than freed blocks kept by the heap.",
]


def to_markdown(rows, machine, command) -> str:
    out = ["# Benchmarks: linsolve_rbp against its peers", "",
           f"Generated by `{command}`.", "", "| Machine | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in machine]
    out += ["", "| Comparison | Target | Measured | Result |", "| --- | --- | --- | --- |"]
    out += [f"| {r.what} | {r.target} | {r.measured} | {r.verdict} |" for r in rows]
    out += [""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(out)


def _rst_cell(text: str) -> str:
    return text.replace("`", "``").replace("````", "``") if text else ".."


def to_rst(rows, machine, command) -> str:
    out = [f"Generated by ``{command}``.", "", ".. list-table:: Machine", "   :widths: 25 75", ""]
    for k, v in machine:
        out += [f"   * - {k}", f"     - {v}"]
    out += ["", ".. list-table:: Measurements", "   :header-rows: 1", "   :widths: 46 16 30 8", "",
            "   * - Comparison", "     - Target", "     - Measured", "     - Result"]
    for r in rows:
        out += [f"   * - {_rst_cell(r.what)}", f"     - {_rst_cell(r.target)}",
                f"     - {_rst_cell(r.measured)}", f"     - {r.verdict or '..'}"]
    out += [""] + [f"* {_rst_cell(n)}" for n in NOTES] + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    """Run the comparison with the command-line arguments ``argv`` (default ``sys.argv[1:]``),
    write the tables and return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m asv_benchmarks.peers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks_table.md",
                        help="markdown output; the reST table goes to the same name with .inc")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run in seconds")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    parser.add_argument("--skip-rbp", action="store_true", help="leave out Neumann-RBP vs BPTT")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be a positive integer")
    cfg = CONFIGS["quick" if args.quick else "full"]
    from threadpoolctl import threadpool_limits

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    command = "python -m asv_benchmarks.peers" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads != 1 else "")
    t0 = time.perf_counter()
    rows: list[Row] = []
    with threadpool_limits(limits=args.threads):
        machine = machine_info(args.threads)
        for name, fn in (("solver overhead", overhead_rows), ("gmres vs scipy", gmres_rows),
                         ("batched", batched_rows)):
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows += fn(cfg)
    if not args.skip_rbp:
        if torch is None:
            print("torch is not installed: Neumann-RBP vs BPTT left out", file=sys.stderr)
        else:
            print("measuring Neumann-RBP vs BPTT (a fresh process per method) ...", file=sys.stderr, flush=True)
            rows += rbp_rows(cfg, args.threads)
    machine.append(("run time of this script", f"{time.perf_counter() - t0:.0f} s"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(rows, machine, command))
    out.with_suffix(".inc").write_text(to_rst(rows, machine, command))
    for r in rows:
        print(f"{r.verdict or '-':4}  {r.what}: {r.measured} (target {r.target or '-'})")
    print(f"wrote {out} and {out.with_suffix('.inc')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
