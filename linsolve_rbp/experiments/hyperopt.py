"""Hyperparameter optimisation through a long training run (Section 5.3 of Liao et al., 2018).

The inner problem trains an MLP 784-50-50-50-10 (tanh, 44,860 parameters) with SGD with
momentum in the style of Maclaurin et al. (2015)::

    v_{t+1} = beta_i v_t - (1 - beta_i) grad L_batch(w_t)
    w_{t+1} = w_t + alpha_i v_{t+1}

with one learning rate ``alpha_i = exp(lr_i)`` and one momentum ``beta_i = sigmoid(m_i)`` per
weight matrix and bias vector (16 hyperparameters). The meta-objective is the training loss of
the final weights ``w_T`` on the whole training set; its gradient with respect to the 16
hyperparameters is the meta-gradient.

* BPTT differentiates through all ``T`` steps (memory grows with ``T``).
* TBPTT differentiates through the last ``K`` steps only.
* The RBP family treats the state ``h = (w, v)`` (n = 89,720) as if at a fixed point of the last
  step ``h_T = F(h_{T-1})``, which runs on the full training set, keeps only that step's graph,
  and solves ``(I - J^T) z = dL/dh_T`` with ``J = dh_T / dh_{T-1}`` by any method of
  :func:`linsolve_rbp.solve` (``neumann`` is Neumann-RBP; ``rbp`` is the paper's original RBP,
  fixed-point iteration from a uniform ``[0, 1]`` start), then returns ``z^T dF/dtheta``.

References
----------
R. Liao, Y. Xiong, E. Fetaya, L. Zhang, K. Yoon, X. Pitkow, R. Urtasun, R. Zemel, "Reviving and
Improving Recurrent Back-Propagation", ICML 2018, Section 5.3 and Table 3.

D. Maclaurin, D. Duvenaud, R. P. Adams, "Gradient-based Hyperparameter Optimization through
Reversible Learning", ICML 2015.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

from .._validate import positive_int
from . import _backward
from .fresh import MEMORY_ENV, run_fresh
from .progress import progress_bar

__all__ = [
    "LAYER_SIZES",
    "N_HPARAMS",
    "UNROLLED_METHODS",
    "param_shapes",
    "n_params",
    "init_params",
    "init_hparams",
    "random_data",
    "mlp_loss",
    "inner_step",
    "hypergradient",
    "meta_train",
    "cost_data",
    "cost_meta_gradient",
    "cost_table",
]

LAYER_SIZES = (784, 50, 50, 50, 10)
#: Two per weight matrix and bias vector: 8 log learning rates, then 8 momentum logits.
N_HPARAMS = 16
#: Methods that differentiate through the unrolled steps rather than solve a linear system.
UNROLLED_METHODS = _backward.UNROLLED


def _torch():
    import torch

    return torch


def param_shapes(layer_sizes=LAYER_SIZES) -> list[tuple[int, ...]]:
    """Shapes of the weight matrices and bias vectors, in the order ``W1, b1, W2, b2, ...``."""
    shapes = []
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return shapes


def n_params(layer_sizes=LAYER_SIZES) -> int:
    """Number of MLP parameters (44,860 for the paper's 784-50-50-50-10)."""
    return sum(math.prod(s) for s in param_shapes(layer_sizes))


def init_params(seed: int = 0, layer_sizes=LAYER_SIZES, scale: float = math.exp(-3.0),
                dtype=None):
    """Initial flat parameter vector, ``N(0, 1) * scale`` (the paper's ``e^-3``)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(int(seed))
    dtype = dtype or torch.float32
    return torch.randn(n_params(layer_sizes), generator=gen, dtype=dtype) * scale


def init_hparams(lr: float = -1.0, momentum: float = 0.0, n_groups: int = 8, dtype=None):
    """Initial hyperparameters: ``n_groups`` log learning rates then ``n_groups`` momentum
    logits (the paper's ``lr = -1``, ``momentum = 0``)."""
    torch = _torch()
    dtype = dtype or torch.float32
    return torch.cat([torch.full((n_groups,), float(lr), dtype=dtype),
                      torch.full((n_groups,), float(momentum), dtype=dtype)])


def random_data(n: int = 10_000, seed: int = 0, dim: int = 784, classes: int = 10, dtype=None):
    """Random inputs and labels of MNIST's shapes, for tests and timing without the data."""
    torch = _torch()
    gen = torch.Generator().manual_seed(int(seed))
    X = torch.rand(n, dim, generator=gen, dtype=dtype or torch.float32)
    X = X - X.mean(dim=0, keepdim=True)
    y = torch.randint(0, classes, (n,), generator=gen)
    return X, y


def _unflatten(w, shapes):
    out, i = [], 0
    for s in shapes:
        k = math.prod(s)
        out.append(w[i:i + k].view(s))
        i += k
    return out


def mlp_loss(w, X, y, layer_sizes=LAYER_SIZES):
    """Mean cross-entropy of the tanh MLP with flat parameters ``w`` on ``(X, y)``."""
    torch = _torch()
    ps = _unflatten(w, param_shapes(layer_sizes))
    a = X
    for i in range(0, len(ps), 2):
        a = a @ ps[i] + ps[i + 1]
        if i + 2 < len(ps):
            a = torch.tanh(a)
    return torch.nn.functional.cross_entropy(a, y)


def _group_sizes(layer_sizes):
    return [math.prod(s) for s in param_shapes(layer_sizes)]


def inner_step(h, hparams, X, y, *, layer_sizes=LAYER_SIZES, weight_decay: float = math.exp(-100.0)):
    """One step of SGD with momentum on the state ``h = (w, v)``; differentiable in ``h`` and
    ``hparams`` (pure function, composable with ``torch.func``)."""
    torch = _torch()
    sizes = _group_sizes(layer_sizes)
    P = sum(sizes)
    G = len(sizes)
    counts = torch.tensor(sizes, device=h.device)
    alpha = torch.repeat_interleave(torch.exp(hparams[:G]), counts)
    beta = torch.repeat_interleave(torch.sigmoid(hparams[G:2 * G]), counts)
    w, v = h[:P], h[P:]
    g = torch.func.grad(mlp_loss)(w, X, y, layer_sizes) + weight_decay * w
    v_new = beta * v - (1.0 - beta) * g
    w_new = w + alpha * v_new
    return torch.cat([w_new, v_new])


def _batches(N, batch_size, steps, seed, device):
    """Indices of the mini-batch of each step: epochs of a seeded permutation, the same
    sequence for every meta-iteration (as in Maclaurin et al.)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(int(seed))
    per_epoch = max(1, N // batch_size)
    out = []
    perm = None
    for t in range(steps):
        j = t % per_epoch
        if j == 0:
            perm = torch.randperm(N, generator=gen)
        out.append(perm[j * batch_size:(j + 1) * batch_size].to(device))
    return out


def _check_data(data):
    torch = _torch()
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError("data must be a pair (X, y) of torch tensors")
    X, y = data
    if not (isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError("data must be a pair (X, y) of torch tensors")
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"data must be X of shape (N, d) and y of shape (N,); got {tuple(X.shape)} "
                         f"and {tuple(y.shape)}")
    return X, y


def hypergradient(method: str, hparams, data, *, steps: int = 100, truncate: int | None = 50,
                  batch_size: int = 200, params0=None, seed: int = 0,
                  layer_sizes=LAYER_SIZES, weight_decay: float = math.exp(-100.0),
                  full_batch_last: bool | None = None, rtol: float | None = None,
                  atol: float | None = None, solver_options: dict | None = None,
                  generator=None) -> tuple[float, Any, dict]:
    """Meta-loss and meta-gradient of the training loss after ``steps`` SGD steps.

    Parameters
    ----------
    method : str
        ``"bptt"`` (through all steps), ``"tbptt"`` (through the last ``truncate`` steps),
        ``"rbp"`` (the paper's Algorithm 1: fixed-point iteration from ``z_0 ~ U[0, 1]``), or
        any method of :func:`linsolve_rbp.methods` used on the adjoint system of the last step
        (``"neumann"`` is Neumann-RBP, ``"cgne"`` CG-RBP; ``"neumann_rbp"`` and ``"cg_rbp"``
        are accepted aliases).
    hparams : torch.Tensor, shape (16,)
        Log learning rates then momentum logits, one per weight matrix / bias vector
        (see :func:`init_hparams`).
    data : (X, y)
        Training inputs ``(N, 784)`` and integer labels ``(N,)``; the meta-objective is the
        loss on all of them.
    steps : int
        Inner SGD steps ``T``.
    truncate : int or None
        ``K``: steps back-propagated by TBPTT, or iterations (products) of the linear solver
        for the RBP family. Ignored by BPTT.
    batch_size : int
        Inner mini-batch size (200 in the paper).
    params0 : torch.Tensor, optional
        Initial flat weights; default :func:`init_params` with ``seed``.
    seed : int
        Seed of the initial weights (when ``params0`` is None), of the mini-batch order and of
        RBP's random start.
    layer_sizes : tuple of int
        MLP layer widths.
    weight_decay : float
        L2 coefficient of the inner loss (``e^-100`` as in the paper).
    full_batch_last : bool, optional
        Run the last step on the full training set. Default: True for the RBP family (as in
        the paper), False for BPTT/TBPTT.
    rtol, atol : float or None
        Tolerances of the linear solve; both None (default) runs exactly ``truncate``
        iterations, as in the paper.
    solver_options : dict, optional
        Further keyword arguments of :func:`linsolve_rbp.solve` (e.g. ``{"restart": 20}``).
    generator : torch.Generator, optional
        Source of RBP's random start (default: seeded with ``seed``).

    Returns
    -------
    meta_loss : float
        Training loss of ``w_T`` on all of ``data``.
    grads : torch.Tensor, shape (16,)
        The meta-gradient (detached).
    info : dict
        ``method``, ``solver`` (the linear-solve method or None), ``graph_steps`` (inner steps
        whose graph was kept), ``result`` (the :class:`~linsolve_rbp.SolveResult` or None),
        ``status``, ``iterations``, ``residual_norm``, ``time_s``.

    Raises
    ------
    ValueError
        Unknown ``method``; ``steps`` or ``truncate`` not positive.
    TypeError
        ``data`` is not a pair of tensors.

    Notes
    -----
    Memory: BPTT keeps the graph of all ``T`` steps, TBPTT of ``K``; the RBP family keeps only
    the last step's (its vector-Jacobian products reuse one ``torch.func.vjp`` closure; methods
    that also need ``J v``, such as ``cgne`` and ``lsqr``, compute it with ``torch.func.jvp``).

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.experiments import hyperopt as ho
    >>> data = ho.random_data(n=400, seed=0)
    >>> loss, g, info = ho.hypergradient("neumann", ho.init_hparams(), data, steps=5,
    ...                                  truncate=3)
    >>> g.shape, info["status"]
    (torch.Size([16]), 'COMPLETED')
    """
    torch = _torch()
    import linsolve_rbp as lr

    solver = _backward.resolve(method)
    X, y = _check_data(data)
    steps = positive_int(steps, "steps")
    if method != "bptt":
        truncate = positive_int(truncate, "truncate")
    G = len(param_shapes(layer_sizes))
    hp = hparams.detach().clone()
    if hp.shape != (2 * G,):
        raise ValueError(f"hparams must have shape ({2 * G},), got {tuple(hp.shape)}")
    if full_batch_last is None:
        full_batch_last = solver is not None
    if params0 is None:
        params0 = init_params(seed, layer_sizes, dtype=X.dtype).to(X.device)
    P = n_params(layer_sizes)
    if params0.shape != (P,):
        raise ValueError(f"params0 must have shape ({P},), got {tuple(params0.shape)}")
    hp = hp.to(dtype=X.dtype, device=X.device)
    h = torch.cat([params0.detach().to(X.dtype), torch.zeros_like(params0, dtype=X.dtype)])
    batches = _batches(X.shape[0], batch_size, steps, seed, X.device)

    def step(h_, hp_, t):
        if t == steps - 1 and full_batch_last:
            Xb, yb = X, y
        else:
            Xb, yb = X[batches[t]], y[batches[t]]
        return inner_step(h_, hp_, Xb, yb, layer_sizes=layer_sizes, weight_decay=weight_decay)

    t0 = time.perf_counter()
    info: dict = {"method": method, "solver": solver, "result": None, "status": None,
                  "iterations": None, "residual_norm": None}
    if solver is None:
        keep = steps if method == "bptt" else min(truncate, steps)
        with torch.no_grad():
            for t in range(steps - keep):
                h = step(h, hp, t)
        h = h.detach()
        hp_var = hp.clone().requires_grad_(True)
        for t in range(steps - keep, steps):
            h = step(h, hp_var, t)
        meta = mlp_loss(h[:P], X, y, layer_sizes)
        (grads,) = torch.autograd.grad(meta, hp_var)
        info["graph_steps"] = keep
    else:
        with torch.no_grad():
            for t in range(steps - 1):
                h = step(h, hp, t)
        h_prev = h.detach()
        h_T, vjp_fn = torch.func.vjp(lambda h_, hp_: step(h_, hp_, steps - 1), h_prev, hp)
        w_T = h_T[:P].detach().requires_grad_(True)
        meta = mlp_loss(w_T, X, y, layer_sizes)
        (g_w,) = torch.autograd.grad(meta, w_T)
        b = torch.cat([g_w, torch.zeros_like(g_w)])
        n = b.shape[0]

        def jvp(v):
            return torch.func.jvp(lambda h_: step(h_, hp, steps - 1), (h_prev,), (v,))[1]

        A = lr.LinearOperator((n, n), matvec=lambda u: u - vjp_fn(u)[0],
                              rmatvec=lambda v: v - jvp(v), like=b)
        x0 = None
        kwargs = dict(solver_options or {})
        if method == "rbp":
            gen = generator or torch.Generator().manual_seed(int(seed))
            x0 = torch.rand(n, generator=gen, dtype=b.dtype).to(b.device)
            # Algorithm 1 runs its K steps whatever happens; report, do not stop early.
            kwargs.setdefault("divtol", None)
        res = lr.solve(A, b, method=solver, x0=x0, rtol=rtol, atol=atol, maxiter=truncate, **kwargs)
        grads = vjp_fn(res.x)[1]
        info.update(result=res, status=res.status.name, iterations=res.iterations,
                    residual_norm=float(res.residual_norm), graph_steps=1)
    info["time_s"] = time.perf_counter() - t0
    return float(meta.detach()), grads.detach(), info


def meta_train(method: str, data, *, meta_iters: int = 100, meta_lr: float = 0.05,
               decay_at: int = 50, steps: int = 100, truncate: int | None = 50,
               hparams0=None, seed: int = 0, progress: bool = False, **kwargs) -> dict:
    """Optimise the 16 hyperparameters with Adam on the meta-gradient of :func:`hypergradient`.

    Adam with learning rate ``meta_lr``, multiplied by 0.1 at meta-iteration ``decay_at``, as
    in the paper's code. The initial weights and the mini-batch order stay fixed across
    meta-iterations (``seed``).

    Parameters
    ----------
    method, data, steps, truncate, seed, **kwargs
        As for :func:`hypergradient`.
    meta_iters : int
        Meta-iterations (100 in the paper).
    meta_lr : float
        Adam learning rate (0.05).
    decay_at : int
        Meta-iteration at which the learning rate drops tenfold (50).
    hparams0 : torch.Tensor, optional
        Initial hyperparameters (default :func:`init_hparams`).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``meta_loss`` (list, one per meta-iteration, before its update), ``hparams`` (final, as
        a list), ``time_s`` (list), ``status`` (list of solver statuses or None).

    Examples
    --------
    >>> from linsolve_rbp.experiments import hyperopt as ho
    >>> out = ho.meta_train("neumann", ho.random_data(n=400), meta_iters=2, steps=3, truncate=2)
    >>> len(out["meta_loss"])
    2
    """
    torch = _torch()

    X, _ = _check_data(data)
    hp = (init_hparams(dtype=X.dtype) if hparams0 is None else hparams0.detach().clone()).to(X.device)
    hp.requires_grad_(True)
    opt = torch.optim.Adam([hp], lr=meta_lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[decay_at], gamma=0.1)
    params0 = init_params(seed, kwargs.get("layer_sizes", LAYER_SIZES), dtype=X.dtype).to(X.device)
    out = {"method": method, "meta_loss": [], "time_s": [], "status": []}
    for _ in progress_bar(range(meta_iters), enabled=progress, desc=f"hyperopt {method}"):
        loss, g, info = hypergradient(method, hp, data, steps=steps, truncate=truncate,
                                      params0=params0, seed=seed, **kwargs)
        out["meta_loss"].append(loss)
        out["time_s"].append(info["time_s"])
        out["status"].append(info["status"])
        opt.zero_grad()
        hp.grad = g
        opt.step()
        sched.step()
    out["hparams"] = hp.detach().cpu().tolist()
    return out


def cost_data(n: int, seed: int = 0, threads: int = 1, warm_up: str | None = None):
    """What one cost measurement needs, made in the measuring process before it measures:
    torch on ``threads`` threads, random data of ``n`` examples (:func:`random_data`) and the
    initial hyperparameters.

    ``warm_up`` names a method to run once on a 400-example slice first, so that one-off
    kernel set-up is not charged to the measurement. (A warm-up on the full data would
    already reach the full-batch last step's peak and hide it from the memory figure.)

    Returns
    -------
    (data, hparams)
    """
    torch = _torch()
    torch.set_num_threads(int(threads))
    data = random_data(n=n, seed=seed)
    hp = init_hparams()
    if warm_up is not None:
        small = (data[0][:400, ...], data[1][:400])
        hypergradient(warm_up, hp, small, steps=2, truncate=1, batch_size=200)
    return data, hp


def cost_meta_gradient(prepared, method: str, **kwargs) -> dict:
    """One meta-gradient by :func:`hypergradient` on ``prepared = cost_data(...)``.

    Neumann-RBP runs exactly its ``truncate`` terms (no divergence stop), as in the paper.

    Returns
    -------
    dict
        ``iterations``, ``graph_steps`` and ``status`` of the call (a small, picklable
        summary: :func:`linsolve_rbp.experiments.fresh.run_fresh` sends it back).
    """
    data, hp = prepared
    if method == "neumann":
        kwargs.setdefault("solver_options", {"divtol": None})
    _, _, info = hypergradient(method, hp, data, **kwargs)
    return {"iterations": info["iterations"], "graph_steps": info["graph_steps"], "status": info["status"]}


def cost_table(data, *, steps: int = 1000, truncations=(10, 50, 100), seed: int = 0) -> dict:
    """Time and extra peak memory of one BPTT and one Neumann-RBP meta-gradient (Table 3).

    Each measurement runs in a fresh process (:func:`linsolve_rbp.experiments.fresh.run_fresh`)
    on random data of ``data``'s size (CPU, one thread), after the data are made and kernels
    warmed up on a 400-example slice. Time comes from one process; memory from a second one
    started with :data:`~linsolve_rbp.experiments.fresh.MEMORY_ENV` (glibc's mmap threshold
    fixed at 128 KiB), so that freed large blocks go back to the system and the peak resident
    set follows the live tensors: memory is the growth of that peak during the call. It counts
    the graph kept for back-propagation and, for Neumann-RBP, the full-batch last step.

    Returns
    -------
    dict
        ``bptt`` (``time_s``, ``memory_mb``), ``neumann`` (per truncation) and ``ratios``
        (BPTT / Neumann-RBP, per truncation). ``memory_mb`` is in MiB.
    """
    n = int(data[0].shape[0])

    def measure(method, K):
        setup = partial(cost_data, n, seed, 1, method)
        kw = dict(steps=steps, truncate=K, seed=seed)
        t = run_fresh(cost_meta_gradient, method, setup=setup, **kw).seconds
        m = run_fresh(cost_meta_gradient, method, setup=setup, env=MEMORY_ENV, **kw).peak_bytes
        return {"time_s": t, "memory_mb": m / 2**20}

    out = {"steps": steps, "n": n, "bptt": measure("bptt", None), "neumann": {}, "ratios": {}}
    for K in truncations:
        r = out["neumann"][str(K)] = measure("neumann", K)
        # A growth under 1 MB is within the noise of the resident set: no meaningful ratio.
        out["ratios"][str(K)] = {"time": out["bptt"]["time_s"] / r["time_s"],
                                 "memory": (out["bptt"]["memory_mb"] / r["memory_mb"]
                                            if r["memory_mb"] >= 1.0 else None)}
    return out
