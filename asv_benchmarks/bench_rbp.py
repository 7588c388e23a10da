"""Neumann-RBP against BPTT and TBPTT: time and peak memory of one meta-gradient in the
hyperparameter-optimisation setting of Liao et al. (ICML 2018, Section 5.3), computed by
:func:`linsolve_rbp.experiments.hyperopt.hypergradient` on random data of MNIST's shape (the
cost depends on the shapes only); and the backward pass of a deep-equilibrium layer by
Neumann-RBP, fixed_point and gmres against BPTT and a hand-written autograd loop."""

from __future__ import annotations

from .common import grid, has_torch, torch

#: Inner SGD steps ``T`` and truncations ``K`` (TBPTT's steps, Neumann-RBP's terms); the
#: default grid is ``T = 100``, ``K`` in 10 and 50, ``LINSOLVE_RBP_BENCH_FULL=1`` adds
#: ``T = 1000`` and ``K = 100``.
STEPS = grid([100], [100, 1000])
TRUNCATIONS = grid([10, 50], [10, 50, 100])


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


#: The DEQ backward workload of the issue: tanh cell ``f(h) = tanh(W h + U x)``, state size
#: ``d``, batch ``B``, float32, ``K`` Neumann terms.
DEQ = dict(d=192, B=48, K=16)


class DEQBackward:
    """The backward pass of a deep-equilibrium layer ``h* = tanh(W h* + U x)`` (d = 192,
    B = 48 samples, float32, ``||W||_2 = 0.9``) at a fixed point reached by 60 forward
    iterations: ``neumann`` (``fixed_point(backward={"method": "neumann"})`` with K = 16 terms,
    no stopping test), ``fixed_point`` (the same budget), ``gmres`` (rtol 1e-6) against ``bptt``
    (back-propagation through K recorded steps from the fixed point) and ``autograd_loop`` (a
    hand-written loop of ``torch.autograd.grad`` over the same K - 1 products). The graph is
    recorded in ``setup``; each timed call is one ``backward`` (``retain_graph=True``)."""

    params = [["neumann", "fixed_point", "gmres", "bptt", "autograd_loop"]]
    param_names = ["method"]
    warmup_time = 0.05

    def setup(self, method):
        if not has_torch():
            raise NotImplementedError("torch is not installed")
        from linsolve_rbp.adapters import torch as lrt

        torch.set_num_threads(1)
        d, B, K = DEQ["d"], DEQ["B"], DEQ["K"]
        g = torch.Generator().manual_seed(0)
        W = torch.randn(d, d, generator=g)
        W = (W * (0.9 / torch.linalg.matrix_norm(W, ord=2))).requires_grad_()
        U = torch.randn(d, d, generator=g) / d ** 0.5
        x = torch.randn(B, d, generator=g)
        Ux = x @ U.T
        self.W, self.method = W, method

        def f(h):
            return torch.tanh(h @ W.T + Ux)

        h0 = torch.zeros(B, d)
        with torch.no_grad():
            h_star = h0
            for _ in range(60):
                h_star = f(h_star)
        self.grad_out = torch.randn(B, d, generator=g)
        if method in ("neumann", "fixed_point", "gmres"):
            if method == "gmres":
                backward = {"method": "gmres", "rtol": 1e-6}
            else:
                backward = {"method": method, "rtol": None, "atol": None, "divtol": None,
                            "maxiter": K - 1}
            self.out = lrt.fixed_point(f, h_star, forward_maxiter=1, forward_tol=None,
                                       backward=backward, batch_dims=1, on_failure="ignore")
        elif method == "bptt":
            self.out = lrt.unroll(f, h_star.detach(), steps=K)
        else:
            h = h_star.detach().requires_grad_()
            self.h, self.fh, self.K = h, f(h), K
        self.run = self._autograd_loop if method == "autograd_loop" else self._backward
        self.run()

    def _backward(self):
        self.W.grad = None
        self.out.backward(self.grad_out, retain_graph=True)

    def _autograd_loop(self):
        # z = sum_{k<K} (J^T)^k g by K - 1 vector-Jacobian products, then one more for dL/dW.
        z = v = self.grad_out
        for _ in range(self.K - 1):
            (v,) = torch.autograd.grad(self.fh, self.h, v, retain_graph=True)
            z = z + v
        (gw,) = torch.autograd.grad(self.fh, self.W, z, retain_graph=True)
        return gw

    def time_backward(self, method):
        self.run()
