"""Measure linsolve_rbp side by side with its peers, in one run, and write the tables.

    pip install -c constraints.txt -e ".[torch,bench,peers]"
    python -m asv_benchmarks.peers --out docs/benchmarks_table.md

(from the repository root; or ``from asv_benchmarks.peers import main; main([...])``)

writes a markdown page to ``--out`` and the same tables as reStructuredText next to it (same
name, suffix ``.inc``, so that Sphinx does not take it for a page of its own;
``docs/benchmarks.rst`` includes it). ``--quick`` runs every measurement at toy sizes in
seconds (a smoke test of the script; its figures mean nothing). ``--only NAME`` (repeatable)
runs some sections only.

Sections (each a list of :class:`~asv_benchmarks.common.Row`: workload, this package's time,
the peer and its time in the same run, the products of each side, a note):

* ``lean``, ``lean_gmres``, ``lean_deq``: the workloads of the lean-iteration targets, from
  the modules of those names in this folder (cg on the 2-D Poisson stencil against scipy's cg,
  the overhead at a 1 ms product, gmres on the dense ``I - J^T`` against scipy's gmres, the
  cost per product around a near-free product, the DEQ backward of a tanh cell against BPTT, a
  hand-written autograd loop, torchopt and torchdeq). Each module is imported when its section
  runs; a module that is missing or fails is reported as a row, not an error.
* ``batched``: 256 independent systems of n = 64, each with its own matrix ``I - J_i^T``, in
  one ``gmres`` call with ``batch_dims=1`` (numpy and torch) against a loop of scipy's gmres,
  torchdeq's batched fixed-point iteration and, when JAX is installed, lineax's GMRES under
  ``jax.vmap`` and ``jax.jit`` (compile time reported apart).
* ``deq``: the backward pass of a DEQ layer ``h* = tanh(W h* + U x)`` (d = 256, B = 64) by
  this package's ``gmres``, ``fixed_point`` and ``neumann`` against torchdeq's implicit
  backward, torchopt's ``solve_inv(ns=True)`` and BPTT, with each gradient's relative error
  against the exact dense formula ``dL/dW = sum_b (D_b z_b) h_b^T``, ``z_b = (I - W^T D_b)^{-1}
  g_b``, ``D_b = diag(1 - h_b^2)``.
* ``rbp``: Neumann-RBP against BPTT for the meta-gradient of the paper's
  hyperparameter-optimisation experiment (Liao et al., ICML 2018, Table 3): time and peak
  memory, each method in a fresh process (:func:`linsolve_rbp.experiments.fresh.run_fresh`),
  with the paper's targets (PASS / MISS).

Peers that are not installed (the ``peers`` extra: torchdeq, torchopt; lineax needs JAX) are
left out of their rows with a note. BLAS and torch run on ``--threads`` threads (default 1)
so that figures do not depend on how busy the other cores are; every time is the smallest of
repeated runs, the two sides of a row timed in turns.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
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

from .common import Row, best_time, format_rows

__all__ = ["CONFIGS", "SECTIONS", "Check", "Row", "main", "run", "to_markdown", "to_rst"]

#: Sizes of the full run and of the ``--quick`` smoke run.
CONFIGS = {
    "full": dict(repeats=5, batch=256, batch_n=64, deq_d=256, deq_B=64, deq_K=20,
                 steps=1000, truncations=(10, 50, 100), data_n=10_000, batch_size=200,
                 variants=(None, False)),
    "quick": dict(repeats=1, batch=8, batch_n=16, deq_d=16, deq_B=4, deq_K=5,
                  steps=4, truncations=(1, 2), data_n=200, batch_size=20, variants=(None,)),
}
#: Paper's Table 3 (BPTT / Neumann-RBP run time, per truncation K).
PAPER_TIME_RATIO = {10: 3.02, 50: 2.87, 100: 2.68}
RESTART = 30
RTOL = 1e-8
#: The modules of the lean-iteration workloads, run by their sections (see :func:`lean_rows`).
LEAN_MODULES = ("lean", "lean_gmres", "lean_deq")


@dataclass
class Check:
    """A row with a target (the ``rbp`` section): what, the target, the measured figure and
    whether the target is met (None: informative row without a target)."""

    section: str
    what: str
    target: str
    measured: str
    ok: bool | None

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


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


# -- sections from the lean-iteration modules -------------------------------------------------

#: Peer of a row whose tuple does not name one, by module (the modules' own tables say it in
#: their header line).
_DEFAULT_PEER = {"lean": "scipy cg", "lean_gmres": "scipy", "lean_deq": "BPTT"}


def _peer_of(module: str, workload: str) -> str:
    w = workload.lower()
    if "overhead" in w:
        return "products x product time"
    if " vs " in workload:
        return workload.rsplit(" vs ", 1)[1].split(" (")[0].strip()
    return _DEFAULT_PEER.get(module, "peer")


def as_row(item, module: str = "") -> Row:
    """A :class:`~asv_benchmarks.common.Row` from what a lean module returns: a ``Row`` (of
    any copy of ``common``), or a tuple ``(workload, ours_s, peer_s, ours_products,
    peer_products[, note])`` with times in seconds."""
    if isinstance(item, Row):
        return item
    if hasattr(item, "workload") and hasattr(item, "ours_ms"):
        return Row(item.workload, item.ours_ms, getattr(item, "peer", None), getattr(item, "peer_ms", None),
                   getattr(item, "products", None), getattr(item, "note", ""))
    workload, ours_s, peer_s, p_ours, p_peer, *rest = item
    return Row(str(workload), None if ours_s is None else 1e3 * ours_s, _peer_of(module, str(workload)),
               None if peer_s is None else 1e3 * peer_s, f"{p_ours} / {p_peer}",
               str(rest[0]) if rest else "")


def _module_rows(mod, name: str, quick: bool):
    if hasattr(mod, "run"):
        return mod.run(quick=quick)
    return mod.main(["--quick"] if quick else [])


def lean_rows(name: str, quick: bool) -> tuple[list[Row], str]:
    """Rows of the module ``asv_benchmarks.<name>`` and any table it printed.

    The module is imported here (a missing or broken one gives a row saying so). Its
    ``run(quick=...)`` is called (returning rows); a module without one has its
    ``main(["--quick"] or [])`` run, with its printed table captured, and its return value
    taken as rows when it is a list."""
    try:
        mod = importlib.import_module(f"asv_benchmarks.{name}")
    except Exception as exc:  # noqa: BLE001 - any failure to import is reported, not raised
        return [Row(f"`{name}` section", None, note=f"not run: asv_benchmarks.{name} does not import "
                    f"({type(exc).__name__}: {exc})")], ""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            out = _module_rows(mod, name, quick)
    except Exception as exc:  # noqa: BLE001
        return [Row(f"`{name}` section", None, note=f"failed: {type(exc).__name__}: {exc}")], buf.getvalue()
    rows = [as_row(r, name) for r in out] if isinstance(out, (list, tuple)) else []
    return rows, buf.getvalue()


# -- 256 systems with their own matrices -------------------------------------------------------

def _torchdeq():
    try:
        from torchdeq.solver import get_solver

        return get_solver
    except ImportError:
        return None


def _torchopt():
    try:
        import torchopt

        return torchopt
    except ImportError:
        return None


def _jax():
    try:
        import jax
        import lineax

        jax.config.update("jax_enable_x64", True)
        return jax, lineax
    except ImportError:
        return None


def batched_rows(cfg) -> list[Row]:
    """``B`` systems ``(I - J_i^T) z_i = b_i``, ``J_i = random_contractive(n, 0.9, seed=i)``:
    one batched gmres call (numpy, torch) against a loop of scipy's gmres, torchdeq's batched
    fixed-point iteration and lineax's vmapped GMRES.

    Each library applies the batched product ``M_i x_i`` (``M_i = I - J_i^T``) its fastest
    way: numpy as ``M @ x[..., None]`` (a matrix-vector product per system); torch, whose
    CPU batched matrix-vector product (``bmm`` with one column, also ``matmul`` and
    ``einsum``) is about three times slower than its batched row-times-matrix product, as
    ``x[:, None, :] @ M^T`` with the transposes ``M_i^T`` stored contiguously once: the same
    product, the same values (bit for bit on this workload: the torch solve takes the same
    steps to the same ``x`` either way)."""
    import torch

    B, n, repeats = cfg["batch"], cfg["batch_n"], cfg["repeats"]
    Ms = np.stack([np.eye(n) - random_contractive(n, rho=0.9, seed=i).T for i in range(B)])
    bs = np.random.default_rng(2).standard_normal((B, n))
    where = f"{B} systems n = {n}, own matrices, restart {RESTART}, rtol {RTOL:g}"

    def relres(X):
        X = np.asarray(X)
        r = bs - (Ms @ X[..., None])[..., 0]
        return float(np.max(np.linalg.norm(r, axis=1) / np.linalg.norm(bs, axis=1)))

    Mt, bt = torch.from_numpy(Ms), torch.from_numpy(bs)
    MtT = Mt.transpose(1, 2).contiguous()  # M_i^T, for torch's row-times-matrix product
    ops = {
        "numpy": (lr.LinearOperator((n, n), matvec=lambda X: (Ms @ X[..., None])[..., 0], like=bs[0]), bs),
        "torch": (lr.LinearOperator((n, n), matvec=lambda X: (X[:, None, :] @ MtT)[:, 0, :], like=bt[0]), bt),
    }
    kw = dict(rtol=RTOL, atol=0.0, restart=RESTART, batch_dims=1)
    ours = {}
    for name, (op, b) in ops.items():
        res = lr.solve(op, b, method="gmres", **kw)
        t = best_time(lambda op=op, b=b: lr.solve(op, b, method="gmres", **kw), repeats)
        ours[name] = (t, res)

    def loop():
        return [spla.gmres(Ms[i], bs[i], rtol=RTOL, atol=0.0, restart=RESTART) for i in range(B)]

    counted = [lr.aslinearoperator(Ms[i]) for i in range(B)]
    sp_x = [spla.gmres(c.to_scipy(), bs[i], rtol=RTOL, atol=0.0, restart=RESTART)[0] for i, c in enumerate(counted)]
    sp_products = sum(c.matvec_count for c in counted)
    t_loop = best_time(loop, max(1, repeats // 2))
    rows = []
    for name, (t, res) in ours.items():
        # The time of the batched products alone (the operator's own cost, not the solver's).
        op, b = ops[name]
        t_prod = product_time(op.matvec, b, calls=5, blocks=3) * res.matvecs
        rows.append(Row(f"{where}, ours {name} (`batch_dims=1`)", 1e3 * t, "scipy gmres loop", 1e3 * t_loop,
                        f"{res.matvecs} batched / {sp_products} single",
                        f"speed-up {t_loop / t:.1f}x (target >= 20x); converged {int(np.sum(res.converged))}/{B}; "
                        f"max rel. residual {relres(_np(res.x)):.1e} / {relres(np.stack(sp_x)):.1e}; "
                        f"of which the {res.matvecs} products alone {1e3 * t_prod:.1f} ms"))
    t_np, res_np = ours["numpy"]
    get_solver = _torchdeq()
    if get_solver is None:
        rows.append(Row(f"{where}, ours numpy", 1e3 * t_np, "torchdeq", None, None, "torchdeq not installed"))
    else:
        fp = get_solver("fixed_point_iter")
        MtT = Mt  # z = J^T z + b with J^T = I - M: f(z) = z - M z + b
        n_calls = [0]

        def g(z):
            n_calls[0] += 1
            return z - (MtT @ z[..., None])[..., 0] + bt

        def deq():
            return fp(g, torch.zeros_like(bt), max_iter=100 * n, tol=RTOL, stop_mode="rel")[0]

        n_calls[0] = 0
        z = deq()
        calls = n_calls[0]
        t_deq = best_time(deq, repeats)
        rows.append(Row(f"{where}, ours numpy", 1e3 * t_np, "torchdeq fixed_point_iter (batched)", 1e3 * t_deq,
                        f"{res_np.matvecs} / {calls}",
                        f"max rel. residual {relres(_np(res_np.x)):.1e} / {relres(z.numpy()):.1e}"))
    jl = _jax()
    if jl is None:
        rows.append(Row(f"{where}, ours numpy", 1e3 * t_np, "lineax", None, None, "JAX / lineax not installed"))
    else:
        jax, lx = jl
        jnp = jax.numpy
        Mj, bj = jnp.asarray(Ms), jnp.asarray(bs)
        solver = lx.GMRES(rtol=RTOL, atol=0.0, restart=RESTART, stagnation_iters=RESTART)

        def one(M, b):
            sol = lx.linear_solve(lx.MatrixLinearOperator(M), b, solver=solver, throw=False)
            return sol.value, sol.stats["num_steps"]

        fn = jax.jit(jax.vmap(one))
        t0 = time.perf_counter()
        x, steps = fn(Mj, bj)
        x.block_until_ready()
        t_compile = time.perf_counter() - t0
        t_lx = best_time(lambda: fn(Mj, bj)[0].block_until_ready(), repeats)
        rows.append(Row(f"{where}, ours numpy", 1e3 * t_np, "lineax GMRES, vmap + jit", 1e3 * t_lx,
                        f"{res_np.matvecs} / {int(np.max(np.asarray(steps)))} steps",
                        f"lineax compile {t_compile:.2f} s excluded; max rel. residual "
                        f"{relres(_np(res_np.x)):.1e} / {relres(np.asarray(x)):.1e}"))
    return rows


def _np(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


# -- DEQ backward with gradient errors ---------------------------------------------------------

def _deq_cell(d, B, dtype, seed=0):
    """``W`` (``||W||_2 = 0.9``, requires grad), ``Ux``, the cell, its fixed point ``h*``
    (float64 iteration to convergence, cast to ``dtype``) and a loss gradient ``g``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    W64 = torch.randn(d, d, generator=gen, dtype=torch.float64)
    W64 *= 0.9 / torch.linalg.matrix_norm(W64, ord=2)
    U = torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    Ux64 = x @ U.T
    h = torch.zeros(B, d, dtype=torch.float64)
    for _ in range(600):
        h = torch.tanh(h @ W64.T + Ux64)
    g64 = torch.randn(B, d, generator=gen, dtype=torch.float64)
    # Exact gradient: z_b = (I - W^T D_b)^{-1} g_b, dL/dW = sum_b (D_b z_b) h_b^T.
    D = 1 - h ** 2
    A = torch.eye(d, dtype=torch.float64) - W64.T[None] * D[:, None, :]
    z = torch.linalg.solve(A, g64[..., None])[..., 0]
    exact = (D * z).T @ h
    W = W64.to(dtype).requires_grad_()
    Ux = Ux64.to(dtype)

    def f(hh):
        return torch.tanh(hh @ W.T + Ux)

    return W, f, h.to(dtype), g64.to(dtype), exact


def deq_rows(cfg) -> list[Row]:
    """The DEQ backward by this package, torchdeq, torchopt and BPTT, timed from the fixed
    point to ``W.grad`` (one evaluation of the cell with its graph, then the backward pass),
    with the gradient's relative error against the exact dense formula."""
    import torch

    from linsolve_rbp.adapters import torch as lrt

    d, B, K, repeats = cfg["deq_d"], cfg["deq_B"], cfg["deq_K"], max(3, cfg["repeats"])
    rows = []
    for dtype, rtol in ((torch.float64, 1e-6), (torch.float32, None)):
        W, f, h_star, g, exact = _deq_cell(d, B, dtype)
        label = f"DEQ backward, tanh cell d = {d}, B = {B}, {str(dtype).split('.')[-1]}"
        counted = [0]

        def err():
            return float((W.grad.double() - exact).norm() / exact.norm())

        def timed(run):
            """(best time in ms, products, relative gradient error) of ``run``."""
            W.grad = None
            counted[0] = 0
            products = run()
            e = err()

            def once():
                W.grad = None
                run()

            return 1e3 * best_time(once, repeats), products, e

        def ours(backward):
            def run():
                # forward_maxiter=0: h* is given, as to the peers; the layer's one evaluation
                # of f with the graph measures its residual and serves the backward pass.
                out, info = lrt.fixed_point(f, h_star, forward_maxiter=0, forward_tol=None, backward=backward,
                                            batch_dims=1, on_failure="ignore", return_info=True)
                out.backward(g)
                return info.backward.matvecs + info.backward.rmatvecs
            return run

        def vjp_of(hh, out):
            def vjp(v):
                counted[0] += 1
                return torch.autograd.grad(out, hh, v, retain_graph=True)[0]
            return vjp

        def bptt(steps):
            def run():
                out = lrt.unroll(f, h_star, steps=steps)
                out.backward(g)
                return steps
            return run

        if rtol is not None:  # tolerance-driven solvers
            sides = {"gmres": ours({"method": "gmres", "rtol": rtol}),
                     "fixed_point": ours({"method": "fixed_point", "rtol": rtol})}
            get_solver = _torchdeq()
            peer = None
            if get_solver is not None:
                from torchdeq.grad import backward_factory

                fp = get_solver("fixed_point_iter")

                def counting_solver(func, x0, **kw):
                    def cf(y):
                        counted[0] += 1
                        return func(y)
                    return fp(cf, x0, **kw)

                grad_fn = backward_factory(grad_type="ift", hook_ift=True, b_solver=counting_solver,
                                           b_solver_kwargs=dict(max_iter=1000, tol=rtol, stop_mode="rel"))

                class _Trainer:
                    hook = None

                def peer_run():
                    counted[0] = 0
                    out = grad_fn(_Trainer(), f, h_star.clone())[0]
                    out.backward(g)
                    return counted[0]

                peer = timed(peer_run)
            for name, run in sides.items():
                t, p, e = timed(run)
                if peer is None:
                    rows.append(Row(f"{label}, rtol {rtol:g}, ours `{name}`", t, "torchdeq", None, p,
                                    f"grad rel. error {e:.1e}; torchdeq not installed"))
                else:
                    rows.append(Row(f"{label}, rtol {rtol:g}, ours `{name}`", t, "torchdeq IFT (fixed_point_iter)",
                                    peer[0], f"{p} / {peer[1]}",
                                    f"grad rel. error {e:.1e} / {peer[2]:.1e}"))
        else:  # fixed budget: K Neumann terms (K - 1 products)
            neumann = ours({"method": "neumann", "rtol": None, "atol": None, "divtol": None, "maxiter": K - 1})
            t, p, e = timed(neumann)
            tb, pb, eb = timed(bptt(K))
            rows.append(Row(f"{label}, K = {K} Neumann terms, ours `neumann`", t, f"BPTT through {K} steps", tb,
                            f"{p} / {pb}", f"grad rel. error {e:.1e} / {eb:.1e}"))
            topt = _torchopt()
            if topt is None:
                rows.append(Row(f"{label}, K = {K}, ours `neumann`", t, "torchopt", None, p,
                                "torchopt not installed"))
            else:
                solve = topt.linear_solve.solve_inv(ns=True, maxiter=K - 1)

                def torchopt_run():
                    hh = h_star.detach().requires_grad_()
                    out = f(hh)
                    vjp = vjp_of(hh, out)
                    counted[0] = 0
                    z = solve(lambda v: v - vjp(v), g)
                    products = counted[0]
                    out.backward(z)
                    return products

                to, po, eo = timed(torchopt_run)
                rows.append(Row(f"{label}, K = {K}, ours `neumann`", t, "torchopt solve_inv(ns=True)", to,
                                f"{p} / {po}", f"grad rel. error {e:.1e} / {eo:.1e}"))
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


def rbp_rows(cfg, threads) -> list[Check]:
    T, Ks = cfg["steps"], cfg["truncations"]
    bptt = _child("bptt", None, cfg, threads)
    rows = [Check("Neumann-RBP vs BPTT", f"BPTT, T = {T} (all {bptt['graph_steps']} steps kept)", "",
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
            rows.append(Check("Neumann-RBP vs BPTT", f"time, BPTT / {what}",
                            f">= {target} (paper)",
                            f"{tr:.2f} ({r['time_s']:.2f} s, {r['iterations']} products)", tr >= target))
            rows.append(Check("Neumann-RBP vs BPTT", f"peak memory, BPTT / {what}", ">= 10",
                            f"{mr:.1f} ({r['memory_mib']:.1f} MiB)", mr >= 10))
        k0, k1 = min(Ks), max(Ks)
        growth = mem[k1] / max(mem[k0], 1e-3) - 1.0
        rows.append(Check("Neumann-RBP vs BPTT",
                        f"Neumann-RBP peak memory growth from K = {k0} to K = {k1}, {label}",
                        "< 5%", f"{100 * growth:+.1f}% ({mem[k0]:.1f} -> {mem[k1]:.1f} MiB)",
                        growth < 0.05))
    return rows



# -- output ------------------------------------------------------------------------------------

#: Section name -> (title, function of (cfg, threads) giving rows), in the order of the page.
SECTIONS = {
    "lean": "cg on the 2-D Poisson stencil and the overhead at a 1 ms product (`asv_benchmarks.lean`)",
    "lean_gmres": "gmres on the dense I - J^T and around a near-free product (`asv_benchmarks.lean_gmres`)",
    "lean_deq": "DEQ backward, tanh cell d = 192, B = 48, float32, K = 16 (`asv_benchmarks.lean_deq`)",
    "batched": "256 systems with their own matrices",
    "deq": "DEQ backward with gradient errors against the exact formula",
    "rbp": "Neumann-RBP against BPTT (Liao et al., 2018, Table 3)",
}

NOTES = [
    "Times are milliseconds, the smallest of repeated runs, both sides of a row measured in the "
    "same run on one thread; `ours / peer` below 1 means this package is faster. Products: "
    "ours / peer.",
    "DEQ rows: each time runs from the fixed point to `W.grad` (one evaluation of the cell with "
    "its graph, then the backward pass; BPTT records its K steps). The gradient error is "
    "relative to the exact dense formula dL/dW = sum_b (D_b z_b) h_b^T with "
    "z_b = (I - W^T D_b)^{-1} g_b and D_b = diag(1 - h_b^2), at a fixed point iterated to "
    "convergence in float64.",
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


def to_markdown(results, machine, command) -> str:
    """The markdown page: machine, one table per section (:func:`format_rows`; the ``rbp``
    section with targets), notes."""
    out = ["# Benchmarks: linsolve_rbp against its peers", "",
           f"Generated by `{command}`.", "", "| Machine | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in machine]
    for name, (rows, text) in results.items():
        out += ["", f"## {SECTIONS[name]}", ""]
        if name == "rbp":
            out += ["| Comparison | Target | Measured | Result |", "| --- | --- | --- | --- |"]
            out += [f"| {r.what} | {r.target} | {r.measured} | {r.verdict} |" for r in rows]
        elif rows:
            out.append(format_rows(rows).rstrip("\n"))
        if text.strip() and not rows:
            out += ["```", text.rstrip("\n"), "```"]
    out += [""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(out)


def _rst_cell(text) -> str:
    text = "" if text is None else str(text)
    return text.replace("`", "``").replace("````", "``").replace("|", "\\|") if text.strip() else ".."


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if v < 10 else f"{v:.1f}")


def to_rst(results, machine, command) -> str:
    """The same page as reStructuredText list tables (included by ``docs/benchmarks.rst``)."""
    out = [f"Generated by ``{command}``.", "", ".. list-table:: Machine", "   :widths: 25 75", ""]
    for k, v in machine:
        out += [f"   * - {_rst_cell(k)}", f"     - {_rst_cell(v)}"]
    for name, (rows, text) in results.items():
        title = _rst_cell(SECTIONS[name])
        out.append("")
        if name == "rbp":
            out += [f".. list-table:: {title}", "   :header-rows: 1", "   :widths: 46 16 30 8", "",
                    "   * - Comparison", "     - Target", "     - Measured", "     - Result"]
            for r in rows:
                out += [f"   * - {_rst_cell(r.what)}", f"     - {_rst_cell(r.target)}",
                        f"     - {_rst_cell(r.measured)}", f"     - {r.verdict or '..'}"]
        elif rows:
            out += [f".. list-table:: {title}", "   :header-rows: 1", "   :widths: 34 9 18 9 8 10 12", "",
                    "   * - workload", "     - ours (ms)", "     - peer", "     - peer (ms)",
                    "     - ours / peer", "     - products", "     - note"]
            for r in rows:
                ratio = r.ratio
                out += [f"   * - {_rst_cell(r.workload)}", f"     - {_fmt(r.ours_ms)}",
                        f"     - {_rst_cell(r.peer or '-')}", f"     - {_fmt(r.peer_ms)}",
                        f"     - {'-' if ratio is None else f'{ratio:.2f}'}",
                        f"     - {_rst_cell('-' if r.products is None else r.products)}",
                        f"     - {_rst_cell(r.note)}"]
        if text.strip() and not rows:
            out += [f"**{title}**", "", ".. code-block:: text", ""]
            out += ["   " + line for line in text.rstrip("\n").splitlines()]
    out += [""] + [f"* {_rst_cell(n)}" for n in NOTES] + [""]
    return "\n".join(out)


def run(sections=tuple(SECTIONS), quick: bool = False, threads: int = 1) -> dict:
    """Run ``sections`` (names of :data:`SECTIONS`) and return ``{name: (rows, printed
    text)}``; rows are :class:`~asv_benchmarks.common.Row` (:class:`Check` for ``rbp``)."""
    from threadpoolctl import threadpool_limits

    cfg = CONFIGS["quick" if quick else "full"]
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    results = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        if name == "rbp":
            if torch is None:
                results[name] = ([], "torch is not installed: Neumann-RBP vs BPTT left out")
            else:
                results[name] = (rbp_rows(cfg, threads), "")
            continue
        with threadpool_limits(limits=threads):
            if name in LEAN_MODULES:
                results[name] = lean_rows(name, quick)
            elif torch is None:
                results[name] = ([Row(SECTIONS[name], None, note="not run: torch is not installed")], "")
            else:
                fn = {"batched": batched_rows, "deq": deq_rows}[name]
                results[name] = (fn(cfg), "")
    return results


def main(argv=None) -> int:
    """Run the comparison with the command-line arguments ``argv`` (default ``sys.argv[1:]``),
    write the tables and return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m asv_benchmarks.peers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks_table.md",
                        help="markdown output; the reST tables go to the same name with .inc")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run in seconds")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    parser.add_argument("--only", action="append", choices=list(SECTIONS),
                        help="run only this section (repeatable)")
    parser.add_argument("--skip-rbp", action="store_true", help="leave out Neumann-RBP vs BPTT")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be a positive integer")
    sections = [s for s in (args.only or SECTIONS) if not (args.skip_rbp and s == "rbp")]
    command = "python -m asv_benchmarks.peers" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads != 1 else "") + \
        "".join(f" --only {s}" for s in (args.only or ())) + (" --skip-rbp" if args.skip_rbp else "")
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        machine = machine_info(args.threads)
    machine.append(("peers", peer_versions()))
    results = run(sections, quick=args.quick, threads=args.threads)
    machine.append(("run time of this script", f"{time.perf_counter() - t0:.0f} s"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(results, machine, command))
    out.with_suffix(".inc").write_text(to_rst(results, machine, command))
    for name, (rows, text) in results.items():
        if name == "rbp":
            for r in rows:
                print(f"{r.verdict or '-':4}  {r.what}: {r.measured} (target {r.target or '-'})")
        elif rows:
            print(format_rows(rows, title=SECTIONS[name]))
        if text.strip() and not rows:
            print(text)
    print(f"wrote {out} and {out.with_suffix('.inc')}", file=sys.stderr)
    return 0


def peer_versions() -> str:
    """Versions of the installed peers (the ``peers`` extra, and JAX/lineax when present)."""
    from importlib import metadata

    found = []
    for name in ("scipy", "torchdeq", "torchopt", "jax", "lineax"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


if __name__ == "__main__":
    sys.exit(main())
