"""The solvers, one method per module, and the public names for writing a new one.

Each method is a :class:`Solver` subclass registered by name with
:func:`linsolve_rbp.register_method`; :func:`linsolve_rbp.solve` validates the call and hands
the solver a :class:`Problem` in batched form; a :class:`Monitor` applies the stopping,
divergence and non-finite tests and returns the :class:`Outcome`. See "Adding a solver" in the
documentation.
"""

from ._base import (
    Monitor,
    Outcome,
    Problem,
    Solver,
    all_ranks,
    allreduce_max,
    allreduce_sum,
    current_reduction,
    dot,
    local_dot,
    norm,
    safe_norm,
    using_reduction,
    verified_rounds,
)

__all__ = [
    "Solver", "Problem", "Monitor", "Outcome", "dot", "norm", "safe_norm", "verified_rounds",
    "local_dot", "allreduce_sum", "allreduce_max", "all_ranks", "current_reduction",
    "using_reduction",
]
