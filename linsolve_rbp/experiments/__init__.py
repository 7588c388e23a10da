"""The three experiments of Liao et al., "Reviving and Improving Recurrent Back-Propagation"
(ICML 2018): Hopfield associative memory, GNNs on citation networks, and hyperparameter
optimisation through a long training run.

The submodules import torch on use; ``import linsolve_rbp.experiments`` needs only numpy.
"""

from __future__ import annotations

__all__ = ["register_cli"]


def register_cli(subparsers):
    """Add the ``reproduce`` subcommand to an argparse ``subparsers`` object."""
    from .cli import register

    return register(subparsers)
