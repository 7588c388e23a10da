"""Penalties that keep a fixed-point map well behaved, to add to a training loss.

- :func:`jacobian_penalty`: the Hutchinson estimate of ``||J||_F^2`` at the fixed point, from
  ``probes`` vector-Jacobian products (Bai, Koltun & Kolter, ICML 2021), differentiable.
- :func:`column_norm_penalty`, :func:`gershgorin_penalty`: penalties on a (small, dense)
  Jacobian ``J = dF/dh`` that keep ``I - J`` invertible, the second condition of the implicit
  function theorem under which the RBP adjoint system ``(I - J^T) z = g`` is solvable (the
  appendix of Liao et al., ICML 2018). :func:`jacobian_matrix` forms ``J`` from ``n``
  vector-Jacobian products (``n`` the size of one sample's state), with the graph kept.

All are differentiable with respect to the parameters ``f`` closes over. The estimators that
only need products (spectral norm and radius, the Neumann error bound) are array-API code in
:mod:`linsolve_rbp.diagnostics`.

References
----------
R. Liao et al., "Reviving and Improving Recurrent Back-Propagation", ICML 2018.

S. Bai, V. Koltun, J. Z. Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021.
"""

from __future__ import annotations

import math

import torch

from ..._validate import check_common, choice, positive_int
from ._tree import Structure

__all__ = ["jacobian_penalty", "jacobian_matrix", "column_norm_penalty", "gershgorin_penalty"]

#: Distributions of the Hutchinson probe vectors (both have ``E[v v^T] = I``).
PROBE_DISTRIBUTIONS = ("gaussian", "rademacher")


def _record(f, h, batch_dims, name):
    """Evaluate ``f`` once at ``h`` (a tensor, or a tuple / list / dict of them, nested;
    detached) with the graph kept: ``(inputs, outputs)`` as lists of tensors, the inputs
    requiring grad. The state is checked and rebuilt for ``f`` as :func:`fixed_point` does
    (:class:`~linsolve_rbp.adapters.torch._tree.Structure`)."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    batch_dims = check_common({"batch_dims": batch_dims})["batch_dims"]
    st = Structure.of(h, name, batch_dims)
    inputs = [t.detach().requires_grad_(True) for t in st.leaves(h, name)]
    with torch.enable_grad():
        out = f(st.build(inputs))
    return inputs, st.check_output(out)


def _vjp(outputs, inputs, vectors, create_graph):
    grads = torch.autograd.grad(
        outputs, inputs, vectors, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _sq_norm(tensors, batch_dims):
    """Squared norm of a list of tensors, per sample with ``batch_dims=1``."""
    if batch_dims == 1:
        return sum(t.reshape(t.shape[0], -1).pow(2).sum(dim=1) for t in tensors)
    return sum(t.pow(2).sum() for t in tensors)


def jacobian_penalty(f, h, *, probes: int = 1, batch_dims: int = 0,
                     distribution: str = "gaussian", create_graph: bool = True, generator=None):
    """Hutchinson estimate of ``||J||_F^2``, ``J = df/dh`` at ``h``: the Jacobian
    regularisation of Bai, Koltun and Kolter (ICML 2021).

    With random vectors ``v`` such that ``E[v v^T] = I``, ``E ||v^T J||^2 = tr(J J^T) =
    ||J||_F^2``; the estimate is the mean of ``||v^T J||^2`` over ``probes`` vectors, each
    ``v^T J`` one vector-Jacobian product.

    Parameters
    ----------
    f : callable
        The map, state -> state of the same structure; closes over its parameters.
    h : torch.Tensor or tuple, list or dict of tensors
        Where to take the Jacobian (the fixed point). It is detached: the penalty is
        differentiable with respect to what ``f`` closes over, not through ``h``.
    probes : int
        Number of random vectors. The estimate is unbiased for any number; its variance falls
        as ``1 / probes``.
    batch_dims : {0, 1}
        1: the leading axis indexes samples that do not interact (a mini-batch); the result
        is one estimate per sample, of the Frobenius norm of that sample's Jacobian block.
    distribution : {"gaussian", "rademacher"}
        Standard normal entries (as Bai et al.) or random signs (a smaller variance).
    create_graph : bool
        Keep the graph of the products, so that the penalty can be back-propagated (its
        backward pass costs about as much again). False gives a detached estimate.
    generator : torch.Generator, optional
        Source of the random vectors (default: torch's global generator).

    Returns
    -------
    torch.Tensor
        A scalar (``batch_dims=0``) or a vector of one estimate per sample (``batch_dims=1``);
        add ``.mean()`` of it to the loss, times a weight.

    Notes
    -----
    Cost: one evaluation of ``f`` with the graph kept and ``probes`` vector-Jacobian
    products. torchdeq's ``jac_reg(f0, z0, vecs)`` is this estimate with ``batch_dims=0``
    divided by the number of entries of the state, ``h.numel()``.

    References
    ----------
    S. Bai, V. Koltun, J. Z. Kolter, "Stabilizing Equilibrium Models by Jacobian
    Regularization", ICML 2021.

    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Communications in Statistics - Simulation and Computation
    18(3), 1989.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> _ = torch.manual_seed(0)
    >>> W = torch.tensor([[0.3, 0.4], [0.0, 0.2]], requires_grad=True)
    >>> f = lambda h: h @ W.T                  # J = W, ||W||_F^2 = 0.29
    >>> est = lrt.jacobian_penalty(f, torch.zeros(2), probes=2000)
    >>> abs(float(est.detach()) - 0.29) < 0.03
    True
    >>> est.backward()                         # differentiable: d||W||_F^2/dW = 2 W
    >>> torch.allclose(W.grad, 2 * W.detach(), atol=0.1)
    True
    """
    probes = positive_int(probes, "probes")
    distribution = choice(distribution, "distribution", PROBE_DISTRIBUTIONS)
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be True or False, got {create_graph!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    inputs, outputs = _record(f, h, batch_dims, "h")
    if not any(o.requires_grad for o in outputs):  # f(h) does not depend on h: J = 0
        zero = torch.zeros((), dtype=inputs[0].dtype, device=inputs[0].device)
        return zero.expand(inputs[0].shape[0]).clone() if batch_dims == 1 else zero
    total = 0.0
    for _ in range(probes):
        vs = []
        for o in outputs:
            if distribution == "gaussian":
                v = torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=generator)
            else:
                v = torch.randint(0, 2, o.shape, device=o.device, generator=generator)
                v = (2 * v - 1).to(o.dtype)
            vs.append(v)
        total = total + _sq_norm(_vjp(outputs, inputs, vs, create_graph), batch_dims)
    return total / probes


def jacobian_matrix(f, h, *, batch_dims: int = 0, create_graph: bool = True):
    """The dense Jacobian ``J = df/dh`` at ``h``, from one vector-Jacobian product per entry of
    one sample's state, with the graph kept for the penalties below.

    Parameters
    ----------
    f : callable
        The map, state -> state of the same structure.
    h : torch.Tensor or tuple, list or dict of tensors
        Where to take the Jacobian; detached. A structured state is flattened (its tensors'
        entries in order, per sample with ``batch_dims=1``).
    batch_dims : {0, 1}
        1: one Jacobian block per sample, from the same ``n`` products (the samples do not
        interact, so one product with the unit vector ``e_j`` in every sample gives row ``j``
        of every block).
    create_graph : bool
        Keep the graph (to differentiate a penalty of ``J``).

    Returns
    -------
    torch.Tensor
        Shape ``(n, n)``, or ``(batch, n, n)`` with ``batch_dims=1``.

    Notes
    -----
    Cost: one evaluation of ``f`` and ``n`` vector-Jacobian products, ``n`` the number of
    entries of one sample's state. Use it for small states; :func:`jacobian_penalty` needs
    ``probes`` products whatever the size.

    Examples
    --------
    >>> import torch
    >>> from linsolve_rbp.adapters import torch as lrt
    >>> W = torch.tensor([[0.3, 0.4], [0.0, 0.2]])
    >>> lrt.jacobian_matrix(lambda h: h @ W.T, torch.zeros(2)).equal(W)
    True
    """
    inputs, outputs = _record(f, h, batch_dims, "h")
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be True or False, got {create_graph!r}")
    lead = (inputs[0].shape[0],) if batch_dims == 1 else ()
    sizes = [math.prod(o.shape[batch_dims:]) for o in outputs]
    n = sum(sizes)
    if not any(o.requires_grad for o in outputs):
        ref = inputs[0]
        return torch.zeros(lead + (n, n), dtype=ref.dtype, device=ref.device)
    rows = []
    for j in range(n):
        vs, start = [], 0
        for o, size in zip(outputs, sizes):
            v = torch.zeros(lead + (size,), dtype=o.dtype, device=o.device)
            if start <= j < start + size:
                v[..., j - start] = 1.0
            vs.append(v.reshape(o.shape))
            start += size
        g = _vjp(outputs, inputs, vs, create_graph)
        rows.append(torch.cat([t.reshape(lead + (-1,)) for t in g], dim=-1))
    return torch.stack(rows, dim=-2)


def _check_square(J):
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"J must be a torch.Tensor, got {type(J).__name__}")
    if J.ndim not in (2, 3) or J.shape[-1] != J.shape[-2]:
        raise ValueError(
            f"J must be a square matrix (n, n) or a stack of them (batch, n, n), got shape "
            f"{tuple(J.shape)}"
        )


def column_norm_penalty(J, mu: float = 0.9):
    """Scarselli et al.'s contraction penalty ``sum_j max(||J[:, j]||_1 - mu, 0)^2``.

    Parameters
    ----------
    J : torch.Tensor, shape (n, n) or (batch, n, n)
        The Jacobian ``dF/dh`` at the fixed point, differentiable with respect to the
        parameters (from :func:`jacobian_matrix`, or ``torch.func.jacrev``); a stack of
        per-sample Jacobians gives one penalty per sample.
    mu : float
        Target bound on the column 1-norms, below 1.

    Returns
    -------
    torch.Tensor
        A scalar to add to the loss (one per sample for a stack).

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
    col = J.abs().sum(dim=-2)
    return (torch.clamp(col - mu, min=0.0) ** 2).sum(dim=-1)


def gershgorin_penalty(J, margin: float = 0.1):
    """Penalty keeping the Gershgorin lower bound of ``I - J`` above ``margin``.

    Every eigenvalue of ``I - J`` has real part at least
    ``min_i (1 - J_ii - sum_{j != i} |J_ij|)`` (Gershgorin's circle theorem); the penalty is
    ``sum_i max(margin - (1 - J_ii - sum_{j != i} |J_ij|), 0)^2``.

    Parameters
    ----------
    J : torch.Tensor, shape (n, n) or (batch, n, n)
        The Jacobian at the fixed point, differentiable with respect to the parameters (from
        :func:`jacobian_matrix`); a stack gives one penalty per sample.
    margin : float
        Required lower bound (positive keeps ``I - J`` away from singular).

    Returns
    -------
    torch.Tensor
        A scalar to add to the loss (one per sample for a stack).

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
    diag = torch.diagonal(J, dim1=-2, dim2=-1)
    off = J.abs().sum(dim=-1) - diag.abs()
    lower = 1.0 - diag - off
    return (torch.clamp(margin - lower, min=0.0) ** 2).sum(dim=-1)
