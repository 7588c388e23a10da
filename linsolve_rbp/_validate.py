"""The argument validators every entry point shares.

Each validator takes the value and the argument's name, returns the normalised value (a plain
``int`` or ``float``), and raises a :class:`TypeError` or :class:`ValueError` whose message
names the argument and says what was expected. :func:`linsolve_rbp.solve`, the torch
adapter's ``implicit_grad`` / ``fixed_point`` and :meth:`Solver.check_options` all use them, so
one option is judged the same way wherever it is passed.

This module imports nothing but ``backend``, so every layer may use it; the checks that need
the method registry (:func:`linsolve_rbp.solve.check_options`) live with the registry.
"""

from __future__ import annotations

import difflib
import math
import numbers

from . import backend as _b

__all__ = [
    "ArgumentTypeError",
    "COMMON_OPTIONS",
    "ON_FAILURE",
    "positive_int",
    "nonnegative_int",
    "nonnegative_real",
    "boolean",
    "choice",
    "callable_or_none",
    "did_you_mean",
    "check_kind",
    "check_common",
    "unknown_option",
]

#: The options every method accepts, with :func:`linsolve_rbp.solve`'s defaults.
COMMON_OPTIONS = {
    "rtol": 1e-5,
    "atol": 0.0,
    "maxiter": None,
    "x0": None,
    "M": None,
    "callback": None,
    "throw": False,
    "on_failure": None,
    "batch_dims": 0,
    "check_every": 1,
    "divtol": 1e5,
    "compile": False,
    "reduction": None,
}

#: The failure policies: what a solve that did not succeed does.
ON_FAILURE = ("warn", "raise", "ignore")

# Names people reach for that are not option names, mapped to the option they mean. difflib
# alone would not find these (``tol`` is too short to be "close" to ``rtol`` by its ratio).
_ALIASES = {
    "tol": "rtol",
    "tolerance": "rtol",
    "reltol": "rtol",
    "abstol": "atol",
    "max_iter": "maxiter",
    "max_iterations": "maxiter",
    "niter": "maxiter",
    "iters": "maxiter",
    "x_0": "x0",
    "initial_guess": "x0",
    "preconditioner": "M",
    "precond": "M",
    "raise_on_failure": "throw",
    "onfailure": "on_failure",
    "batch_dim": "batch_dims",
}


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (``maxiter=2.5``, ``throw=1``). Both a TypeError (Python's
    convention) and a ValueError (scipy's, for solver options), so either ``except`` catches it.
    A value of the right type but out of range raises a plain ValueError."""


def _is_int(value) -> bool:
    # bool is an Integral in Python, but maxiter=True is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` as an ``int >= 1`` (or None where ``allow_none``); else a ValueError naming
    ``name``."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        extra = " or None" if allow_none else ""
        error = ValueError if _is_int(value) else ArgumentTypeError
        raise error(f"{name} must be a positive integer{extra}, got {value!r}")
    return int(value)


def nonnegative_int(value, name: str) -> int:
    """``value`` as an ``int >= 0``; else a ValueError naming ``name``."""
    if not _is_int(value) or value < 0:
        error = ValueError if _is_int(value) else ArgumentTypeError
        raise error(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def nonnegative_real(value, name: str, *, allow_none: bool = False, allow_inf: bool = True):
    """``value`` as a ``float >= 0`` (NaN refused; infinity unless ``allow_inf`` is False;
    None where ``allow_none``); else a ValueError naming ``name``.

    0-d arrays (numpy or torch scalars) are accepted and converted with ``float``.
    """
    if value is None and allow_none:
        return None
    if _b.is_array(value) and getattr(value, "ndim", None) == 0 and not isinstance(value, bool):
        try:
            if not _b.is_complex_dtype(_b.array_namespace(value), value.dtype):
                value = float(value)
        except (TypeError, ValueError):
            pass
    extra = " or None" if allow_none else ""
    if not _is_real(value):
        raise ArgumentTypeError(f"{name} must be a non-negative real number{extra}, got {value!r}")
    v = float(value)
    if not v >= 0 or (not allow_inf and math.isinf(v)):
        fin = "finite " if not allow_inf else ""
        raise ValueError(f"{name} must be a {fin}non-negative real number{extra}, got {value!r}")
    return v


def boolean(value, name: str, *, allow_none: bool = False) -> bool | None:
    """``value`` if it is a bool (numpy bools too; None where ``allow_none``); else an
    :class:`ArgumentTypeError` naming ``name``.

    Ints are refused on purpose: ``throw=1`` more often means a confusion of arguments.
    """
    if isinstance(value, bool) or (value is None and allow_none):
        return value
    if type(value).__name__ == "bool_" and type(value).__module__ == "numpy":
        return bool(value)
    extra = ", False or None" if allow_none else " or False"
    raise ArgumentTypeError(f"{name} must be True{extra}, got {value!r}")


def choice(value, name: str, choices, *, allow_none: bool = False):
    """``value`` if it is one of ``choices`` (or None where ``allow_none``); else a ValueError
    naming ``name``, the choices, and the closest one."""
    if value is None and allow_none:
        return None
    try:
        ok = value in choices and not isinstance(value, bool) or (
            isinstance(value, bool) and any(c is value for c in choices)
        )
    except TypeError:  # unhashable or uncomparable
        ok = False
    if ok:
        return value
    shown = ", ".join(repr(c) for c in choices) + (", or None" if allow_none else "")
    hint = did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
    raise ValueError(f"{name} must be one of {shown}; got {value!r}{hint}")


def callable_or_none(value, name: str):
    """``value`` if it is callable or None; else a TypeError naming ``name``."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")
    return value


def did_you_mean(name: str, candidates, aliases: dict | None = None) -> str:
    """``" (did you mean 'x'?)"`` for the candidate closest to ``name``, or ``""``."""
    if not isinstance(name, str):
        return ""
    candidates = list(candidates)
    if aliases:
        target = aliases.get(name.lower())
        if target in candidates:
            return f" (did you mean {target!r}?)"
    # Compare case- and separator-insensitively, so that "scipy_gmres" finds "scipy.gmres"
    # and "Restart" finds "restart".
    def key(s):
        return s.lower().replace("_", "").replace(".", "").replace("-", "")

    keyed = {key(c): c for c in candidates}
    if key(name) in keyed:
        return f" (did you mean {keyed[key(name)]!r}?)"
    close = difflib.get_close_matches(key(name), list(keyed), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {keyed[close[0]]!r}?)"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: The option kinds :meth:`Solver.check_options` understands, besides a tuple of choices.
OPTION_KINDS = (
    "positive_real",
    "nonnegative",
    "nonnegative_or_inf",
    "positive_int",
    "nonnegative_int",
    "bool",
    "positive_int_or_none",
    "nonnegative_or_none",
)


def check_kind(value, name: str, kind):
    """Validate one method option by its declared kind (see :data:`OPTION_KINDS`; a tuple
    is a choice among its values) and return it normalised."""
    if isinstance(kind, tuple):
        return choice(value, name, kind)
    if kind == "positive_real":
        v = nonnegative_real(value, name, allow_inf=False)
        if v == 0:
            raise ValueError(f"{name} must be a positive finite real number, got {value!r}")
        return v
    if kind == "nonnegative":
        # A finite real >= 0: an infinite damping (damp, eta) only makes the iteration
        # non-finite.
        return nonnegative_real(value, name, allow_inf=False)
    if kind == "nonnegative_or_inf":
        return nonnegative_real(value, name)
    if kind == "nonnegative_or_none":
        return nonnegative_real(value, name, allow_none=True)
    if kind == "positive_int":
        return positive_int(value, name)
    if kind == "positive_int_or_none":
        return positive_int(value, name, allow_none=True)
    if kind == "nonnegative_int":
        return nonnegative_int(value, name)
    if kind == "bool":
        return boolean(value, name)
    raise ValueError(f"unknown option kind {kind!r} for option {name!r}; one of {OPTION_KINDS} or a tuple")


def check_common(opts: dict) -> dict:
    """Validate the options every method shares (those present in ``opts``), except ``M``,
    whose check needs the operator types (:func:`linsolve_rbp.solve.check_options`)."""
    out = {}
    if "rtol" in opts:
        out["rtol"] = nonnegative_real(opts["rtol"], "rtol", allow_none=True, allow_inf=False)
    if "atol" in opts:
        out["atol"] = nonnegative_real(opts["atol"], "atol", allow_none=True, allow_inf=False)
    if "maxiter" in opts:
        out["maxiter"] = positive_int(opts["maxiter"], "maxiter", allow_none=True)
    if "divtol" in opts:
        out["divtol"] = nonnegative_real(opts["divtol"], "divtol", allow_none=True)
    if "check_every" in opts:
        out["check_every"] = positive_int(opts["check_every"], "check_every")
    if "batch_dims" in opts:
        v = opts["batch_dims"]
        if not _is_int(v) or v not in (0, 1):
            raise ValueError(f"batch_dims must be 0 or 1, got {v!r}")
        out["batch_dims"] = int(v)
    if "callback" in opts:
        out["callback"] = callable_or_none(opts["callback"], "callback")
    if "compile" in opts:
        out["compile"] = boolean(opts["compile"], "compile")
    if "reduction" in opts:
        out["reduction"] = _reduction(opts["reduction"])
    if "throw" in opts:
        out["throw"] = boolean(opts["throw"], "throw")
    if "on_failure" in opts:
        out["on_failure"] = choice(opts["on_failure"], "on_failure", ON_FAILURE, allow_none=True)
    if out.get("throw") and out.get("on_failure") in ("warn", "ignore"):
        raise ValueError(
            f"throw=True conflicts with on_failure={out['on_failure']!r}: throw=True is an alias "
            "of on_failure='raise'; pass only one of them"
        )
    if "x0" in opts:
        x0 = opts["x0"]
        if x0 is not None and not _b.is_array(x0):
            raise TypeError(
                f"x0 must be an array like b (numpy, torch, cupy or array-API) or None, "
                f"got {type(x0).__name__}"
            )
        out["x0"] = x0
    # Fixed-budget mode runs exactly maxiter iterations; without one there is no budget.
    rtol = out.get("rtol", COMMON_OPTIONS["rtol"])
    atol = out.get("atol", COMMON_OPTIONS["atol"])
    if rtol is None and atol is None and out.get("maxiter") is None:
        raise ValueError("maxiter must be given in fixed-budget mode (rtol=None, atol=None)")
    return out


def unknown_option(method: str, unknown, accepted, *, aliases=None, where: str = "") -> TypeError:
    """The error for the options ``unknown`` that ``method`` does not take: the closest of
    ``accepted`` to the first (by ``aliases``, the common options' by default) and all of
    them; ``where`` prefixes the message (``"forward: forward "``)."""
    accepted = sorted(accepted, key=str.lower)
    first = unknown[0]
    hint = did_you_mean(first, accepted, _ALIASES if aliases is None else aliases)
    s = "s" if len(unknown) > 1 else ""
    return TypeError(
        f"{where}method {method!r} got unknown option{s} {', '.join(map(repr, unknown))}{hint}; "
        f"it accepts: {', '.join(accepted)}"
    )




def _reduction(red):
    """``reduction=``: None or a reduction object (:mod:`linsolve_rbp.distributed`)."""
    if red is None:
        return None
    missing = [a for a in ("allreduce_sum", "allreduce_max", "allreduces", "size", "rank") if not hasattr(red, a)]
    if missing:
        raise TypeError(
            "reduction must be None or a reduction of linsolve_rbp.distributed (Local, "
            "Simulated(n)[rank], TorchDistributed(group), MPI(comm)), got "
            f"{type(red).__name__} (it has no {', '.join(missing)})"
        )
    return red
