"""Semi-supervised node classification on citation networks with a GNN run for many
propagation steps (Section 5.2 of Liao et al., 2018).

The hidden state of every node starts as its PCA-reduced features; each propagation step sums
the neighbours' states and updates with a GRU cell, ``h <- GRU(A h, h)``; a linear layer reads
the classes out of the final state. The backward pass is BPTT, TBPTT, or an RBP-family adjoint
solve at the final state (:mod:`linsolve_rbp.experiments._backward`). A logistic regression
on the PCA features is the baseline.

PCA is computed with a full SVD of the centred feature matrix (numpy), signs fixed so that the
largest-magnitude entry of each component is positive; the paper's code uses scikit-learn's
``PCA(random_state=1234)``, whose components agree up to solver round-off and sign.

References
----------
R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018, Section 5.2,
Table 2. Z. Yang, W. Cohen, R. Salakhutdinov, "Revisiting Semi-Supervised Learning with Graph
Embeddings", ICML 2016 (the Planetoid data).
"""

from __future__ import annotations

import numpy as np

from . import _backward
from .progress import progress_bar

__all__ = ["pca", "split", "GNN", "train_gnn", "train_baseline"]

PCA_DIMS = {"cora": 64, "pubmed": 16, "citeseer": 64}


def pca(features: np.ndarray, dim: int) -> np.ndarray:
    """Project centred ``features`` on their ``dim`` leading principal directions."""
    X = np.asarray(features, dtype=np.float64)
    if not 1 <= dim <= min(X.shape):
        raise ValueError(f"dim must be between 1 and {min(X.shape)}, got {dim}")
    X = X - X.mean(axis=0, keepdims=True)
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    V = Vt[:dim].T
    signs = np.sign(V[np.abs(V).argmax(axis=0), np.arange(dim)])
    return (X @ (V * signs)).astype(np.float32)


def split(n: int, seed: int, fractions=(0.01, 0.49)):
    """Random train / validation / test node indices (1% / 49% / rest by default)."""
    rng = np.random.RandomState(seed)
    perm = rng.permutation(n)
    n_tr = max(1, int(fractions[0] * n))  # at least one labelled node to train on
    n_va = int(fractions[1] * n)
    return perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]


class GNN:
    """GRU-update graph network: ``h <- GRUCell(A h, h)``, linear read-out."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        self.cell = torch.nn.GRUCell(dim, dim)
        self.out = torch.nn.Linear(dim, num_classes)

    def step_params(self):
        return tuple(self.cell.parameters())

    def out_params(self):
        return tuple(self.out.parameters())

    def step_fn(self, adj):
        import torch

        cell = self.cell
        names = [n for n, _ in cell.named_parameters()]

        src, dst = adj

        def step(h, *ps):
            # Sum aggregation as an index_add, which (unlike sparse matmul) has forward-mode AD.
            m = torch.zeros_like(h).index_add(0, dst, h[src])
            return torch.func.functional_call(cell, dict(zip(names, ps)), (m, h))

        return step

    def logits(self, h, *ps):
        import torch

        names = [n for n, _ in self.out.named_parameters()]
        return torch.func.functional_call(self.out, dict(zip(names, ps or self.out_params())), (h,))


def _adjacency(edges, n):
    import torch

    e = torch.as_tensor(np.asarray(edges, dtype=np.int64).reshape(-1, 2))
    if e.numel() and (int(e.min()) < 0 or int(e.max()) >= n):
        raise ValueError(f"graph['edges'] must index nodes 0..{n - 1}")
    return e[:, 0].contiguous(), e[:, 1].contiguous()


def _accuracy(logits, labels, idx):
    return float((logits[idx].argmax(1) == labels[idx]).float().mean())


def train_gnn(method: str, graph: dict, *, seed: int = 0, epochs: int = 2000, steps: int = 100,
              truncate: int = 5, dim: int | None = None, lr: float = 1e-3, momentum: float = 0.9,
              weight_decay: float = 5e-4, eval_every: int = 20, features=None,
              progress: bool = False) -> dict:
    """Train the GNN with one backward ``method`` on one random split.

    Parameters
    ----------
    method : str
        ``"bptt"``, ``"tbptt"``, ``"rbp"``, or a :func:`linsolve_rbp.solve` method.
    graph : dict
        From :func:`~linsolve_rbp.problems.data.load_planetoid`.
    seed : int
        Seed of the split and of the initial weights.
    epochs, steps, truncate : int
        Full-batch epochs, propagation steps, and TBPTT steps / solver iterations.
    dim : int, optional
        PCA dimension (64 for Cora, 16 for Pubmed by default).
    lr, momentum, weight_decay : float
        SGD settings (the paper's 1e-3, 0.9, 5e-4).
    eval_every : int
        Validation period in epochs.
    features : numpy.ndarray, optional
        Precomputed PCA features.
    progress : bool

    Returns
    -------
    dict
        ``test_acc`` (at the best validation accuracy), ``best_val_acc``, ``train_loss`` (per
        epoch), ``val_acc`` (per evaluation), ``solver_failures``.

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.experiments import citation
    >>> rng = np.random.RandomState(0)
    >>> g = {"features": rng.rand(60, 8).astype("float32"), "labels": rng.randint(0, 3, 60),
    ...      "edges": np.array([[i, (i + 1) % 60] for i in range(60)] + [[(i + 1) % 60, i] for i in range(60)]),
    ...      "num_classes": 3, "name": "toy"}
    >>> out = citation.train_gnn("neumann", g, epochs=2, steps=3, truncate=2, dim=4)
    >>> 0.0 <= out["test_acc"] <= 1.0
    True
    """
    import torch

    _backward.resolve(method)
    n = graph["features"].shape[0]
    dim = dim or PCA_DIMS.get(graph.get("name"), 64)
    feats = pca(graph["features"], dim) if features is None else features
    h0 = torch.as_tensor(feats)
    labels = torch.as_tensor(graph["labels"], dtype=torch.int64)
    tr, va, te = (torch.as_tensor(i) for i in split(n, seed))
    adj = _adjacency(graph["edges"], n)
    model = GNN(dim, graph["num_classes"], seed)
    params = model.step_params() + model.out_params()
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    step = model.step_fn(adj)
    gen = torch.Generator().manual_seed(int(seed))

    def loss_fn(h, *out_ps):
        return torch.nn.functional.cross_entropy(model.logits(h[tr], *out_ps), labels[tr])

    out = {"method": method, "seed": seed, "truncate": truncate, "train_loss": [], "val_acc": [],
           "solver_failures": 0, "best_val_acc": -1.0, "test_acc": float("nan")}
    for epoch in progress_bar(range(epochs), enabled=progress, desc=f"gnn {method}"):
        ops = model.out_params()
        loss, grads, h_T, res = _backward.backward(
            method, step, h0, model.step_params(), lambda h: loss_fn(h, *ops), steps, truncate,
            generator=gen, loss_params=ops)
        if res is not None and not res.success:
            out["solver_failures"] += 1
        out["train_loss"].append(float(loss))
        opt.zero_grad()
        for p, g in zip(params, grads):
            p.grad = g.detach()
        opt.step()
        if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
            with torch.no_grad():
                h = h0
                for _ in range(steps):
                    h = step(h, *model.step_params())
                logits = model.logits(h)
            v = _accuracy(logits, labels, va)
            out["val_acc"].append(v)
            if v > out["best_val_acc"]:
                out["best_val_acc"] = v
                out["test_acc"] = _accuracy(logits, labels, te)
    return out


def train_baseline(graph: dict, *, seed: int = 0, dim: int | None = None, weight_decay: float = 5e-4,
                   features=None, max_iter: int = 200) -> dict:
    """Logistic regression on the PCA features of the training nodes (L-BFGS, L2 penalty).

    Returns
    -------
    dict
        ``test_acc``, ``val_acc``.
    """
    import torch

    n = graph["features"].shape[0]
    dim = dim or PCA_DIMS.get(graph.get("name"), 64)
    feats = torch.as_tensor(pca(graph["features"], dim) if features is None else features)
    labels = torch.as_tensor(graph["labels"], dtype=torch.int64)
    tr, va, te = (torch.as_tensor(i) for i in split(n, seed))
    torch.manual_seed(seed)
    lin = torch.nn.Linear(dim, graph["num_classes"])
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(feats[tr]), labels[tr])
        loss = loss + 0.5 * weight_decay * sum((p ** 2).sum() for p in lin.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = lin(feats)
    return {"method": "baseline", "seed": seed, "test_acc": _accuracy(logits, labels, te),
            "val_acc": _accuracy(logits, labels, va)}
