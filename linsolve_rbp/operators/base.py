"""The backend-agnostic :class:`LinearOperator`, its algebra, and the operators over explicit
matrices (:func:`aslinearoperator`).

An operator maps vectors of shape ``(n,)`` to vectors of shape ``(m,)``. A batch of
independent vectors is an array of shape ``(B, n)``: each row is one vector, and the operator
acts on every row (block-diagonal semantics: ``A.matvec(X)[i] == A.matvec(X[i])``). A batched
product counts as one product in ``matvec_count``.

Subclasses implement ``_matvec`` (and ``_rmatvec`` for ``A^H x``). The public ``matvec`` and
``rmatvec`` validate the vector once and delegate; composites call their children's counted but
unvalidated ``_mv`` / ``_rmv``, so ``(I - J.T).matvec(u)`` checks ``u`` once and counts one
``J.rmatvec``.
"""

from __future__ import annotations

import numbers
import weakref

from .. import backend as _b
from .._validate import boolean, nonnegative_int

__all__ = [
    "LinearOperator",
    "IdentityOperator",
    "MissingRmatvecError",
    "OperatorMismatchError",
    "aslinearoperator",
    "DenseOperator",
    "SparseOperator",
    "TorchSparseOperator",
    "ScipyOperator",
]


class MissingRmatvecError(TypeError):
    """An operation needs ``A^H x`` (a transpose, or a method such as cgne or lsqr) from an
    operator that was built without ``rmatvec``."""


class OperatorMismatchError(ValueError):
    """Operands disagree in shape, dtype, backend or device."""


# ``_setup(symmetric=_DETECT)``: the structure tag is found on first use by the subclass's
# ``_detect_symmetric`` (a cheap check for matrices); ``None`` means "unknown", stated.
_DETECT = object()


def _check_symmetric_tag(value, shape):
    value = boolean(value, "symmetric", allow_none=True)
    if value is True and shape[0] != shape[1]:
        raise ValueError(f"symmetric=True needs a square operator, got shape {_fmt_shape(shape)}")
    return value


def _is_real_scalar(c) -> bool:
    if isinstance(c, numbers.Real):
        return True
    if _b.is_array(c):
        return not _b.is_complex_dtype(_b.array_namespace(c), c.dtype)
    return False


def _fmt_shape(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class LinearOperator:
    """A linear map given by products, on any array-API backend.

    Parameters
    ----------
    shape : tuple of int
        ``(m, n)``: the operator maps ``(n,)`` vectors to ``(m,)`` vectors.
    matvec : callable
        ``matvec(x) -> A x``. It receives a ``(n,)`` vector, or a ``(B, n)`` batch of row
        vectors in batched solves, and must return the same leading shape with last axis ``m``.
    rmatvec : callable, optional
        ``rmatvec(y) -> A^H y`` (the conjugate transpose, as in scipy). Needed for ``A.T``,
        ``A.H`` and for methods such as ``cgne`` and ``lsqr``.
    dtype : dtype, optional
        The dtype of the operator. Defaults to ``like.dtype`` when ``like`` is given.
    like : array, optional
        An array whose backend, device and dtype the operator adopts; vectors of another
        backend, device or dtype are then rejected with a clear error.
    symmetric : bool or None, optional
        The structure tag :attr:`symmetric`: True if ``A`` is symmetric (Hermitian, for
        complex data), False if it is known not to be, None (the default) if unknown.
        :func:`linsolve_rbp.solve` refuses methods that need a symmetric operator (cg, minres,
        scipy.cg) on one tagged False.

    Attributes
    ----------
    symmetric : bool or None
        Whether ``A == A^H``: True, False, or None (unknown). Settable. Operators over
        matrices find it by a cheap check on first use (dense: comparing with the conjugate
        transpose, for ``n`` up to 4096, else None; sparse: ``max|S - S^H| <= tiny max|S|``
        with ``tiny = sqrt(eps)``); the identity is symmetric; ``A.T``, ``A.H`` and ``c * A``
        (real ``c``) inherit ``A``'s tag; a sum or difference of two symmetric operators is
        symmetric, of a symmetric and a non-symmetric one not symmetric, else unknown;
        products are unknown (except ``A.H @ A`` and ``A @ A.H``, which are symmetric).
    rowwise : bool
        Whether products are known to act on each row of a ``(B, n)`` batch as on a vector
        (True for the operators over explicit matrices, the identity, and composites of only
        those). Closures and Jacobians may couple rows or act per system, so they say False;
        methods that hand the operator one system at a time (the scipy bridges) refuse
        batched solves on them.

    Notes
    -----
    Subclasses implement ``_matvec`` and, where they can, ``_rmatvec``; they call
    ``_setup(shape, dtype=..., xp=..., device=..., backend=..., symmetric=...)`` instead of
    ``__init__``. Without ``symmetric=`` the tag comes from :meth:`_detect_symmetric` on first
    use (None unless the subclass overrides it).

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> M = np.array([[2.0, 1.0], [0.0, 3.0]])
    >>> A = lr.LinearOperator((2, 2), matvec=lambda x: x @ M.T, rmatvec=lambda y: y @ M,
    ...                       like=np.zeros(2))
    >>> A @ np.array([1.0, 1.0])
    array([3., 3.])
    >>> (A.T @ np.array([1.0, 1.0])).tolist(), A.matvec_count, A.rmatvec_count
    ([2.0, 4.0], 1, 1)
    """

    # Make numpy defer to the operator's reflected methods: without this, ``ndarray - A`` and
    # ``ndarray * A`` broadcast elementwise over the operator as if it were a scalar.
    __array_ufunc__ = None

    # Whether a detected structure tag is kept: True for matrices (whose check costs a pass
    # over the data); composites derive theirs from their operands at every look, so a tag
    # set on an operand later is seen.
    _cache_symmetric = False

    def __init__(self, shape, matvec=None, rmatvec=None, *, dtype=None, like=None, symmetric=None):
        if matvec is None:
            raise TypeError(
                "matvec must be given: a callable computing A @ x "
                "(or subclass LinearOperator and implement _matvec)"
            )
        if not callable(matvec):
            raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
        if rmatvec is not None and not callable(rmatvec):
            raise TypeError(f"rmatvec must be callable or None, got {type(rmatvec).__name__}")
        self._matvec_fn = matvec
        self._rmatvec_fn = rmatvec
        xp = device = backend = None
        if like is not None:
            if not _b.is_array(like):
                raise TypeError(
                    f"like must be an array (numpy, torch, cupy or array-API), "
                    f"got {type(like).__name__}"
                )
            xp = _b.array_namespace(like)
            device = _b.device_of(like)
            backend = _b.backend_name(like)
            if dtype is None:
                dtype = like.dtype
        self._setup(shape, dtype=dtype, xp=xp, device=device, backend=backend, symmetric=symmetric)

    # -- construction helpers for subclasses -------------------------------------------------
    def _setup(self, shape, *, dtype=None, xp=None, device=None, backend=None, symmetric=_DETECT):
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise TypeError(f"shape must be a pair of non-negative integers, got {shape!r}") from None
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"shape must be a pair of non-negative integers (m, n), got {shape!r}")
        self.shape = shape
        self.dtype = dtype
        self.xp = xp
        self.device = device
        self.backend = backend
        self.matvec_count = 0
        self.rmatvec_count = 0
        if symmetric is not _DETECT:
            symmetric = _check_symmetric_tag(symmetric, shape)
        self._symmetric = symmetric

    # -- structure ----------------------------------------------------------------------------
    @property
    def symmetric(self) -> bool | None:
        """Whether ``A == A^H``: True, False or None (unknown); see the class docstring."""
        tag = getattr(self, "_symmetric", _DETECT)
        if tag is _DETECT:
            tag = self._detect_symmetric()
            if self._cache_symmetric:
                # Found once, on first use: the check of a matrix reads all of it.
                self._symmetric = tag
        return tag

    @symmetric.setter
    def symmetric(self, value):
        self._symmetric = _check_symmetric_tag(value, self.shape)

    def _detect_symmetric(self) -> bool | None:
        """The structure tag of an operator not told it: None (unknown) unless overridden."""
        return None

    @property
    def rowwise(self) -> bool:
        """Whether products are known to act row by row on a ``(B, n)`` batch."""
        return False

    # -- what subclasses implement -----------------------------------------------------------
    def _matvec(self, x):
        return self._matvec_fn(x)

    def _rmatvec(self, x):
        if getattr(self, "_rmatvec_fn", None) is None:
            raise self._missing_rmatvec()
        return self._rmatvec_fn(x)

    @property
    def has_rmatvec(self) -> bool:
        """Whether ``A^H x`` is available (needed by ``A.T``, cgne, lsqr, ...)."""
        if type(self)._rmatvec is not LinearOperator._rmatvec:
            return True
        return getattr(self, "_rmatvec_fn", None) is not None

    def _missing_rmatvec(self):
        return MissingRmatvecError(
            f"{self!r} has no rmatvec (A^H x): pass rmatvec= when building the operator "
            "(for a torch Jacobian, JacobianOperator provides it), or use a method that "
            "needs only matvec such as gmres or bicgstab"
        )

    # -- counted, unvalidated products used by composites and solvers -----------------------
    def _mv(self, x):
        self.matvec_count += 1
        return self._matvec(x)

    def _rmv(self, x):
        if not self.has_rmatvec:
            raise self._missing_rmatvec()
        self.rmatvec_count += 1
        return self._rmatvec(x)

    # -- public products ----------------------------------------------------------------------
    def matvec(self, x):
        """Return ``A x`` for ``x`` of shape ``(n,)`` or a batch ``(B, n)``."""
        self.check_vector(x, "x", self.shape[1])
        y = self._mv(x)
        self._check_output(y, x, self.shape[0], "matvec")
        return y

    def rmatvec(self, y):
        """Return ``A^H y`` for ``y`` of shape ``(m,)`` or a batch ``(B, m)``."""
        if not self.has_rmatvec:
            raise self._missing_rmatvec()
        self.check_vector(y, "y", self.shape[0])
        x = self._rmv(y)
        self._check_output(x, y, self.shape[1], "rmatvec")
        return x

    def reset_counters(self) -> None:
        """Set ``matvec_count`` and ``rmatvec_count`` back to zero."""
        self.matvec_count = 0
        self.rmatvec_count = 0

    def check_vector(self, x, name: str, n: int | None = None, batch_dims: int | None = None):
        """Raise a clear error unless ``x`` is a vector (or batch) this operator can act on."""
        if n is None:
            n = self.shape[1]
        if not _b.is_array(x):
            raise TypeError(
                f"{name} must be an array (numpy, torch, cupy or array-API), "
                f"got {type(x).__name__}"
            )
        allowed = (1, 2) if batch_dims is None else (1 + batch_dims,)
        if x.ndim not in allowed or x.shape[-1] != n:
            want = {1: f"({n},)", 2: f"(B, {n})"}
            expected = " or ".join(want[d] for d in allowed)
            raise OperatorMismatchError(
                f"{name} must have shape {expected} to match the operator of shape "
                f"{_fmt_shape(self.shape)}, got shape {_fmt_shape(x.shape)}"
            )
        if self.backend is not None:
            xb = _b.backend_name(x)
            if xb != self.backend:
                raise TypeError(
                    f"{name} is a {xb} array but the operator works on {self.backend} arrays; "
                    f"convert {name} (see linsolve_rbp.backend.to_numpy / from_numpy) or "
                    "build the operator from data of the same backend"
                )
        if self.device is not None and str(_b.device_of(x)) != str(self.device):
            raise OperatorMismatchError(
                f"{name} is on device {_b.device_of(x)} but the operator is on device "
                f"{self.device}; move one of them"
            )
        if self.dtype is not None and x.dtype != self.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the operator has dtype {self.dtype}; "
                f"cast {name} (or the operator's data) so that they agree"
            )

    @staticmethod
    def _check_output(y, x, m, which):
        shape = getattr(y, "shape", None)
        if shape is None or tuple(shape) != tuple(x.shape[:-1]) + (m,):
            raise OperatorMismatchError(
                f"the operator's {which} returned "
                f"{'shape ' + _fmt_shape(tuple(shape)) if shape is not None else type(y).__name__}"
                f" for input of shape {_fmt_shape(tuple(x.shape))}; expected "
                f"{_fmt_shape(tuple(x.shape[:-1]) + (m,))}"
            )

    # -- operator algebra ---------------------------------------------------------------------
    @property
    def T(self) -> "LinearOperator":
        """The transpose ``A^T`` (needs ``rmatvec``)."""
        return _TransposeOperator(self, conjugate=False)

    @property
    def H(self) -> "LinearOperator":
        """The conjugate transpose ``A^H`` (needs ``rmatvec``)."""
        return _TransposeOperator(self, conjugate=True)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return _ProductOperator(self, other)
        if _b.is_sparse(other):
            return _ProductOperator(self, aslinearoperator(other))
        if _b.is_array(other):
            if other.ndim != 1:
                raise OperatorMismatchError(
                    f"A @ v takes a vector of shape ({self.shape[1]},); for a batch of row "
                    f"vectors of shape (B, {self.shape[1]}) use A.matvec(V), and to compose "
                    f"with a matrix use A @ lr.aslinearoperator(M); got shape "
                    f"{_fmt_shape(tuple(other.shape))}"
                )
            return self.matvec(other)
        return NotImplemented

    def __rmatmul__(self, other):
        if _b.is_sparse(other):
            return _ProductOperator(aslinearoperator(other), self)
        if _b.is_array(other):
            # As for A @ M: a 2-D array could be a matrix or a batch of vectors; say which.
            raise OperatorMismatchError(
                f"M @ A with an array M of shape {_fmt_shape(tuple(other.shape))} is ambiguous; "
                "to compose with a matrix use lr.aslinearoperator(M) @ A, and for products "
                "with A^H use A.rmatvec"
            )
        return NotImplemented

    def __add__(self, other):
        other = _as_operand(other, "+")
        if other is NotImplemented:
            return NotImplemented
        return _SumOperator(self, other, sign=1)

    def __radd__(self, other):
        other = _as_operand(other, "+")
        if other is NotImplemented:
            return NotImplemented
        return _SumOperator(other, self, sign=1)

    def __sub__(self, other):
        other = _as_operand(other, "-")
        if other is NotImplemented:
            return NotImplemented
        return _SumOperator(self, other, sign=-1)

    def __rsub__(self, other):
        other = _as_operand(other, "-")
        if other is NotImplemented:
            return NotImplemented
        return _SumOperator(other, self, sign=-1)

    def __neg__(self):
        return _ScaledOperator(self, -1.0)

    def __mul__(self, c):
        if not _is_scalar(c):
            return NotImplemented
        return _ScaledOperator(self, c)

    __rmul__ = __mul__

    def __truediv__(self, c):
        if not _is_scalar(c):
            return NotImplemented
        return _ScaledOperator(self, 1.0 / c)

    # -- conversions --------------------------------------------------------------------------
    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` over this operator (numpy data only).

        Products applied through it are counted on this operator.
        """
        if self.backend not in (None, "numpy"):
            raise TypeError(
                f"to_scipy() needs a numpy-backed operator; this one works on {self.backend} "
                "arrays (for cupy data use cupyx.scipy.sparse.linalg.aslinearoperator)"
            )
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as SciPyLO

        m, n = self.shape

        def mv(x):
            x = np.asarray(x)
            return self._mv(x.reshape(n)).reshape(x.shape[:-1] + (m,) if x.ndim == 1 else (m, 1))

        def rmv(y):
            y = np.asarray(y)
            return self._rmv(y.reshape(m)).reshape((n,) if y.ndim == 1 else (n, 1))

        def mm(X):
            return self._mv(np.asarray(X).T).T

        def rmm(Y):
            return self._rmv(np.asarray(Y).T).T

        dtype = self.dtype if self.dtype is not None else np.float64
        if self.has_rmatvec:
            return SciPyLO(self.shape, matvec=mv, rmatvec=rmv, matmat=mm, rmatmat=rmm, dtype=dtype)
        return SciPyLO(self.shape, matvec=mv, matmat=mm, dtype=dtype)

    def to_dense(self, like=None):
        """The dense matrix of this operator, built from one batched product with the identity.

        Use for small operators (tests, direct reference solves): it costs ``n`` products'
        worth of work and ``m * n`` memory.
        """
        xp, dtype, device = self.xp, self.dtype, self.device
        if like is not None:
            xp, dtype, device = _b.array_namespace(like), like.dtype, _b.device_of(like)
        if xp is None:
            raise TypeError(
                "to_dense() needs to know the backend: pass like=<an array> or build the "
                "operator with like="
            )
        eye = xp.eye(self.shape[1], dtype=dtype, device=device)
        return xp.matrix_transpose(self._mv(eye))

    def __repr__(self) -> str:
        dt = "" if self.dtype is None else f", dtype={self.dtype}"
        be = "" if self.backend is None else f", backend={self.backend}"
        return f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]}{dt}{be}>"


def _is_scalar(c) -> bool:
    if isinstance(c, numbers.Number):
        return True
    return _b.is_array(c) and c.ndim == 0


def _as_operand(other, op):
    if isinstance(other, LinearOperator):
        return other
    if _b.is_sparse(other) or (_b.is_array(other) and other.ndim == 2):
        return aslinearoperator(other)
    return NotImplemented


def _common(ops, what):
    """Shared dtype/namespace/device/backend of operands, checked for agreement."""
    backends = {o.backend for o in ops if o.backend is not None}
    if len(backends) > 1:
        raise TypeError(
            f"cannot combine operators of different backends with {what}: "
            f"{' and '.join(sorted(backends))}"
        )
    devices = {str(o.device) for o in ops if o.device is not None}
    if len(devices) > 1:
        raise OperatorMismatchError(
            f"cannot combine operators on different devices with {what}: {' and '.join(sorted(devices))}"
        )
    xp = next((o.xp for o in ops if o.xp is not None), None)
    device = next((o.device for o in ops if o.device is not None), None)
    backend = next(iter(backends), None)
    dtypes = [o.dtype for o in ops if o.dtype is not None]
    # Backends such as torch refuse mixed-dtype products, so a mixed composite would fail deep
    # inside its first product; refuse it here instead.
    if any(d != dtypes[0] for d in dtypes[1:]):
        raise OperatorMismatchError(
            f"cannot combine operators of different dtypes with {what}: "
            f"{' and '.join(str(d) for d in dtypes)}; cast one so that they agree"
        )
    dtype = dtypes[0] if dtypes else None
    return dict(dtype=dtype, xp=xp, device=device, backend=backend)


class IdentityOperator(LinearOperator):
    """The identity on vectors of length ``n``.

    Parameters
    ----------
    n : int
        The size.
    like : array, optional
        Fixes backend, device and dtype (as for :class:`LinearOperator`).
    dtype : dtype, optional
        Overrides ``like.dtype``.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> I = lr.IdentityOperator(3, like=np.zeros(3))
    >>> (2.0 * I - I) @ np.arange(3.0)
    array([0., 1., 2.])
    """

    def __init__(self, n, *, like=None, dtype=None):
        n = nonnegative_int(n, "n")
        kw = dict(dtype=dtype)
        if like is not None:
            if not _b.is_array(like):
                raise TypeError(f"like must be an array, got {type(like).__name__}")
            kw = dict(
                dtype=like.dtype if dtype is None else dtype,
                xp=_b.array_namespace(like),
                device=_b.device_of(like),
                backend=_b.backend_name(like),
            )
        self._setup((n, n), **kw)

    def _matvec(self, x):
        return x

    def _rmatvec(self, x):
        return x

    def _detect_symmetric(self):
        return True

    @property
    def rowwise(self):
        return True


class _TransposeOperator(LinearOperator):
    def __init__(self, A: LinearOperator, conjugate: bool):
        if not A.has_rmatvec:
            raise A._missing_rmatvec()
        self.A = A
        self.conjugate = conjugate
        self._setup((A.shape[1], A.shape[0]), dtype=A.dtype, xp=A.xp, device=A.device, backend=A.backend)

    def _needs_conj(self, x):
        if self.conjugate:
            return False
        xp = self.xp if self.xp is not None else _b.array_namespace(x)
        return _b.is_complex_dtype(xp, x.dtype)

    def _matvec(self, x):
        if self._needs_conj(x):
            xp = self.xp or _b.array_namespace(x)
            return xp.conj(self.A._rmv(xp.conj(x)))
        return self.A._rmv(x)

    def _rmatvec(self, x):
        if self._needs_conj(x):
            xp = self.xp or _b.array_namespace(x)
            return xp.conj(self.A._mv(xp.conj(x)))
        return self.A._mv(x)

    @property
    def has_rmatvec(self):
        return True

    def _detect_symmetric(self):
        # (A^T)^H = conj(A), Hermitian exactly when A is; A^H likewise.
        return self.A.symmetric

    @property
    def rowwise(self):
        return self.A.rowwise

    @property
    def T(self):
        return self.A if not self.conjugate else super().T

    @property
    def H(self):
        return self.A if self.conjugate else super().H

    def __repr__(self):
        return f"{self.A!r}.{'H' if self.conjugate else 'T'}"


class _ScaledOperator(LinearOperator):
    def __init__(self, A: LinearOperator, c):
        self.A = A
        self.c = c
        self._setup(A.shape, dtype=A.dtype, xp=A.xp, device=A.device, backend=A.backend)

    def _matvec(self, x):
        return self.c * self.A._mv(x)

    def _rmatvec(self, x):
        c = self.c
        if isinstance(c, complex):
            c = c.conjugate()
        elif _b.is_array(c):
            c = _b.array_namespace(c).conj(c)
        return c * self.A._rmv(x)

    @property
    def has_rmatvec(self):
        return self.A.has_rmatvec

    def _detect_symmetric(self):
        if not _is_real_scalar(self.c):
            return None  # c A is Hermitian only for real c (or A = 0)
        tag = self.A.symmetric
        if tag is False and not (isinstance(self.c, numbers.Real) and self.c != 0):
            return None  # 0 * A is symmetric; a 0-d array c is not read on the host here
        return tag

    @property
    def rowwise(self):
        return self.A.rowwise

    def __repr__(self):
        return f"({self.c} * {self.A!r})"


class _SumOperator(LinearOperator):
    def __init__(self, A: LinearOperator, B: LinearOperator, sign: int):
        if A.shape != B.shape:
            raise OperatorMismatchError(
                f"cannot {'add' if sign > 0 else 'subtract'} operators of shapes "
                f"{_fmt_shape(A.shape)} and {_fmt_shape(B.shape)}"
            )
        self.A, self.B, self.sign = A, B, sign
        self._setup(A.shape, **_common([A, B], "+" if sign > 0 else "-"))

    def _matvec(self, x):
        return self.A._mv(x) + self.B._mv(x) if self.sign > 0 else self.A._mv(x) - self.B._mv(x)

    def _rmatvec(self, x):
        return self.A._rmv(x) + self.B._rmv(x) if self.sign > 0 else self.A._rmv(x) - self.B._rmv(x)

    @property
    def has_rmatvec(self):
        return self.A.has_rmatvec and self.B.has_rmatvec

    def _detect_symmetric(self):
        tags = (self.A.symmetric, self.B.symmetric)
        if tags == (True, True):
            return True
        if True in tags and False in tags:
            return False  # S + N symmetric would make N = (S + N) - S symmetric
        return None

    @property
    def rowwise(self):
        return self.A.rowwise and self.B.rowwise

    def __repr__(self):
        return f"({self.A!r} {'+' if self.sign > 0 else '-'} {self.B!r})"


class _ProductOperator(LinearOperator):
    def __init__(self, A: LinearOperator, B: LinearOperator):
        if A.shape[1] != B.shape[0]:
            raise OperatorMismatchError(
                f"cannot compose operators of shapes {_fmt_shape(A.shape)} @ "
                f"{_fmt_shape(B.shape)}: inner sizes {A.shape[1]} and {B.shape[0]} differ"
            )
        self.A, self.B = A, B
        self._setup((A.shape[0], B.shape[1]), **_common([A, B], "@"))

    def _matvec(self, x):
        return self.A._mv(self.B._mv(x))

    def _rmatvec(self, x):
        return self.B._rmv(self.A._rmv(x))

    @property
    def has_rmatvec(self):
        return self.A.has_rmatvec and self.B.has_rmatvec

    def _detect_symmetric(self):
        # Products of symmetric operators are in general not symmetric; the normal-equation
        # forms A^H A and A A^H are.
        A, B = self.A, self.B
        for P, Q in ((A, B), (B, A)):
            if isinstance(P, _TransposeOperator) and P.A is Q:
                real = Q.dtype is not None and Q.xp is not None and not _b.is_complex_dtype(Q.xp, Q.dtype)
                if P.conjugate or real:
                    return True
        return None

    @property
    def rowwise(self):
        return self.A.rowwise and self.B.rowwise

    def __repr__(self):
        return f"({self.A!r} @ {self.B!r})"


# -- operators over explicit matrices -------------------------------------------------------
# Dense arrays of any array-API backend, scipy / cupyx sparse matrices, torch sparse tensors and
# scipy ``LinearOperator`` objects; :func:`aslinearoperator` picks the right one. They live in
# this module because the algebra above wraps matrix operands with them.

#: Dense matrices up to this size get their ``symmetric`` tag from a comparison with their
#: conjugate transpose (O(n^2), on first use); larger ones are tagged None (unknown).
SYMMETRY_CHECK_MAX_N = 4096


def _tiny(xp, dtype):
    """The relative asymmetry tolerated in a "symmetric" matrix: sqrt(eps), so that matrices
    formed as ``B @ B.T`` or ``(B + B.T) / 2`` in floating point count as symmetric."""
    try:
        return float(xp.finfo(_b.real_dtype(xp, dtype)).eps) ** 0.5
    except (TypeError, ValueError, AttributeError):
        return 1e-8


def _close_to_zero(diff, scale, tiny):
    """``diff <= tiny * scale`` for host floats; None when they are not finite."""
    if not (diff == diff and scale == scale) or scale == float("inf"):
        return None
    return bool(diff <= tiny * scale)


class _MatrixOperator(LinearOperator):
    """Operators over an explicit matrix: products act row by row on a batch, and the
    symmetry check's result is kept."""

    _cache_symmetric = True

    @property
    def rowwise(self):
        return True


def _apply(M, MT, x):
    """``M x`` for a vector, ``X M^T`` for a batch of row vectors."""
    if x.ndim == 1:
        return M @ x
    return x @ MT


class DenseOperator(_MatrixOperator):
    """A dense 2-D array (numpy, torch, cupy, array_api_strict, ...) as an operator."""

    def __init__(self, M):
        if M.ndim != 2:
            raise ValueError(f"M must be a 2-D array, got shape {tuple(M.shape)}")
        xp = _b.array_namespace(M)
        if not _b.is_floating_dtype(xp, M.dtype):
            raise TypeError(
                f"the dense matrix must have a floating dtype (float32, float64, complex64, complex128), "
                f"got {M.dtype}; cast it first"
            )
        self.M = M
        self._MT = xp.matrix_transpose(M)
        if _b.is_complex_dtype(xp, M.dtype):
            self._MH = xp.conj(self._MT)
            self._MHT = xp.conj(M)
        else:
            self._MH, self._MHT = self._MT, M
        self._setup(M.shape, dtype=M.dtype, xp=xp, device=_b.device_of(M), backend=_b.backend_name(M))

    def _matvec(self, x):
        return _apply(self.M, self._MT, x)

    def _rmatvec(self, x):
        return _apply(self._MH, self._MHT, x)

    def _host_products(self):
        """``(mv, rmv)`` on numpy arrays for a numpy matrix, or a CPU torch matrix without
        gradient (numpy views of its memory, so they see in-place changes), else None: the
        products without the operator's layers of calls. See
        :func:`linsolve_rbp.solve._host_views`."""
        import numpy as np

        M = self.M
        if isinstance(M, np.ndarray):
            key = None
        elif not _b.is_torch_array(M) or M.device.type != "cpu" or M.requires_grad:
            return None
        else:
            key = (M._version, M.data_ptr())
        cached = getattr(self, "_host_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            Mn = _b.to_numpy(M)
        except (TypeError, RuntimeError):
            return None
        MHn = Mn.conj().T if Mn.dtype.kind == "c" else Mn.T
        Mt, MHt = Mn.T, MHn.T

        def mv(x):
            return Mn @ x if x.ndim == 1 else x @ Mt

        def rmv(x):
            return MHn @ x if x.ndim == 1 else x @ MHt

        self._host_cache = (key, (mv, rmv))
        return mv, rmv

    def to_dense(self, like=None):
        return self.M

    def _detect_symmetric(self):
        m, n = self.shape
        if m != n:
            return False
        if n == 0:
            return True
        if n > SYMMETRY_CHECK_MAX_N:
            return None
        xp = _b.array_namespace(self.M)
        try:
            diff = float(xp.max(xp.abs(self.M - self._MH)))
            scale = float(xp.max(xp.abs(self.M)))
        except (TypeError, ValueError, RuntimeError):  # a backend without these reductions
            return None
        return _close_to_zero(diff, scale, _tiny(xp, self.M.dtype))


class _SparseMatrixOperator(_MatrixOperator):
    """A sparse matrix ``S`` and its conjugate transpose ``_SH`` (formed on first use: the
    methods that need only ``S x`` never pay for it), applied by ``_sp``."""

    def _matvec(self, x):
        return self._sp(self.S, x)

    def _rmatvec(self, x):
        return self._sp(self._SH, x)

    @property
    def _SH(self):
        SH = self.__dict__.get("_SH_")
        if SH is None:
            SH = self.__dict__["_SH_"] = self._conj_transpose()
        return SH

    def _detect_symmetric(self):
        # The check reads all of S and forms S^H: its result is kept for the matrix the user
        # passed (a raw matrix is wrapped anew by every solve), as long as that matrix keeps
        # its data (see _matrix_key).
        key = self._matrix_key()
        if key is not None:
            hit = _SYMMETRY_TAGS.get(key[0])
            if hit is not None and hit[0]() is self._source and hit[1] == key[1]:
                return hit[2]
        tag = self._check_symmetric()
        if key is not None:
            ident = key[0]
            try:
                ref = weakref.ref(self._source, lambda _r, ident=ident: _SYMMETRY_TAGS.pop(ident, None))
            except TypeError:
                return tag
            _SYMMETRY_TAGS[ident] = (ref, key[1], tag)
        return tag

    def _matrix_key(self):
        return None


#: Symmetry tags of sparse matrices users passed: ``id(matrix) -> (weakref, fingerprint,
#: tag)``; an entry goes when its matrix is collected, and is ignored once the fingerprint
#: (shape, dtype, number of entries, where the arrays are, a version counter or a checksum
#: of the values) changes. A tag is a courtesy check (cg and minres refuse a matrix tagged
#: not symmetric): a result's claims always rest on its true residual.
_SYMMETRY_TAGS: dict = {}


def _ptr(a):
    return a.__array_interface__["data"][0]


class SparseOperator(_SparseMatrixOperator):
    """A scipy.sparse or cupyx.scipy.sparse matrix as an operator (stored as CSR)."""

    def __init__(self, S):
        self._source = S
        S = S.tocsr()
        self.S = S
        data = S.data
        xp = _b.array_namespace(data)
        if not _b.is_floating_dtype(xp, data.dtype):
            raise TypeError(
                f"the sparse matrix must have a floating dtype, got {data.dtype}; "
                "cast it with .astype(float)"
            )
        self._setup(S.shape, dtype=data.dtype, xp=xp, device=_b.device_of(data), backend=_b.backend_name(data))

    def _conj_transpose(self):
        S = self.S
        return S.conj().T.tocsr() if S.dtype.kind == "c" else S.T.tocsr()

    def _host_products(self):
        """``(mv, rmv)`` on numpy arrays for a scipy matrix: scipy's CSR kernel called
        directly (its ``S @ x`` spends some microseconds in Python before it), else None."""
        import numpy as np

        S = self.S
        if not isinstance(S.data, np.ndarray):
            return None
        cached = self.__dict__.get("_host_cache")
        if cached is None:
            AH = []

            def rmv(x):
                if not AH:
                    AH.append(_csr_product(self._SH))
                return AH[0](x)

            cached = self._host_cache = ((_csr_product(S), rmv),)
        return cached[0]

    @staticmethod
    def _sp(S, x):
        if x.ndim == 1:
            return S @ x
        return (S @ x.T).T

    def to_dense(self, like=None):
        return self.S.toarray()

    def _matrix_key(self):
        S = self.S
        import numpy as np

        if not isinstance(S.data, np.ndarray):
            return None  # cupyx: no fingerprint without a device pass
        fp = (S.shape, str(S.dtype), S.nnz, _ptr(S.data), _ptr(S.indices), _ptr(S.indptr),
              float(np.add.reduce(S.data, dtype=np.complex128 if S.dtype.kind == "c" else np.float64)))
        return id(self._source), fp

    def _check_symmetric(self):
        m, n = self.shape
        if m != n:
            return False
        if self.S.nnz == 0:
            return True
        try:
            D = self.S - self._SH
            diff = float(abs(D).max()) if D.nnz else 0.0
            scale = float(abs(self.S).max())
        except (TypeError, ValueError, AttributeError, NotImplementedError):
            return None
        return _close_to_zero(diff, scale, _tiny(self.xp, self.dtype))


class TorchSparseOperator(_SparseMatrixOperator):
    """A sparse torch tensor (COO or CSR) as an operator (stored as CSR; a CSR tensor is used
    as it is, without a copy)."""

    def __init__(self, S):
        torch = _b.import_optional("torch", "torch sparse operators")
        if S.ndim != 2:
            raise ValueError(f"the sparse tensor must be 2-D, got shape {tuple(S.shape)}")
        if not (S.dtype.is_floating_point or S.dtype.is_complex):
            raise TypeError(f"the sparse tensor must have a floating dtype, got {S.dtype}")
        self._source = S
        if S.layout == torch.sparse_csr:
            self.S = S
        else:
            coo = S.to_sparse_coo().coalesce() if S.layout != torch.sparse_coo else S.coalesce()
            self.S = coo.to_sparse_csr()
        dense_like = torch.empty(0, dtype=S.dtype, device=S.device)
        self._setup(
            tuple(S.shape), dtype=S.dtype, xp=_b.array_namespace(dense_like),
            device=S.device, backend="torch",
        )

    def _conj_transpose(self):
        ST = self.S.to_sparse_coo().coalesce().t().coalesce()
        if self.S.dtype.is_complex:
            ST = ST.conj().resolve_conj()
        return ST.to_sparse_csr()

    @staticmethod
    def _sp(S, x):
        if x.ndim == 1:
            return S.mv(x)  # the sparse matrix-vector kernel, without a (n, 1) matrix product
        return (S @ x.T).T

    def _host_products(self):
        """``(mv, rmv)`` on numpy arrays for a CPU sparse tensor without gradient: scipy CSR
        products on views of its arrays (scipy's CPU kernel is several times faster than
        torch's; a view sees in-place changes of the values), else None. See
        :func:`linsolve_rbp.solve._host_views`."""
        S = self.S
        if S.device.type != "cpu" or S.requires_grad:
            return None
        cached = self.__dict__.get("_host_cache")
        if cached is None:
            A = _scipy_view(S)
            if A is None:
                cached = (None,)
            else:
                AH = []

                def mv(x):
                    return A @ x if x.ndim == 1 else (A @ x.T).T

                def rmv(x):
                    if not AH:  # S^H formed on the first product with it
                        AH.append(_scipy_view(self._SH))
                    M = AH[0]
                    return M @ x if x.ndim == 1 else (M @ x.T).T

                cached = ((mv, rmv),)
            self._host_cache = cached
        return cached[0]

    def to_dense(self, like=None):
        return self.S.to_dense()

    def _matrix_key(self):
        S = self.S
        fp = (tuple(S.shape), str(S.dtype), S.device.type, S._version, S.values().data_ptr(),
              S.crow_indices().data_ptr(), S.col_indices().data_ptr(), S.values().numel())
        return id(self._source), fp

    def _check_symmetric(self):
        m, n = self.shape
        if m != n:
            return False
        try:
            S = self.S.to_sparse_coo().coalesce()
            D = (S - self._SH.to_sparse_coo()).coalesce()
            if S.values().numel() == 0:
                return True
            diff = float(D.values().abs().max()) if D.values().numel() else 0.0
            scale = float(S.values().abs().max())
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            return None
        return _close_to_zero(diff, scale, _tiny(self.xp, self.dtype))


def _csr_product(S):
    """``x -> S x`` (``X S^T`` for a batch of rows) for a scipy CSR matrix ``S``: for a
    contiguous vector of ``S``'s dtype, scipy's CSR kernel called directly, else ``S @ x``."""
    import numpy as np

    def slow(x):
        return S @ x if x.ndim == 1 else (S @ x.T).T

    try:
        from scipy.sparse._sparsetools import csr_matvec
    except ImportError:  # pragma: no cover - a scipy without that module
        return slow
    m, n = S.shape
    dtype = S.data.dtype
    if dtype not in (np.float32, np.float64, np.complex64, np.complex128) or S.indptr.dtype != S.indices.dtype:
        return slow

    def mv(x):
        if x.ndim != 1 or x.dtype != dtype or not x.flags.c_contiguous:
            return slow(x)
        y = np.zeros(m, dtype=dtype)
        # S's arrays read at each product: the matrix's current ones.
        csr_matvec(m, n, S.indptr, S.indices, S.data, x, y)
        return y

    return mv


def _scipy_view(S):
    """A scipy CSR matrix on a view of the values of the CPU torch CSR tensor ``S`` (its
    index arrays copied to int32 where they fit: scipy's product is faster on those), or
    None."""
    try:
        import scipy.sparse as sp

        vals = S.values()
        if vals.is_conj():
            vals = vals.resolve_conj()
        data = vals.detach().numpy()
        indices = S.col_indices().numpy()
        indptr = S.crow_indices().numpy()
        return sp.csr_matrix((data, indices, indptr), shape=tuple(S.shape), copy=False)
    except (ImportError, TypeError, ValueError, RuntimeError, AttributeError):
        return None


class ScipyOperator(_MatrixOperator):
    """A :class:`scipy.sparse.linalg.LinearOperator` (numpy data) as an operator."""

    def __init__(self, L):
        import numpy as np

        self.L = L
        dtype = np.dtype(L.dtype) if L.dtype is not None else np.dtype(np.float64)
        self._setup(L.shape, dtype=dtype, xp=_b.array_namespace(np.empty(0)), device="cpu", backend="numpy")

    @property
    def has_rmatvec(self) -> bool:
        from scipy.sparse.linalg import LinearOperator as SciPyLO

        L = self.L
        if getattr(L, "_CustomLinearOperator__rmatvec_impl", "n/a") is None:
            return False
        cls = type(L)
        return cls._rmatvec is not SciPyLO._rmatvec or cls._adjoint is not SciPyLO._adjoint

    def _matvec(self, x):
        if x.ndim == 1:
            return self.L.matvec(x).reshape(self.shape[0])
        return self.L.matmat(x.T).T

    def _rmatvec(self, x):
        if x.ndim == 1:
            return self.L.rmatvec(x).reshape(self.shape[1])
        return self.L.rmatmat(x.T).T


def aslinearoperator(A) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator`.

    Parameters
    ----------
    A : LinearOperator, array, sparse matrix or scipy LinearOperator
        A :class:`LinearOperator` (returned as is); a dense 2-D numpy, torch, cupy or array-API
        array; a scipy.sparse or cupyx.scipy.sparse matrix; a sparse torch tensor (COO or CSR);
        or a :class:`scipy.sparse.linalg.LinearOperator`.

    Returns
    -------
    LinearOperator
        An operator whose products run in ``A``'s own backend and device.

    Raises
    ------
    TypeError
        If ``A`` is none of the above.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp, linsolve_rbp as lr
    >>> A = lr.aslinearoperator(sp.eye(3, format="csr") * 2.0)
    >>> A @ np.ones(3)
    array([2., 2., 2.])
    """
    if isinstance(A, LinearOperator):
        return A
    if _b.is_sparse(A):
        if _b.is_torch_array(A):
            return TorchSparseOperator(A)
        return SparseOperator(A)
    mod = type(A).__module__
    if mod.startswith("scipy.sparse.linalg"):
        from scipy.sparse.linalg import LinearOperator as SciPyLO

        if isinstance(A, SciPyLO):
            return ScipyOperator(A)
    if type(A).__name__ == "matrix" and mod.startswith("numpy"):
        import numpy as np

        A = np.asarray(A)
    if _b.is_array(A):
        if A.ndim != 2:
            raise ValueError(f"A must be a 2-D matrix, got an array of shape {tuple(A.shape)}")
        return DenseOperator(A)
    raise TypeError(
        "A must be a linsolve_rbp.LinearOperator, a 2-D array (numpy, torch, cupy, array-API), "
        "a scipy/cupyx sparse matrix, a sparse torch tensor or a scipy LinearOperator; "
        f"got {type(A).__module__}.{type(A).__name__}"
    )
