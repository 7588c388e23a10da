"""Problems with known structure, shared by the command line, the experiments, the tests and
the benchmarks: one implementation of each.

- :mod:`~linsolve_rbp.problems.matrices`: :func:`convection_diffusion` (sparse, nonsymmetric)
  and :func:`random_contractive` (dense, spectral radius chosen);
- :mod:`~linsolve_rbp.problems.hopfield`: the Hopfield associative memory of Liao et al.
  (2018) on the ten shipped digits (:func:`load_digits`, :func:`hopfield_weights`,
  :func:`corrupt`, :class:`HopfieldNetwork`);
- :mod:`~linsolve_rbp.problems.gnn`: the adjoint system of a gated graph network
  (:func:`gnn_adjoint`; PyTorch);
- :mod:`~linsolve_rbp.problems.data`: loaders of downloaded data (MNIST, Planetoid).

These modules use only numpy, scipy, :mod:`linsolve_rbp.operators` and
:mod:`linsolve_rbp.backend` (torch inside :func:`gnn_adjoint`).
"""

from __future__ import annotations

from .gnn import GNNAdjoint, gnn_adjoint
from .hopfield import HopfieldNetwork, corrupt, hopfield_weights, load_digits
from .matrices import convection_diffusion, random_contractive

__all__ = [
    "convection_diffusion",
    "random_contractive",
    "GNNAdjoint",
    "gnn_adjoint",
    "HopfieldNetwork",
    "hopfield_weights",
    "corrupt",
    "load_digits",
]
