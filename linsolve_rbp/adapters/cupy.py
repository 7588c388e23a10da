"""cupy adapter: operators on cupy arrays and zero-copy bridges to CUDA torch tensors.

Every solver of :func:`linsolve_rbp.solve` runs on cupy arrays as it is (the solvers take their
array functions from the right-hand side's namespace), and :func:`linsolve_rbp.aslinearoperator`
already accepts dense cupy arrays and ``cupyx.scipy.sparse`` matrices. This module adds:

- :func:`aslinearoperator`: the same, but insisting on cupy data, so that a host array passed by
  mistake is caught where the operator is built;
- :func:`jacobian_operator`: a Jacobian given by user product closures on cupy arrays (a VJP,
  and optionally a JVP), as the adjoint systems of recurrent back-propagation need;
- :func:`from_torch`: any operator over CUDA torch tensors (a
  :class:`linsolve_rbp.adapters.torch.JacobianOperator`, say) acting on cupy arrays, with the
  data shared through DLPack rather than copied;
- :func:`to_cupy` / :func:`to_torch`: DLPack conversions (no copy), the ones of
  :mod:`linsolve_rbp.backend`.

cupy is imported only when one of these functions needs it; importing this module does not
need cupy.
"""

from __future__ import annotations

from .. import backend as _b
from ..backend import cupy_to_torch as to_torch, torch_to_cupy as to_cupy
from ..operators import LinearOperator, aslinearoperator as _aslinearoperator

__all__ = ["aslinearoperator", "jacobian_operator", "from_torch", "to_cupy", "to_torch"]


def _cupy():
    return _b.import_optional("cupy", "the cupy adapter")


def aslinearoperator(A) -> LinearOperator:
    """An operator over cupy data: a dense cupy array, a ``cupyx.scipy.sparse`` matrix, or a
    :class:`linsolve_rbp.LinearOperator` working on cupy arrays.

    Parameters
    ----------
    A : cupy.ndarray, cupyx.scipy.sparse matrix or LinearOperator

    Returns
    -------
    LinearOperator
        Products run on ``A``'s device; vectors of another backend are rejected.

    Raises
    ------
    TypeError
        If ``A`` is not cupy data (for numpy or torch data use
        :func:`linsolve_rbp.aslinearoperator`).

    Examples
    --------
    >>> import cupy as cp, linsolve_rbp as lr                       # doctest: +SKIP
    >>> from linsolve_rbp.adapters import cupy as lrc               # doctest: +SKIP
    >>> A = lrc.aslinearoperator(cp.eye(3) * 2.0)                   # doctest: +SKIP
    >>> lr.solve(A, cp.ones(3), method="cg").x                      # doctest: +SKIP
    array([0.5, 0.5, 0.5])
    """
    op = _aslinearoperator(A)
    if op.backend != "cupy":
        raise TypeError(
            f"A must be cupy data (a cupy array, a cupyx.scipy.sparse matrix or an operator on "
            f"cupy arrays); got an operator on {op.backend or 'unspecified'} arrays "
            "(use linsolve_rbp.aslinearoperator for other backends)"
        )
    return op


def jacobian_operator(n: int, vjp, jvp=None, *, like) -> LinearOperator:
    """A square Jacobian ``J`` given by product closures on cupy arrays.

    Parameters
    ----------
    n : int
        The size: ``J`` is ``(n, n)``.
    vjp : callable
        ``vjp(u) -> J^T u`` for a cupy vector ``u`` of shape ``(n,)`` (or ``(B, n)`` in batched
        solves, one row per system).
    jvp : callable, optional
        ``jvp(v) -> J v``. Needed only by methods that apply ``J`` (``cgne``, ``lsqr``);
        ``gmres``, ``bicgstab``, ``neumann`` and ``fixed_point`` solve ``(I - J^T) z = g``
        with ``vjp`` alone.
    like : cupy.ndarray
        Fixes the device and dtype of the operator.

    Returns
    -------
    LinearOperator
        ``J``; the adjoint operator of recurrent back-propagation is
        ``lr.IdentityOperator(n, like=g) - J.T``.

    Raises
    ------
    TypeError
        If ``like`` is not a cupy array or a closure is not callable.

    Examples
    --------
    >>> import cupy as cp, linsolve_rbp as lr                       # doctest: +SKIP
    >>> from linsolve_rbp.adapters import cupy as lrc               # doctest: +SKIP
    >>> M = 0.5 * cp.eye(3)                                         # doctest: +SKIP
    >>> J = lrc.jacobian_operator(3, vjp=lambda u: u @ M, like=M)   # doctest: +SKIP
    >>> g = cp.ones(3)                                              # doctest: +SKIP
    >>> lr.solve(lr.IdentityOperator(3, like=g) - J.T, g, method="gmres").x  # doctest: +SKIP
    array([2., 2., 2.])
    """
    if not _b.is_cupy_array(like):
        raise TypeError(f"like must be a cupy array, got {type(like).__module__}.{type(like).__name__}")
    if not callable(vjp):
        raise TypeError(f"vjp must be callable, got {type(vjp).__name__}")
    if jvp is None:

        def jvp(v):
            raise TypeError(
                "this Jacobian was built from a VJP only: J @ v needs jvp= (methods such as "
                "cgne and lsqr apply J); gmres, bicgstab, neumann and fixed_point do not"
            )

    elif not callable(jvp):
        raise TypeError(f"jvp must be callable or None, got {type(jvp).__name__}")
    return LinearOperator((n, n), matvec=jvp, rmatvec=vjp, like=like)


class _TorchOnCupy(LinearOperator):
    """A torch-backed operator acting on cupy arrays through DLPack."""

    def __init__(self, op: LinearOperator):
        cupy = _cupy()
        self.op = op
        dtype = cupy.dtype(str(op.dtype).replace("torch.", ""))
        index = op.device.index if op.device.index is not None else 0
        with cupy.cuda.Device(index):
            like = cupy.empty((0,), dtype=dtype)
        self._setup(op.shape, dtype=like.dtype, xp=_b.array_namespace(like), device=_b.device_of(like), backend="cupy")

    def _matvec(self, x):
        return _b.torch_to_cupy(self.op._mv(_b.cupy_to_torch(x)))

    def _rmatvec(self, x):
        return _b.torch_to_cupy(self.op._rmv(_b.cupy_to_torch(x)))

    @property
    def has_rmatvec(self):
        return self.op.has_rmatvec

    def __repr__(self):
        return f"from_torch({self.op!r})"


def from_torch(op: LinearOperator) -> LinearOperator:
    """An operator over CUDA torch tensors, acting on cupy arrays without copies.

    Products convert the cupy vector to a torch tensor and the result back through DLPack,
    sharing memory; they are counted on ``op`` as well. This lets a cupy-based solve (for
    example the ``scipy.*`` methods, which run ``cupyx.scipy.sparse.linalg`` on GPU data)
    use a :class:`linsolve_rbp.adapters.torch.JacobianOperator`.

    Parameters
    ----------
    op : LinearOperator
        An operator whose backend is torch and whose device is a CUDA device.

    Returns
    -------
    LinearOperator
        The same operator on cupy arrays of the matching dtype and device.

    Raises
    ------
    TypeError
        If ``op`` is not a LinearOperator over torch tensors.
    ValueError
        If ``op`` is not on a CUDA device.
    """
    if not isinstance(op, LinearOperator) or op.backend != "torch":
        raise TypeError(f"op must be a LinearOperator over torch tensors, got {op!r}")
    if op.device is None or getattr(op.device, "type", str(op.device)) != "cuda":
        raise ValueError(f"op must be on a CUDA device to share data with cupy, got device {op.device}")
    return _TorchOnCupy(op)
