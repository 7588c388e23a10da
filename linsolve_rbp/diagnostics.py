"""Invertibility diagnostics for recurrent back-propagation: is ``I - J^T`` safe to solve, and
will a truncated Neumann series (or fixed-point iteration) converge?

All estimates use products only (``J v`` and, for the spectral norm, ``J^H u``), in the
backend of the operator; nothing is materialised. This module is array-API code: the
contraction penalties, torch functions of a dense Jacobian to add to a training loss, are in
the torch adapter (:func:`linsolve_rbp.adapters.torch.column_norm_penalty`,
:func:`linsolve_rbp.adapters.torch.gershgorin_penalty`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import backend as _b
from ._validate import choice, nonnegative_int, nonnegative_real, positive_int
from .operators import aslinearoperator

__all__ = [
    "DotTestResult",
    "dot_test",
    "spectral_norm",
    "spectral_radius",
    "neumann_error_bound",
]


class DotTestResult(NamedTuple):
    """Outcome of :func:`dot_test`."""

    passed: bool
    lhs: complex
    rhs: complex
    relative_error: float


def _random(A, n, seed, like):
    """A random ``(n,)`` vector in the operator's backend (or ``like``'s)."""
    rng = np.random.default_rng(seed)
    dtype = np.result_type(getattr(like, "dtype", None) or np.float64) if like is not None and \
        _b.backend_name(like) == "numpy" else None
    v = rng.standard_normal(n)
    if like is None:
        like = getattr(A, "_like", None)
    if like is None:
        if A.xp is None or A.backend == "numpy":
            return v.astype(dtype or (A.dtype if A.dtype is not None else np.float64))
        raise TypeError("give v0 (or like) so that the random start is in the operator's backend")
    return _b.from_numpy(v, like)


def _template(A, v0):
    if v0 is not None:
        return v0
    if A.backend not in (None, "numpy"):
        raise TypeError(
            f"the operator works on {A.backend} arrays: pass v0, a start vector in that backend")
    return None


def _to_scalar(x) -> complex:
    a = np.asarray(_b.to_numpy(x))
    return complex(a.reshape(-1)[0]) if np.iscomplexobj(a) else float(a.reshape(-1)[0])


def dot_test(A, x=None, y=None, *, rtol: float | None = None, seed: int = 0) -> DotTestResult:
    """Check that ``rmatvec`` is the adjoint of ``matvec``: ``<A x, y> == <x, A^H y>``.

    Parameters
    ----------
    A : LinearOperator or anything :func:`~linsolve_rbp.aslinearoperator` accepts
        Must have ``rmatvec``.
    x, y : array, optional
        Test vectors of shapes ``(n,)`` and ``(m,)``; random standard-normal numpy vectors by
        default (give them for a non-numpy operator).
    rtol : float, optional
        Pass when ``|lhs - rhs| <= rtol * max(|lhs|, |rhs|)``; default ``1e-4`` in single
        precision and ``1e-10`` otherwise.
    seed : int
        Seed of the random vectors.

    Returns
    -------
    DotTestResult
        ``passed``, both inner products and their relative difference.

    Raises
    ------
    MissingRmatvecError
        ``A`` has no ``rmatvec``.

    Notes
    -----
    A wrong vector-Jacobian or Jacobian-vector product (a sign, a missing term, a transpose)
    shows up here long before it spoils a gradient: methods that use both products (cgne,
    lsqr) assume they are adjoint. The same test is PyLops' ``dottest``.

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.diagnostics import dot_test
    >>> M = np.arange(6.0).reshape(2, 3)
    >>> dot_test(M).passed
    True
    """
    rtol = nonnegative_real(rtol, "rtol", allow_none=True)
    A = aslinearoperator(A)
    m, n = A.shape
    if x is None:
        x = np.random.default_rng(seed).standard_normal(n)
    if y is None:
        y = np.random.default_rng(seed + 1).standard_normal(m)
    Ax = A.matvec(x)
    AHy = A.rmatvec(y)
    xp = _b.array_namespace(Ax)
    lhs_a = xp.sum(xp.conj(y) * Ax) if _b.is_complex_dtype(xp, Ax.dtype) else xp.sum(y * Ax)
    rhs_a = xp.sum(xp.conj(AHy) * x) if _b.is_complex_dtype(xp, AHy.dtype) else xp.sum(AHy * x)
    lhs, rhs = _to_scalar(lhs_a), _to_scalar(rhs_a)
    if rtol is None:
        single = str(Ax.dtype).endswith(("float32", "complex64"))
        rtol = 1e-4 if single else 1e-10
    scale = max(abs(lhs), abs(rhs))
    err = abs(lhs - rhs) / scale if scale > 0 else 0.0
    return DotTestResult(bool(err <= rtol), lhs, rhs, float(err))


def _vnorm(xp, v):
    return float(_to_scalar(xp.linalg.vector_norm(v)))


def spectral_norm(J, *, v0=None, maxiter: int = 100, rtol: float = 1e-6, seed: int = 0) -> float:
    """Estimate the largest singular value ``||J||_2`` by power iteration on ``J^H J``.

    Parameters
    ----------
    J : LinearOperator or matrix
        Needs ``matvec`` and ``rmatvec`` (for a torch Jacobian: a JVP and a VJP).
    v0 : array, optional
        Start vector (required for a non-numpy operator; it fixes backend, device and dtype).
    maxiter : int
        Power iterations (each one ``J v`` and one ``J^H u``).
    rtol : float
        Stop when the estimate changes by less than ``rtol`` relatively.
    seed : int
        Seed of the random start.

    Returns
    -------
    float
        A lower bound on ``||J||_2`` that converges to it (at the rate
        ``(sigma_2 / sigma_1)^2``).

    Notes
    -----
    ``||J||_2 < 1`` makes ``h -> F(h)`` a contraction near ``h*``, and then the Neumann series
    and fixed-point iteration for ``(I - J^T) z = g`` converge with error at most
    ``||J||^(K+1) ||g|| / (1 - ||J||)`` (:func:`neumann_error_bound`).

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.diagnostics import spectral_norm
    >>> J = np.diag([0.5, -0.9, 0.1])
    >>> round(spectral_norm(J), 6)
    0.9
    """
    maxiter = positive_int(maxiter, "maxiter")
    rtol = nonnegative_real(rtol, "rtol")
    J = aslinearoperator(J)
    _template(J, v0)
    v = v0 if v0 is not None else _random(J, J.shape[1], seed, None)
    xp = _b.array_namespace(v)
    nv = _vnorm(xp, v)
    if nv == 0:
        raise ValueError("v0 must be non-zero")
    v = v / nv
    est = 0.0
    for _ in range(maxiter):
        w = J.rmatvec(J.matvec(v))
        nw = _vnorm(xp, w)
        new = math.sqrt(nw)
        if nw == 0:
            return 0.0
        v = w / nw
        if abs(new - est) <= rtol * new:
            return new
        est = new
    return est


def spectral_radius(J, *, v0=None, maxiter: int = 50, method: str = "arnoldi", rtol: float = 1e-6,
                    seed: int = 0) -> float:
    """Estimate the spectral radius ``rho(J)`` (largest eigenvalue modulus) from products ``J v``.

    Parameters
    ----------
    J : LinearOperator or matrix
        Needs ``matvec`` only.
    v0 : array, optional
        Start vector (required for a non-numpy operator).
    maxiter : int
        Krylov dimension (Arnoldi) or number of iterations (power).
    method : {"arnoldi", "power"}
        ``"arnoldi"``: the largest Ritz value modulus after ``maxiter`` Arnoldi steps (exact when
        ``maxiter >= n``; handles complex and equal-modulus dominant eigenvalues).
        ``"power"``: the growth rate ``||J^k v||^(1/k)`` of power iteration, cheap in memory
        (two vectors) but slow to converge.
    rtol : float
        Power iteration stops when its estimate changes by less than ``rtol`` relatively.
    seed : int
        Seed of the random start.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Unknown ``method``, ``maxiter`` below 1 or a negative ``rtol`` (the message names the
        argument).

    Notes
    -----
    ``rho(J) < 1`` is what the Neumann series and fixed-point iteration (RBP) need to converge;
    ``rho(J) >= 1`` means they diverge, and a Krylov method (gmres, lsqr) is needed. Arnoldi
    keeps ``maxiter + 1`` vectors; the small Hessenberg matrix's eigenvalues are computed on
    the host with numpy.

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.diagnostics import spectral_radius
    >>> J = np.array([[0.0, -0.8], [0.8, 0.0]])   # eigenvalues +-0.8i
    >>> round(spectral_radius(J), 6)
    0.8
    """
    method = choice(method, "method", ("arnoldi", "power"))
    maxiter = positive_int(maxiter, "maxiter")
    rtol = nonnegative_real(rtol, "rtol")
    J = aslinearoperator(J)
    if J.shape[0] != J.shape[1]:
        raise ValueError(f"J must be square, got shape {J.shape}")
    _template(J, v0)
    v = v0 if v0 is not None else _random(J, J.shape[1], seed, None)
    xp = _b.array_namespace(v)
    nv = _vnorm(xp, v)
    if nv == 0:
        raise ValueError("v0 must be non-zero")
    v = v / nv
    n = J.shape[0]
    if method == "power":
        logsum, est = 0.0, 0.0
        for k in range(1, maxiter + 1):
            w = J.matvec(v)
            nw = _vnorm(xp, w)
            if nw == 0:
                return 0.0
            logsum += math.log(nw)
            v = w / nw
            new = math.exp(logsum / k)
            if k > 1 and abs(new - est) <= rtol * new:
                return new
            est = new
        return est
    m = min(maxiter, n)
    V = [v]
    H = np.zeros((m + 1, m), dtype=complex)
    for j in range(m):
        w = J.matvec(V[j])
        for i in range(j + 1):  # modified Gram-Schmidt, twice for orthogonality
            c = _to_scalar(xp.sum(xp.conj(V[i]) * w) if _b.is_complex_dtype(xp, w.dtype) else xp.sum(V[i] * w))
            H[i, j] += c
            w = w - c * V[i] if isinstance(c, complex) and c.imag else w - float(np.real(c)) * V[i]
        for i in range(j + 1):
            c = _to_scalar(xp.sum(xp.conj(V[i]) * w) if _b.is_complex_dtype(xp, w.dtype) else xp.sum(V[i] * w))
            H[i, j] += c
            w = w - c * V[i] if isinstance(c, complex) and c.imag else w - float(np.real(c)) * V[i]
        h = _vnorm(xp, w)
        H[j + 1, j] = h
        if h <= 1e-12 * max(1.0, np.abs(H[:j + 2, j]).max()):
            m = j + 1  # invariant subspace: the Ritz values are eigenvalues
            break
        V.append(w / h)
    return float(np.abs(np.linalg.eigvals(H[:m, :m])).max())


def neumann_error_bound(K: int, norm_J: float, g_norm: float = 1.0) -> float:
    """Bound on the error of the ``K``-step Neumann series for ``(I - J^T) z = g``.

    ``z_K = sum_{k=0..K} (J^T)^k g`` differs from the solution by the tail
    ``sum_{k>K} (J^T)^k g``, whose norm is at most ``||J||^(K+1) ||g|| / (1 - ||J||)``.

    Parameters
    ----------
    K : int
        Truncation (``maxiter`` of the ``neumann`` method).
    norm_J : float
        ``||J||`` in an operator norm (for example :func:`spectral_norm`); must be below 1.
    g_norm : float
        ``||g||``, the norm of the right-hand side (1 gives the relative bound).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        ``norm_J`` is not in ``[0, 1)``, ``K`` is not a non-negative integer, or ``g_norm`` is
        negative (the message names the argument).

    Notes
    -----
    The geometric tail bound behind Proposition 2 of Liao et al. (2018), which relates the
    truncated Neumann series to the exact RBP gradient when the map is contractive. With
    ``rho(J) < 1 <= ||J||`` the series still converges but no bound of this form holds; use
    :func:`spectral_radius` to tell the cases apart.

    References
    ----------
    R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018,
    Proposition 2.

    Examples
    --------
    >>> from linsolve_rbp.diagnostics import neumann_error_bound
    >>> round(neumann_error_bound(9, 0.5), 6)   # 0.5**10 / 0.5
    0.001953
    """
    K = nonnegative_int(K, "K")
    norm_J = nonnegative_real(norm_J, "norm_J")
    if norm_J >= 1.0:
        raise ValueError(f"norm_J must be in [0, 1) for the Neumann series to converge, got {norm_J!r}")
    return nonnegative_real(g_norm, "g_norm") * norm_J ** (K + 1) / (1.0 - norm_J)
