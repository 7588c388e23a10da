"""Per-iteration cost of the own methods, side by side with their peers (issue 12, "lean
iterations").

Workloads (as the issue defines them):

- ``cg`` on the 2-D Poisson matrix (5-point, ``kron(I, T) + kron(T, I)``, ``T = tridiag(-1, 2,
  -1)``) of order ``100^2`` and ``300^2``, ``b = ones``, ``rtol = 1e-8``: this package on a
  scipy CSR matrix and on a torch CSR tensor, against ``scipy.sparse.linalg.cg(rtol=1e-8)`` on
  the scipy CSR matrix.
- Overhead at a 1 ms product: every own method (``cg``, ``cgne``, ``minres``, ``lsqr``,
  ``gmres``, ``bicgstab``, ``neumann``, ``fixed_point``) on a ``LinearOperator`` whose products
  spin for about 1 ms; the ratio is the solve time over (products x the time of one product,
  measured on its own). ``A = I - J`` with ``J`` symmetric, eigenvalues spread evenly over
  ``[-0.9, 0.9]`` (the spectral radius of the issue's contractive workloads), order 64:
  symmetric positive definite (for cg, minres) and contractive (for neumann, fixed_point).

Timings are single threaded (thread pools pinned before numpy is imported, when this module
is the first to import it; ``torch.set_num_threads(1)``), the minimum of ``--repeat`` runs,
each pair measured in the same run. Run it with ``python -m asv_benchmarks.lean`` (``--quick``
for fewer repeats, ``--only cg`` or ``--only overhead`` for one part).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402

import linsolve_rbp as lr  # noqa: E402

from .common import Row, best_pair, best_time  # noqa: E402

try:  # noqa: E402
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

__all__ = ["main", "run", "poisson2d", "cg_poisson", "overhead", "OWN_METHODS"]

OWN_METHODS = ("cg", "cgne", "minres", "lsqr", "gmres", "bicgstab", "neumann", "fixed_point")


def _pin_threads():
    if torch is not None:
        torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return None
    return threadpool_limits(1)


def poisson2d(k: int):
    """The 2-D Poisson matrix of order ``k^2`` (scipy CSR)."""
    T = sp.diags([-np.ones(k - 1), 2 * np.ones(k), -np.ones(k - 1)], [-1, 0, 1])
    I = sp.identity(k)
    return (sp.kron(I, T) + sp.kron(T, I)).tocsr()


#: The clock of every timing: CPU time of this process. With one thread it is the wall time
#: of an unloaded machine, and it does not count the time other processes take the core
#: (the development machine has 2 cores shared with test runs).
clock = time.process_time


def _best(f, repeat: int) -> float:
    return best_time(f, repeat, clock)


def _pair(f, g, repeat: int):
    return best_pair(f, g, repeat, clock)


def cg_poisson(k: int, repeat: int = 5):
    """Rows ``(workload, ours_s, peer_s, ours_products, peer_products)`` of cg on the 2-D
    Poisson matrix of order ``k^2``: scipy CSR and torch CSR against scipy's cg."""
    A = poisson2d(k)
    n = A.shape[0]
    b = np.ones(n)
    rtol = 1e-8
    count = [0]

    def mv(v):
        count[0] += 1
        return A @ v

    Ac = spla.LinearOperator(A.shape, matvec=mv, dtype=A.dtype)
    count[0] = 0
    x_sp, info = spla.cg(Ac, b, rtol=rtol, atol=0.0, maxiter=10 * n)
    peer_products = count[0]
    assert info == 0

    def peer():
        spla.cg(A, b, rtol=rtol, atol=0.0, maxiter=10 * n)

    rows = []
    res = lr.solve(A, b, method="cg", rtol=rtol)
    assert res.converged, res.message
    t_ours, t_peer = _pair(lambda: lr.solve(A, b, method="cg", rtol=rtol), peer, repeat)
    rows.append((f"cg Poisson {k}^2 scipy CSR", t_ours, t_peer, res.matvecs, peer_products))
    # The same with the operator built once: the solver alone, without the per-call wrapping
    # of the matrix (its transpose and symmetry check).
    op = lr.aslinearoperator(A)
    op.symmetric  # noqa: B018 - the structure check, done once
    t_ours, t_peer = _pair(lambda: lr.solve(op, b, method="cg", rtol=rtol), peer, repeat)
    rows.append((f"cg Poisson {k}^2 scipy CSR, op once", t_ours, t_peer, res.matvecs, peer_products))
    if torch is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta state"
            At = torch.sparse_csr_tensor(
                torch.from_numpy(A.indptr.astype(np.int64)), torch.from_numpy(A.indices.astype(np.int64)),
                torch.from_numpy(A.data), size=A.shape,
            )
        bt = torch.ones(n, dtype=torch.float64)
        res = lr.solve(At, bt, method="cg", rtol=rtol)
        assert res.converged, res.message
        t_ours, t_peer = _pair(lambda: lr.solve(At, bt, method="cg", rtol=rtol), peer, repeat)
        rows.append((f"cg Poisson {k}^2 torch CSR", t_ours, t_peer, res.matvecs, peer_products))
    return rows


def _spin(seconds: float):
    end = clock() + seconds
    while clock() < end:
        pass


def overhead(methods=OWN_METHODS, n: int = 64, product_s: float = 1e-3, repeat: int = 3, xp_name="numpy", radius: float = 0.9):
    """Rows ``(workload, ours_s, products x product_s, products, products)`` of each method on
    an operator whose products spin for ``product_s`` seconds."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    J = Q @ np.diag(np.linspace(-radius, radius, n)) @ Q.T
    A = np.eye(n) - J
    b = rng.standard_normal(n)
    if xp_name == "torch":
        A = torch.from_numpy(A)
        b = torch.from_numpy(b)

    def matvec(v):
        _spin(product_s)
        return A @ v

    op = lr.LinearOperator((n, n), matvec=matvec, rmatvec=matvec, like=b, symmetric=True)
    # One product on its own (the spin plus the tiny dense product), for the denominator.
    v = b * 1.0
    t_prod = min(_best(lambda: matvec(v), 50), _best(lambda: matvec(v), 50))
    rows = []
    for method in methods:
        kw = dict(rtol=1e-8, maxiter=1000)
        res = lr.solve(op, b, method=method, **kw)
        assert res.converged, (method, res.message)
        products = res.matvecs + res.rmatvecs
        t = _best(lambda: lr.solve(op, b, method=method, **kw), repeat)
        rows.append((f"overhead 1ms {method} ({xp_name})", t, products * t_prod, products, products))
    return rows


def _print(rows):
    head = f"{'workload':<40} {'ours':>10} {'peer':>10} {'ratio':>7} {'products':>12}"
    print(head)
    print("-" * len(head))
    for name, ours, peer, p_ours, p_peer in rows:
        prod = f"{p_ours}/{p_peer}"
        print(f"{name:<40} {ours * 1e3:>8.1f}ms {peer * 1e3:>8.1f}ms {ours / peer:>7.3f} {prod:>12}")


def as_rows(rows) -> list:
    """:class:`~asv_benchmarks.common.Row` objects (times in ms) of the tuples
    ``(workload, ours_s, peer_s, ours_products, peer_products)`` of :func:`cg_poisson` and
    :func:`overhead`."""
    out = []
    for name, ours, peer, p_ours, p_peer in rows:
        what = "products x product time" if name.startswith("overhead") else "scipy cg"
        out.append(Row(name, 1e3 * ours, what, 1e3 * peer, f"{p_ours} / {p_peer}"))
    return out


def run(quick: bool = False, repeat: int | None = None, torch_overhead: bool = False) -> list:
    """The rows of this module as :class:`~asv_benchmarks.common.Row` objects: cg on the
    Poisson matrix of order ``100^2`` (and ``300^2`` unless ``quick``) and the overhead at a
    1 ms product (on torch tensors too with ``torch_overhead``), timed as :func:`main` times
    them (the caller pins the thread pools; :func:`main` does)."""
    repeat = repeat or (2 if quick else 7)
    rows = []
    for k in (100,) if quick else (100, 300):
        rows += cg_poisson(k, repeat=repeat if k == 100 else max(2, repeat // 2))
    rows += overhead(repeat=max(1, repeat // 2))
    if torch_overhead and torch is not None:
        rows += overhead(repeat=max(1, repeat // 2), xp_name="torch")
    return as_rows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m asv_benchmarks.lean", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("cg", "overhead"), default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, only the 100^2 Poisson problem")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--torch", action="store_true", help="also the overhead rows on torch tensors")
    args = ap.parse_args(argv)
    limits = _pin_threads()
    repeat = args.repeat or (2 if args.quick else 7)
    rows = []
    if args.only in (None, "cg"):
        for k in (100,) if args.quick else (100, 300):
            rows += cg_poisson(k, repeat=repeat if k == 100 else max(2, repeat // 2))
    if args.only in (None, "overhead"):
        rows += overhead(repeat=max(1, repeat // 2))
        if args.torch and torch is not None:
            rows += overhead(repeat=max(1, repeat // 2), xp_name="torch")
    print("ours: this package; peer: scipy.sparse.linalg.cg for cg rows, products x (time of "
          "one product) for overhead rows; min of repeats, single thread, CPU time")
    _print(rows)
    del limits
    return rows


if __name__ == "__main__":
    main()
