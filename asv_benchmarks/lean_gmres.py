"""Per-iteration cost of ``gmres`` and ``bicgstab`` against scipy, side by side in one run.

    python -m asv_benchmarks.lean_gmres            # from the repository root
    python -m asv_benchmarks.lean_gmres --quick    # toy sizes: a smoke run in seconds

(or ``from asv_benchmarks.lean_gmres import main; main([...])``). Each row prints the
workload, our time, the peer's time, the ratio ours / peer and the products of each side.

Workloads (issue 12):

* gmres on the dense ``I - J^T``, ``J = random_contractive(200, 0.9, seed=0)``, restart 30,
  rtol 1e-8: ours on numpy and on torch (CPU) against ``scipy.sparse.linalg.gmres`` on numpy,
  plus ours on torch against ours on numpy (target: scipy / ours >= 3 on numpy, torch /
  numpy <= 1.5), and ours on torch with ``compile=True`` (each restart cycle one compiled
  graph) against lineax's GMRES under ``jax.jit`` (compile times of both excluded; target:
  ours / lineax <= 2), or against ours on numpy when JAX / lineax is not installed; this row
  compiles for about a minute and is left out of ``--quick``;
* the cost per product around a near-free product (a diagonal of ``n = 16384`` entries
  spread over [1, 1000], applied by one elementwise multiplication), for gmres (restart 30)
  and bicgstab, ours (numpy and torch) against scipy, both sides running until the same
  unreachable tolerance stops them at a budget;
* the overhead at a ~1 ms product (a product that spins for 1 ms): wall time / (products x
  product time), target <= 1.05.

BLAS and torch run on one thread; every figure is the smallest of ``--repeats`` runs, and the
two sides of a ratio are timed in turns so that a burst of load inflates neither alone.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import scipy.sparse.linalg as spla

import linsolve_rbp as lr
from linsolve_rbp.problems import random_contractive

from .common import Row, best_pair, best_time

__all__ = ["main", "run", "gmres_dense_rows", "per_iteration_rows", "overhead_rows"]

RESTART = 30
RTOL = 1e-8


def _counted(matvec, n, dtype=np.float64):
    count = [0]

    def mv(v):
        count[0] += 1
        return matvec(v)

    return spla.LinearOperator((n, n), matvec=mv, dtype=dtype), count


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _lineax_dense(M, b, kw):
    """lineax's GMRES on the dense ``M`` under ``jax.jit`` (float64, the same tolerance and
    restart), compiled: ``(run, steps, compile_s, relres)`` (``relres`` its true relative
    residual), or None without JAX / lineax. XLA's
    thread pool is pinned to one thread when JAX is imported here first."""
    import os

    if "jax" not in sys.modules:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    try:
        import jax
        import lineax as lx
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    # lineax's own test (elementwise scaled residual, max norm; as in ``peers``): its true
    # relative residual is reported next to the time.
    solver = lx.GMRES(rtol=kw["rtol"], atol=kw["atol"], restart=kw["restart"],
                      stagnation_iters=kw["restart"], max_steps=kw["maxiter"])
    Mj, bj = jax.numpy.asarray(M), jax.numpy.asarray(b)

    @jax.jit
    def solve(M, b):
        sol = lx.linear_solve(lx.MatrixLinearOperator(M), b, solver=solver, throw=False)
        return sol.value, sol.stats["num_steps"]

    t0 = time.perf_counter()
    x, steps = solve(Mj, bj)
    x.block_until_ready()
    t_compile = time.perf_counter() - t0
    relres = float(np.linalg.norm(b - M @ np.asarray(x)) / np.linalg.norm(b))
    return (lambda: solve(Mj, bj)[0].block_until_ready()), int(steps), t_compile, relres


def gmres_dense_rows(n=200, repeats=20, compiled=True):
    """gmres on dense ``I - J^T``: ours (numpy, torch; with ``compiled`` also torch with
    ``compile=True``) against scipy, and the compiled one against lineax (jitted)."""
    M = np.eye(n) - random_contractive(n, 0.9, seed=0).T
    b = np.random.default_rng(0).standard_normal(n)
    kw = dict(rtol=RTOL, atol=0.0, restart=RESTART)

    def ours_np():
        return lr.solve(M, b, method="gmres", maxiter=100 * n, **kw)

    def scipy_np():
        return spla.gmres(M, b, maxiter=100 * n, **kw)

    res = ours_np()
    op, count = _counted(lambda v: M @ v, n)
    _, info = spla.gmres(op, b, maxiter=100 * n, **kw)
    t_ours, t_sp = best_pair(ours_np, scipy_np, repeats)
    where = f"gmres dense I - J^T n={n} restart {RESTART} rtol {RTOL:g}"
    rows = [(f"{where}, numpy vs scipy", t_ours, t_sp, res.matvecs, count[0],
             f"{res.status.name} / info={info}")]
    torch = _torch()
    if torch is not None:
        Mt, bt = torch.from_numpy(M), torch.from_numpy(b)

        def ours_t():
            return lr.solve(Mt, bt, method="gmres", maxiter=100 * n, **kw)

        rt = ours_t()
        t_t, t_np = best_pair(ours_t, ours_np, repeats)
        rows.append((f"{where}, torch vs scipy", t_t, t_sp, rt.matvecs, count[0], rt.status.name))
        rows.append((f"{where}, torch vs our numpy", t_t, t_np, rt.matvecs, res.matvecs, rt.status.name))
        if compiled:
            rows.append(_compiled_row(where, Mt, bt, M, b, kw, n, ours_np, res, repeats))
    return rows


def _compiled_row(where, Mt, bt, M, b, kw, n, ours_np, res, repeats):
    """ours on torch with ``compile=True`` against lineax jitted (or our numpy without it);
    both compile times are excluded and reported in the note."""
    def ours_c():
        return lr.solve(Mt, bt, method="gmres", maxiter=100 * n, compile=True, **kw)

    t0 = time.perf_counter()
    rc = ours_c()
    t_ours_compile = time.perf_counter() - t0
    rc = ours_c()
    note = (f"{rc.status.name}, {rc.iterations} steps used, {rc.info.get('discarded_steps', 0)} "
            f"computed past the stop; torch.compile {t_ours_compile:.0f} s excluded")
    lx = _lineax_dense(M, b, dict(kw, maxiter=100 * n))
    if lx is None:
        t_c, t_np = best_pair(ours_c, ours_np, repeats)
        return (f"{where}, torch compiled vs our numpy", t_c, t_np, rc.matvecs, res.matvecs,
                note + "; JAX / lineax not installed")
    run_lx, steps, t_lx_compile, relres = lx
    t_c, t_lx = best_pair(ours_c, run_lx, repeats)
    inside, calls = _inside_graphs(ours_c, repeats)
    # (lineax counts restart cycles, each of `restart` products, testing once per cycle)
    return (f"{where}, torch compiled vs lineax GMRES jit", t_c, t_lx, rc.matvecs,
            f"{steps} cycles of {kw['restart']}",
            note + f", lineax jit {t_lx_compile:.1f} s excluded; lineax rel. residual {relres:.1e}; "
                   f"of our solve {1e3 * inside:.2f} ms in {calls} calls of compiled graphs (guards "
                   f"included), the rest outside them")


def _inside_graphs(run, repeats):
    """``(seconds, calls)``: the time a solve spends inside the calls of its compiled graphs
    (torch's guard checks included), in the fastest of ``repeats`` solves."""
    from linsolve_rbp.solvers import _compile

    spent = [0.0, 0]
    call = _compile._Compiled.__call__

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return call(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    best = (float("inf"), 0.0, 0)
    _compile._Compiled.__call__ = timed
    try:
        for _ in range(repeats):
            spent[:] = [0.0, 0]
            t0 = time.perf_counter()
            run()
            total = time.perf_counter() - t0
            if total < best[0]:
                best = (total, spent[0], spent[1])
    finally:
        _compile._Compiled.__call__ = call
    return best[1], best[2]


def per_iteration_rows(n=16384, repeats=10, budget=300):
    """Time per product around a near-free product (a diagonal), ours against scipy."""
    d = np.linspace(1.0, 1000.0, n)
    b = np.random.default_rng(0).standard_normal(n)
    rows = []
    torch = _torch()
    backends = [("numpy", d, b)]
    if torch is not None:
        backends.append(("torch", torch.from_numpy(d), torch.from_numpy(b)))
    for method, peer in (("gmres", spla.gmres), ("bicgstab", spla.bicgstab)):
        if method == "gmres":
            ours_kw = dict(restart=RESTART, maxiter=budget)
            peer_kw = dict(restart=RESTART, maxiter=budget // RESTART)
        else:
            ours_kw = dict(maxiter=budget // 2)
            peer_kw = dict(maxiter=budget // 2)
        op, count = _counted(lambda v: d * v, n)

        def theirs():
            count[0] = 0
            return peer(op, b, rtol=1e-15, atol=0.0, **peer_kw)

        theirs()
        n_sp = count[0]
        for name, dd, bb in backends:
            A = lr.LinearOperator((n, n), matvec=lambda v, dd=dd: dd * v, like=bb)

            def ours(A=A, bb=bb):
                return lr.solve(A, bb, method=method, rtol=1e-15, atol=0.0, **ours_kw)

            res = ours()
            t_o, t_p = best_pair(ours, theirs, repeats)
            rows.append((f"{method} per product, diagonal n={n}, {name} vs scipy (ms/product)",
                         t_o / res.matvecs, t_p / n_sp, res.matvecs, n_sp, res.status.name))
    return rows


def overhead_rows(n=64, product_s=1e-3, repeats=3, budget=60):
    """Wall time / (products x product time) at a product that spins ``product_s``."""
    Jt = random_contractive(n, 0.9, seed=0).T
    b = np.random.default_rng(0).standard_normal(n)

    def spin(v):
        t_end = time.perf_counter() + product_s
        y = v - v @ Jt.T
        while time.perf_counter() < t_end:
            pass
        return y

    # The time one product takes, as measured (the spin plus the call).
    t_mv = best_time(lambda: spin(b), 20)
    rows = []
    A = lr.LinearOperator((n, n), matvec=spin, like=b)
    for method, kw in (("gmres", dict(restart=RESTART)), ("bicgstab", {})):
        def run(method=method, kw=kw):
            return lr.solve(A, b, method=method, rtol=1e-15, atol=0.0, maxiter=budget, **kw)

        res = run()
        wall = best_time(run, repeats)
        ideal = res.matvecs * t_mv
        rows.append((f"{method} overhead at a {1e3 * product_s:g} ms product (wall / products x product)",
                     wall, ideal, res.matvecs, res.matvecs, res.status.name))
    return rows


def _peer(workload: str) -> str:
    if "overhead" in workload:
        return "products x product time"
    return workload.rsplit(" vs ", 1)[1].split(" (")[0].strip()


def run(quick: bool = False, repeats: int | None = None, only=("dense", "iteration", "overhead")) -> list:
    """The rows of this module (the groups ``only``) as :class:`~asv_benchmarks.common.Row`
    objects, at the sizes of :func:`main` (toy sizes with ``quick``); the caller pins the
    thread pools (:func:`main` does)."""
    rows = []
    if quick:
        r = repeats or 1
        if "dense" in only:
            rows += gmres_dense_rows(n=40, repeats=r, compiled=False)
        if "iteration" in only:
            rows += per_iteration_rows(n=256, repeats=r, budget=60)
        if "overhead" in only:
            rows += overhead_rows(n=16, product_s=1e-4, repeats=r, budget=10)
    else:
        if "dense" in only:
            rows += gmres_dense_rows(repeats=repeats or 30)
        if "iteration" in only:
            rows += per_iteration_rows(repeats=repeats or 10)
        if "overhead" in only:
            rows += overhead_rows(repeats=repeats or 3)
    return [Row(what, 1e3 * ours, _peer(what), 1e3 * peer, f"{p_o} / {p_p}", note)
            for what, ours, peer, p_o, p_p, note in rows]


def _print(rows):
    print(f"{'workload':<88} {'ours':>10} {'peer':>10} {'ratio':>7}  products (ours / peer)")
    for what, ours, peer, p_o, p_p, note in rows:
        print(f"{what:<88} {1e3 * ours:8.3f}ms {1e3 * peer:8.3f}ms {ours / peer:7.3f}  {p_o} / {p_p}  [{note}]",
              flush=True)


def main(argv=None) -> int:
    """Run the measurements with the command-line arguments ``argv`` (default
    ``sys.argv[1:]``) and print the table; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m asv_benchmarks.lean_gmres",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (the smallest is kept)")
    parser.add_argument("--only", choices=("dense", "iteration", "overhead"), action="append",
                        help="run only these groups (repeatable)")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch = _torch()
    if torch is not None:
        torch.set_num_threads(1)
    only = set(args.only or ("dense", "iteration", "overhead"))
    with threadpool_limits(limits=1):
        rows = run(quick=args.quick, repeats=args.repeats, only=only)
    _print([(r.workload, r.ours_ms / 1e3, r.peer_ms / 1e3, *str(r.products).split(" / "), r.note) for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
