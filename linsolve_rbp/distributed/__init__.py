"""Solves whose vectors are sharded over processes.

Each rank holds a slice of the unknowns and of the right-hand side and an operator acting on
its slice (doing its own communication); ``solve(A_local, b_local, reduction=red)`` then
takes every inner product and norm as a global reduction through ``red``, so that all ranks
run the same iterations, take the same decisions and stop together:

- :class:`TorchDistributed` -- a ``torch.distributed`` process group (gloo, NCCL, ...);
- :class:`MPI` -- an mpi4py communicator, for numpy (and, through the host, other) arrays;
- :class:`Simulated` -- ranks simulated by threads in one process, for tests;
- :class:`Local` -- one process (what ``reduction=None`` does), counting the collectives a
  sharded solve would make.

``res.info["allreduces"]`` reports the collectives the solver made. torch and mpi4py are
imported only when their engine is made.
"""

from ._engines import LOCAL, MPI, Local, Reduction, Simulated, TorchDistributed
from ._sharded import row_sharded

__all__ = ["Reduction", "Local", "LOCAL", "Simulated", "TorchDistributed", "MPI", "row_sharded"]
