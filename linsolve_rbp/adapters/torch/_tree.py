"""Structured states: tuples, lists and dicts of tensors (nested freely) as one flat tensor.

A multiscale DEQ keeps one tensor per resolution; :func:`fixed_point`, :func:`implicit_grad`,
:func:`unroll` and :class:`JacobianOperator` accept such a state as it is. Inside, the state is
laid out as one flat tensor, the concatenation of its tensors flattened in the order of
:func:`Structure.leaves` (tuples and lists in order, dicts in the key order of the starting
state; a dict ``f`` returns, or a gradient given as a dict, may hold the same keys in another
order: its tensors are matched by key), so that the solvers see one vector, and ``f`` sees the
user's structure again: the map the solvers iterate is ``x -> pack(f(unpack(x)))``. Packing
and unpacking are differentiable tensor operations (``reshape``, ``cat``, ``split``), so
gradients flow through them, and they do not read the host, so they run under
``torch.func.vmap`` too.

All tensors of one state share one floating dtype and device (they become one tensor).
This module holds no state.
"""

from __future__ import annotations

import collections
import math

import torch

from ..._validate import check_common
from ._checks import check_batch_dims, check_state, match_output

__all__ = ["Structure", "is_structured", "flat_state", "tensors", "detached"]


def is_structured(state) -> bool:
    """Whether ``state`` is a container (tuple, list or dict) rather than one tensor."""
    return isinstance(state, (tuple, list, dict))


class _Leaf:
    __slots__ = ()

    def __repr__(self):
        return "*"


_LEAF = _Leaf()


def _describe(node) -> str:
    """The layout in Python's notation: ``(tensor, {'a': tensor})``."""
    if node is _LEAF:
        return "tensor"
    kind, typ, keys, children = node
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {_describe(c)}" for k, c in zip(keys, children)) + "}"
    inner = ", ".join(_describe(c) for c in children)
    if kind == "list":
        return f"[{inner}]"
    return f"({inner}{',' if len(children) == 1 else ''})"


def _dict_maker(x):
    """How to rebuild a dict of ``x``'s type from ``(key, value)`` pairs."""
    typ = type(x)
    if typ is dict:
        return dict
    if isinstance(x, collections.defaultdict):
        factory = x.default_factory
        return lambda pairs: typ(factory, pairs)
    return typ


def _flatten(x, path, leaves, paths, like=None):
    """The tree of ``x`` (``_LEAF`` or ``(kind, maker, keys, children)``); appends its tensors
    and their paths to ``leaves`` and ``paths``. With ``like`` (a tree), a dict holding the
    keys of the matching dict of ``like`` in another order is read in ``like``'s key order: a
    dict's tensors are matched by key, not by position."""
    if isinstance(x, torch.Tensor):
        leaves.append(x)
        paths.append(path)
        return _LEAF
    sub = like[3] if isinstance(like, tuple) else None
    if isinstance(x, dict):
        keys = tuple(x.keys())
        if sub is not None and like[0] == "dict" and keys != like[2] and set(keys) == set(like[2]):
            keys = like[2]
        kids = sub if sub is not None and len(sub) == len(keys) else (None,) * len(keys)
        return ("dict", _dict_maker(x), keys,
                tuple(_flatten(x[k], f"{path}[{k!r}]", leaves, paths, c) for k, c in zip(keys, kids)))
    if isinstance(x, (tuple, list)):
        kind = "list" if isinstance(x, list) else "tuple"
        kids = sub if sub is not None and len(sub) == len(x) else (None,) * len(x)
        return (kind, type(x), None,
                tuple(_flatten(v, f"{path}[{i}]", leaves, paths, c) for i, (v, c) in enumerate(zip(x, kids))))
    raise TypeError(
        f"{path} must be a torch.Tensor, or a tuple, list or dict of tensors (nested freely), "
        f"got {type(x).__name__}"
    )


def _build(node, it):
    if node is _LEAF:
        return next(it)
    kind, typ, keys, children = node
    values = [_build(c, it) for c in children]
    if kind == "dict":
        return typ(list(zip(keys, values)))
    if kind == "tuple" and hasattr(typ, "_fields"):
        return typ(*values)  # a namedtuple takes its fields one by one
    return typ(values)


def _same_tree(a, b) -> bool:
    if a is _LEAF or b is _LEAF:
        return a is b
    if a[0] != b[0] or a[2] != b[2] or len(a[3]) != len(b[3]):
        return False
    return all(_same_tree(x, y) for x, y in zip(a[3], b[3]))


class Structure:
    """The layout of a structured state: its containers, and the shape of each tensor.

    Built from a state with :meth:`of` (which checks it); then :meth:`pack` turns a state of
    this structure into one flat tensor (``(n,)``, or ``(B, m)`` with ``batch_dims=1``),
    :meth:`unpack` turns such a tensor back, and :meth:`wrap` turns ``f`` on states into ``f``
    on flat tensors.

    Attributes
    ----------
    shapes : tuple of tuple of int
        The shapes of the state's tensors, in order.
    paths : tuple of str
        Where each tensor sits (``"h0[1]['a']"``), for messages.
    batch_dims : {0, 1}
        With 1, every tensor has the same leading batch axis and the flat form is ``(B, m)``.
    dtype, device
        Shared by every tensor.
    """

    def __init__(self, tree, shapes, paths, dtype, device, batch_dims, name):
        self.tree = tree
        self.shapes = tuple(shapes)
        self.paths = tuple(paths)
        self.dtype = dtype
        self.device = device
        self.batch_dims = batch_dims
        self.name = name
        if batch_dims == 1:
            self.sizes = tuple(math.prod(s[1:]) for s in self.shapes)
            self.nbatch = self.shapes[0][0]
        else:
            self.sizes = tuple(math.prod(s) for s in self.shapes)
            self.nbatch = None

    def __repr__(self):
        return f"Structure({_describe(self.tree)}, shapes={list(self.shapes)})"

    @classmethod
    def of(cls, state, name, batch_dims=0) -> "Structure":
        """The structure of ``state`` (named ``name`` in messages), after checking that every
        tensor in it is a dense real floating tensor, that they share dtype and device, and,
        with ``batch_dims=1``, that they share a non-empty leading batch axis."""
        leaves, paths = [], []
        tree = _flatten(state, name, leaves, paths)
        if not leaves:
            raise ValueError(f"{name} holds no tensor: a state needs at least one")
        for t, p in zip(leaves, paths):
            check_state(t, p)
        first, p0 = leaves[0], paths[0]
        for t, p in zip(leaves[1:], paths[1:]):
            if t.dtype != first.dtype or t.device != first.device:
                raise TypeError(
                    f"{p} ({t.dtype} on {t.device}) must have the dtype and device of {p0} "
                    f"({first.dtype} on {first.device}): the tensors of one state are solved "
                    "for as one vector"
                )
        if batch_dims == 1:
            for t, p in zip(leaves, paths):
                if t.ndim < 1 or t.shape[0] == 0:
                    raise ValueError(
                        f"batch_dims=1 needs {p} with a non-empty leading batch axis, got shape "
                        f"{tuple(t.shape)}"
                    )
                if t.shape[0] != first.shape[0]:
                    raise ValueError(
                        f"batch_dims=1 needs every tensor of {name} to have the same leading "
                        f"batch axis: {p} has {t.shape[0]} samples, {p0} has {first.shape[0]}"
                    )
        try:  # the state is rebuilt for f and for the output: refuse a container that cannot be
            _build(tree, iter(leaves))
        except Exception as exc:  # noqa: BLE001 - a container type whose constructor differs
            raise TypeError(
                f"{name} holds a container that cannot be rebuilt from its items ({exc}); use "
                "tuples, lists, dicts (or namedtuples, OrderedDict, defaultdict)"
            ) from None
        return cls(tree, [tuple(t.shape) for t in leaves], paths, first.dtype, first.device, batch_dims, name)

    # -- states <-> flat tensors ----------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Entries of the flat form (per sample with ``batch_dims=1``)."""
        return sum(self.sizes)

    def leaves(self, state, name=None):
        """The tensors of ``state`` in order, after checking that it has this structure
        (``name`` names it in messages)."""
        name = name or self.name
        leaves, paths = [], []
        tree = _flatten(state, name, leaves, paths, self.tree)
        if not _same_tree(tree, self.tree):
            raise ValueError(
                f"{name} must have the structure of {self.name}, {_describe(self.tree)}, got "
                f"{_describe(tree)}"
            )
        for t, p, shape in zip(leaves, paths, self.shapes):
            if tuple(t.shape) != shape:
                raise ValueError(f"{p} must have shape {shape} (as in {self.name}), got {tuple(t.shape)}")
        return leaves

    def pack(self, state, name=None):
        """``state`` (of this structure) as one flat tensor; differentiable."""
        return self.pack_leaves(self.leaves(state, name))

    def pack_leaves(self, leaves):
        if self.batch_dims == 1:
            parts = [t.reshape(t.shape[0], -1) for t in leaves]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        parts = [t.reshape(-1) for t in leaves]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def unpack(self, x):
        """The flat tensor ``x`` (``(n,)``, or ``(B, m)`` with ``batch_dims=1``) as a state of
        this structure; its tensors are views of ``x``."""
        if self.batch_dims == 1:
            parts = torch.split(x, self.sizes, dim=-1) if len(self.sizes) > 1 else (x,)
            leaves = [p.reshape((x.shape[0],) + s[1:]) for p, s in zip(parts, self.shapes)]
        else:
            parts = torch.split(x, self.sizes) if len(self.sizes) > 1 else (x,)
            leaves = [p.reshape(s) for p, s in zip(parts, self.shapes)]
        return _build(self.tree, iter(leaves))

    def build(self, leaves):
        """A state of this structure holding ``leaves`` (in order)."""
        return _build(self.tree, iter(leaves))

    def flat_shape(self):
        """The shape of the flat form."""
        return (self.nbatch, self.numel) if self.batch_dims == 1 else (self.numel,)

    # -- f -----------------------------------------------------------------------------------
    def check_output(self, out):
        """The leaves of ``f``'s output, checked against this structure: same containers, same
        shapes, same dtype (a lower-precision floating output under :func:`torch.autocast` is
        cast back, as for one tensor)."""
        if isinstance(out, torch.Tensor) and self.tree is not _LEAF:
            raise TypeError(
                f"f must return a state of the structure of {self.name}, {_describe(self.tree)}, "
                "got one torch.Tensor"
            )
        leaves, paths = [], []
        try:
            tree = _flatten(out, "f(h)", leaves, paths, self.tree)
        except TypeError as exc:
            raise TypeError(f"f must return a state of the structure of {self.name}: {exc}") from None
        if not _same_tree(tree, self.tree):
            raise ValueError(
                f"f must map a state to a state of the same structure: {self.name} is "
                f"{_describe(self.tree)}, f(h) is {_describe(tree)}"
            )
        checked = []
        for t, p, shape, hp in zip(leaves, paths, self.shapes, self.paths):
            if t.shape != shape or t.dtype != self.dtype:
                t = match_output(t, shape, self.dtype, self.device, p, hp)
            checked.append(t)
        return checked

    def wrap(self, f):
        """``f`` on flat tensors: ``x -> pack(f(unpack(x)))``, with ``f``'s output checked."""

        def flat_f(x):
            return self.pack_leaves(self.check_output(f(self.unpack(x))))

        flat_f.__wrapped__ = f
        return flat_f


def flat_state(state, name, batch_dims):
    """Check a state argument (one tensor, or a structure of tensors) and ``batch_dims``;
    returns ``(batch_dims, structure, x)``: the structure (None for one tensor) and the state
    as the tensor the solvers see (the state itself for one tensor, its packed form for a
    structure; differentiable in the state either way)."""
    if is_structured(state):
        batch_dims = check_common({"batch_dims": batch_dims})["batch_dims"]
        structure = Structure.of(state, name, batch_dims)
        return batch_dims, structure, structure.pack(state)
    check_state(state, name)
    return check_batch_dims(batch_dims, state, name), None, state


def tensors(state) -> list:
    """The tensors of a state (one tensor, or a structure of them), in order; no checks."""
    if not is_structured(state):
        return [state]
    leaves, paths = [], []
    _flatten(state, "state", leaves, paths)
    return leaves


def detached(state):
    """The state with each of its tensors detached, in the same containers."""
    if not is_structured(state):
        return state.detach()
    leaves, paths = [], []
    tree = _flatten(state, "state", leaves, paths)
    return _build(tree, iter([t.detach() for t in leaves]))
