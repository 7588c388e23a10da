"""Contraction penalties: torch functions of a (small, dense) Jacobian ``J = dF/dh`` at the
fixed point, to add to a training loss so that the recurrent map stays contractive and the RBP
adjoint system ``(I - J^T) z = g`` stays solvable by fixed-point or Neumann iteration.

Both are differentiable in ``J`` (take ``J`` from :func:`torch.func.jacrev` with the graph
kept). The estimators that only need products (spectral norm and radius, the Neumann error
bound) are array-API code in :mod:`linsolve_rbp.diagnostics`.

Reference: the appendix of R. Liao et al., "Reviving and Improving Recurrent
Back-Propagation", ICML 2018.
"""

from __future__ import annotations

import torch

__all__ = ["column_norm_penalty", "gershgorin_penalty"]


def _check_square(J):
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"J must be a torch.Tensor, got {type(J).__name__}")
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"J must be a square matrix, got shape {tuple(J.shape)}")


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
    >>> from linsolve_rbp.adapters.torch import column_norm_penalty
    >>> round(float(column_norm_penalty(torch.tensor([[1.0, 0.0], [0.5, 0.2]]), mu=0.9)), 6)
    0.36
    """
    _check_square(J)
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
    >>> from linsolve_rbp.adapters.torch import gershgorin_penalty
    >>> round(float(gershgorin_penalty(torch.tensor([[0.5, 0.6], [0.0, 0.2]]), margin=0.1)), 6)
    0.04
    """
    _check_square(J)
    diag = torch.diagonal(J)
    off = J.abs().sum(dim=1) - diag.abs()
    lower = 1.0 - diag - off
    return (torch.clamp(margin - lower, min=0.0) ** 2).sum()
