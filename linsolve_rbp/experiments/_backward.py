"""The backward passes the experiments compare: BPTT and TBPTT through unrolled steps, and the
RBP family (an adjoint linear solve at the last step) with any method of
:func:`linsolve_rbp.solve`.

Only the last step's graph is kept by the RBP family: ``torch.func.vjp`` gives a closure that
applies ``J^T`` any number of times; ``J v`` (for cgne, lsqr) is a ``torch.func.jvp`` of the
same step.
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
    BPTT)."""
    import torch

    keep = min(int(keep), int(n_steps))
    h = h0
    with torch.no_grad():
        for _ in range(n_steps - keep):
            h = step(h, *params)
    h = h.detach()
    for _ in range(keep):
        h = step(h, *params)
    loss = loss_fn(h)
    grads = torch.autograd.grad(loss, tuple(params) + tuple(loss_params), allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g
                  for p, g in zip(tuple(params) + tuple(loss_params), grads))
    return loss.detach(), grads, h.detach(), None


def adjoint(step, h0, params, loss_fn, n_steps: int, method: str, truncate: int, *,
            rtol=None, atol=None, random_start: bool = False, generator=None,
            solver_options=None, loss_params=()):
    """Loss and gradients by the RBP family.

    ``n_steps - 1`` steps run without a graph; the last step ``h_T = step(h_{T-1}, *params)``
    is kept; ``(I - J^T) z = dL/dh_T`` is solved with ``J = dh_T/dh_{T-1}`` by ``method`` with
    at most ``truncate`` iterations (exactly that many when ``rtol`` and ``atol`` are None),
    from zero or, with ``random_start``, from ``U[0, 1]`` (the paper's Algorithm 1); the
    gradients are ``z^T d step / d params``, followed by the direct gradients of the loss with
    respect to ``loss_params``.

    Returns ``(loss, grads, h_T, result)``.
    """
    import torch

    import linsolve_rbp as lr

    solver = resolve(method)
    params = tuple(params)
    h = h0
    with torch.no_grad():
        for _ in range(n_steps - 1):
            h = step(h, *params)
    h_prev = h.detach()
    plain = tuple(p.detach() for p in params)
    # Two closures: products with J^T must not also form the (possibly large) parameter
    # cotangents, which are needed once, at the end.
    h_T, vjp_h = torch.func.vjp(lambda x: step(x, *plain), h_prev)
    _, vjp_p = torch.func.vjp(lambda *ps: step(h_prev, *ps), *plain)
    h_leaf = h_T.detach().requires_grad_(True)
    loss = loss_fn(h_leaf)
    g, *g_loss = torch.autograd.grad(loss, (h_leaf,) + tuple(loss_params))
    shape = h_prev.shape
    b = g.reshape(-1)
    n = b.shape[0]

    def jt(u):
        return u - vjp_h(u.reshape(shape))[0].reshape(-1)

    def jv(v):
        out = torch.func.jvp(lambda x: step(x, *plain), (h_prev,), (v.reshape(shape),))[1]
        return v - out.reshape(-1)

    A = lr.LinearOperator((n, n), matvec=jt, rmatvec=jv, like=b)
    kwargs = dict(solver_options or {})
    x0 = None
    if random_start:
        x0 = torch.rand(n, generator=generator, dtype=b.dtype).to(b.device)
        # Algorithm 1 runs its K steps whatever happens; report, do not stop early.
        kwargs.setdefault("divtol", None)
    res = lr.solve(A, b, method=solver, x0=x0, rtol=rtol, atol=atol, maxiter=int(truncate), **kwargs)
    grads = tuple(vjp_p(res.x.reshape(shape))) + tuple(g_loss)
    return loss.detach(), tuple(grads), h_T.detach(), res


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
