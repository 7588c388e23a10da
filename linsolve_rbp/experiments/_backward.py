"""The backward passes the experiments compare: BPTT and TBPTT through unrolled steps, and the
RBP family (an adjoint linear solve at the last step) with any method of
:func:`linsolve_rbp.solve`.

Both go through the torch adapter: :func:`~linsolve_rbp.adapters.torch.unroll` for the
unrolled baselines and :func:`~linsolve_rbp.adapters.torch.implicit_grad` for the RBP family,
which keeps only the last step's graph.
"""

from __future__ import annotations

UNROLLED = ("bptt", "tbptt")
ALIASES = {"rbp": "fixed_point", "neumann_rbp": "neumann", "cg_rbp": "cgne"}


def resolve(method: str):
    """``None`` for BPTT/TBPTT, else the :func:`linsolve_rbp.solve` method name."""
    import linsolve_rbp as lr

    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method in UNROLLED:
        return None
    solver = ALIASES.get(method, method)
    if solver not in lr.methods():
        names = ", ".join(UNROLLED + tuple(ALIASES) + tuple(lr.methods()))
        raise ValueError(f"method must be one of {names}; got {method!r}")
    return solver


def unrolled(step, h0, params, loss_fn, n_steps: int, keep: int, loss_params=()):
    """Loss and gradients (of ``params`` then ``loss_params``, the loss's own parameters) by
    back-propagating through the last ``keep`` of ``n_steps`` steps (``keep = n_steps`` is
    BPTT), with :func:`linsolve_rbp.adapters.torch.unroll`."""
    import torch

    from ..adapters import torch as lrt

    keep = min(int(keep), int(n_steps))
    h = lrt.unroll(lambda x: step(x, *params), h0.detach(), steps=int(n_steps), truncate=keep)
    loss = loss_fn(h)
    wrt = tuple(params) + tuple(loss_params)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(wrt, grads))
    return loss.detach(), grads, h.detach(), None


def adjoint(step, h0, params, loss_fn, n_steps: int, method: str, truncate: int, *,
            rtol=None, atol=None, random_start: bool = False, generator=None,
            solver_options=None, loss_params=()):
    """Loss and gradients by the RBP family, with
    :func:`linsolve_rbp.adapters.torch.implicit_grad`.

    ``n_steps - 1`` steps run without a graph; ``(I - J^T) z = dL/dh_T`` is solved with
    ``J = dh_T/dh_{T-1}`` of the last step by ``method`` with at most ``truncate`` iterations
    (exactly that many when ``rtol`` and ``atol`` are None), from zero or, with
    ``random_start``, from ``U[0, 1]`` (the paper's Algorithm 1); the gradients are
    ``z^T d step / d params``, followed by the direct gradients of the loss with respect to
    ``loss_params``.

    Returns ``(loss, grads, h_T, result)``.
    """
    import torch

    from ..adapters import torch as lrt

    solver = resolve(method)
    params = tuple(params)
    h = h0
    with torch.no_grad():
        for _ in range(n_steps - 1):
            h = step(h, *params)
        h_prev = h.detach()
        h_T = step(h_prev, *params)
    h_leaf = h_T.detach().requires_grad_(True)
    loss = loss_fn(h_leaf)
    g, *g_loss = torch.autograd.grad(loss, (h_leaf,) + tuple(loss_params))
    kwargs = dict(solver_options or {})
    x0 = None
    if random_start:
        x0 = torch.rand(g.numel(), generator=generator, dtype=g.dtype).to(g.device)
        # Algorithm 1 runs its K steps whatever happens; report, do not stop early.
        kwargs.setdefault("divtol", None)
    # A failed solve is part of what the experiments measure (RBP at small K): it is recorded
    # in the returned result, not warned about at every step.
    grads, res = lrt.implicit_grad(lambda x: step(x, *params), h_prev, g, params,
                                   method=solver, on_failure="ignore", x0=x0, rtol=rtol,
                                   atol=atol, maxiter=int(truncate), **kwargs)
    return loss.detach(), tuple(grads) + tuple(g_loss), h_T.detach(), res


def backward(method, step, h0, params, loss_fn, n_steps, truncate, *, generator=None,
             loss_params=(), **kw):
    """Dispatch to :func:`unrolled` or :func:`adjoint` (``"rbp"`` starts from ``U[0, 1]``)."""
    solver = resolve(method)
    if solver is None:
        keep = n_steps if method == "bptt" else truncate
        return unrolled(step, h0, params, loss_fn, n_steps, keep, loss_params=loss_params)
    return adjoint(step, h0, params, loss_fn, n_steps, method, truncate,
                   random_start=(method == "rbp"), generator=generator,
                   loss_params=loss_params, **kw)
