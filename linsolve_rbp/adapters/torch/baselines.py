"""The baselines recurrent back-propagation is compared with: back-propagation through time
(BPTT) through every iteration of ``h <- f(h)``, and its truncated variant (TBPTT).

Reference: R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018
(Proposition 1: at a converged fixed point, TBPTT with truncation ``K`` is Neumann-RBP with
``K`` terms).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..._validate import nonnegative_int
from ._tree import Structure, is_structured

__all__ = ["unroll"]


def unroll(f: Callable, h0, steps: int, truncate: int | None = None):
    """Iterate ``h <- f(h)`` ``steps`` times: back-propagation through time (BPTT) or its
    truncated variant (TBPTT), the baselines of recurrent back-propagation.

    Parameters
    ----------
    f : callable
        State -> state of the same structure and shapes.
    h0 : torch.Tensor, or tuple, list or dict of torch.Tensor
        The starting state: one tensor, or a structure of tensors (nested freely), which ``f``
        receives and returns as it is.
    steps : int
        Number of iterations (0 returns ``h0``).
    truncate : int, optional
        None: every iteration is recorded (BPTT; memory grows with ``steps``). ``K``: the first
        ``steps - K`` iterations run under :func:`torch.no_grad` and only the last ``K`` are
        recorded (TBPTT); ``h0`` then receives no gradient unless ``K >= steps``.

    Returns
    -------
    torch.Tensor, or a structure like ``h0``
        The state after ``steps`` iterations.

    Raises
    ------
    TypeError, ValueError
        For bad input.

    Notes
    -----
    At a converged fixed point, the TBPTT gradient with truncation ``K`` equals Neumann-RBP
    with ``K`` terms, ``z = sum_{k<K} (J^T)^k g`` (Proposition 1 of Liao et al., 2018); with
    :func:`implicit_grad` that is ``method="neumann", rtol=None, atol=None, maxiter=K - 1``.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> h = lrt.unroll(lambda h: w * h + 1.0, torch.tensor(0.0, dtype=torch.float64), steps=3)
    >>> h.item()
    1.75
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    structure = Structure.of(h0, "h0") if is_structured(h0) else None
    if structure is None and not isinstance(h0, torch.Tensor):
        raise TypeError(
            f"h0 must be a torch.Tensor, or a tuple, list or dict of tensors, got {type(h0).__name__}"
        )
    steps = nonnegative_int(steps, "steps")
    if truncate is not None:
        truncate = nonnegative_int(truncate, "truncate")
        if truncate > steps:
            raise ValueError(f"truncate ({truncate}) must not exceed steps ({steps})")
    recorded = steps if truncate is None else truncate
    if structure is not None:
        # f sees the user's structure; each output is checked to keep it (and its shapes).
        def step(h):
            return structure.build(structure.check_output(f(h)))
    else:
        step = f
    h = h0
    free = steps - recorded
    if free:
        with torch.no_grad():
            for _ in range(free):
                h = step(h)
        h = h.detach() if structure is None else structure.build([t.detach() for t in structure.leaves(h)])
    for _ in range(recorded):
        h = step(h)
    return h
