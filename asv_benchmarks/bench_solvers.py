"""Every method of ``linsolve_rbp.methods()`` on dense, sparse, batched and Jacobian systems,
on numpy and torch (CPU, and CUDA where there is a device)."""

from __future__ import annotations

import numpy as np

import linsolve_rbp as lr
from linsolve_rbp.problems import convection_diffusion, random_contractive

from .common import (
    BACKENDS,
    SolveBenchmark,
    all_methods,
    check_applies,
    has_torch,
    to_backend,
    torch_device,
)

#: Spectral radius of ``J`` in the dense adjoint systems ``(I - J^T) z = b``.
RHO = 0.9


def _adjoint_system(J, backend, nrhs=None, seed=0):
    """``I - J^T`` as the composite users build, and a random right-hand side (``nrhs`` rows
    for a batch)."""
    n = J.shape[0]
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n,) if nrhs is None else (nrhs, n))
    Jb, bb = to_backend(J, backend), to_backend(b, backend)
    A = lr.IdentityOperator(n, like=bb[0, ...] if nrhs is not None else bb) - lr.aslinearoperator(Jb).T
    return A, bb


class DenseNonsymmetric(SolveBenchmark):
    """``(I - J^T) z = b`` with a dense random ``J`` of spectral radius 0.9
    (:func:`linsolve_rbp.problems.random_contractive`)."""

    params = [all_methods(), [100, 1000, 4000], BACKENDS]
    param_names = ["method", "n", "backend"]

    def setup_cache(self):
        # The eigenvalue scaling of a 4000 x 4000 matrix takes tens of seconds: build once.
        return {n: random_contractive(n, rho=RHO, seed=n) for n in self.params[1]}

    def setup(self, cache, method, n, backend):
        self.method, self.backend = method, backend
        self.A, self.b = _adjoint_system(cache[n], backend)
        check_applies(method, self.A, self.b, symmetric=False, contractive=True)


class ConvectionDiffusion(SolveBenchmark):
    """The 2-D upwind convection-diffusion operator on a 64 x 64 grid (n = 4096, sparse,
    nonsymmetric; :func:`linsolve_rbp.problems.convection_diffusion`), as a scipy CSR matrix
    or a torch sparse CSR tensor."""

    params = [all_methods(), BACKENDS]
    param_names = ["method", "backend"]

    def setup(self, method, backend):
        self.method, self.backend = method, backend
        S = convection_diffusion(64, peclet=10.0)
        b = np.random.default_rng(0).standard_normal(S.shape[0])
        self.b = to_backend(b, backend)
        self.A = lr.aslinearoperator(to_backend(S, backend))
        check_applies(method, self.A, self.b, symmetric=False, contractive=False)


class Batched(SolveBenchmark):
    """``B`` independent right-hand sides of the dense ``n = 100`` adjoint system in one call
    (``batch_dims=1``): per-system step sizes and convergence tests."""

    params = [all_methods(), [1, 64, 256], BACKENDS]
    param_names = ["method", "B", "backend"]
    kwargs = {"batch_dims": 1}

    def setup(self, method, B, backend):
        self.method, self.backend = method, backend
        J = random_contractive(100, rho=RHO, seed=1)
        self.A, self.b = _adjoint_system(J, backend, nrhs=B)
        check_applies(method, self.A, self.b, symmetric=False, contractive=True, batch_dims=1)


class TorchJacobian(SolveBenchmark):
    """The adjoint system ``(I - J^T) z = b`` of the fixed point ``h* = tanh(W h* + U x + c)``
    of a one-layer recurrent MLP (n = 512, ``||W||_2 = 0.9``), with ``J`` a
    :class:`linsolve_rbp.adapters.torch.JacobianOperator`: every product is a
    vector-Jacobian (or Jacobian-vector) product through autograd."""

    params = [all_methods(), ["torch-cpu", "torch-cuda"]]
    param_names = ["method", "backend"]
    n = 512

    def setup(self, method, backend):
        if not has_torch():
            raise NotImplementedError("torch is not installed")
        import torch

        try:
            from linsolve_rbp.adapters import torch as lrt

            JacobianOperator = lrt.JacobianOperator
        except (ImportError, AttributeError) as exc:
            raise NotImplementedError(f"the torch adapter is not available: {exc}") from exc
        device = torch_device(backend)
        self.method, self.backend = method, backend
        g = torch.Generator().manual_seed(0)
        n = self.n
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        W *= 0.9 / torch.linalg.matrix_norm(W, ord=2)
        u = torch.randn(n, generator=g, dtype=torch.float64)
        W, u = W.to(device), u.to(device)

        def f(h):
            return torch.tanh(W @ h + u)

        h = torch.zeros(n, dtype=torch.float64, device=device)
        with torch.no_grad():
            for _ in range(200):
                h = f(h)
        J = JacobianOperator(f, h)
        self.b = torch.randn(n, generator=g, dtype=torch.float64).to(device)
        self.A = lr.IdentityOperator(n, like=self.b) - J.T
        check_applies(method, self.A, self.b, symmetric=False, contractive=True)
