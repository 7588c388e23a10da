"""Every method of ``linsolve_rbp.methods()`` on dense, sparse, batched and Jacobian systems,
on numpy and torch (CPU, and CUDA where there is a device), and the workloads of the
lean-iteration targets (cg on the 2-D Poisson stencil, dense gmres at n = 200, a product that
costs a millisecond).

The default grid is small (``asv run --quick`` of the whole suite in minutes on two cores);
``LINSOLVE_RBP_BENCH_FULL=1`` adds the large sizes (see :data:`common.FULL`)."""

from __future__ import annotations

import numpy as np

import linsolve_rbp as lr
from linsolve_rbp.problems import convection_diffusion, random_contractive

from .common import (
    BACKENDS,
    FULL,
    SolveBenchmark,
    grid,
    poisson2d,
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

    params = [all_methods(), grid([200], [100, 1000, 4000]), BACKENDS]
    param_names = ["method", "n", "backend"]

    def setup_cache(self):
        # The eigenvalue scaling of a 4000 x 4000 matrix takes tens of seconds: build once.
        return {n: random_contractive(n, rho=RHO, seed=n) for n in self.params[1]}

    def setup(self, cache, method, n, backend):
        self.method, self.backend = method, backend
        self.A, self.b = _adjoint_system(cache[n], backend)
        check_applies(method, self.A, self.b, symmetric=False, contractive=True)


class ConvectionDiffusion(SolveBenchmark):
    """The 2-D upwind convection-diffusion operator on a 32 x 32 grid (64 x 64 in the full grid;
    sparse,
    nonsymmetric; :func:`linsolve_rbp.problems.convection_diffusion`), as a scipy CSR matrix
    or a torch sparse CSR tensor."""

    params = [all_methods(), BACKENDS]
    param_names = ["method", "backend"]
    #: Grid side: 64 (n = 4096) in the full grid, 32 (n = 1024) by default.
    side = 64 if FULL else 32

    def setup(self, method, backend):
        self.method, self.backend = method, backend
        S = convection_diffusion(self.side, peclet=10.0)
        b = np.random.default_rng(0).standard_normal(S.shape[0])
        self.b = to_backend(b, backend)
        self.A = lr.aslinearoperator(to_backend(S, backend))
        check_applies(method, self.A, self.b, symmetric=False, contractive=False)


class Batched(SolveBenchmark):
    """``B`` independent right-hand sides of the dense ``n = 100`` adjoint system in one call
    (``batch_dims=1``): per-system step sizes and convergence tests."""

    params = [all_methods(), grid([64], [1, 64, 256]), BACKENDS]
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


class Poisson(SolveBenchmark):
    """The 2-D Poisson stencil ``kron(I, T) + kron(T, I)``, ``T = tridiag(-1, 2, -1)``, on an
    ``m x m`` grid (n = 100^2 by default, also 300^2 in the full grid), ``b`` all ones,
    relative tolerance 1e-8, as a scipy CSR matrix and a torch sparse CSR tensor: ``cg``
    against the scipy bridge ``scipy.cg`` on the same matrix (the cg target of the issue)."""

    params = [["cg", "scipy.cg", "minres"], grid([100], [100, 300]), ["numpy", "torch-cpu"]]
    param_names = ["method", "m", "backend"]
    rtol = 1e-8

    def setup(self, method, m, backend):
        self.method, self.backend = method, backend
        S = poisson2d(m)
        self.A = lr.aslinearoperator(to_backend(S, backend))
        self.b = to_backend(np.ones(S.shape[0]), backend)
        self.kwargs = {"rtol": self.rtol, "maxiter": 10 * m}
        check_applies(method, self.A, self.b, symmetric=True, contractive=False)


class DenseGmres(SolveBenchmark):
    """``gmres`` (restart 30, rtol 1e-8) on the dense ``I - J^T``, ``n = 200``, ``J`` of
    spectral radius 0.9 (``random_contractive(200, 0.9, seed=0)``) on numpy and torch,
    against the scipy bridge on the numpy matrix: the gmres target of the issue."""

    params = [["gmres", "scipy.gmres"], ["numpy", "torch-cpu"]]
    param_names = ["method", "backend"]
    n = 200

    def setup_cache(self):
        return random_contractive(self.n, rho=RHO, seed=0)

    def setup(self, cache, method, backend):
        self.method, self.backend = method, backend
        M = np.eye(self.n) - cache.T
        self.A = lr.aslinearoperator(to_backend(M, backend))
        self.b = to_backend(np.random.default_rng(0).standard_normal(self.n), backend)
        self.kwargs = {"rtol": 1e-8, "restart": 30}
        check_applies(method, self.A, self.b, symmetric=False, contractive=True, restart=30)


class MillisecondProduct:
    """Solver overhead at a product that costs a millisecond (it spins): the time of a solve of
    20 iterations divided by (products x 1 ms), for each own method; 1.00 means the method
    costs nothing but its products (the issue's target: <= 1.05). ``track_overhead`` counts
    the process's CPU time, products and solve alike (one thread), so that other processes on
    the machine do not move the ratio; ``time_solve`` is wall time, as everywhere."""

    params = [[m for m in all_methods() if not m.startswith("scipy.")]]
    param_names = ["method"]
    timeout = 300
    number = 1
    repeat = (1, 3, 20.0)
    n = 256
    iters = 20
    product_s = 1e-3

    def setup(self, method):
        import time

        self.method = method
        solver = lr.get_method(method)
        rng = np.random.default_rng(0)
        G = rng.standard_normal((self.n, self.n))
        if solver.needs_symmetric:
            S = (G + G.T) / 2
            S *= 0.9 / np.max(np.abs(np.linalg.eigvalsh(S)))
        else:
            S = random_contractive(self.n, rho=0.9, seed=0).T
        M = np.eye(self.n) - S
        wait = self.product_s
        clock = time.process_time

        def spin(v):
            t0 = clock()
            out = M @ v
            while clock() - t0 < wait:
                pass
            return out

        def spin_h(v):
            t0 = clock()
            out = M.T @ v
            while clock() - t0 < wait:
                pass
            return out

        self.b = rng.standard_normal(self.n)
        self.A = lr.LinearOperator((self.n, self.n), matvec=spin, rmatvec=spin_h, like=self.b)

    def _solve(self):
        # rtol below reach: every method runs its whole budget.
        return lr.solve(self.A, self.b, method=self.method, rtol=1e-14, maxiter=self.iters)

    def time_solve(self, method):
        self._solve()

    def track_overhead(self, method):
        import time

        # asv calls a track_ benchmark once: the smallest ratio of three solves, so that a
        # burst of load from other processes does not make the figure.
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            res = self._solve()
            cpu = time.process_time() - t0
            best = min(best, cpu / ((res.matvecs + res.rmatvecs) * self.product_s))
        return round(best, 3)

    track_overhead.unit = "time / (products x product time)"
