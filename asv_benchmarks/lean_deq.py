"""DEQ backward passes side by side: the package's Neumann-RBP against BPTT, hand-written
autograd loops and the peers (issue 12, "Cheaper VJPs" and the DEQ target).

    python -m asv_benchmarks.lean_deq            # the issue's sizes
    python -m asv_benchmarks.lean_deq --quick    # toy sizes, seconds (a smoke test)

(or ``from asv_benchmarks.lean_deq import main; main([...])``). Prints one table per workload:

* **tanh cell** ``f(h) = tanh(W h + U x)``, ``W`` and ``U`` requiring grad, ``d = 192``,
  ``B = 48``, float32, ``K = 16`` terms: the gradient of ``<g, h*>`` with respect to ``W`` and
  ``U`` at a converged fixed point ``h*``, by

  - the package: ``lrt.fixed_point(f, h0, backward={"method": "neumann", "rtol": None,
    "atol": None, "maxiter": K})`` and ``loss.backward()`` (timed: the backward pass);
  - BPTT through ``K`` recorded steps from ``h*`` (timed: recording and backward);
  - a hand-written loop of ``torch.autograd.grad`` calls on one record of ``f`` (the products
    Neumann-RBP makes, with nothing around them), and the same loop over a
    :func:`torch.func.vjp` closure built once;
  - torchopt's ``solve_inv(ns=True, maxiter=K)`` on the same products, and torchdeq's implicit
    (IFT) backward with its ``fixed_point_iter`` for ``K`` iterations, where installed;

* **gmres vs fixed_point backward**, the same cell at ``d = 256``, ``B = 64``, float64, each to
  ``rtol = 1e-6`` (and torchdeq's fixed-point backward to the same relative tolerance).

"products" counts vector-Jacobian products through ``f`` (a hook on its pre-activation),
including the final one with respect to the parameters. "grad error" is the relative error of
the parameter gradient against the exact implicit gradient
``(df/dw)^T (I - J^T)^{-1} g``, formed densely with :func:`torch.autograd.functional.jacobian`
on a small float64 cell (``d = 12``, ``B = 3``); it shows the truncation of ``K`` terms, the
same for every ``K``-term route.

Times are the smallest of ``--repeats`` runs, the routes interleaved round by round so that
their ratios are measured side by side; torch runs on ``--threads`` threads (default 1).
"""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["CONFIGS", "main", "run", "tanh_cell_rows", "gmres_rows"]

#: Sizes of the full run and of the ``--quick`` smoke run.
CONFIGS = {
    "full": dict(d=192, B=48, K=16, repeats=200, d2=256, B2=64, repeats2=60, small_d=12, small_B=3),
    "quick": dict(d=16, B=4, K=4, repeats=3, d2=16, B2=4, repeats2=2, small_d=6, small_B=2),
}
RTOL2 = 1e-6


class Cell:
    """``f(h) = tanh(h W^T + x U^T)`` with ``||W||_2 = rho`` (contracting), its converged fixed
    point ``h*`` and a cotangent ``g``; ``f`` counts the VJPs that pass through it."""

    def __init__(self, torch, d, B, dtype, rho=0.5, seed=0):
        self.torch = torch
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=gen, dtype=dtype)
        W = rho * W / torch.linalg.matrix_norm(W, 2)
        U = torch.randn(d, d, generator=gen, dtype=dtype) / d**0.5
        self.W, self.U = W.requires_grad_(), U.requires_grad_()
        self.params = (self.W, self.U)
        self.x = torch.randn(B, d, generator=gen, dtype=dtype)
        self.g = torch.randn(B, d, generator=gen, dtype=dtype)
        self.counting = False
        self.products = 0
        with torch.no_grad():
            h = torch.zeros(B, d, dtype=dtype)
            for _ in range(300):
                h = self.f(h)
        self.h_star = h

    def _count(self, grad):
        self.products += 1

    def f(self, h):
        pre = h @ self.W.T + self.x @ self.U.T
        if self.counting and pre.requires_grad:
            pre.register_hook(self._count)
        return self.torch.tanh(pre)

    def zero_grad(self):
        self.W.grad = self.U.grad = None

    def exact_grads(self):
        """``(df/dw)^T (I - J^T)^{-1} g``, dense (small cells only)."""
        torch = self.torch
        h, n = self.h_star, self.h_star.numel()
        J = torch.autograd.functional.jacobian(lambda s: self.f(s.reshape(h.shape)).reshape(-1), h.reshape(-1))
        z = torch.linalg.solve(torch.eye(n, dtype=h.dtype) - J.T, self.g.reshape(-1))
        was = self.counting
        self.counting = False
        try:
            out = []
            for i in range(len(self.params)):
                def fp(p, i=i):
                    ps = list(self.params)
                    ps[i] = p
                    return torch.tanh(h @ ps[0].T + self.x @ ps[1].T).reshape(-1)
                Jp = torch.autograd.functional.jacobian(fp, self.params[i].detach())
                out.append((Jp.reshape(n, -1).T @ z).reshape(self.params[i].shape))
        finally:
            self.counting = was
        return tuple(out)


def _routes(cell, K):
    """name -> a callable returning the parameter gradients (W, U); None where a peer is not
    installed (the reason in the value's place, as a string)."""
    import torch

    import linsolve_rbp.adapters.torch as lrt

    f, h_star, g, params = cell.f, cell.h_star, cell.g, cell.params
    routes = {}

    out = lrt.fixed_point(f, h_star, forward_maxiter=1, forward_tol=None,
                          backward={"method": "neumann", "rtol": None, "atol": None, "maxiter": K})
    loss = (out * g).sum()

    def package():
        cell.zero_grad()
        loss.backward(retain_graph=True)
        return cell.W.grad, cell.U.grad

    routes["linsolve_rbp fixed_point, backward neumann (Neumann-RBP)"] = package

    def bptt():
        cell.zero_grad()
        h = h_star
        for _ in range(K):
            h = f(h)
        (h * g).sum().backward()
        return cell.W.grad, cell.U.grad

    routes[f"BPTT through {K} recorded steps"] = bptt

    def hand():
        h = h_star.detach().requires_grad_()
        o = f(h)
        v = z = g
        for _ in range(K):
            (v,) = torch.autograd.grad(o, h, v, retain_graph=True)
            z = z + v
        return torch.autograd.grad(o, params, z)

    routes["hand-written torch.autograd.grad loop"] = hand

    def func_vjp():
        o, vjp = torch.func.vjp(f, h_star)
        v = z = g
        for _ in range(K):
            (v,) = vjp(v)
            z = z + v
        h = h_star.detach().requires_grad_()
        return torch.autograd.grad(f(h), params, z)

    routes["torch.func.vjp closure built once, loop"] = func_vjp

    try:
        from torchopt.linear_solve import solve_inv
    except ImportError as exc:
        routes["torchopt solve_inv(ns=True)"] = f"not installed ({exc.name})"
    else:
        solver = solve_inv(ns=True, maxiter=K)

        def torchopt_ns():
            h = h_star.detach().requires_grad_()
            o = f(h)

            def matvec(v):
                return v - torch.autograd.grad(o, h, v, retain_graph=True)[0]

            z = solver(matvec, g)
            return torch.autograd.grad(o, params, z)

        routes["torchopt solve_inv(ns=True)"] = torchopt_ns

    deq = _torchdeq_backward(K, tol=1e-30, stop_mode="abs")
    if isinstance(deq, str):
        routes["torchdeq IFT backward, fixed_point_iter"] = deq
    else:
        zs = deq(None, f, h_star)
        dloss = (zs[-1] * g).sum()

        def torchdeq_ift():
            cell.zero_grad()
            dloss.backward(retain_graph=True)
            return cell.W.grad, cell.U.grad

        routes["torchdeq IFT backward, fixed_point_iter"] = torchdeq_ift
    return routes


def _torchdeq_backward(max_iter, tol, stop_mode):
    try:
        from torchdeq.grad import backward_factory
        from torchdeq.solver import get_solver
    except ImportError as exc:
        return f"not installed ({exc.name})"
    return backward_factory(grad_type="ift", hook_ift=False, b_solver=get_solver("fixed_point_iter"),
                            b_solver_kwargs=dict(max_iter=max_iter, tol=tol, stop_mode=stop_mode))


def _interleaved(fns, repeats):
    """Smallest wall time of each callable, the callables run round by round."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _counted_routes(cell, K, routes=_routes):
    """Products and gradients of one run of each route, on graphs recorded with counting on
    (the timed routes record without the counting hook)."""
    cell.counting = True
    try:
        out = {}
        for name, fn in routes(cell, K).items():
            if callable(fn):
                cell.products = 0
                grads = fn()
                out[name] = (cell.products, grads)
        return out
    finally:
        cell.counting = False


def _rel_error(grads, exact):
    import torch

    a = torch.cat([t.detach().reshape(-1).double() for t in grads])
    b = torch.cat([t.detach().reshape(-1).double() for t in exact])
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def tanh_cell_rows(cfg):
    """Rows ``(route, products, ms, ratio to the hand loop, ratio to BPTT, grad error)`` for the
    tanh cell, and the list of target checks ``(what, ok)``."""
    import torch

    K = cfg["K"]
    cell = Cell(torch, cfg["d"], cfg["B"], torch.float32)
    routes = _routes(cell, K)
    runnable = {k: v for k, v in routes.items() if callable(v)}
    times = _interleaved(runnable, cfg["repeats"])
    small = Cell(torch, cfg["small_d"], cfg["small_B"], torch.float64)
    exact = small.exact_grads()
    counts = _counted_routes(cell, K)
    small_runs = _counted_routes(small, K)
    hand = next(k for k in routes if k.startswith("hand"))
    bptt = next(k for k in routes if k.startswith("BPTT"))
    pkg = next(k for k in routes if k.startswith("linsolve_rbp"))
    rows = []
    for name, fn in routes.items():
        if not callable(fn):
            rows.append((name, "-", fn, "", "", ""))
            continue
        products = counts[name][0]
        grads = small_runs[name][1]
        t = times[name]
        rows.append((name, str(products), f"{t * 1e3:.3f}", f"{t / times[hand]:.2f}",
                     f"{t / times[bptt]:.2f}", f"{_rel_error(grads, exact):.1e}"))
    checks = [
        (f"package <= BPTT through {K} steps", times[pkg] <= times[bptt]),
        ("package <= 1.25 x hand-written autograd.grad loop", times[pkg] <= 1.25 * times[hand]),
    ]
    for peer in ("torchopt solve_inv(ns=True)", "torchdeq IFT backward, fixed_point_iter"):
        if callable(routes.get(peer)):
            checks.append((f"package ahead of {peer}", times[pkg] < times[peer]))
        else:
            checks.append((f"package ahead of {peer}: {routes.get(peer)}", None))
    return rows, checks


def gmres_rows(cfg):
    """Rows ``(route, products, ms, status)`` of the gmres-vs-fixed_point backward at
    ``rtol = 1e-6`` (float64)."""
    import torch

    import linsolve_rbp.adapters.torch as lrt

    cell = Cell(torch, cfg["d2"], cfg["B2"], torch.float64)
    name_deq = f"torchdeq IFT backward, fixed_point_iter, rel tol {RTOL2:g}"
    deq = _torchdeq_backward(200, tol=RTOL2, stop_mode="rel")

    def routes(cell, K=None):
        f, g = cell.f, cell.g
        fns = {}
        for method in ("gmres", "fixed_point", "neumann"):
            out, info = lrt.fixed_point(f, cell.h_star, forward_maxiter=1, forward_tol=None, return_info=True,
                                        backward={"method": method, "rtol": RTOL2})
            loss = (out * g).sum()

            def run(loss=loss, info=info):
                cell.zero_grad()
                loss.backward(retain_graph=True)
                return info.backward.status.name

            fns[f"linsolve_rbp backward {method}, rtol {RTOL2:g}"] = run
        if not isinstance(deq, str):
            zs = deq(None, f, cell.h_star)
            dloss = (zs[-1] * g).sum()

            def run_deq():
                cell.zero_grad()
                dloss.backward(retain_graph=True)
                return ""

            fns[name_deq] = run_deq
        return fns

    times = _interleaved(routes(cell), cfg["repeats2"])
    counts = _counted_routes(cell, None, routes)
    rows = [(k, str(n), f"{times[k] * 1e3:.3f}", status) for k, (n, status) in counts.items()]
    if isinstance(deq, str):
        rows.append((name_deq, "-", deq, ""))
    return rows


def run(quick: bool = False, repeats: int | None = None) -> list:
    """The rows of :func:`tanh_cell_rows` and :func:`gmres_rows` as
    :class:`~asv_benchmarks.common.Row` objects: each route against the package's Neumann-RBP
    (with both gradient errors), the target checks (PASS / MISS / SKIP in the note), and the
    d = 256 float64 backward of each method against torchdeq's."""
    from .common import Row

    cfg = dict(CONFIGS["quick" if quick else "full"])
    if repeats is not None:
        cfg["repeats"] = cfg["repeats2"] = repeats
    table, checks = tanh_cell_rows(cfg)
    where = f"DEQ backward d = {cfg['d']}, B = {cfg['B']}, float32, K = {cfg['K']}"
    ours = next(r for r in table if r[0].startswith("linsolve_rbp"))
    rows = []
    for route, products, ms, _hand, _bptt, err in table:
        if route == ours[0]:
            continue
        try:
            peer_ms = float(ms)
        except ValueError:  # a peer that is not installed: its reason stands in the time column
            rows.append(Row(f"{where}, {ours[0]}", float(ours[2]), route, None, ours[1], ms))
            continue
        rows.append(Row(f"{where}, {ours[0]}", float(ours[2]), route, peer_ms, f"{ours[1]} / {products}",
                        f"grad error {ours[5]} / {err}"))
    for what, ok in checks:
        rows.append(Row(f"{where}: {what}", None, None, None, None,
                        "PASS" if ok else ("MISS" if ok is not None else "SKIP")))
    g = gmres_rows(cfg)
    peer = next((r for r in g if not r[0].startswith("linsolve_rbp")), None)
    for route, products, ms, status in g:
        if route.startswith("linsolve_rbp"):
            peer_ms = float(peer[2]) if peer is not None and peer[1] != "-" else None
            rows.append(Row(f"DEQ backward d = {cfg['d2']}, B = {cfg['B2']}, float64, {route}", float(ms),
                            None if peer is None else peer[0], peer_ms,
                            f"{products} / {peer[1]}" if peer is not None else products, status))
    return rows


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asv_benchmarks.lean_deq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke test; figures mean nothing)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per route (default: the config's)")
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS["quick" if args.quick else "full"])
    if args.repeats is not None:
        cfg["repeats"] = cfg["repeats2"] = args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); smallest of {cfg['repeats']} interleaved runs")
    rows, checks = tanh_cell_rows(cfg)
    print(f"\nDEQ backward, tanh cell d = {cfg['d']}, B = {cfg['B']}, float32, K = {cfg['K']} terms")
    print(_table(("route", "products", "ms", "/ hand loop", "/ BPTT", "grad error"), rows))
    for what, ok in checks:
        print(f"  {'PASS' if ok else ('MISS' if ok is not None else 'SKIP')}  {what}")
    print(f"\nDEQ backward, tanh cell d = {cfg['d2']}, B = {cfg['B2']}, float64: gmres vs fixed_point")
    print(_table(("route", "products", "ms", "status"), gmres_rows(cfg)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
