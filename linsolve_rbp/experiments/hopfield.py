"""Associative memory with a continuous Hopfield network (Section 5.1 of Liao et al., 2018).

State ``h`` of ``784 + hidden + 784`` units (observed, hidden, output), updated ``steps`` times
by ``h <- (1 - a) h + W sigmoid(b h)`` with the observed units clamped to the input image. The
loss is the mean absolute difference between the output units and the image. ``W`` starts as
``randn * 1e-3`` made symmetric with a zero diagonal and is trained with Adam; the backward pass
is BPTT, TBPTT or an RBP-family adjoint solve at the final state (see
:mod:`linsolve_rbp.experiments._backward`).

Table 1 of the paper reports the success rate over trials, a trial succeeding when its final
training loss is below half of the initial one. The digits, their corruption and the unit
layout are :mod:`linsolve_rbp.problems.hopfield`'s (shared with ``linsolve-rbp compare``,
which solves the adjoint system of closed-form weights instead of training them).

References
----------
R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018, Section 5.1,
Table 1, Figures 1-2. J. J. Hopfield, "Neurons with graded response have collective
computational properties like those of two-state neurons", PNAS 81, 1984.
"""

from __future__ import annotations

import numpy as np

from .._validate import positive_int
from ..problems.hopfield import N_PIXELS, corrupt
from . import _backward
from .progress import progress_bar

__all__ = ["HopfieldConfig", "init_weights", "symmetrise", "run", "evaluate", "train", "success"]


class HopfieldConfig:
    """Settings of the Hopfield experiment (defaults: the paper's)."""

    def __init__(self, hidden=1024, steps=50, a=1.0, b=0.5, lr=1e-3, init_scale=1e-3,
                 truncate=20, corrupt_fraction=0.5, dtype="float32"):
        self.hidden, self.steps, self.a, self.b = int(hidden), int(steps), float(a), float(b)
        self.lr, self.init_scale, self.truncate = float(lr), float(init_scale), int(truncate)
        self.corrupt_fraction, self.dtype = float(corrupt_fraction), dtype

    @property
    def n(self) -> int:
        return 2 * N_PIXELS + self.hidden

    def as_dict(self):
        return dict(vars(self))


def _raw_weights(cfg: HopfieldConfig, seed: int):
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(cfg.n, cfg.n, generator=gen, dtype=getattr(torch, cfg.dtype)) * cfg.init_scale


def symmetrise(V):
    """``W = V + V^T`` with a zero diagonal: the connection matrix of raw parameters ``V``."""
    W = V + V.T
    W.fill_diagonal_(0.0)
    return W


def init_weights(cfg: HopfieldConfig, seed: int):
    """``W = randn * scale``, symmetrised (``W + W^T``), zero diagonal."""
    return symmetrise(_raw_weights(cfg, seed))


def _step_fn(cfg, x):
    """The update with the observed units clamped to ``x`` (``h`` of shape (..., n))."""
    import torch

    def step(h, W):
        new = (1.0 - cfg.a) * h + torch.sigmoid(cfg.b * h) @ W.T
        return torch.cat([x.expand(new.shape[:-1] + (N_PIXELS,)), new[..., N_PIXELS:]], dim=-1)

    return step


def _h0(cfg, x):
    import torch

    h = torch.zeros(x.shape[:-1] + (cfg.n,), dtype=x.dtype)
    return torch.cat([x, h[..., N_PIXELS:]], dim=-1)


def _loss(target):
    def loss(h):
        return (h[..., -N_PIXELS:] - target).abs().mean()

    return loss


def run(W, x, cfg: HopfieldConfig):
    """Final state after ``cfg.steps`` updates from inputs ``x`` (shape (B, 784)), no graph."""
    import torch

    step = _step_fn(cfg, x)
    h = _h0(cfg, x)
    with torch.no_grad():
        for _ in range(cfg.steps):
            h = step(h, W)
    return h


def evaluate(W, inputs, targets, cfg):
    """Mean L1 loss of the outputs and pixel accuracy of the outputs thresholded at 0.5."""
    h = run(W, inputs, cfg)
    out = h[..., -N_PIXELS:]
    return float((out - targets).abs().mean()), float(((out > 0.5).to(targets.dtype) == targets).float().mean())


def success(train_loss) -> bool:
    """The paper's Table 1 criterion: final training loss below half of the initial one."""
    return bool(train_loss[-1] < 0.5 * train_loss[0])


def train(method: str, images: np.ndarray, *, truncate: int = 20, epochs: int = 1000, seed: int = 1234,
          cfg: HopfieldConfig | None = None, lr_decay_step: int = 10_000, progress: bool = False,
          keep_weights: bool = False) -> dict:
    """Train the Hopfield memory on ``images`` with one backward ``method``.

    Parameters
    ----------
    method : str
        ``"bptt"``, ``"tbptt"``, ``"rbp"`` (fixed-point iteration from ``U[0, 1]``), or a
        :func:`linsolve_rbp.solve` method (``"neumann"``, ``"cgne"``, ``"gmres"``, ``"lsqr"``).
    images : numpy.ndarray, shape (m, 784)
        Binary images (the paper's ten digits: :func:`linsolve_rbp.problems.load_digits`).
    truncate : int
        TBPTT steps or solver iterations.
    epochs : int
        Passes over the images, one Adam step per image (batch 1, as in the paper).
    seed : int
        Seed of ``W``, the image order and RBP's random start.
    cfg : HopfieldConfig, optional
    lr_decay_step : int
        Adam step at which the learning rate drops tenfold (10,000 in the paper's code).
    progress : bool
        Show a tqdm bar.
    keep_weights : bool
        Return the trained ``W`` under ``"W"``.

    Returns
    -------
    dict
        ``train_loss`` and ``val_loss`` / ``val_acc`` (one value per epoch, the first before
        training), ``success`` (Table 1's criterion), ``solver_failures`` (backward solves that
        did not succeed), ``method``, ``truncate``, ``seed``.

    Examples
    --------
    >>> from linsolve_rbp.experiments import hopfield
    >>> from linsolve_rbp.problems import load_digits
    >>> imgs = load_digits()[0]
    >>> cfg = hopfield.HopfieldConfig(hidden=16, steps=5)
    >>> out = hopfield.train("neumann", imgs[:2], truncate=3, epochs=1, cfg=cfg)
    >>> len(out["train_loss"])
    2
    """
    import torch

    cfg = cfg or HopfieldConfig()
    epochs = positive_int(epochs, "epochs")
    _backward.resolve(method)
    dtype = getattr(torch, cfg.dtype)
    X = torch.as_tensor(np.asarray(images), dtype=dtype)
    if X.ndim != 2 or X.shape[1] != N_PIXELS:
        raise ValueError(f"images must have shape (m, {N_PIXELS}), got {tuple(X.shape)}")
    Xv = torch.as_tensor(corrupt(np.asarray(images), cfg.corrupt_fraction), dtype=dtype)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(int(seed))
    # The trained parameters are the raw V of W = V + V^T (zero diagonal), as in the paper's
    # code, so W stays symmetric with no self-loops (the Hopfield model's assumptions) instead
    # of drifting asymmetric under Adam.
    V = _raw_weights(cfg, seed).requires_grad_(True)
    W = symmetrise(V.detach()).requires_grad_(True)  # BPTT/TBPTT differentiate through W
    opt = torch.optim.Adam([V], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_decay_step, gamma=0.1)
    out = {"method": method, "truncate": truncate, "seed": seed, "train_loss": [], "val_loss": [],
           "val_acc": [], "solver_failures": 0, "backward_calls": 0}

    def record():
        out["train_loss"].append(evaluate(W.detach(), X, X, cfg)[0])
        vl, va = evaluate(W.detach(), Xv, X, cfg)
        out["val_loss"].append(vl)
        out["val_acc"].append(va)

    record()
    bar = progress_bar(range(epochs), enabled=progress, desc=f"hopfield {method} K={truncate}")
    for _ in bar:
        for i in torch.randperm(X.shape[0], generator=gen).tolist():
            x = X[i:i + 1, ...]
            step = _step_fn(cfg, x)
            _, grads, _, res = _backward.backward(method, step, _h0(cfg, x), (W,), _loss(x),
                                                  cfg.steps, truncate, generator=gen)
            out["backward_calls"] += 1
            if res is not None and not res.success:
                out["solver_failures"] += 1
            opt.zero_grad()
            V.grad = symmetrise(grads[0])  # chain rule through W = V + V^T, diagonal masked
            opt.step()
            sched.step()
            W = symmetrise(V.detach()).requires_grad_(True)
        record()
        bar.set_postfix(loss=out["train_loss"][-1], refresh=False)
    out["success"] = success(out["train_loss"])
    if keep_weights:
        out["W"] = W.detach()
    return out
