"""Train a deep equilibrium (DEQ) classifier on scikit-learn's digits with linsolve_rbp.

The model: an encoder ``u = E x``, an equilibrium layer ``h* = tanh(W h* + u)`` (an
``lrt.DEQ``: Anderson acceleration forward, GMRES on the adjoint system backward; ``W``
rescaled to spectral norm at most ``--gamma``), a read-out.
Each epoch prints the loss, the train and test accuracy, the time of the epoch and the layer's
solver statistics (``layer.summary()``). After training, two comparisons on the trained model
(``--compare``): the forward solvers (iterations and time to the same tolerance on the test
set) and the backward methods (time and distance of the gradient to a tight GMRES solve).

Run (the ``examples`` extra installs scikit-learn)::

    pip install -c constraints.txt -e ".[torch,examples]"
    python examples/deq_digits.py                # 10 epochs, under a minute on one CPU core
    python examples/deq_digits.py --compare      # and the solver comparisons
    python examples/deq_digits.py --engine torchdeq   # the same model with torchdeq's layer

Everything is seeded: with ``--threads 1`` (the default) losses, accuracies and iteration
counts repeat from run to run (on the same versions of torch and this package); times do not.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from linsolve_rbp.adapters import torch as lrt


class Cell(torch.nn.Module):
    """``f(h, u, W) = tanh(W h + drop(u))``: the input injection ``u`` goes through variational
    dropout (one mask per solve, so that ``f`` stays one map during the solve)."""

    def __init__(self, dropout):
        super().__init__()
        self.drop = lrt.VariationalDropout(dropout) if dropout > 0 else None

    def forward(self, h, u, W):
        if self.drop is not None:
            u = self.drop(u)
        return torch.tanh(h @ W.T + u)


class Model(torch.nn.Module):
    """Encoder, equilibrium layer, read-out. The layer's weight is rescaled to spectral norm
    at most ``gamma < 1`` once per call (``f`` is then a contraction, as tanh is 1-Lipschitz),
    and passed to ``f`` as an input."""

    def __init__(self, hidden, dropout, forward, backward, maxiter, tol, gamma, engine):
        super().__init__()
        self.hidden, self.gamma = hidden, gamma
        self.encoder = torch.nn.Linear(64, hidden)
        self.W = torch.nn.Parameter(torch.randn(hidden, hidden) / hidden ** 0.5)
        layer = lrt.DEQ if engine == "linsolve_rbp" else TorchDEQLayer
        self.deq = layer(Cell(dropout), forward=forward, forward_maxiter=maxiter,
                         forward_tol=tol, eval_forward_maxiter=2 * maxiter,
                         backward=backward, batch_dims=1)
        self.readout = torch.nn.Linear(hidden, 10)

    def weight(self):
        norm = torch.linalg.matrix_norm(self.W, 2)
        return self.W * torch.clamp(self.gamma / norm, max=1.0)

    def forward(self, x, penalties=None):
        h0 = torch.zeros(x.shape[0], self.hidden, dtype=self.W.dtype, device=self.W.device)
        args = (h0, self.encoder(x), self.weight())
        if penalties:
            h, reg = self.deq(*args, penalties=penalties)
            return self.readout(h), reg
        return self.readout(self.deq(*args)), {}


class TorchDEQLayer(torch.nn.Module):
    """The same layer with torchdeq (``--engine torchdeq``, for comparison): its Anderson
    solver forward, implicit differentiation (``ift=True``) with its fixed-point iteration
    backward, the same budgets; the statistics torchdeq reports (forward steps)."""

    def __init__(self, f, forward, forward_maxiter, forward_tol, eval_forward_maxiter, backward,
                 batch_dims):
        super().__init__()
        from torchdeq import get_deq

        self.f = f
        solver = {"iterate": "fixed_point_iter"}.get(forward["method"], forward["method"])
        self.deq = get_deq(f_solver=solver, f_max_iter=forward_maxiter, f_tol=forward_tol,
                           eval_f_max_iter=eval_forward_maxiter, ift=True,
                           b_solver="fixed_point_iter", b_max_iter=backward["maxiter"],
                           b_tol=backward["rtol"])
        self.steps = []

    def forward(self, h0, *inputs):
        lrt.reset_dropout(self.f)  # one mask per solve (torchdeq's reset_dropout)
        z_out, info = self.deq(lambda z: self.f(z, *inputs), h0)
        self.steps.append(info["nstep"].float().mean().item())
        return z_out[-1]

    def summary(self, reset=False):
        steps = self.steps
        if reset:
            self.steps = []
        return {"forward_iterations_mean": sum(steps) / len(steps) if steps else None,
                "forward_iterations_max": int(max(steps)) if steps else None,
                "backward_iterations_mean": None, "backward_iterations_max": None,
                "backward_products": 0, "forward_statuses": {}, "backward_statuses": {}}


OUTPUT = []  # every line printed, for --write-docs


def say(line=""):
    print(line, flush=True)
    OUTPUT.extend(str(line).split("\n"))


def rst_table(header, rows):
    """A reStructuredText simple table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(header), rule, *map(line, cells[1:]), rule, ""])


def load(limit, seed):
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed,
                                              stratify=y)
    if limit:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
        x_te, y_te = x_te[:limit], y_te[:limit]
    return x_tr, y_tr, x_te, y_te


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        logits, _ = model(x)
    model.train()
    return float((logits.argmax(dim=1) == y).float().mean())


def fmt(value, spec):
    """``value`` formatted by ``spec`` (a width first), or a dash of that width for None."""
    if value is None:
        return "-".rjust(int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
    return format(value, spec)


def train(args):
    x_tr, y_tr, x_te, y_te = load(args.limit, args.seed)
    forward = {"method": args.forward}
    backward = {"method": args.backward, "rtol": args.backward_tol,
                "maxiter": args.backward_maxiter}
    model = Model(args.hidden, args.dropout, forward, backward, args.forward_maxiter,
                  args.forward_tol, args.gamma, args.engine)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    penalties = {"jacobian": {"probes": 1}} if args.jac_reg > 0 else None
    say(f"digits: {len(x_tr)} train, {len(x_te)} test; hidden {args.hidden}; "
        f"jac_reg {args.jac_reg:g}")
    if args.engine == "torchdeq":
        say(f"torchdeq: f_solver {args.forward} (f_max_iter {args.forward_maxiter}, f_tol "
            f"{args.forward_tol:g}); ift=True,")
        say(f"          b_solver fixed_point_iter (b_tol {args.backward_tol:g}, b_max_iter "
            f"{args.backward_maxiter})")
    else:
        say(f"forward {args.forward} (maxiter {args.forward_maxiter}, tol {args.forward_tol:g}); "
            f"backward {args.backward} (rtol {args.backward_tol:g}, maxiter "
            f"{args.backward_maxiter})")
    say("epoch  loss    train  test   s/ep   fwd it  max   bwd it  max   prods   "
        "statuses fwd | bwd")
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(x_tr), args.batch_size):
            idx = order[i:i + args.batch_size]
            logits, reg = model(x_tr[idx], penalties)
            loss = torch.nn.functional.cross_entropy(logits, y_tr[idx])
            if reg:
                loss = loss + args.jac_reg * reg["jacobian"] / args.hidden
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        elapsed = time.perf_counter() - t0
        s = model.deq.summary(reset=True)
        train_acc = accuracy(model, x_tr, y_tr)
        test_acc = accuracy(model, x_te, y_te)
        model.deq.summary(reset=True)  # forget the evaluation calls
        fst = ",".join(f"{k}:{v}" for k, v in s["forward_statuses"].items()) or "-"
        bst = ",".join(f"{k}:{v}" for k, v in s["backward_statuses"].items()) or "-"
        say(f"{epoch:5d}  {total / len(x_tr):.4f}  {train_acc:.3f}  {test_acc:.3f}  "
            f"{elapsed:5.2f}  {fmt(s['forward_iterations_mean'], '6.1f')}  "
            f"{fmt(s['forward_iterations_max'], '4d')}  "
            f"{fmt(s['backward_iterations_mean'], '6.1f')}  "
            f"{fmt(s['backward_iterations_max'], '4d')}  {s['backward_products']:6d}  "
            f"{fst} | {bst}")
    say(f"final test accuracy {accuracy(model, x_te, y_te):.3f}")
    return model, (x_tr, y_tr, x_te, y_te)


def _double(model):
    """A float64 copy of the trained model, in evaluation mode (no dropout): the comparisons
    ask for tolerances below float32's resolution."""
    m = copy.deepcopy(model).double().eval()
    return m, m.deq.f


def compare_forward(model, x, tol, maxiter, repeats):
    """Every forward solver on the trained map, to the same tolerance, on the whole of ``x``."""
    say(f"\nforward solvers on the trained model ({len(x)} test digits, float64, tol {tol:g}):")
    say("method     status           iterations  f evals  JVPs  time/ms")
    model, cell = _double(model)
    with torch.no_grad():
        u, W = model.encoder(x.double()), model.weight()
    h0 = torch.zeros(len(x), model.hidden, dtype=torch.float64)
    rows = []
    for method in ("iterate", "anderson", "broyden", "newton"):
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                _, info = lrt.fixed_point(lambda h: cell(h, u, W), h0, forward=method,
                                          forward_maxiter=maxiter, forward_tol=tol,
                                          batch_dims=1, on_failure="ignore", return_info=True)
            t = time.perf_counter() - t0
            best = t if best is None else min(best, t)
        r = info.forward
        evals, jvps = r.info.get("f_evals", r.iterations), r.info.get("jvps", 0)
        say(f"{method:<10s} {r.status.name:<16s} {r.iterations:10d}  {evals:7d}  {jvps:4d}  "
            f"{1e3 * best:7.1f}")
        rows.append((f"``{method}``", r.status.name, r.iterations, evals, jvps,
                     f"{1e3 * best:.1f}"))
    return rst_table(["forward", "status", "iterations", "f evaluations", "JVPs", "time/ms"],
                     rows)


def compare_backward(model, x, y, repeats):
    """Gradients of the training loss on one batch by each backward method, against a tight
    GMRES solve: time of the backward pass and relative error of the gradient."""
    say(f"\nbackward methods on the trained model (one batch of {len(x)}, float64;")
    say("error relative to GMRES at rtol 1e-12):")
    say("method                          time/ms  products  grad error")
    model, cell = _double(model)
    x = x.double()
    h0 = torch.zeros(len(x), model.hidden, dtype=torch.float64)
    params = list(model.parameters())
    methods = [
        ("gmres rtol 1e-12", {"method": "gmres", "rtol": 1e-12, "maxiter": 200}),
        ("gmres rtol 1e-4", {"method": "gmres", "rtol": 1e-4, "maxiter": 50}),
        ("neumann 10 terms", {"method": "neumann", "maxiter": 10, "rtol": None, "atol": None}),
        ("fixed_point rtol 1e-4", {"method": "fixed_point", "rtol": 1e-4, "maxiter": 200}),
        ("phantom steps 5 damping 0.5", {"method": "phantom", "steps": 5, "damping": 0.5}),
        ("jfb", {"method": "jfb"}),
    ]
    reference, rows = None, []
    for name, backward in methods:
        best, grads, res = None, None, None
        for _ in range(repeats):
            u, W = model.encoder(x), model.weight()
            h, info = lrt.fixed_point(lambda h: cell(h, u, W), h0, forward="anderson",
                                      forward_maxiter=200, forward_tol=1e-12, batch_dims=1,
                                      backward=backward, return_info=True)
            loss = torch.nn.functional.cross_entropy(model.readout(h), y)
            t0 = time.perf_counter()
            grads = torch.autograd.grad(loss, params)
            t = time.perf_counter() - t0
            best = t if best is None else min(best, t)
            res = info.backward
        flat = torch.cat([g.reshape(-1) for g in grads])
        if reference is None:
            reference = flat
        err = float(torch.linalg.vector_norm(flat - reference)
                    / torch.linalg.vector_norm(reference))
        products = res.matvecs + res.rmatvecs
        say(f"{name:<30s}  {1e3 * best:7.2f}  {products:8d}  {err:.2e}")
        rows.append((name, products, f"{1e3 * best:.2f}", f"{err:.2e}"))
    return rst_table(["backward", "products", "time/ms", "gradient error"], rows)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=0.9,
                   help="bound on the spectral norm of the layer's weight (below 1: contracting)")
    p.add_argument("--forward", default="anderson",
                   choices=["iterate", "anderson", "broyden", "newton"])
    p.add_argument("--forward-maxiter", type=int, default=30)
    p.add_argument("--forward-tol", type=float, default=1e-4)
    p.add_argument("--backward", default="gmres")
    p.add_argument("--backward-tol", type=float, default=1e-4)
    p.add_argument("--backward-maxiter", type=int, default=30)
    p.add_argument("--jac-reg", type=float, default=0.0,
                   help="weight of the Jacobian regulariser ||J||_F^2 / hidden (0: off)")
    p.add_argument("--limit", type=int, default=0,
                   help="use only the first LIMIT train and test digits (0: all)")
    p.add_argument("--engine", default="linsolve_rbp", choices=["linsolve_rbp", "torchdeq"],
                   help="the equilibrium layer: lrt.DEQ, or torchdeq's (for comparison; "
                        "torchdeq is in the peers extra)")
    p.add_argument("--compare", action="store_true",
                   help="after training, compare the forward solvers and the backward methods")
    p.add_argument("--repeats", type=int, default=3,
                   help="timings of the comparisons: best of REPEATS runs")
    p.add_argument("--write-docs", metavar="DIR",
                   help="also write the output (and with --compare the two tables) as "
                        "reStructuredText includes into DIR (the docs use docs/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.compare and args.engine != "linsolve_rbp":
        p.error("--compare needs --engine linsolve_rbp")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    OUTPUT.clear()
    command = "python examples/deq_digits.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    model, (x_tr, y_tr, x_te, y_te) = train(args)
    tables = {}
    if args.compare:
        tables["forward"] = compare_forward(model, x_te, tol=1e-8, maxiter=300,
                                            repeats=args.repeats)
        tables["backward"] = compare_backward(model, x_tr[:args.batch_size],
                                              y_tr[:args.batch_size], args.repeats)
    if args.write_docs:
        tag = args.forward if args.engine == "linsolve_rbp" else args.engine
        write_docs(Path(args.write_docs), tag, command, tables)


def write_docs(folder, forward, command, tables):
    """The run's output as a literal block, and the comparison tables, as includes."""
    note = f".. Generated by ``{command}``; do not edit.\n\n"
    lines = [f"   {line}".rstrip() for line in [f"$ {command}", *OUTPUT]]
    (folder / f"deq_example_{forward}.inc").write_text(note + "::\n\n" + "\n".join(lines) + "\n")
    for name, table in tables.items():
        (folder / f"deq_{name}_table.inc").write_text(note + table)


if __name__ == "__main__":
    main()
