"""Small helpers shared by the Krylov solvers (cg, cgne, minres, lsqr).

Every scalar of a batched Krylov recurrence is a ``(B,)`` array, one entry per system. A zero
denominator in one system (a breakdown, or a system that has already stopped) must not put
NaN or inf into the others, so divisions go through :func:`safe_div`.
"""

from __future__ import annotations

import math

__all__ = ["safe_div", "real_part", "is_complex", "scalars", "host_axpy", "host_upper_solve", "where_of", "host_scalars",
           "fdiv", "fmax", "sq_norm"]


_WHERE: dict = {}


def where_of(xp):
    """The fastest ``where(cond, a, b)`` of a namespace for arrays of one dtype, found once:
    ``torch.where`` itself for the ``array_api_compat.torch`` wrapper (whose ``where``
    runs type promotion in Python first), ``xp.where`` elsewhere."""
    key = id(xp)
    try:
        return _WHERE[key][1]
    except KeyError:
        pass
    f = xp.where
    if getattr(xp, "__name__", "") == "array_api_compat.torch":
        import torch

        f = torch.where
    _WHERE[key] = (xp, f)
    return f


def safe_div(xp, num, den):
    """``num / den`` where ``den != 0`` and 0 elsewhere, elementwise, never NaN or inf from a
    zero ``den``."""
    where = where_of(xp)
    nonzero = den != 0
    safe = where(nonzero, den, xp.ones_like(den))
    q = num / safe
    return where(nonzero, q, xp.zeros_like(q))


_COMPLEX: dict = {}


def is_complex(xp, dtype) -> bool:
    """``xp.isdtype(dtype, "complex floating")``, remembered per dtype (it runs every
    iteration). Keyed by the dtype's type and the dtype itself (a tuple compares the types
    first, so the dtypes of different libraries are never compared with one another; no
    ``str(dtype)``, which costs microseconds for numpy's)."""
    try:
        key = (type(dtype), dtype)
        c = _COMPLEX.get(key)
    except TypeError:  # an unhashable dtype
        key = (type(dtype), str(dtype))
        c = _COMPLEX.get(key)
    if c is None:
        c = _COMPLEX[key] = bool(xp.isdtype(dtype, "complex floating"))
    return c


def real_part(xp, a):
    """The real part of ``a`` (``a`` itself for a real dtype)."""
    if is_complex(xp, a.dtype):
        return xp.real(a)
    return a


def scalars(prob, value: float):
    """A ``(B,)`` array of per-system real scalars, all equal to ``value``."""
    return prob.xp.full((prob.nsys,), value, dtype=prob.real_dtype, device=prob.device)


_BLAS_AXPY: dict = {}


def host_axpy(xp, like):
    """``axpy(a, x, y)``: ``y <- y + a x`` in place, for 1-D arrays of ``like``'s dtype and a
    real or complex Python scalar ``a``.

    On the host (numpy) with a BLAS dtype this is BLAS ``axpy`` (one pass over ``x`` and
    ``y``, no temporary; half the time of ``y += a * x``); elsewhere ``y += a * x``. ``y`` must
    be an array the caller owns. A helper of the host single-system paths (see
    :func:`linsolve_rbp.solvers._base.is_host`), which may round the last bit differently
    from ``y + a * x`` (BLAS may fuse the multiply and add)."""
    from ._base import is_host

    f = None
    # (BLAS refuses empty vectors: a rank of a sharded solve may hold no entries.)
    if is_host(xp) and like.shape[-1] and str(like.dtype) in ("float32", "float64", "complex64", "complex128"):
        f = _BLAS_AXPY.get(str(like.dtype))
        if f is None:
            try:
                from scipy.linalg import blas

                f = _BLAS_AXPY[str(like.dtype)] = blas.get_blas_funcs("axpy", (like,))
            except (ImportError, ValueError):  # pragma: no cover - scipy is a dependency
                f = None
    if f is None:
        def axpy(a, x, y):
            y += a * x
            return y

        return axpy

    def blas_axpy(a, x, y):
        out = f(x, y, x.shape[0], a)
        if out is not y:  # not updated in place (a non-contiguous y): write it back
            y[...] = out
        return y

    return blas_axpy


_TRTRS: list = []


def host_upper_solve():
    """LAPACK ``dtrtrs`` (scipy's), the solve of an upper-triangular float64 system read from
    the upper triangle of a numpy matrix, ``(y, info)`` with ``info > 0`` where a diagonal
    entry is zero; or None without scipy. Found once.

    On an upper-triangular matrix with no zero diagonal it gives ``numpy.linalg.solve``'s
    values bit for bit (LU with partial pivoting makes no swaps and ``L = I`` there, and
    both end in the same triangular solve; checked on 20000 random float64 systems), in a
    fraction of the time of numpy's wrapper. float64 only: numpy solves float32 systems in
    float64, and its complex results differ in the last bits."""
    if not _TRTRS:
        try:
            from scipy.linalg import lapack

            f = lapack.get_lapack_funcs("trtrs", dtype="float64")
        except (ImportError, ValueError):  # pragma: no cover - scipy is a dependency
            f = None
        _TRTRS.append(f)
    return _TRTRS[0]


def host_scalars(prob, mon) -> bool:
    """Whether a recurrence may keep its per-system scalars as host floats: one system, on
    the host (numpy), in float64 (or complex128), where float arithmetic is the dtype's
    own, so the scalars are those of the ``(1,)`` array path."""
    from ._base import is_host

    return mon.host_single and is_host(prob.xp) and str(prob.real_dtype) == "float64"


def fdiv(num: float, den: float) -> float:
    """:func:`safe_div` on host floats: ``num / den``, or 0 where ``den == 0``."""
    return num / den if den != 0.0 else 0.0


def fmax(a: float, b: float) -> float:
    """``maximum(a, b)`` on host floats with NaN propagating, as the array function's."""
    if a != a or b != b:
        return math.nan
    return b if b > a else a


def sq_norm(xp, v):
    """Per-row squared 2-norms ``<v, v>`` (real), one fused inner product."""
    from ._base import dot

    return real_part(xp, dot(xp, v, v))
