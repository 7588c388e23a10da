"""Matrices with known structure: a sparse convection-diffusion operator and dense random
contractions.

Used by the tests, the benchmarks and ``linsolve-rbp compare``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._validate import nonnegative_real, positive_int

__all__ = ["convection_diffusion", "random_contractive"]


def convection_diffusion(n: int = 32, peclet: float = 10.0, dtype=np.float64) -> sp.csr_matrix:
    """The 2-D convection-diffusion operator ``-Laplace(u) + peclet * (u_x + u_y)`` on the unit
    square, Dirichlet boundary, upwind differences for convection, on an ``n x n`` interior
    grid: a sparse, nonsymmetric, nonsingular M-matrix of size ``n^2``.

    Parameters
    ----------
    n : int
        Interior grid points per side (the matrix has ``n**2`` rows).
    peclet : float
        Convection strength; 0 gives the symmetric positive-definite Laplacian.
    dtype : numpy dtype

    Returns
    -------
    scipy.sparse.csr_matrix

    Examples
    --------
    >>> from linsolve_rbp.problems import convection_diffusion
    >>> convection_diffusion(8).shape
    (64, 64)
    """
    n = positive_int(n, "n")
    h = 1.0 / (n + 1)
    # 1-D second difference and upwind first difference (flow in +x / +y).
    e = np.ones(n)
    d2 = sp.diags([-e[:-1], 2 * e, -e[:-1]], [-1, 0, 1]) / h**2
    d1 = sp.diags([-e[:-1], e], [-1, 0]) / h
    eye = sp.identity(n)
    L = sp.kron(eye, d2) + sp.kron(d2, eye)
    C = sp.kron(eye, d1) + sp.kron(d1, eye)
    return (L + peclet * C).tocsr().astype(dtype)


def random_contractive(n: int, rho: float = 0.9, seed=None, dtype=np.float64) -> np.ndarray:
    """A dense random nonsymmetric matrix ``J`` with spectral radius exactly ``rho``.

    ``I - J^T`` is then the adjoint operator of a fixed-point map that contracts at rate
    ``rho`` (diverges for ``rho >= 1``).

    Parameters
    ----------
    n : int
    rho : float
        The spectral radius.
    seed : int or numpy Generator, optional
    dtype : numpy dtype

    Returns
    -------
    numpy.ndarray of shape (n, n)

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.problems import random_contractive
    >>> J = random_contractive(20, rho=0.5, seed=0)
    >>> round(float(max(abs(np.linalg.eigvals(J)))), 6)
    0.5
    """
    n = positive_int(n, "n")
    rho = nonnegative_real(rho, "rho", allow_inf=False)
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((n, n)) / np.sqrt(n)
    r = float(np.max(np.abs(np.linalg.eigvals(J))))
    return (J * (rho / r)).astype(dtype)
