"""Convergence warnings a person can read: one in full, then a periodic count.

A training loop that calls a solve (or a :func:`~linsolve_rbp.adapters.torch.fixed_point`
layer) at every step and fails at every step would otherwise print one
:class:`~linsolve_rbp.ConvergenceWarning` per step: each carries its own numbers, so Python's
once-per-location filter never recognises two of them as the same. :func:`warn_failure`
deduplicates them per call site: the first warning of a call site is issued in full, later
ones only at the 10th, 100th, 1000th, ... occurrence, with a line saying how many similar
warnings were suppressed since the last one shown.

:func:`show_all_convergence_warnings` switches the deduplication off (every failure warns);
:func:`reset_convergence_warnings` forgets the counts (the next failure of each call site is
shown in full again).
"""

from __future__ import annotations

import sys
import threading
import warnings

from ._result import ConvergenceWarning
from ._validate import boolean, positive_int

__all__ = [
    "warn_failure",
    "show_all_convergence_warnings",
    "reset_convergence_warnings",
    "convergence_warning_counts",
]

_LOCK = threading.Lock()
_COUNTS: dict = {}  # key -> [occurrences, occurrence number of the last one shown]
_SHOW_ALL = False

_HOW_TO_SEE_ALL = "call linsolve_rbp.show_all_convergence_warnings(True) to see every one"


def show_all_convergence_warnings(enable: bool = True) -> bool:
    """Issue every :class:`~linsolve_rbp.ConvergenceWarning`, or deduplicate them again.

    By default, repeated convergence warnings from one call site (the line that called
    :func:`linsolve_rbp.solve` with ``on_failure="warn"``, :func:`implicit_grad
    <linsolve_rbp.adapters.torch.implicit_grad>`, or the line that built a
    :func:`fixed_point <linsolve_rbp.adapters.torch.fixed_point>` layer) are deduplicated:
    the first is issued in full, then only the 10th, 100th, 1000th, ... with the number of
    similar warnings suppressed since the last one shown.

    Parameters
    ----------
    enable : bool
        True: issue every warning in full (Python's warning filters still apply). False:
        deduplicate (the default).

    Returns
    -------
    bool
        The previous setting, so that a caller can restore it.

    Examples
    --------
    >>> import linsolve_rbp as lr
    >>> previous = lr.show_all_convergence_warnings(True)
    >>> _ = lr.show_all_convergence_warnings(previous)
    """
    global _SHOW_ALL
    enable = boolean(enable, "enable")
    with _LOCK:
        previous, _SHOW_ALL = _SHOW_ALL, enable
    return previous


def reset_convergence_warnings() -> None:
    """Forget how often each call site has warned: the next convergence warning of every
    call site is issued in full again."""
    with _LOCK:
        _COUNTS.clear()


def convergence_warning_counts() -> dict:
    """How many convergence failures each deduplication key has seen since the last reset
    (shown or suppressed), as ``{key: count}``; a key is ``(filename, lineno, context)``
    unless the caller passed its own."""
    with _LOCK:
        return {k: v[0] for k, v in _COUNTS.items()}


def _caller_location(stacklevel: int):
    """``(filename, lineno)`` of the frame ``stacklevel`` levels above the caller of
    :func:`warn_failure` (stacklevel=1: the line that called it), as ``warnings.warn`` counts."""
    try:
        frame = sys._getframe(stacklevel + 1)
    except ValueError:  # the stack is not that deep
        return ("sys", 1)
    return (frame.f_code.co_filename, frame.f_lineno)


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def warn_failure(
    result,
    context: str,
    *,
    key=None,
    stacklevel: int = 2,
    message: str | None = None,
    location: tuple | None = None,
) -> bool:
    """Issue a :class:`~linsolve_rbp.ConvergenceWarning` for a failed solve, deduplicated.

    Parameters
    ----------
    result : linsolve_rbp.SolveResult or None
        The failed result; its ``message`` is the text of the warning (unless ``message`` is
        given). Nothing is issued for a result that succeeded.
    context : str
        What failed, in words ("fixed_point backward (adjoint solve)"); the warning reads
        ``"{context}: {message}"``.
    key : hashable, optional
        What counts as "the same warning". Default: the code location found by
        ``stacklevel`` (or ``location``) together with ``context``.
    stacklevel : int
        As for :func:`warnings.warn`: 1 is the line that called :func:`warn_failure`, 2 its
        caller (the default), and so on. It gives the location the warning is attributed to
        and, without ``key``, the deduplication key.
    message : str, optional
        The text to use instead of ``result.message``.
    location : (str, int) or (str, int, str), optional
        ``(filename, lineno)`` or ``(filename, lineno, module_name)`` to attribute the warning to, instead of the frame found by
        ``stacklevel`` (for warnings issued from autograd hooks, whose own frames are inside
        torch: the line that built the layer is more useful).

    Returns
    -------
    bool
        Whether a warning was issued (False when suppressed by the deduplication or when the
        result succeeded).

    Notes
    -----
    The first warning of a key is issued in full; later ones only at occurrence 10, 100,
    1000, ..., each with a line saying how many similar warnings were suppressed since the
    last one shown. ``linsolve_rbp.show_all_convergence_warnings(True)`` issues every one;
    ``linsolve_rbp.reset_convergence_warnings()`` forgets the counts. Python's warning
    filters apply to the warnings that are issued (``warnings.simplefilter("error",
    linsolve_rbp.ConvergenceWarning)`` turns them into exceptions; suppressed ones are not
    issued at all, so use :func:`show_all_convergence_warnings` with such a filter).
    """
    if result is not None and message is None and getattr(result, "success", False):
        return False
    stacklevel = positive_int(stacklevel, "stacklevel")
    text = message if message is not None else getattr(result, "message", "the solve did not succeed")
    loc = tuple(location) if location is not None else _caller_location(stacklevel)
    if key is None:
        # The status is part of the key: a NONFINITE after MAX_ITERATIONS at the same call
        # site is news, not a repeat.
        key = (loc[0], loc[1], context, getattr(getattr(result, "status", None), "name", None))
    with _LOCK:
        show_all = _SHOW_ALL
        entry = _COUNTS.setdefault(key, [0, 0])
        entry[0] += 1
        count, last_shown = entry
        show = show_all or count == 1 or _is_power_of_ten(count)
        if show:
            entry[1] = count
    if not show:
        return False
    full = f"{context}: {text}"
    if not show_all:
        if count == 1:
            full += (
                "\n(repeats of this warning from this call site are counted and shown only at "
                f"the 10th, 100th, 1000th, ... occurrence; {_HOW_TO_SEE_ALL})"
            )
        else:
            suppressed = count - last_shown - 1
            full += (
                f"\n(occurrence {count} of this warning from this call site; {suppressed} "
                f"similar warning{'s' if suppressed != 1 else ''} suppressed since the last one "
                f"shown; {_HOW_TO_SEE_ALL})"
            )
    if location is not None:
        filename, lineno = loc[0], loc[1]
        module = loc[2] if len(loc) > 2 else (filename[:-3] if filename.endswith(".py") else filename)
        warnings.warn_explicit(full, ConvergenceWarning, filename, lineno, module=module)
    else:
        warnings.warn(full, ConvergenceWarning, stacklevel=stacklevel + 1)
    return True
