"""The reduction engines: what a solve whose vectors are sharded over ranks uses for its inner
products and norms.

A reduction sums (or takes the maximum of) small arrays over the ranks, one collective per
call however many arrays it is given, and counts the collectives it made. The solvers call it
through :func:`linsolve_rbp.solvers.dot` and friends; the operator does its own communication
(:meth:`Reduction.allgather` helps there).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Sequence

from .. import backend as _b

__all__ = ["Reduction", "Local", "LOCAL", "Simulated", "TorchDistributed", "MPI"]


class Reduction:
    """Base class of the reductions.

    A subclass sets ``rank`` and ``size`` and implements ``_allreduce`` (one
    collective on a 1-D array) and ``_allgather`` (the 1-D arrays of every rank, in rank
    order); the public methods pack several arrays into one buffer, count the collectives and
    restore shapes and dtypes.

    Attributes
    ----------
    rank : int
        This process's rank, ``0 <= rank < size``.
    size : int
        The number of ranks the vectors are split over.
    allreduces : int
        The all-reduce collectives made so far through :meth:`allreduce_sum` and
        :meth:`allreduce_max` (the solver's; a solve reports its own share as
        ``res.info["allreduces"]``).
    allgathers : int
        The all-gathers made so far through :meth:`allgather` (the operator's).
    """

    rank: int = 0
    size: int = 1

    def __init__(self):
        self.allreduces = 0
        self.allgathers = 0

    # -- what the solvers call -----------------------------------------------------------------
    def allreduce_sum(self, xp, arrays: Sequence) -> list:
        """The elementwise sums over the ranks of each array, made by ONE collective.

        Parameters
        ----------
        xp : namespace
            The arrays' namespace.
        arrays : sequence of arrays
            Real or complex arrays of any shapes (every rank passes the same shapes and
            dtypes, in the same order).

        Returns
        -------
        list of arrays
            New arrays (never the inputs written into), same shapes and dtypes, equal on all
            ranks.
        """
        return self._reduce(xp, arrays, "sum")

    def allreduce_max(self, xp, arrays: Sequence) -> list:
        """As :meth:`allreduce_sum`, with the elementwise maximum (real arrays only)."""
        return self._reduce(xp, arrays, "max")

    def allgather(self, xp, a, sizes: Sequence[int] | None = None):
        """The arrays ``a`` of all ranks concatenated along their last axis, in rank order.

        For an operator whose vectors are sharded: a row-sharded matrix's product needs the
        whole vector. The shards may differ in length; ``sizes`` (the last-axis length of every
        rank's ``a``) saves the collective that finds them out. torch tensors that require
        grad get a gradient (its transpose sums the gradients of the ranks and keeps this
        rank's part), so ``f`` of a :class:`~linsolve_rbp.adapters.torch.JacobianOperator` may
        call it (use ``jvp="double_backward"``).
        """
        if _is_torch(a) and a.requires_grad:
            return _torch_gather_fn().apply(a, self, xp, None if sizes is None else tuple(sizes))
        return self._gather_concat(xp, a, sizes)

    # -- packing -------------------------------------------------------------------------------
    def _reduce(self, xp, arrays, op):
        arrays = list(arrays)
        if op == "max" and any(_is_complex(xp, a.dtype) for a in arrays):
            raise ValueError("allreduce_max needs real arrays")
        self.allreduces += 1
        if not arrays:
            return []
        if len(arrays) == 1:
            a = arrays[0]
            out = self._allreduce(xp, xp.reshape(a, (-1,)), op)
            return [xp.reshape(out, a.shape)]
        dt = xp.result_type(*[a.dtype for a in arrays])
        flat = xp.concat([xp.reshape(xp.astype(a, dt) if a.dtype != dt else a, (-1,)) for a in arrays])
        out = self._allreduce(xp, flat, op)
        res, i = [], 0
        for a in arrays:
            k = math.prod(a.shape)
            piece = xp.reshape(out[i:i + k], a.shape)
            i += k
            if piece.dtype != a.dtype:
                if _is_complex(xp, piece.dtype) and not _is_complex(xp, a.dtype):
                    piece = xp.real(piece)
                piece = xp.astype(piece, a.dtype)
            res.append(piece)
        return res

    def _gather_concat(self, xp, a, sizes):
        self.allgathers += 1
        if self.size == 1:
            return a
        parts = self._allgather(xp, a, sizes)
        return xp.concat(parts, axis=-1)

    def _allreduce(self, xp, flat, op):  # pragma: no cover - abstract
        raise NotImplementedError

    def _allgather(self, xp, a, sizes):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class Local(Reduction):
    """One process, the whole vector: every collective is the identity.

    ``solve(..., reduction=Local())`` gives the answer of ``reduction=None`` and counts, in
    ``res.info["allreduces"]``, the collectives the solve would make over several ranks.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> from linsolve_rbp import distributed as lrd
    >>> A = np.diag(np.arange(1.0, 11.0))
    >>> res = lr.solve(A, np.ones(10), method="cg", rtol=1e-10, reduction=lrd.Local())
    >>> res.converged, res.info["allreduces"] > 0
    (True, True)
    """

    def _allreduce(self, xp, flat, op):
        return flat

    def _allgather(self, xp, a, sizes):
        return [a]


#: The reduction of a solve given none (:func:`linsolve_rbp.solvers.current_reduction`).
LOCAL = Local()


# -- in-process simulated ranks ------------------------------------------------------------------
class _Hub:
    """What the ranks of a :class:`Simulated` group share: a barrier and one slot per rank."""

    def __init__(self, size: int, timeout: float):
        self.size = size
        self.timeout = timeout
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list = [None] * size
        self.result: Any = None
        self.error: str | None = None
        #: A rank failed and released the others (their error is not the cause).
        self.failed = False

    def exchange(self, rank: int, what: tuple, value, combine: Callable):
        """Every rank hands in ``value`` under the label ``what``; rank 0 checks that the
        labels agree and combines the values in rank order; every rank gets the result."""
        self.slots[rank] = (what, value)
        self._wait()
        if rank == 0:
            labels = [s[0] for s in self.slots]
            if any(lab != labels[0] for lab in labels):
                self.error = (
                    "the simulated ranks disagree on the collective: "
                    + "; ".join(f"rank {r} called {lab}" for r, lab in enumerate(labels))
                    + " (a solver took a decision on local values, or the ranks were given "
                    "different options)"
                )
                self.result = None
            else:
                self.result = combine([s[1] for s in self.slots])
        self._wait()
        if self.error is not None:
            raise RuntimeError(self.error)
        out = self.result
        self._wait()  # nobody writes a slot before every rank has read the result
        return out

    def _wait(self):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            if self.error is not None:
                raise RuntimeError(self.error) from None
            if self.failed:
                raise _Released() from None
            raise RuntimeError(
                f"a simulated rank waited {self.timeout} s for the others at a collective: "
                "the ranks made different numbers of collectives, or one of them failed"
            ) from None


class _Released(RuntimeError):
    """Raised in a simulated rank released from a collective because another rank failed."""

    def __init__(self):
        super().__init__("another simulated rank failed")


class _SimulatedRank(Reduction):
    def __init__(self, hub: _Hub, rank: int):
        super().__init__()
        self._hub = hub
        self.rank = rank
        self.size = hub.size

    def _allreduce(self, xp, flat, op):
        def combine(vals):
            acc = vals[0]
            for v in vals[1:]:
                acc = acc + v if op == "sum" else xp.maximum(acc, v)
            return acc

        out = self._hub.exchange(self.rank, (op, tuple(flat.shape), str(flat.dtype)), flat, combine)
        return xp.asarray(out, copy=True)

    def _allgather(self, xp, a, sizes):
        parts = self._hub.exchange(self.rank, ("allgather", tuple(a.shape[:-1]), str(a.dtype)), a, list)
        return [xp.asarray(p, copy=True) for p in parts]

    def __repr__(self):
        return f"Simulated(size={self.size})[{self.rank}]"


class Simulated:
    """``size`` ranks simulated in one process, one thread each, for tests: the collectives
    are made of the arrays of all ranks (summed in rank order, so every rank gets the same
    bits), and a rank that calls another collective than the others, or one more, is an
    error rather than a hang.

    ``sim[r]`` is rank ``r``'s reduction; :meth:`run` runs a function on every rank at once.

    Parameters
    ----------
    size : int
        The number of ranks.
    timeout : float
        Seconds a rank waits for the others at a collective before it gives up.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> from linsolve_rbp import distributed as lrd
    >>> d = np.arange(1.0, 9.0)
    >>> sim = lrd.Simulated(2)
    >>> def rank_solve(red):  # rank r holds rows 4r .. 4r+3 of a diagonal system
    ...     rows = slice(4 * red.rank, 4 * red.rank + 4)
    ...     A = lr.LinearOperator((4, 4), matvec=lambda v: d[rows] * v, like=d)
    ...     return lr.solve(A, np.ones(4), method="cg", rtol=1e-12, reduction=red)
    >>> r0, r1 = sim.run(rank_solve)
    >>> np.allclose(np.concatenate([r0.x, r1.x]), 1 / d), r0.iterations == r1.iterations
    (True, True)
    """

    def __init__(self, size: int, timeout: float = 60.0):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self._hub = _Hub(size, float(timeout))
        self._ranks = [_SimulatedRank(self._hub, r) for r in range(size)]

    def __getitem__(self, rank: int) -> Reduction:
        return self._ranks[rank]

    def __len__(self):
        return self.size

    def __iter__(self):
        return iter(self._ranks)

    def run(self, fn: Callable, *args, **kwargs) -> list:
        """``[fn(sim[0], *args, **kwargs), ..., fn(sim[size - 1], ...)]``, the calls made at
        once, one thread per rank. An exception on any rank is raised here (the others are
        released)."""
        results: list = [None] * self.size
        errors: list = [None] * self.size

        def body(r):
            try:
                results[r] = fn(self._ranks[r], *args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors[r] = e
                if not isinstance(e, _Released):
                    self._hub.failed = True
                self._hub.barrier.abort()
                return
            try:
                # Every rank ends here: a rank still inside a collective is a disagreement.
                self._hub.exchange(r, ("end of run",), None, lambda v: None)
            except BaseException as e:  # noqa: BLE001
                errors[r] = e
                self._hub.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._hub.barrier.reset()
        self._hub.error, self._hub.failed = None, False
        # The error of the rank that failed, not of those it released.
        cause = next((e for e in errors if e is not None and not isinstance(e, _Released)), None)
        if cause is not None:
            raise cause
        return results


# -- torch.distributed ----------------------------------------------------------------------------
class TorchDistributed(Reduction):
    """Collectives of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU, any
    other backend), on torch tensors (numpy arrays are copied to CPU tensors, which a gloo
    group reduces and an NCCL group does not: with NCCL, solve on CUDA tensors).

    Parameters
    ----------
    group : ProcessGroup or None
        The group whose ranks hold the shards; None is the default (world) group.

    Raises
    ------
    RuntimeError
        If torch.distributed is not available or not initialised
        (:func:`torch.distributed.init_process_group`; ``torchrun`` sets the environment it
        reads).
    """

    def __init__(self, group=None):
        super().__init__()
        try:
            import torch.distributed as dist
        except ImportError as e:  # pragma: no cover - torch is optional
            raise RuntimeError("TorchDistributed needs torch (pip install linsolve_rbp[torch])") from e
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributed needs an initialised process group: call "
                "torch.distributed.init_process_group(...) first (under torchrun, "
                "init_process_group('gloo') or ('nccl') reads the environment it sets)"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _tensor(self, xp, a):
        import torch

        if isinstance(a, torch.Tensor):
            return a, None
        return torch.from_numpy(_b.to_numpy(a).copy()), _b.device_of(a)

    def _back(self, xp, t, device):
        if device is None:
            return t
        return xp.asarray(t.numpy(), device=device)

    def _allreduce(self, xp, flat, op):
        import torch

        dist = self._dist
        t, dev = self._tensor(xp, flat)
        t = t.clone(memory_format=torch.contiguous_format)
        if t.is_complex():
            if op != "sum":
                raise ValueError("allreduce_max needs real arrays")
            buf = torch.view_as_real(t)
        else:
            buf = t
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return self._back(xp, t, dev)

    def _allgather(self, xp, a, sizes):
        import torch

        dist = self._dist
        t, dev = self._tensor(xp, a)
        t = t.contiguous()
        if sizes is None:
            n = torch.tensor([t.shape[-1]], dtype=torch.int64, device=t.device)
            ns = [torch.empty_like(n) for _ in range(self.size)]
            dist.all_gather(ns, n, group=self.group)
            sizes = [int(v.item()) for v in ns]
        big = max(sizes)
        pad = torch.zeros(t.shape[:-1] + (big,), dtype=t.dtype, device=t.device)
        pad[..., : t.shape[-1]] = t
        bufs = [torch.empty_like(pad) for _ in range(self.size)]
        dist.all_gather(bufs, pad, group=self.group)
        return [self._back(xp, buf[..., :k], dev) for buf, k in zip(bufs, sizes)]


# -- MPI -------------------------------------------------------------------------------------------
class MPI(Reduction):
    """Collectives of an MPI communicator through mpi4py, for numpy arrays (other arrays,
    cupy or torch, are copied through the host).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        The communicator whose ranks hold the shards; None is ``MPI.COMM_WORLD``.

    Raises
    ------
    RuntimeError
        If mpi4py is not installed (``pip install linsolve_rbp[mpi]`` installs it with an MPI
        wheel).
    TypeError
        If ``comm`` is not an mpi4py communicator.
    """

    def __init__(self, comm=None):
        super().__init__()
        if comm is not None and not all(hasattr(comm, a) for a in ("Get_rank", "Get_size", "Allreduce", "allgather")):
            raise TypeError(
                f"comm must be None or an mpi4py communicator (MPI.COMM_WORLD, ...), got {type(comm).__name__}"
            )
        try:
            from mpi4py import MPI as _mpi
        except ImportError as e:
            raise RuntimeError(
                "the MPI reduction needs mpi4py: pip install linsolve_rbp[mpi] (mpi4py and an "
                "MPI wheel, mpich)"
            ) from e
        self._mpi = _mpi
        self.comm = _mpi.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def _allreduce(self, xp, flat, op):
        import numpy as np

        host = isinstance(flat, np.ndarray)
        buf = np.array(_b.to_numpy(flat), copy=True, order="C")
        if op == "max" and np.iscomplexobj(buf):
            raise ValueError("allreduce_max needs real arrays")
        self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM if op == "sum" else self._mpi.MAX)
        return buf if host else xp.asarray(buf, device=_b.device_of(flat))

    def _allgather(self, xp, a, sizes):
        import numpy as np

        host = isinstance(a, np.ndarray)
        parts = self.comm.allgather(np.ascontiguousarray(_b.to_numpy(a)))
        if host:
            return parts
        return [xp.asarray(p, device=_b.device_of(a)) for p in parts]


# -- helpers ---------------------------------------------------------------------------------------
def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _is_complex(xp, dtype) -> bool:
    return xp.isdtype(dtype, "complex floating")


_GATHER_FN = None


def _torch_gather_fn():
    """The differentiable all-gather for torch (made once, torch imported only then): its
    transpose sums the ranks' gradients (one all-reduce) and keeps this rank's slice, whose
    transpose is the all-gather again, so double backward works too."""
    global _GATHER_FN
    if _GATHER_FN is not None:
        return _GATHER_FN
    import torch

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, red, xp, sizes):
            ctx.red, ctx.xp = red, xp
            ctx.n = a.shape[-1]
            full = red._gather_concat(xp, a.detach(), sizes)
            ctx.sizes = sizes
            return full

        @staticmethod
        def backward(ctx, g):
            return ReduceSlice.apply(g, ctx.red, ctx.xp, ctx.n, ctx.sizes), None, None, None

    class ReduceSlice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, g, red, xp, n, sizes):
            ctx.red, ctx.xp, ctx.sizes = red, xp, sizes
            (tot,) = red._reduce(xp, (g.detach().contiguous(),), "sum")
            red.allreduces -= 1  # an operator's collective, not the solver's
            red.allgathers += 1
            # This rank's slice: the lengths of the ranks before it.
            if sizes is None:
                (lens,) = red._reduce(xp, (_one_hot_len(g, red, n),), "sum")
                red.allreduces -= 1
                lens = [int(v) for v in lens.tolist()]
            else:
                lens = list(sizes)
            start = sum(lens[: red.rank])
            return tot[..., start:start + n].clone()

        @staticmethod
        def backward(ctx, gz):
            return Gather.apply(gz, ctx.red, ctx.xp, ctx.sizes), None, None, None, None

    _GATHER_FN = Gather
    return Gather


def _one_hot_len(like, red, n):
    import torch

    v = torch.zeros(red.size, dtype=torch.float64, device=like.device)
    v[red.rank] = n
    return v
