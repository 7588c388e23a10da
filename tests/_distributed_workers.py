"""What the ranks of the multi-process tests run (tests/test_distributed_multiprocess.py).

Imported by the processes that ``torch.multiprocessing.spawn`` starts (gloo on 127.0.0.1), and
run as a script under ``mpiexec -n 2 python tests/_distributed_workers.py mpi OUTDIR``. Every
rank writes what it found to ``OUTDIR/rank<r>.pkl``; the test compares it with the
single-process solve, made from the same data (:func:`system`).
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

#: The package's own methods that take a reduction, with the system each one solves.
METHODS = ("cg", "gmres", "bicgstab", "minres", "lsqr", "cgne", "neumann", "fixed_point")
N = 30
SIZES = (14, 16)


def system(method: str):
    """The global system ``(A, b)`` a method is tested on (float64, well conditioned)."""
    rng = np.random.default_rng(METHODS.index(method))
    Q = rng.standard_normal((N, N))
    if method in ("neumann", "fixed_point"):
        A = np.eye(N) - 0.4 * Q / np.linalg.norm(Q, 2)
    elif method in ("cg", "minres"):
        A = Q @ Q.T / N + np.eye(N)
    else:
        A = np.eye(N) + 0.3 * Q / np.linalg.norm(Q, 2)
    b = rng.standard_normal(N)
    return A, b


def options(method: str) -> dict:
    return {"rtol": 1e-11}


def shard(rank: int, sizes=SIZES) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


#: Shards of which rank 0 holds none: it takes part in every collective all the same.
EMPTY_FIRST = (0, N)


def empty_rank_solve(red, like: str):
    """cg (method "auto" too: gmres) on the cg system with rank 0 holding no rows."""
    import linsolve_rbp as lr
    from linsolve_rbp import distributed as lrd

    A, b = system("cg")
    s = shard(red.rank, EMPTY_FIRST)
    A_loc, b_loc = A[s], b[s]
    if like == "torch":
        import torch

        A_loc, b_loc = torch.from_numpy(A_loc.copy()), torch.from_numpy(b_loc.copy())
    op = lrd.row_sharded(A_loc, red, sizes=EMPTY_FIRST, symmetric=True)
    out = {}
    for method in ("cg", "auto"):
        res = lr.solve(op, b_loc, method=method, reduction=red, **options("cg"))
        out[method] = {"x": np.asarray(res.x), "iterations": res.iterations, "status": res.status.name}
    return out


def sharded_solves(red, like: str):
    """Every method on its system, split over the ranks of ``red``: what this rank got."""
    import linsolve_rbp as lr
    from linsolve_rbp import distributed as lrd

    out = {}
    s = shard(red.rank)
    for method in METHODS:
        A, b = system(method)
        A_loc, b_loc = A[s], b[s]
        if like == "torch":
            import torch

            A_loc, b_loc = torch.from_numpy(A_loc.copy()), torch.from_numpy(b_loc.copy())
        sym = True if method in ("cg", "minres") else None
        op = lrd.row_sharded(A_loc, red, sizes=SIZES, symmetric=sym)
        before = red.allreduces
        res = lr.solve(op, b_loc, method=method, reduction=red, **options(method))
        x = res.x.numpy() if like == "torch" else res.x
        out[method] = {
            "x": np.asarray(x), "iterations": res.iterations, "status": res.status.name,
            "allreduces": res.info["allreduces"], "counted": red.allreduces - before,
        }
    return out


# -- DDP training of a DEQ -----------------------------------------------------------------------
BATCH, DIM, FEAT, STEPS = 8, 6, 4, 3


def deq_data():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((BATCH, FEAT))
    Y = rng.standard_normal((BATCH, DIM))
    W0 = 0.5 * rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
    U0 = rng.standard_normal((DIM, FEAT)) / np.sqrt(FEAT)
    return X, Y, W0, U0


BACKWARDS = {
    "exact": dict(forward_tol=1e-12, forward_maxiter=200,
                  backward={"method": "gmres", "rtol": 1e-12}),
    "fixed_budget": dict(forward_tol=None, forward_maxiter=25,
                         backward={"method": "neumann", "rtol": None, "atol": None, "maxiter": 8}),
}


def make_deq():
    import torch

    from linsolve_rbp.adapters import torch as lrt

    X, Y, W0, U0 = deq_data()

    class Net(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.W = torch.nn.Parameter(torch.from_numpy(W0.copy()))
            self.U = torch.nn.Parameter(torch.from_numpy(U0.copy()))
            self.kind = kind

        def forward(self, x):
            u = x @ self.U.T

            def f(h):
                return torch.tanh(h @ self.W.T + u)

            h0 = torch.zeros(x.shape[0], DIM, dtype=x.dtype)
            return lrt.fixed_point(f, h0, batch_dims=1, **BACKWARDS[self.kind])

    return Net


def train(model, X, Y, steps=STEPS):
    """Plain SGD on the mean squared error over the batch given (by hand: torch.optim
    imports torch._dynamo, seconds per process)."""
    import torch

    params = list(model.parameters())
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = ((model(X) - Y) ** 2).sum(dim=1).mean()
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.5 * p.grad
    # "module.W" under DistributedDataParallel, "W" without.
    return {k.split(".")[-1]: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def reference_training(kind: str):
    """Single-process training on the whole batch."""
    import torch

    X, Y, _, _ = deq_data()
    Net = make_deq()
    return train(Net(kind), torch.from_numpy(X), torch.from_numpy(Y))


def ddp_training(rank: int, world: int):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, Y, _, _ = deq_data()
    per = BATCH // world
    rows = slice(rank * per, (rank + 1) * per)
    Net = make_deq()
    out = {}
    for kind in BACKWARDS:
        model = DDP(Net(kind))
        out[kind] = train(model, torch.from_numpy(X[rows].copy()), torch.from_numpy(Y[rows].copy()))
    return out


def gloo_worker(rank: int, world: int, port: int, outdir: str):
    """One rank of the gloo tests: sharded solves on torch and numpy data, DDP training."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from datetime import timedelta

    # A collective that waits longer than this fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        from linsolve_rbp import distributed as lrd

        red = lrd.TorchDistributed()
        got = {"rank": red.rank, "size": red.size}
        got["torch"] = sharded_solves(red, "torch")
        got["numpy"] = {k: v for k, v in sharded_solves(red, "numpy").items() if k in ("cg", "gmres")}
        got["empty_rank"] = empty_rank_solve(red, "torch")
        got["ddp"] = ddp_training(rank, world)
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(got, fh)
    finally:
        dist.destroy_process_group()


def mpi_main(outdir: str):
    from linsolve_rbp import distributed as lrd

    red = lrd.MPI()
    got = {"rank": red.rank, "size": red.size, "numpy": sharded_solves(red, "numpy"),
           "empty_rank": empty_rank_solve(red, "numpy")}
    with open(os.path.join(outdir, f"rank{red.rank}.pkl"), "wb") as fh:
        pickle.dump(got, fh)


if __name__ == "__main__":
    if sys.argv[1] == "mpi":
        mpi_main(sys.argv[2])
