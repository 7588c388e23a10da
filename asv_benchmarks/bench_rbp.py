"""Neumann-RBP against BPTT and TBPTT: time and peak memory of one meta-gradient in the
hyperparameter-optimisation setting of Liao et al. (ICML 2018, Section 5.3), computed by
:func:`linsolve_rbp.experiments.hyperopt.hypergradient` on random data of MNIST's shape (the
cost depends on the shapes only)."""

from __future__ import annotations

from .common import has_torch, torch

#: Inner SGD steps ``T`` and truncations ``K`` (TBPTT's steps, Neumann-RBP's terms).
STEPS = [100, 1000]
TRUNCATIONS = [10, 50, 100]


class HyperoptMetaGradient:
    """One meta-gradient of the 16 hyperparameters of the 784-50-50-50-10 MLP after ``T``
    steps of SGD with momentum (batch 200), by ``bptt`` (all ``T`` steps kept; ``K`` does not
    apply and only ``K = 10`` runs), ``tbptt`` (last ``K`` steps) or ``neumann`` (Neumann-RBP
    with ``K`` terms, last step on the full 10,000 images as in the paper; exactly ``K``
    products, no divergence stop)."""

    params = [["neumann", "bptt", "tbptt"], STEPS, TRUNCATIONS]
    param_names = ["method", "T", "K"]
    timeout = 900
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0

    def setup(self, method, T, K):
        if not has_torch():
            raise NotImplementedError("torch is not installed")
        try:
            from linsolve_rbp.experiments import hyperopt
        except ImportError as exc:
            raise NotImplementedError(f"the hyperopt experiment does not import: {exc}") from exc
        if method == "bptt" and K != TRUNCATIONS[0]:
            raise NotImplementedError("BPTT does not truncate: measured once, at the first K")
        torch.set_num_threads(1)
        self.ho = hyperopt
        self.method, self.T, self.K = method, T, K
        self.data = hyperopt.random_data(n=10_000, seed=0)
        self.hparams = hyperopt.init_hparams()

    def _meta_gradient(self):
        opts = {"divtol": None} if self.method == "neumann" else None
        return self.ho.hypergradient(
            self.method, self.hparams, self.data, steps=self.T,
            truncate=None if self.method == "bptt" else self.K, solver_options=opts,
        )

    def time_meta_gradient(self, method, T, K):
        self._meta_gradient()

    def peakmem_meta_gradient(self, method, T, K):
        self._meta_gradient()
