"""The Jacobian ``J = df/dh`` of a PyTorch function at a state, as a linear operator.

``J.T @ u`` is a vector-Jacobian product on one recorded evaluation of ``f``; ``J @ v`` a
Jacobian-vector product, by forward mode (:func:`torch.func.jvp`) or the double-backward trick
on the same record. Any method of :func:`linsolve_rbp.solve` can then work on ``I - J.T``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ... import backend as _b
from ..._validate import boolean
from ...operators import LinearOperator, OperatorMismatchError
from ._checks import as_params, autocast, autocast_state, check_f_output, check_jvp, flat
from ._tree import flat_state, is_structured

__all__ = ["JacobianOperator", "under_transform"]


def under_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (``vmap``, ``grad``, ``vjp``,
    ``jacrev``, ...), where ``requires_grad_()``, ``torch.autograd.grad`` on closed-over
    tensors and reads of values on the host are not available."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def refuse_transform(what, instead):
    """Raise the error for ``what`` called inside a ``torch.func`` transform, naming what
    works there (``instead``)."""
    if under_transform():
        raise RuntimeError(
            f"{what} cannot run inside a torch.func transform (vmap, grad, ...): it records f "
            f"with torch.autograd and reads values on the host, which those transforms do not "
            f"allow; {instead}"
        )


class JacobianOperator(LinearOperator):
    """The Jacobian ``J = df/dh`` of a PyTorch function at a state, as a linear operator.

    ``f`` is evaluated once, at construction, on a detached copy of ``h`` with the graph kept.
    Products with ``J^T`` (vector-Jacobian products, VJPs) back-propagate through that record
    with ``retain_graph=True``; ``f`` is not evaluated again. Products with ``J``
    (Jacobian-vector products, JVPs) use forward-mode differentiation
    (:func:`torch.func.jvp`) or the double-backward trick on the same record.

    Parameters
    ----------
    f : callable
        Maps a state to a state of the same structure, shapes and dtype; it may close over
        parameters and inputs (an :class:`torch.nn.Module` call is fine).
    h : torch.Tensor, or tuple, list or dict of torch.Tensor
        The state at which ``J`` is taken: one tensor of any shape, or a structure of tensors
        (nested freely, sharing one dtype and device), real floating dtype, CPU or CUDA. It is
        not modified, and the operator does not differentiate into it. A structured state is
        one vector to the operator: its tensors flattened and concatenated in order (tuples and
        lists in order, dicts in key order); :meth:`pack` and :meth:`unpack` convert.
    jvp : {"auto", "forward", "double_backward"}
        How ``J @ v`` is computed. ``"forward"``: :func:`torch.func.jvp`, which evaluates ``f``
        (primal and tangent) once per product. ``"double_backward"``: the VJP ``u -> J^T u`` is
        recorded once with ``create_graph=True`` and ``J v`` is its VJP in ``u``; this works
        for any ``f`` that back-propagates, and evaluates ``f`` no further. ``"auto"`` tries
        forward mode on the first product and falls back to double backward where ``f`` does
        not support it (in-place operations on leaves, operations without a forward-mode
        formula).
    batch_dims : {0, 1}
        0: vectors are flat, of shape ``(n,)`` with ``n = h.numel()`` (or ``(K, n)`` for ``K``
        vectors). 1: ``h`` is a batch of ``B`` samples that do not interact; the operator is
        the per-sample block of the block-diagonal Jacobian, of shape ``(m, m)`` with
        ``m = h[0].numel()``, and acts on ``(B, m)`` arrays (row ``i`` against sample ``i``),
        as :func:`linsolve_rbp.solve` passes them with ``batch_dims=1``. Every tensor of a
        structured state then has the same leading batch axis.

    Attributes
    ----------
    output : torch.Tensor
        The recorded ``f(h)``, attached to the graph of everything ``f`` closes over.
    f_evals : int
        Evaluations of ``f`` made by this operator (1 at construction, plus one per forward-mode
        JVP).
    jvp_mode : str or None
        The JVP route in use (``"forward"`` or ``"double_backward"``); None before the first
        ``J @ v`` in ``"auto"`` mode.
    structure : linsolve_rbp.adapters.torch._tree.Structure or None
        The layout of a structured ``h`` (None for one tensor).
    matvec_count, rmatvec_count : int
        JVPs and VJPs applied so far (a batched product counts once).

    Raises
    ------
    TypeError
        If ``h`` is not a real floating dense tensor or ``f`` does not return a tensor of the
        dtype of ``h`` (under :func:`torch.autocast`, a lower-precision floating output is
        accepted and cast to the dtype of ``h``).
    ValueError
        If ``f(h)`` has another shape or structure than ``h``, or ``jvp`` / ``batch_dims``
        are invalid.
    RuntimeError
        From any product after :meth:`release`, and inside a ``torch.func`` transform
        (use ``torch.func.vjp`` / :func:`torch.func.jvp` there).

    Notes
    -----
    Memory is constant in the number of products: the record (and, for double backward, the
    graph of one VJP) is kept once, and products are returned detached, so an outer autograd
    graph does not record them. Call :meth:`release` to free the record early.

    The operator is tagged ``symmetric=False``: a Jacobian is not symmetric in general, so
    :func:`linsolve_rbp.solve` refuses cg and minres on ``I - J.T`` up front.

    Constructed inside a :func:`torch.autocast` region, the operator records ``f`` there (and
    re-enters the region for forward-mode JVPs); ``f``'s output is cast to the dtype of ``h``,
    which is the operator's dtype.

    Built under :func:`torch.inference_mode` (which records no graph), the operator records
    ``f`` in normal mode, so its products are the same as under :func:`torch.no_grad`; where
    ``f`` uses a tensor created in inference mode that autograd would have to save, only
    forward-mode ``J @ v`` is available and the other products raise RuntimeError.

    With ``batch_dims=1``, ``f`` must treat samples independently (no batch normalisation in
    training mode, no attention across the batch); the operator then equals every diagonal
    block of the full Jacobian.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> W = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
    >>> J = lrt.JacobianOperator(lambda h: h @ W.T, torch.zeros(2, dtype=torch.float64))
    >>> J @ torch.tensor([1.0, 1.0], dtype=torch.float64)
    tensor([0.6000, 0.3000], dtype=torch.float64)
    >>> J.T @ torch.tensor([1.0, 1.0], dtype=torch.float64)
    tensor([0.5000, 0.4000], dtype=torch.float64)

    A state of two tensors is one vector of 3 entries to the operator:

    >>> g = lambda s: (0.5 * s[0], s[1] + s[0][:1])
    >>> J2 = lrt.JacobianOperator(g, (torch.zeros(2), torch.zeros(1)))
    >>> J2.shape, J2.unpack(J2 @ torch.ones(3))
    ((3, 3), (tensor([0.5000, 0.5000]), tensor([2.])))
    """

    def __init__(self, f: Callable, h, *, jvp: str = "auto", batch_dims: int = 0):
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        batch_dims, structure, h = flat_state(h, "h", batch_dims)
        jvp = check_jvp(jvp)
        refuse_transform(
            "JacobianOperator",
            "use torch.func.vjp / torch.func.jvp on f there, or batch_dims=1 for the per-sample "
            "Jacobians of a batch in one operator",
        )
        self._record(f if structure is None else structure.wrap(f), h, jvp, batch_dims)
        self.structure = structure

    @classmethod
    def _checked(cls, f, h, jvp: str, batch_dims: int) -> "JacobianOperator":
        """The operator for arguments the caller has validated already (the backward pass of
        :func:`fixed_point`, whose arguments were checked when the layer was called)."""
        self = cls.__new__(cls)
        self._record(f, h, jvp, batch_dims)
        self.structure = None
        return self

    @classmethod
    def _from_record(cls, f, h_in, output, jvp: str, batch_dims: int, autocast_region=None) -> "JacobianOperator":
        """The operator on a record made already: ``output = f(h_in)`` evaluated with the
        graph kept, ``h_in`` a leaf requiring grad (the record :func:`fixed_point` makes in
        its forward pass and returns, whose graph its backward pass then uses for the
        adjoint's products too: one evaluation of ``f`` serves both). Validated by the caller."""
        self = cls.__new__(cls)
        self._record(f, h_in, jvp, batch_dims, record=output, autocast_region=autocast_region)
        self.structure = None
        return self

    def _record(self, f, h, jvp, batch_dims, record=None, autocast_region=None):
        self.f = f
        self.batch_dims = batch_dims
        self.state_shape = tuple(h.shape)
        self.jvp_mode = None if jvp == "auto" else jvp
        self._dbl = None
        self._released = False
        # Forward-mode JVPs evaluate f again: under the autocast region f was recorded in
        # (for a record made elsewhere, the region the caller recorded it in).
        self._autocast = autocast_region if record is not None else autocast_state(h.device)
        # Set when torch.inference_mode() kept autograd from recording f: then only
        # forward-mode products J @ v exist, and the others raise instead of returning zeros.
        self._unrecorded = False
        if record is not None:
            self._h, out = h, record
        elif torch.is_inference_mode_enabled():
            out = self._record_outside_inference_mode(f, h)
        else:
            self._h = h.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = f(self._h)
        self.output = out if record is not None else check_f_output(out, h)
        # Whether the record reaches h at all (f constant in h gives J = 0), decided once.
        self._live = self.output.requires_grad and not self._unrecorded
        self.f_evals = 0 if record is not None else 1
        if batch_dims == 1:
            self.nbatch = h.shape[0]
            m = h[0, ...].numel()
        else:
            self.nbatch = None
            m = h.numel()
        self._m = m
        setup = dict(dtype=h.dtype, xp=_b.array_namespace(h), device=h.device, backend="torch")
        # A Jacobian is in general not symmetric: tag it, so that solve refuses cg / minres on
        # I - J^T up front instead of running them to their iteration limit.
        self._setup((m, m), symmetric=False, **setup)

    def _record_outside_inference_mode(self, f, h):
        """Under :func:`torch.inference_mode` autograd records nothing, so every product
        through the record would be zero: record ``f`` in normal mode instead. Where ``f``
        cannot run there (it uses a tensor made in inference mode that autograd would have to
        save, or updates one in place: torch refuses both), keep an unrecorded evaluation:
        forward-mode ``J @ v`` still works, and the products that need the record raise (see
        :meth:`_refuse_unrecorded`)."""
        with torch.inference_mode(False):
            self._h = h.detach().clone().requires_grad_(True)
            try:
                with torch.enable_grad():
                    return f(self._h)
            except RuntimeError as exc:
                # "Inference tensors cannot be saved for backward", "Inplace update to
                # inference tensor outside InferenceMode": f needs inference mode.
                if "nference tensor" not in str(exc):
                    raise
        self._unrecorded = True
        self._h = h.detach().clone()
        return f(self._h)

    def _refuse_unrecorded(self, what):
        if self._unrecorded:
            raise RuntimeError(
                f"{what} needs the evaluation of f recorded by autograd, and under "
                "torch.inference_mode() f could not be recorded (it uses a tensor created in "
                "inference mode that autograd would have to save, or updates one in place); "
                "build the operator under torch.no_grad() instead (or, for forward='newton', "
                "use its jvp='forward', which needs no record)"
            )

    def __repr__(self):
        return (
            f"JacobianOperator(state shape {self.state_shape}, batch_dims={self.batch_dims}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # -- shapes ---------------------------------------------------------------------------------
    def _rows(self, x, apply):
        """Apply ``apply`` (state-shaped -> state-shaped) to flat vectors ``x``."""
        m = self.shape[0]
        if self.batch_dims == 1:
            if x.ndim != 2 or x.shape[0] != self.nbatch:
                raise OperatorMismatchError(
                    f"a batched Jacobian (batch_dims=1) acts on arrays of shape "
                    f"({self.nbatch}, {m}), one row per sample; got shape {tuple(x.shape)}"
                )
            return apply(x.reshape(self.state_shape)).reshape(self.nbatch, m)
        if x.ndim == 1:
            return apply(x.reshape(self.state_shape)).reshape(m)
        return torch.stack([apply(x[i, ...].reshape(self.state_shape)).reshape(m) for i in range(x.shape[0])])

    # -- products ---------------------------------------------------------------------------------
    def _check_alive(self, what):
        if self._released:
            raise RuntimeError(
                f"{what} of a released JacobianOperator: release() freed the recorded "
                "evaluation of f, so no product with J or J^T is available any more; build a "
                "new JacobianOperator(f, h)"
            )

    def _vjp(self, u):
        # One autograd.grad call on the record made once: what autograd's own backward step
        # costs, and memory constant in the number of products (retain_graph keeps the one
        # record, the result carries no graph). Measured against a torch.func.vjp closure
        # built once, this is the faster route for a DEQ cell (asv_benchmarks/lean_deq.py).
        if not self._live:
            self._refuse_unrecorded("J.T @ u (a vector-Jacobian product)")
            return torch.zeros_like(u)
        (g,) = torch.autograd.grad(self.output, self._h, grad_outputs=u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if g is None else g.detach()

    def _jvp_forward(self, v):
        h = self._h.detach()
        with torch.no_grad(), autocast(self._autocast):
            out, t = torch.func.jvp(self.f, (h,), (v,))
        self.f_evals += 1
        if not isinstance(t, torch.Tensor) or t.shape != h.shape:
            raise ValueError("forward-mode JVP of f returned an unexpected value")
        return t.detach().to(h.dtype)

    def _jvp_double_backward(self, v):
        if self._dbl is None:
            self._refuse_unrecorded("J @ v by double backward (jvp='double_backward')")
            if not self.output.requires_grad:
                self._dbl = (None, None)
            else:
                # The graph of the VJP in u is recorded in normal mode (inference mode records none).
                with torch.inference_mode(False), torch.enable_grad():
                    u = torch.zeros_like(self.output, requires_grad=True)
                    (g,) = torch.autograd.grad(
                        self.output, self._h, grad_outputs=u, create_graph=True, retain_graph=True, allow_unused=True
                    )
                self._dbl = (u, g)
        u, g = self._dbl
        if g is None or not g.requires_grad:
            return torch.zeros_like(v)
        (jv,) = torch.autograd.grad(g, u, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if jv is None else jv.detach()

    def _jvp(self, v):
        if self.jvp_mode == "forward":
            return self._jvp_forward(v)
        if self.jvp_mode == "double_backward":
            return self._jvp_double_backward(v)
        try:
            out = self._jvp_forward(v)
        except Exception:  # noqa: BLE001 - any failure of forward mode means: use the fallback
            self.jvp_mode = "double_backward"
            return self._jvp_double_backward(v)
        self.jvp_mode = "forward"
        return out

    def _matvec(self, x):
        self._check_alive("J @ v (a Jacobian-vector product)")
        return self._rows(x, self._jvp)

    def _rmatvec(self, x):
        if self._released:
            self._check_alive("J.T @ u (a vector-Jacobian product)")
        if self.batch_dims == 0 and x.ndim == 1:
            # The common case (one flat vector), with no further dispatch.
            return self._vjp(x.reshape(self.state_shape)).reshape(self._m)
        return self._rows(x, self._vjp)

    def _rmv(self, x):
        # Counted, unvalidated (as LinearOperator._rmv), without asking has_rmatvec: a
        # Jacobian always has one.
        self.rmatvec_count += 1
        return self._rmatvec(x)

    # -- states <-> vectors ---------------------------------------------------------------------
    def pack(self, state):
        """A state (of ``h``'s shape, or of its structure) as the flat vector the operator acts
        on: ``(n,)``, or ``(B, m)`` with ``batch_dims=1``."""
        if self.structure is not None:
            return self.structure.pack(state, "state")
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != self.state_shape:
            raise ValueError(
                f"state must be a tensor of shape {self.state_shape} (the shape of h), got "
                f"{type(state).__name__} of shape {tuple(getattr(state, 'shape', ()))}"
            )
        return flat(state, self.batch_dims)

    def unpack(self, v):
        """A flat vector (``(n,)``, or ``(B, m)`` with ``batch_dims=1``) as a state: a tensor
        of ``h``'s shape, or ``h``'s structure of tensors (views of ``v``)."""
        if self.structure is not None:
            return self.structure.unpack(v.reshape(self.state_shape))
        return v.reshape(self.state_shape)

    # -- parameters ------------------------------------------------------------------------------
    def vjp_params(self, z, params, *, release: bool = False):
        """``z^T df/dp`` for each tensor ``p`` of ``params``, from the recorded evaluation.

        Parameters
        ----------
        z : torch.Tensor, or a state of ``h``'s structure
            A flat vector ``(n,)`` (``(B, m)`` with ``batch_dims=1``), a state-shaped tensor,
            or, for a structured ``h``, a state of that structure.
        params : sequence of torch.Tensor
            Tensors ``f`` closes over that require grad (leaves or not).
        release : bool
            Free the record afterwards (no further products are possible).

        Returns
        -------
        tuple of torch.Tensor
            One gradient per parameter, zeros for parameters ``f`` does not use.
        """
        self._check_alive("vjp_params")
        self._refuse_unrecorded("vjp_params")
        release = boolean(release, "release")
        params = as_params(params)
        if self.structure is not None and is_structured(z):
            z = self.structure.pack(z, "z")
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor (or a state of h's structure), got {type(z).__name__}")
        n = self.shape[0] * (self.nbatch if self.batch_dims == 1 else 1)
        if z.numel() != n:
            raise ValueError(
                f"z must have {n} entries (a state of shape {self.state_shape}, flat or not), got "
                f"shape {tuple(z.shape)}"
            )
        z = z.reshape(self.state_shape).to(dtype=self.output.dtype)
        if self.output.requires_grad and params:
            grads = torch.autograd.grad(
                self.output, params, grad_outputs=z, retain_graph=not release, allow_unused=True
            )
        else:
            grads = (None,) * len(params)
        if release:
            self.release()
        return tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads))

    def release(self) -> None:
        """Free the recorded graph. Any later product (``J @ v``, ``J.T @ u``,
        :meth:`vjp_params`) raises RuntimeError; releasing twice is harmless."""
        self.output = self.output.detach()
        self._live = False
        self._dbl = None
        self._released = True

    @property
    def released(self) -> bool:
        """Whether :meth:`release` freed the record (no products are available then)."""
        return self._released
