"""Compiled iteration steps for the own methods (``compile=True``), with :func:`torch.compile`.

Needs: torch arrays (``b`` a torch tensor; the array_api_compat torch namespace), and a C
compiler for torch's default backend on CPU. torch is imported here only when a compiled
solve runs.

How a method uses this module
-----------------------------
A method that supports ``compile=True`` sets the class attribute ``compiles = True`` (the
facade refuses ``compile=True`` for the others, naming those that do) and reads
``prob.compile``. It then writes its per-iteration work as a *module-level* function whose
arguments are the arrays it updates and the product callables (``prob.mv``, ``prob.rmv``,
``prob.psolve``), and calls ``compiled(step)(...)`` from its ordinary Python loop::

    from ._compile import compiled

    def _cg_step(xp, mv, x, r, p, rr, active):      # module level: one code object
        q = mv(p)
        ...
        return x, r, p, rr, rnorm                    # arrays only; no host reads inside

    step = compiled(_cg_step, counts=(prob.A, prob.mv))   # cheap: the wrapper is cached
    x, r, p, rr, rnorm = step(xp, prob.mv, x, r, p, rr, mon.active)

Rules that keep one compiled graph per problem kind (torch's guards decide when a function is
compiled again):

- No host reads in the step (``bool(t)``, ``float(t)``, ``t.item()``, ``t.tolist()``, ``if t``):
  each is a graph break (an error with ``fullgraph=True``). Decisions on device values are
  ``xp.where``; the host decisions (the monitor's ``any_active()`` every ``check_every``
  iterations) stay in the Python loop, outside the step.
- No Python numbers that change every iteration (an iteration counter, a step size read on
  the host): each new value compiles a new graph. Pass device arrays instead.
- Products may be called inside the step: the operator's own code is traced with it (a dense
  or sparse matrix product, a user's closure, a vector-Jacobian product of a torch function
  that dynamo can trace). A new closure of the same code does not recompile; an operator of a
  different kind does. Call the first product of a solve outside the compiled step
  (eagerly): the facade checks the first product's output once, and tracing that check would
  compile the step twice.
- ``xp`` may be passed: the array_api_compat namespace is a module, traced through.

Operators count their products (``A.matvec_count``) in Python attributes that the graph
updates, and torch guards a graph on the values it read: a count that differs at the next
call would compile the step again, every call. So pass the operator and the product callables:
``compiled(step, counts=(prob.A, prob.mv, prob.psolve))``; the wrapper then sets the counts of
those operators and of the operators they are built from (found through their attributes, and
through bound methods and closures for the callables: the preconditioner's operator is
reached only that way) to zero for the call and adds them back after it, so every call sees
the same counts and the products stay counted.

Once torch's recompile limit (``torch._dynamo.config.recompile_limit``, 8 by default) is
reached for a step function, :func:`compiled` runs that function eagerly, with one
:class:`RuntimeWarning`: results stay the same, only the speed changes.
"""

from __future__ import annotations

from types import MappingProxyType

import weakref
from typing import Callable

__all__ = ["BACKEND", "UNROLL", "available", "compiled", "requested", "check_namespace"]

#: The :func:`torch.compile` backend used. Tests set ``"aot_eager"`` (dynamo's tracing,
#: fullgraph checks and autograd, without code generation) to keep compile times short.
BACKEND = "inductor"

#: Inductor's options (``config_patches``) for the compiled steps of CPU tensors, besides the
#: matrix-vector products kept as BLAS calls (see :func:`_inductor_backend`). Empty by
#: default. ``{"cpp_wrapper": True}`` makes the code that calls a graph's kernels C++ instead
#: of Python (no Python call and no buffer allocation from Python per kernel): the gmres
#: solve of ``asv_benchmarks/lean_gmres.py`` (dense ``n = 200``, restart 30, three cycles)
#: then took about 0.8 of the time in one interleaved comparison on a loaded 2-core machine
#: (not a committed benchmark), but its cycle compiled in about twice the time (110 s
#: against 50 s), hence not the default. Read-only: assign a new
#: mapping to change it (``_compile.CPU_OPTIONS = {"cpp_wrapper": True}``).
CPU_OPTIONS = MappingProxyType({})

#: Fixed-budget loops of up to this many iterations are compiled as one graph; longer budgets
#: run graphs of this many iterations from a Python loop, still without host reads between
#: them (a graph's size, and its compile time, grow with the iterations unrolled in it).
UNROLL = 32

_CACHE: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def available() -> bool:
    """Whether :func:`torch.compile` can be used (torch is installed and has it)."""
    from .. import backend as _b

    if not _b.has_module("torch"):
        return False
    import torch

    return hasattr(torch, "compile")


def check_namespace(xp, method: str) -> None:
    """Refuse ``compile=True`` for data that is not torch, naming the argument."""
    if getattr(xp, "__name__", "") not in ("array_api_compat.torch", "torch"):
        raise TypeError(
            f"compile=True compiles the iteration of method {method!r} with torch.compile and "
            f"needs torch tensors; b is an array of {getattr(xp, '__name__', type(xp).__name__)} "
            "(pass torch tensors, or drop compile=True)"
        )
    if not available():  # pragma: no cover - torch without compile
        raise TypeError("compile=True needs torch.compile (torch >= 2.0)")


def requested(prob) -> bool:
    """Whether the solve asked for compiled steps (``Problem.compile``)."""
    return bool(getattr(prob, "compile", False))


def compiled(fn: Callable, *, counts=None, fullgraph: bool = True) -> Callable:
    """``fn`` compiled with :func:`torch.compile` (``fullgraph=True`` by default: a graph break
    is an error, not a silent slow path), the wrapper made once per function and backend.

    Parameters
    ----------
    fn : callable
        A module-level function (see the module docstring for what it may contain).
    counts : LinearOperator, callable, tuple of them, or None
        The operators whose products the function applies, or the product callables it calls
        (``(prob.A, prob.mv, prob.psolve)``: an operator is found as the object of a bound
        method or in a closure's cells): their product counts, and those of the operators
        they are built from, are zero during each call and added back after it (see the
        module docstring).
    fullgraph : bool
        Passed to :func:`torch.compile`.

    Returns
    -------
    callable
        Called like ``fn``. Compilation happens at the first call with a new kind of
        arguments (shapes, dtypes, operator code), not here.
    """
    per_fn = _CACHE.get(fn)
    if per_fn is None:
        per_fn = _CACHE[fn] = {}
    key = (BACKEND, bool(fullgraph))
    wrapper = per_fn.get(key)
    if wrapper is None:
        wrapper = per_fn[key] = _Compiled(fn, fullgraph)
    if counts is None:
        return wrapper
    return _Counted(wrapper, _operators(counts))


_COUNTERS = ("matvec_count", "rmatvec_count")


def _operators(roots, limit: int = 256) -> list:
    """The operators reachable from ``roots`` through their attributes (and lists, tuples and
    dicts of them): those whose counts a product of ``roots`` may update."""
    from ..operators import LinearOperator

    stack = list(roots) if isinstance(roots, (list, tuple)) else [roots]
    seen, out = set(), []
    while stack and len(out) < limit:
        op = stack.pop()
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        if not isinstance(op, LinearOperator):
            # A product callable (``prob.mv``, ``prob.psolve``): the operators it calls, found
            # as the object of a bound method and in the cells of a closure.
            owner = getattr(op, "__self__", None)
            if owner is not None:
                stack.append(owner)
            for cell in getattr(op, "__closure__", None) or ():
                try:
                    v = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(v, LinearOperator) or callable(v):
                    stack.append(v)
            continue
        out.append(op)
        for v in vars(op).values():
            if isinstance(v, LinearOperator):
                stack.append(v)
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
    return out


#: Kinds of operator (the classes it is built from) whose products torch.compile could not
#: trace: their steps run uncompiled, without trying again.
_UNTRACEABLE: set = set()


class _Counted:
    """A compiled function called with the product counts of ``ops`` set to zero, and added
    back after the call (a graph guarded on a count of zero is valid at every call).

    An operator whose products torch cannot trace in one graph (a graph break: the
    vector-Jacobian product of :class:`~linsolve_rbp.adapters.torch.JacobianOperator` calls
    ``torch.autograd.grad`` on a graph recorded outside the compiled region) makes the
    function run uncompiled, for this and every later operator of the same kind, with one
    :class:`RuntimeWarning` giving torch's reason."""

    __slots__ = ("fn", "ops", "kind")

    def __init__(self, fn, ops):
        self.fn, self.ops = fn, ops
        self.kind = tuple(sorted({type(op).__qualname__ for op in ops}))

    def __call__(self, *args, **kwargs):
        if self.kind in _UNTRACEABLE:
            return self.fn.fn(*args, **kwargs)
        from torch._dynamo.exc import Unsupported

        try:
            return self._counted(*args, **kwargs)
        except Unsupported as exc:
            _UNTRACEABLE.add(self.kind)
            import warnings

            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(
                f"compile=True: torch.compile cannot trace the products of this operator in one "
                f"graph ({reason}); the iteration runs uncompiled, with the same results",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn.fn(*args, **kwargs)

    def _counted(self, *args, **kwargs):
        saved = []
        for op in self.ops:
            d = op.__dict__
            saved.append(tuple(d.get(c) for c in _COUNTERS))
            for c in _COUNTERS:
                if c in d:
                    d[c] = 0
        try:
            return self.fn(*args, **kwargs)
        finally:
            for op, old in zip(self.ops, saved):
                d = op.__dict__
                for c, v in zip(_COUNTERS, old):
                    if v is not None:
                        d[c] = v + d.get(c, 0)


class _Compiled:
    """``torch.compile(fn)``, falling back to ``fn`` for the calls that hit torch's recompile
    limit (with ``fullgraph=True`` torch raises there)."""

    def __init__(self, fn, fullgraph):
        import torch

        self.fn = fn
        backend = _inductor_backend if BACKEND == "inductor" else BACKEND
        self.compiled = torch.compile(fn, fullgraph=fullgraph, backend=backend)
        self.warned = False

    def __call__(self, *args, **kwargs):
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            return self.compiled(*args, **kwargs)
        except FailOnRecompileLimitHit:
            if not self.warned:
                self.warned = True
                import warnings

                warnings.warn(
                    f"compile=True: torch's recompile limit was reached for {self.fn.__name__} "
                    "(torch._dynamo.config.recompile_limit; many kinds of problem in one "
                    "process); such calls now run uncompiled, with the same results",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self.fn(*args, **kwargs)


def _mv_as_mm(A, v):
    """``A @ v`` (2-d by 1-d) as a one-column matrix product: an extern (BLAS) call."""
    import torch

    return torch.ops.aten.mm.default(A, v.unsqueeze(1)).squeeze(1)


def _inductor_backend(gm, example_inputs):
    """Inductor (:func:`torch._inductor.compile_fx.compile_fx`), with the matrix-vector products
    ``A @ v`` of a graph on the CPU kept as BLAS calls.

    Inductor decomposes ``aten.mv`` into an elementwise product and a sum, which it compiles
    as a loop of its own: on the CPU that loop is slower than BLAS's ``gemv`` for a matrix of
    some size (the dense ``n = 200`` gmres solve of ``asv_benchmarks/lean_gmres.py``, three
    cycles of 30 such products, took about 1.2 times as long as with BLAS in one interleaved
    comparison; ``python -m asv_benchmarks.lean_gmres`` times the solve as it is).
    Here ``aten.mv`` becomes a one-column ``aten.mm`` instead, which inductor calls as an
    extern kernel (one that also has a C shim, for ``cpp_wrapper``). The small products of
    Gram-Schmidt (a basis of up to ``m + 1`` vectors against one vector) stay inductor's
    loops: as extern calls their fixed cost per call outweighs BLAS's speed. Graphs with
    tensors on another device are compiled by inductor as they are."""
    import torch

    try:  # inductor's own entry points (torch 2.1 and later)
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table
    except ImportError:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("inductor")(gm, example_inputs)
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    if devices - {"cpu"}:
        return compile_fx(gm, example_inputs)
    table = dict(select_decomp_table())
    table[torch.ops.aten.mv.default] = _mv_as_mm
    return compile_fx(gm, example_inputs, decompositions=table,
                      config_patches=dict(CPU_OPTIONS) or None)
