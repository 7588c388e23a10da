"""``linsolve-rbp reproduce hopfield|citation|hyperopt``: run the paper's experiments
(:mod:`linsolve_rbp.experiments`), write JSON results and PNG figures.

The experiments need PyTorch (``pip install linsolve_rbp[torch,cli]``); without it the
command says so and exits with code 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import backend as _b
from ..problems import corrupt, load_digits
from ..problems import data as _data
from ..problems.hopfield import N_PIXELS
from .report import new_figure

__all__ = ["DEFAULT_METHODS", "register", "run"]

DEFAULT_METHODS = {
    "hopfield": "bptt,tbptt,rbp,cgne,neumann,gmres,lsqr",
    "citation": "baseline,bptt,tbptt,rbp,cgne,neumann,gmres,lsqr",
    "hyperopt": "bptt,tbptt,rbp,neumann",
}


def _ints(text):
    return [int(t) for t in str(text).split(",") if t.strip()]


def register(subparsers):
    """Add ``reproduce`` to ``subparsers``; its ``func`` takes the Namespace and returns an
    exit code."""
    p = subparsers.add_parser(
        "reproduce", help="run an experiment of Liao et al. (ICML 2018)",
        description="Reproduce an experiment of Liao et al., 'Reviving and Improving Recurrent "
                    "Back-Propagation' (ICML 2018): results as JSON, figures as PNG.")
    p.add_argument("experiment", choices=["hopfield", "citation", "hyperopt"])
    p.add_argument("--data-dir", default=None, help="folder with the data files (else the cache, "
                   "~/.cache/linsolve_rbp, downloading when missing)")
    p.add_argument("--no-download", action="store_true", help="never download missing files")
    p.add_argument("--out", default="reproduction", help="output folder (default: ./reproduction)")
    p.add_argument("--methods", default=None, help="comma-separated backward methods")
    p.add_argument("--truncations", default=None, help="comma-separated truncations K")
    p.add_argument("--trials", type=int, default=None, help="Hopfield trials per setting (paper: 100)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (paper: 1000 Hopfield, 2000 GNN)")
    p.add_argument("--seeds", type=int, default=None, help="GNN random splits (paper: 10)")
    p.add_argument("--dataset", default="cora", choices=["cora", "pubmed", "citeseer"])
    p.add_argument("--meta-iters", type=int, default=None, help="hyperopt meta-iterations (paper: 100)")
    p.add_argument("--steps", type=int, default=None, help="hyperopt inner steps T (paper: 100)")
    p.add_argument("--cost-steps", type=int, default=None,
                   help="inner steps of the hyperopt cost table (paper: 1000); 0 skips it")
    p.add_argument("--cost-truncations", default="10,50,100",
                   help="Neumann-RBP truncations of the hyperopt cost table")
    p.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke test")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.set_defaults(func=run)
    return p


def _save(obj, path):
    path.write_text(json.dumps(obj, indent=1, default=float))


def run(args) -> int:
    """Run the experiment named in ``args``; return an exit code."""
    try:
        _b.import_optional("torch", "linsolve-rbp reproduce")
        _b.import_optional("matplotlib", "linsolve-rbp reproduce (its figures)")
        if args.progress:
            _b.import_optional("tqdm", "linsolve-rbp reproduce --progress")
    except ImportError as exc:
        print(f"error: {exc}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = (args.methods or DEFAULT_METHODS[args.experiment]).split(",")
    try:
        fn = {"hopfield": _hopfield, "citation": _citation, "hyperopt": _hyperopt}[args.experiment]
        fn(args, methods, out)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    return 0


def _hopfield(args, methods, out):
    from ..experiments import hopfield

    imgs = load_digits()[0]
    trials = args.trials or (1 if args.quick else 100)
    epochs = args.epochs or (1 if args.quick else 1000)
    Ks = _ints(args.truncations or "10,20,30")
    cfg = hopfield.HopfieldConfig(hidden=32 if args.quick else 1024, steps=10 if args.quick else 50)
    t0 = time.time()
    runs, table, examples = [], {}, {}
    for m in methods:
        for K in ([Ks[0]] if m == "bptt" else Ks):
            ok = 0
            for trial in range(trials):
                r = hopfield.train(m, imgs, truncate=K, epochs=epochs, seed=1234 + trial, cfg=cfg,
                                   progress=args.progress, keep_weights=(trial == 0))
                W = r.pop("W", None)
                if W is not None and m not in examples:
                    examples[m] = W
                ok += r["success"]
                runs.append(r)
                print(f"hopfield {m} K={K} trial {trial}: loss {r['train_loss'][0]:.4f} -> "
                      f"{r['train_loss'][-1]:.4f} success={r['success']}", flush=True)
            table[f"{m}/K={K}"] = 100.0 * ok / trials
    res = {"experiment": "hopfield", "config": cfg.as_dict(), "trials": trials, "epochs": epochs,
           "truncations": Ks, "success_rate_percent": table, "runs": runs, "time_s": time.time() - t0}
    _save(res, out / "hopfield.json")
    fig, ax = new_figure(1, 2, figsize=(10, 4))
    for m in methods:
        r = next((r for r in runs if r["method"] == m and r["seed"] == 1234), None)
        if r is None:
            continue
        ax[0].plot(r["train_loss"], label=f"{m} K={r['truncate']}")
        ax[1].plot(r["val_loss"], label=f"{m} K={r['truncate']}")
    for a, t in zip(ax, ["training loss", "validation loss"]):
        a.set_xlabel("epoch")
        a.set_ylabel("L1 loss")
        a.set_title(t)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "hopfield_curves.png", dpi=90)
    import torch

    xin = torch.as_tensor(corrupt(imgs, cfg.corrupt_fraction), dtype=torch.float32)
    rows = [("input", xin.numpy()), ("target", imgs.astype(np.float32))]
    for m, W in examples.items():
        h = hopfield.run(W, xin, cfg)[..., -N_PIXELS:]
        rows.append((m, (h > 0.5).float().numpy()))
    fig, ax = new_figure(len(rows), imgs.shape[0], figsize=(imgs.shape[0], len(rows)))
    for i, (name, ims) in enumerate(rows):
        for j in range(imgs.shape[0]):
            ax[i, j].imshow(ims[j].reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
        ax[i, 0].set_ylabel(name, fontsize=7)
    fig.savefig(out / "hopfield_retrieval.png", dpi=80)
    print(json.dumps(table, indent=1))


def _citation(args, methods, out):
    from ..experiments import citation

    graph = _data.load_planetoid(args.dataset, args.data_dir, download=not args.no_download,
                                missing_allx="restrict")
    seeds = args.seeds or (1 if args.quick else 10)
    epochs = args.epochs or (2 if args.quick else 2000)
    K = _ints(args.truncations or "5")[0]
    steps = 5 if args.quick else 100
    dim = citation.PCA_DIMS.get(args.dataset, 64)
    feats = citation.pca(graph["features"], dim)
    t0 = time.time()
    runs, table = [], {}
    for m in methods:
        accs = []
        for s in range(seeds):
            if m == "baseline":
                r = citation.train_baseline(graph, seed=s, features=feats)
            else:
                r = citation.train_gnn(m, graph, seed=s, epochs=epochs, steps=steps, truncate=K,
                                       features=feats, progress=args.progress)
            accs.append(100.0 * r["test_acc"])
            runs.append(r)
            print(f"citation {args.dataset} {m} seed {s}: test acc {accs[-1]:.2f}", flush=True)
        table[m] = {"mean": float(np.nanmean(accs)), "std": float(np.nanstd(accs)), "runs": accs}
    res = {"experiment": "citation", "dataset": args.dataset, "restricted": graph["restricted"],
           "nodes": int(graph["features"].shape[0]), "seeds": seeds, "epochs": epochs, "steps": steps,
           "truncate": K, "pca_dim": dim, "test_accuracy_percent": table, "runs": runs,
           "time_s": time.time() - t0}
    _save(res, out / f"citation_{args.dataset}.json")
    print(json.dumps({m: f"{v['mean']:.2f} +- {v['std']:.2f}" for m, v in table.items()}, indent=1))


def _hyperopt(args, methods, out):
    import torch

    from ..experiments import hyperopt

    if args.quick:
        X, y = hyperopt.random_data(n=400)
        source = "random"
    else:
        Xn, yn, source = _data.load_hyperopt_data(args.data_dir, download=not args.no_download)
        X, y = torch.as_tensor(Xn), torch.as_tensor(yn)
    iters = args.meta_iters or (2 if args.quick else 100)
    steps = args.steps or (5 if args.quick else 100)
    K = _ints(args.truncations or "50")[0]
    K = min(K, steps)
    t0 = time.time()
    curves = {}
    for m in methods:
        r = hyperopt.meta_train(m, (X, y), meta_iters=iters, decay_at=max(1, iters // 2), steps=steps,
                                truncate=K, progress=args.progress)
        curves[m] = r
        print(f"hyperopt {m}: meta-loss {r['meta_loss'][0]:.4f} -> {r['meta_loss'][-1]:.4f}", flush=True)
    res = {"experiment": "hyperopt", "data": source, "n": int(X.shape[0]), "meta_iters": iters,
           "steps": steps, "truncate": K, "curves": curves, "time_s": time.time() - t0}
    cost_steps = args.cost_steps if args.cost_steps is not None else (5 if args.quick else 1000)
    if cost_steps:
        Ks = _ints(args.cost_truncations)
        res["cost"] = hyperopt.cost_table((X, y), steps=cost_steps, truncations=Ks)
        print(json.dumps(res["cost"]["ratios"], indent=1))
    _save(res, out / "hyperopt.json")
    fig, ax = new_figure(figsize=(5, 4))
    for m, r in curves.items():
        ax.plot(r["meta_loss"], label=m)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("meta-objective (training loss)")
    ax.set_title(f"hyperparameter optimisation, T={steps}, K={K}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hyperopt_meta.png", dpi=90)
