"""Invertibility diagnostics for recurrent back-propagation: is ``I - J^T`` safe to solve, and
will a truncated Neumann series (or fixed-point iteration) converge?

All estimates use products only (``J v`` and, for the spectral norm, ``J^H u``), in the
backend of the operator; nothing is materialised. The two regularisers are torch functions
of a (small, dense) Jacobian, to add to a training loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import backend as _b
from .operators import aslinearoperator

__all__ = [
    "DotTestResult",
    "dot_test",
    "spectral_norm",
    "spectral_radius",
    "neumann_error_bound",
    "column_norm_penalty",
    "gershgorin_penalty",
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
    J = aslinearoperator(J)
    _template(J, v0)
    v = v0 if v0 is not None else _random(J, J.shape[1], seed, None)
    xp = _b.array_namespace(v)
    nv = _vnorm(xp, v)
    if nv == 0:
        raise ValueError("v0 must be non-zero")
    v = v / nv
    est = 0.0
    for _ in range(int(maxiter)):
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
        Unknown ``method``.

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
    if method not in ("arnoldi", "power"):
        raise ValueError(f"method must be 'arnoldi' or 'power', got {method!r}")
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
        for k in range(1, int(maxiter) + 1):
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
    m = min(int(maxiter), n)
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
        ``norm_J`` is not in ``[0, 1)``, or ``K`` is negative.

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
    if isinstance(K, bool) or int(K) != K or K < 0:
        raise ValueError(f"K must be a non-negative integer, got {K!r}")
    if not 0.0 <= norm_J < 1.0:
        raise ValueError(f"norm_J must be in [0, 1) for the Neumann series to converge, got {norm_J!r}")
    return float(g_norm) * norm_J ** (int(K) + 1) / (1.0 - norm_J)


def column_norm_penalty(J, mu: float = 0.9):
    """Scarselli et al.'s contraction penalty ``sum_j max(||J[:, j]||_1 - mu, 0)^2``.

    Parameters
    ----------
    J : torch.Tensor, shape (n, n)
        The Jacobian ``dF/dh`` at the fixed point, differentiable with respect to the
        parameters (e.g. from ``torch.func.jacrev``).
    mu : float
        Target bound on the column 1-norms, below 1.

    Returns
    -------
    torch.Tensor
        A scalar to add to the loss.

    Notes
    -----
    The largest column 1-norm is ``||J||_1 >= rho(J)``, so driving every column norm below
    ``mu < 1`` keeps the recurrent map contractive and the RBP adjoint system solvable by
    fixed-point or Neumann iteration.

    References
    ----------
    F. Scarselli, M. Gori, A. C. Tsoi, M. Hagenbuchner, G. Monfardini, "The Graph Neural
    Network Model", IEEE Trans. Neural Networks 20(1), 2009. Discussed in the appendix of Liao
    et al., ICML 2018.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.diagnostics import column_norm_penalty
    >>> round(float(column_norm_penalty(torch.tensor([[1.0, 0.0], [0.5, 0.2]]), mu=0.9)), 6)
    0.36
    """
    import torch

    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"J must be a square matrix, got shape {tuple(J.shape)}")
    col = J.abs().sum(dim=0)
    return (torch.clamp(col - mu, min=0.0) ** 2).sum()


def gershgorin_penalty(J, margin: float = 0.1):
    """Penalty keeping the Gershgorin lower bound of ``I - J`` above ``margin``.

    Every eigenvalue of ``I - J`` has real part at least
    ``min_i (1 - J_ii - sum_{j != i} |J_ij|)`` (Gershgorin's circle theorem); the penalty is
    ``sum_i max(margin - (1 - J_ii - sum_{j != i} |J_ij|), 0)^2``.

    Parameters
    ----------
    J : torch.Tensor, shape (n, n)
        The Jacobian at the fixed point, differentiable with respect to the parameters.
    margin : float
        Required lower bound (positive keeps ``I - J`` away from singular).

    Returns
    -------
    torch.Tensor
        A scalar to add to the loss.

    References
    ----------
    S. Gershgorin, "Über die Abgrenzung der Eigenwerte einer Matrix", 1931. The penalty is
    the appendix's alternative to Scarselli et al.'s in Liao et al., ICML 2018.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.diagnostics import gershgorin_penalty
    >>> round(float(gershgorin_penalty(torch.tensor([[0.5, 0.6], [0.0, 0.2]]), margin=0.1)), 6)
    0.04
    """
    import torch

    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"J must be a square matrix, got shape {tuple(J.shape)}")
    diag = torch.diagonal(J)
    off = J.abs().sum(dim=1) - diag.abs()
    lower = 1.0 - diag - off
    return (torch.clamp(margin - lower, min=0.0) ** 2).sum()
