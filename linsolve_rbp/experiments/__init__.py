"""The three experiments of Liao et al., "Reviving and Improving Recurrent Back-Propagation"
(ICML 2018): Hopfield associative memory (:mod:`.hopfield`), GNNs on citation networks
(:mod:`.citation`), and hyperparameter optimisation through a long training run
(:mod:`.hyperopt`); :mod:`.fresh` measures time and peak memory in a fresh process.

The problems and data loaders they share with the rest of the package live in
:mod:`linsolve_rbp.problems`; ``linsolve-rbp reproduce`` (:mod:`linsolve_rbp.cli.reproduce`)
runs them. The submodules import torch on use; ``import linsolve_rbp.experiments`` needs
only numpy.
"""

from __future__ import annotations

__all__: list[str] = []
