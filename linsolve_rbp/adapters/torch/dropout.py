"""Variational dropout: one dropout mask for a whole forward solve.

``torch.nn.Dropout`` inside ``f`` draws a new mask at every application of ``f``, so the map
``h <- f(h)`` changes from one iteration to the next and has no fixed point: the forward
iteration cannot converge, and the adjoint system of the backward pass is not the Jacobian of
the map the forward pass used. :class:`VariationalDropout` draws its mask once and applies the
same mask at every evaluation until :meth:`VariationalDropout.reset_mask` is called, so ``f``
is one deterministic map per forward solve (Gal & Ghahramani, NeurIPS 2016, used in deep
equilibrium models by Bai et al., NeurIPS 2019).

:class:`linsolve_rbp.adapters.torch.DEQ` draws a new mask for every call (and reuses that
call's mask in its backward pass); with :func:`~linsolve_rbp.adapters.torch.fixed_point`
call ``reset_mask`` (or :func:`reset_dropout` on the model) before each forward solve.
"""

from __future__ import annotations

import torch

from ..._validate import ArgumentTypeError

__all__ = ["VariationalDropout", "reset_dropout"]


class VariationalDropout(torch.nn.Module):
    """Dropout whose mask stays the same until :meth:`reset_mask`: one mask per forward solve.

    In training mode the input is multiplied by a mask of zeros (probability ``p``) and
    ``1 / (1 - p)`` (probability ``1 - p``), drawn at the first call after construction or
    after :meth:`reset_mask` and reused by every later call; in evaluation mode (``.eval()``)
    the input passes through unchanged, as with :class:`torch.nn.Dropout`.

    Parameters
    ----------
    p : float
        Probability of an element to be zeroed, ``0 <= p < 1``.
    shared_dims : tuple of int, optional
        Axes of the input over which one mask value is shared (size 1 in the mask), e.g.
        ``(-1,)`` to drop whole feature vectors of a sequence, or ``(2, 3)`` to drop whole
        channels of an image state (as ``torch.nn.Dropout2d`` does). Default: none, one value
        per element.

    Raises
    ------
    ValueError
        ``p`` outside ``[0, 1)``; at a call, an input whose shape does not fit the mask drawn
        for this solve (the message says to call :meth:`reset_mask` before each solve).

    Notes
    -----
    The mask is drawn with the input's dtype and device, from torch's global generator (so
    ``torch.manual_seed`` makes it reproducible). Its values are detached: the gradient with
    respect to the input is the mask itself, which is what the backward pass of a fixed-point
    layer needs: the Jacobian of the same map the forward pass iterated.

    References
    ----------
    Y. Gal, Z. Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
    Neural Networks", NeurIPS 2016.

    S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> _ = torch.manual_seed(0)
    >>> drop = lrt.VariationalDropout(0.5)
    >>> x = torch.ones(2, 4)
    >>> bool((drop(x) == drop(x)).all())       # the same mask at every call
    True
    >>> drop.reset_mask()                      # a new solve: a new mask at the next call
    >>> drop.eval()(x).equal(x)                # evaluation mode: the identity
    True
    """

    def __init__(self, p: float = 0.5, shared_dims: tuple = ()):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise ArgumentTypeError(f"p must be a real number in [0, 1), got {p!r}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"p must be in [0, 1) (the probability of zeroing), got {p!r}")
        if isinstance(shared_dims, int) and not isinstance(shared_dims, bool):
            shared_dims = (shared_dims,)
        if not isinstance(shared_dims, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shared_dims
        ):
            raise ArgumentTypeError(f"shared_dims must be a tuple of ints, got {shared_dims!r}")
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)
        self.mask = None

    def extra_repr(self):
        shared = f", shared_dims={self.shared_dims}" if self.shared_dims else ""
        return f"p={self.p}{shared}"

    def reset_mask(self) -> None:
        """Forget the mask: the next call in training mode draws a new one."""
        self.mask = None

    def _mask_shape(self, x):
        shape = list(x.shape)
        for d in self.shared_dims:
            if not -x.ndim <= d < x.ndim:
                raise ValueError(
                    f"shared_dims={self.shared_dims} names axis {d}, but the input has "
                    f"{x.ndim} axes"
                )
            shape[d] = 1
        return tuple(shape)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        shape = self._mask_shape(x)
        mask = self.mask
        if mask is None:
            keep = 1.0 - self.p
            mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep) / keep
            self.mask = mask
        elif tuple(mask.shape) != shape or mask.device != x.device:
            raise ValueError(
                f"VariationalDropout: the input has shape {tuple(x.shape)} but the mask of this "
                f"solve was drawn for shape {tuple(mask.shape)}; call reset_mask() (or "
                "lrt.reset_dropout(model)) before each forward solve"
            )
        return x * mask.to(x.dtype)


def reset_dropout(module) -> int:
    """Call :meth:`VariationalDropout.reset_mask` on every :class:`VariationalDropout` in
    ``module`` (an :class:`torch.nn.Module`, itself included); return how many there were.

    Call it before each :func:`~linsolve_rbp.adapters.torch.fixed_point` solve of a map that
    uses variational dropout (:class:`~linsolve_rbp.adapters.torch.DEQ` does it for you).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    count = 0
    for m in module.modules():
        if isinstance(m, VariationalDropout):
            m.reset_mask()
            count += 1
    return count
