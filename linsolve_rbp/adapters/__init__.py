"""Framework adapters.

- :mod:`linsolve_rbp.adapters.torch` (a package: ``jacobian``, ``implicit``, ``layer``,
  ``baselines``, ``penalties``): Jacobians of PyTorch functions as operators, implicit
  gradients, a differentiable fixed-point layer whose backward pass is recurrent
  back-propagation, the unrolled (BPTT / TBPTT) baselines, and contraction penalties. It
  keeps no module-level state.
- :mod:`linsolve_rbp.adapters.cupy`: operators on cupy arrays and zero-copy DLPack bridges
  between CUDA torch tensors and cupy.

The submodules import their framework only when they are imported themselves, so
``import linsolve_rbp.adapters`` works without torch or cupy installed::

    from linsolve_rbp.adapters import torch as lrt
"""

__all__ = ["torch", "cupy"]
