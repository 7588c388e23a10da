"""The adjoint system of a gated graph neural network run to its fixed point (PyTorch).

The network follows the GNN of Liao et al. (2018, Section 4.2): node states are updated by a
GRU cell whose input is the sum of the neighbours' messages, ``h_i <- GRU(x_i + sum_{j in N(i)}
M h_j, h_i)``, until they stop changing; a linear layer reads the classes out of the states.
Here the graph is random and the weights are PyTorch's default initialisation, with the
messages divided by the largest degree so that the update contracts and the fixed point exists.
"""

from __future__ import annotations

import numpy as np

from .._validate import positive_int

__all__ = ["GNNAdjoint", "gnn_adjoint"]


class GNNAdjoint:
    """What :func:`gnn_adjoint` returns.

    Attributes
    ----------
    f : callable
        The update map on flat states of length ``n = nodes * hidden``.
    h_star : torch.Tensor, shape (n,)
        The fixed point.
    b : torch.Tensor, shape (n,) or (B, n)
        ``dL/dh*`` for one (or ``B``) random labellings of the nodes.
    forward_iterations : int
    """

    def __init__(self, f, h_star, b, forward_iterations):
        self.f, self.h_star, self.b = f, h_star, b
        self.forward_iterations = forward_iterations

    def dense_jacobian(self) -> np.ndarray:
        """``J = df/dh`` at ``h*`` as a float64 numpy array, by reverse-mode autodiff."""
        import torch

        J = torch.autograd.functional.jacobian(self.f, self.h_star, vectorize=True)
        return J.detach().cpu().double().numpy()


def gnn_adjoint(nodes: int = 150, hidden: int = 16, degree: int = 4, classes: int = 7,
                batch: int = 1, seed: int = 0, dtype=None, device="cpu",
                tol: float = 1e-12, maxiter: int = 2000) -> GNNAdjoint:
    """Build the GNN's fixed point and the right-hand side ``dL/dh*`` of its adjoint system.

    Parameters
    ----------
    nodes, hidden, degree, classes : int
        Graph size, state size per node, number of random neighbours drawn per node (the graph
        is then made undirected) and number of classes of the read-out.
    batch : int
        Number of random labellings, each giving one right-hand side for the same Jacobian.
    seed : int
        Seeds the graph, the weights, the node features and the labels.
    dtype : torch.dtype, optional
        Default float64.
    device : str or torch.device
    tol, maxiter
        The forward iteration stops when ``||f(h) - h|| <= tol ||f(h)||``.

    Returns
    -------
    GNNAdjoint

    Raises
    ------
    RuntimeError
        When the forward iteration does not converge.

    Examples
    --------
    >>> from linsolve_rbp.problems import gnn_adjoint
    >>> sysm = gnn_adjoint(nodes=20, hidden=4)
    >>> tuple(sysm.h_star.shape), tuple(sysm.b.shape)
    ((80,), (80,))
    """
    import torch

    nodes, hidden, degree, classes, batch = (
        positive_int(v, name) for v, name in ((nodes, "nodes"), (hidden, "hidden"), (degree, "degree"),
                                              (classes, "classes"), (batch, "batch")))
    dtype = torch.float64 if dtype is None else dtype
    gen = torch.Generator().manual_seed(int(seed))
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))  # nn.Module initialisation draws from the global generator
    try:
        gru = torch.nn.GRUCell(hidden, hidden).to(dtype=dtype, device=device)
        msg = torch.nn.Linear(hidden, hidden, bias=False).to(dtype=dtype, device=device)
        readout = torch.nn.Linear(hidden, classes).to(dtype=dtype, device=device)
    finally:
        torch.random.set_rng_state(torch_state)
    for p in [*gru.parameters(), *msg.parameters(), *readout.parameters()]:
        p.requires_grad_(False)
    src = torch.arange(nodes).repeat_interleave(degree)
    dst = torch.randint(0, nodes, (nodes * degree,), generator=gen)
    adj = torch.zeros(nodes, nodes, dtype=dtype)
    adj[src, dst] = 1.0
    adj = torch.maximum(adj, adj.T)
    adj.fill_diagonal_(0.0)
    adj = (adj / adj.sum(1).max()).to(device)
    x = torch.randn(nodes, hidden, generator=gen, dtype=dtype).to(device)

    def f(hflat):
        h = hflat.reshape(nodes, hidden)
        return gru(x + adj @ msg(h), h).reshape(-1)

    h = torch.zeros(nodes * hidden, dtype=dtype, device=device)
    with torch.no_grad():
        for k in range(1, maxiter + 1):
            hn = f(h)
            done = bool(torch.linalg.vector_norm(hn - h) <= tol * torch.linalg.vector_norm(hn))
            h = hn
            if done:
                break
        else:
            raise RuntimeError(f"the GNN forward iteration did not reach tol={tol} in {maxiter} updates")
    labels = torch.randint(0, classes, (batch, nodes), generator=gen).to(device)
    rows = []
    for i in range(batch):
        hv = h.detach().clone().requires_grad_(True)
        logits = readout(hv.reshape(nodes, hidden))
        loss = torch.nn.functional.cross_entropy(logits, labels[i, ...])
        (g,) = torch.autograd.grad(loss, hv)
        rows.append(g)
    b = rows[0] if batch == 1 else torch.stack(rows)
    return GNNAdjoint(f, h.detach(), b.detach(), k)
