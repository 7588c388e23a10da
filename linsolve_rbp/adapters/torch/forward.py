"""Forward solvers of :func:`~linsolve_rbp.adapters.torch.fixed_point`: find ``h* = f(h*)``.

Four methods, chosen by name (``forward="anderson"``) or with options
(``forward={"method": "anderson", "m": 8}``):

``"iterate"``
    Plain (optionally damped) fixed-point iteration ``h <- (1 - tau) h + tau f(h)``. One
    evaluation of ``f`` per iteration; converges when ``f`` is contracting.
``"anderson"``
    Anderson acceleration (type II, in the difference form of Walker & Ni 2011): the next
    iterate combines the last ``m + 1`` iterates and their images with the weights that
    minimise the combined residual ``f(h) - h`` in the least-squares sense. One evaluation of
    ``f`` per iteration plus ``O(m^2 n)`` work. For an affine ``f``, without truncation
    (``m`` at least the iterations run) and ``tau = 1``, its iterates are those of GMRES on
    ``(I - J) h = c`` (Walker & Ni 2011), so with ``m`` large enough (up to the dimension)
    it also converges where ``f`` is not contracting; a small ``m`` may stall there.
``"broyden"``
    Broyden's ("good") quasi-Newton method on ``g(h) = f(h) - h`` (Broyden 1965), with the
    inverse Jacobian kept in the limited-memory low-rank form ``-I + U V^T`` of the deep
    equilibrium code (Bai et al. 2019) that torchdeq users know; ``memory`` bounds the rank.
``"newton"``
    Jacobian-free Newton-Krylov: each step solves ``(I - J) dh = f(h) - h`` with this
    package's own ``gmres`` on Jacobian-vector products
    (:class:`~linsolve_rbp.adapters.torch.JacobianOperator`, no
    Jacobian is formed), then takes ``h <- h + alpha dh`` with a backtracking line search on
    ``||f(h) - h||`` (Armijo test; Knoll & Keyes 2004).

Every method stops a sample when ``||f(h) - h|| <= tol * max(1, ||f(h)||)``; with ``tol=None``
it runs ``maxiter`` iterations and ends COMPLETED. Results have the form of
:func:`linsolve_rbp.solve`'s: status (per sample with ``batch_dims=1``), iterations, residual
history, and in ``info`` what the method did (evaluations of ``f``, products, inner solves).
Samples that have converged stop changing; a sample whose residual is not finite stops at its
last finite iterate (NONFINITE).

Examples
--------
A tanh cell with a symmetric coupling of spectral norm 0.9 (a graph network run to
convergence, say): the contraction is slow, and plain iteration needs several times the
iterations of the others (on one machine: 121, against 35 for Anderson, 27 for Broyden,
and 4 Newton steps, which cost 54 evaluations of ``f``, forward-mode Jacobian-vector
products included; ``info.forward.info["f_evals"]``).

>>> import torch
>>> from linsolve_rbp.adapters import torch as lrt
>>> g = torch.Generator().manual_seed(0)
>>> W = torch.randn(64, 64, dtype=torch.float64, generator=g)
>>> W = 0.9 * (W + W.T) / torch.linalg.matrix_norm(W + W.T, ord=2)
>>> x = 0.1 * torch.randn(64, dtype=torch.float64, generator=g)
>>> f = lambda h: torch.tanh(h @ W.T + x)
>>> its = {}
>>> for method in ("iterate", "anderson", "broyden", "newton"):
...     h, info = lrt.fixed_point(f, torch.zeros(64, dtype=torch.float64), forward=method,
...                               forward_tol=1e-8, forward_maxiter=500, return_info=True)
...     its[method] = info.forward.iterations
>>> its["anderson"] < its["iterate"] / 2, its["broyden"] < its["iterate"] / 2, its["newton"] < 10
(True, True, True)

References
----------
H. F. Walker and P. Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer.
Anal. 49(4), 2011.
C. G. Broyden, "A class of methods for solving nonlinear simultaneous equations", Math.
Comp. 19(92), 1965.
S. Bai, J. Z. Kolter and V. Koltun, "Deep Equilibrium Models", NeurIPS 2019.
D. A. Knoll and D. E. Keyes, "Jacobian-free Newton-Krylov methods: a survey of approaches and
applications", J. Comput. Phys. 193(2), 2004.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import torch

from ... import backend as _b
from ..._result import SolveResult, Status
from ..._validate import ArgumentTypeError, check_kind, did_you_mean, unknown_option
from ...operators import IdentityOperator
from ...solve import PreparedSolve
from ._checks import JVP_MODES, check_f_output
from .jacobian import JacobianOperator

__all__ = ["FORWARD_METHODS", "check_forward", "solve_forward"]

#: The forward solvers of :func:`~linsolve_rbp.adapters.torch.fixed_point`.
FORWARD_METHODS = ("iterate", "anderson", "broyden", "newton")

# name -> {option: (kind, default)}; kinds are those of linsolve_rbp._validate.check_kind.
# Read-only: the module holds no mutable state.
_OPTIONS = {
    "iterate": {"tau": ("positive_real", 1.0)},
    "anderson": {"m": ("positive_int", 5), "lam": ("nonnegative", 1e-8), "tau": ("positive_real", 1.0)},
    "broyden": {
        "memory": ("positive_int_or_none", None),
        "line_search": ("bool", False),
        "max_backtracks": ("nonnegative_int", 8),
    },
    "newton": {
        "inner_rtol": ("nonnegative", 1e-3),
        "inner_maxiter": ("positive_int", 20),
        "restart": ("positive_int_or_none", None),
        "line_search": ("bool", True),
        "tau": ("positive_real", 1.0),
        "max_backtracks": ("nonnegative_int", 8),
        "jvp": (JVP_MODES, "auto"),
    },
}
_OPTIONS = MappingProxyType({k: MappingProxyType(v) for k, v in _OPTIONS.items()})

# Names other libraries (torchdeq, scipy.optimize) give these options.
_ALIASES = MappingProxyType({
    "damping": "tau", "beta": "tau", "mixing": "tau", "alpha": "tau",
    "lbfgs_thres": "memory", "threshold": "memory", "history": "m", "window": "m",
    "ls": "line_search", "linesearch": "line_search", "reg": "lam", "regularization": "lam",
    "inner_tol": "inner_rtol", "gmres_rtol": "inner_rtol", "gmres_maxiter": "inner_maxiter",
})

# Names other libraries give the forward methods (torchdeq's f_solver, scipy.optimize).
_METHOD_ALIASES = MappingProxyType({
    "fixed_point_iter": "iterate", "simple_fixed_point_iter": "iterate", "fixed_point": "iterate",
    "picard": "iterate", "naive": "iterate", "forward_iteration": "iterate",
    "newton_krylov": "newton", "jfnk": "newton", "broyden1": "broyden",
})

# Keys fixed_point sets itself, and where they go instead.
_SET_BY_FIXED_POINT = MappingProxyType({
    "maxiter": "forward_maxiter", "max_iter": "forward_maxiter", "f_max_iter": "forward_maxiter",
    "tol": "forward_tol", "rtol": "forward_tol", "f_tol": "forward_tol",
    "batch_dims": "batch_dims", "on_failure": "on_failure",
})

# Status by integer code (Status.code), for per-sample lookups.
_BY_CODE = tuple(sorted(Status, key=lambda st: st.code))
_RUNNING = -1
# Two evaluations of a deterministic f at one state agree to rounding (nondeterministic GPU
# reductions included); a random f (dropout) differs by far more than the square root of eps.
_SQRT_EPS = MappingProxyType(
    {torch.float16: 3e-2, torch.bfloat16: 1e-1, torch.float32: 3.5e-4, torch.float64: 1.5e-8})


# -- options ----------------------------------------------------------------------------------
def check_forward(forward, name: str = "forward") -> tuple:
    """Validate a forward-solver choice: a method name, or a dict ``{"method": name,
    **options}``; returns ``(method, options)`` with every option of the method, defaults
    filled in. Errors name ``name`` (and the option).

    Examples
    --------
    >>> from linsolve_rbp.adapters.torch.forward import check_forward
    >>> check_forward({"method": "anderson", "m": 3})
    ('anderson', {'m': 3, 'lam': 1e-08, 'tau': 1.0})
    """
    if isinstance(forward, str):
        method, given = forward, {}
    elif isinstance(forward, dict):
        given = dict(forward)
        if "method" not in given:
            raise ValueError(
                f"{name} must name its method: {name}={{'method': one of "
                f"{', '.join(map(repr, FORWARD_METHODS))}, ...}}"
            )
        method = given.pop("method")
        name_method = f"{name}['method']"
        if not isinstance(method, str):
            raise ArgumentTypeError(f"{name_method} must be a string, got {type(method).__name__}")
    else:
        raise ArgumentTypeError(
            f"{name} must be a method name ({', '.join(map(repr, FORWARD_METHODS))}) or a dict "
            f"{{'method': name, **options}}, got {type(forward).__name__}"
        )
    where = name if isinstance(forward, str) else f"{name}['method']"
    if method not in FORWARD_METHODS:
        hint = did_you_mean(method, FORWARD_METHODS, _METHOD_ALIASES)
        raise ValueError(f"{where} must be one of {', '.join(map(repr, FORWARD_METHODS))}; got {method!r}{hint}")
    spec = _OPTIONS[method]
    for key in given:
        if key in _SET_BY_FIXED_POINT:
            raise ValueError(
                f"{name} must not set {key!r}: fixed_point sets it; pass "
                f"{_SET_BY_FIXED_POINT[key]}= to fixed_point instead"
            )
    unknown = [k for k in given if k not in spec]
    if unknown:
        raise unknown_option(method, unknown, spec, aliases=_ALIASES, where=f"{name}: forward ")
    options = {k: check_kind(given.get(k, default), f"{name}[{k!r}]", kind)
               for k, (kind, default) in spec.items()}
    return method, options


# -- the shared bookkeeping ---------------------------------------------------------------------
class _Rows:
    """A state as ``(B, n)`` rows (``B = 1`` without a batch axis) and ``f`` on rows."""

    def __init__(self, f, h0, batch_dims):
        self.f = f
        self.h0 = h0
        self.shape = h0.shape
        self.batched = batch_dims == 1
        self.B = h0.shape[0] if self.batched else 1
        self.evals = 0
        # Norms of half-precision states are accumulated in float32 (reported as floats).
        self.ndtype = torch.float32 if h0.dtype in (torch.float16, torch.bfloat16) else None

    def rows(self, h):
        return h.reshape(self.B, -1)

    def state(self, x):
        return x.reshape(self.shape)

    def F(self, x):
        self.evals += 1
        return self.rows(check_f_output(self.f(self.state(x)), self.h0))

    def norm(self, x):
        return torch.linalg.vector_norm(x, dim=-1, dtype=self.ndtype)


class _Monitor:
    """Per-row stopping test and status codes, on the device: no host read unless asked."""

    def __init__(self, rows, tol, device):
        self.tol = tol
        self.active = torch.ones(rows.B, dtype=torch.bool, device=device)
        self.code = torch.full((rows.B,), _RUNNING, dtype=torch.int64, device=device)
        self.last = None
        self.history = []
        self.x_ok = None

    def test(self, rnorm, fnorm, x=None):
        """Record the residual norms of this iteration; returns ``(accept, stop)``: rows whose
        new state is finite (and still running), and rows that stop now. With ``x`` (the
        states the norms are of), keep each row's last state of finite residual in ``x_ok``."""
        active = self.active
        finite = torch.isfinite(rnorm)
        accept = active & finite
        # A row keeps the norm of the state it returns: the last finite one while it ran.
        self.last = rnorm if self.last is None else torch.where(accept, rnorm, self.last)
        self.history.append(self.last)
        self.code = torch.where(active & ~finite, Status.NONFINITE.code, self.code)
        if self.tol is not None:
            ok = accept & (rnorm <= self.tol * torch.clamp(fnorm, min=1.0))
            self.code = torch.where(ok, Status.CONVERGED.code, self.code)
        else:
            ok = torch.zeros_like(accept)
        self.active = accept & ~ok
        if x is not None:
            self.x_ok = x if self.x_ok is None else _where(accept, x, self.x_ok)
        return accept, ok

    def running(self) -> bool:
        return bool(self.active.any())  # one host read


def _tested(rows, mon, x, fx, k, maxiter):
    """The residual ``g = f(x) - x`` of iteration ``k`` and its norms, tested on the monitor
    (which keeps each row's last state of finite residual): ``(g, ||g||)``, or None where the
    loop ends (``maxiter`` iterations run, or no row running)."""
    g = fx - x
    gnorm = rows.norm(g)
    mon.test(gnorm, rows.norm(fx), x)
    if k == maxiter or not mon.running():
        return None
    return g, gnorm


def _where(mask, a, b):
    return torch.where(mask[:, None], a, b)


def _finish(method, rows, x, mon, k, info, matvecs=0, history_has_initial=False):
    """The SolveResult of a forward solve (host reads happen here, after the loop)."""
    tol = mon.tol
    end = Status.COMPLETED if tol is None else Status.MAX_ITERATIONS
    codes = _b.to_numpy(torch.where(mon.code == _RUNNING, end.code, mon.code)).astype(int)
    if mon.history:
        hist = np.asarray(_b.to_numpy(torch.stack(mon.history))).astype(float)
    else:
        hist = np.zeros((0, rows.B))
    return _result(method, rows, x, codes, hist, tol, k, info, matvecs, history_has_initial)


def _result(method, rows, x, codes, hist, tol, k, info, matvecs, history_has_initial):
    """The SolveResult from the per-sample status ``codes`` and the residual history ``hist``
    (``(iterations, B)``), both on the host."""
    # Per-sample statuses by table lookup, counted with numpy (a batch of many samples pays
    # no Python work per sample beyond the lookup).
    counts_of = np.bincount(codes.reshape(-1), minlength=len(_BY_CODE))
    values = np.flatnonzero(counts_of)
    statuses = tuple(map(_BY_CODE.__getitem__, codes.tolist()))
    worst = _BY_CODE[int(values[-1])]
    last = hist[-1] if len(hist) else np.zeros((rows.B,))
    success = all(_BY_CODE[int(c)].success for c in values)
    thr = "no tolerance (forward_tol=None)" if tol is None else f"forward_tol {tol:.1e}"
    what = "last step norm" if not history_has_initial else "residual norm ||f(h) - h||"
    if rows.batched:
        # In the order the statuses first occur, as a count per status name.
        order = [(v, int(counts_of[v])) for v in values.tolist()]
        if len(order) > 1:
            order.sort(key=lambda vc: int(np.argmax(codes == vc[0])))
        head = f"{method}: " + ", ".join(f"{n} {_BY_CODE[v].name.lower()}" for v, n in order) + f" of {rows.B} samples"
    else:
        head = f"{method}: {worst.name.lower()}"
    message = f"{head} after {k} iterations, {what} {float(np.max(last)):.3e} ({thr})"
    if not success:
        message += _hint(method, worst)
    h = rows.state(x)
    info = dict(info, f_evals=rows.evals)
    return h, SolveResult(
        x=h, status=worst,
        converged=(codes == Status.CONVERGED.code) if rows.batched else worst is Status.CONVERGED,
        success=success, iterations=k, matvecs=matvecs, rmatvecs=0,
        residual_norm=last if rows.batched else float(last[0]),
        residual_history=hist if rows.batched else hist[:, 0],
        message=message, method=method, statuses=statuses if rows.batched else None, info=info,
    )


def _hint(method, status):
    if status is Status.NONFINITE:
        tail = "; the iteration produced NaN or inf"
        if method == "iterate":
            return tail + (": f is not contracting from h0 (forward='anderson' or 'newton' may "
                           "converge where plain iteration does not); h* is the last finite iterate")
        return tail + "; f may not be finite along the path from h0; h* is the last finite iterate"
    if method == "iterate":
        return ("; raise forward_maxiter, loosen forward_tol, make f contracting, or use "
                "forward='anderson' or forward='newton'")
    if method == "newton":
        return ("; raise forward_maxiter, loosen forward_tol, or tighten the inner solve "
                "(inner_rtol, inner_maxiter); f may have no fixed point near h0")
    return ("; raise forward_maxiter, loosen forward_tol, or try forward='newton'; f may have no "
            "fixed point near h0")


def _random_note(rows, x, result):
    """When a forward solve failed: evaluate ``f`` twice at the returned state; different
    outputs mean ``f`` is random (dropout, noise) and cannot have a fixed point."""
    if not bool(torch.isfinite(x).all()):
        return
    a = rows.F(x)
    b = rows.F(x)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return
    diff = float(torch.linalg.vector_norm((a - b).to(torch.float64)))
    scale = max(1.0, float(torch.linalg.vector_norm(a.to(torch.float64))))
    if diff > _SQRT_EPS.get(a.dtype, 1e-6) * scale:
        result.info["f_random"] = True
        result.message += (
            f"; f is random: two evaluations at the same state differ (relative difference "
            f"{diff / scale:.1e}), so the iteration chases a moving target and cannot converge. "
            "Dropout or noise inside f? Draw one mask per forward solve (lrt.VariationalDropout) "
            "or call f's module .eval() for the solve"
        )
    else:
        result.info["f_random"] = False
    result.info["f_evals"] = rows.evals


# -- the methods --------------------------------------------------------------------------------
def _iterate(rows, x, maxiter, mon, tau):
    # With tol=None this loop makes no host read (no bool(), no .item()): it can be compiled.
    k = 0
    for k in range(1, maxiter + 1):
        fx = rows.F(x)
        r = fx - x
        x_new = fx if tau == 1.0 else x + tau * r
        accept, _ = mon.test(rows.norm(r), rows.norm(fx))
        x = _where(accept, x_new, x)
        if mon.tol is not None and not mon.running():
            break
    return x, k, {}


def _small_dtype(x):
    return torch.float32 if x.device.type == "mps" else torch.float64


def _anderson(rows, x, maxiter, mon, m, lam, tau):
    sd = _small_dtype(x)
    # Differences of iterates and of residuals, the last m in a ring (their order does not
    # matter to the least-squares problem).
    dX = x.new_zeros((rows.B, m, x.shape[1]))
    dG = torch.zeros_like(dX)
    eye = torch.eye(m, dtype=sd, device=x.device)  # sliced to the memory in use
    count = 0
    fx = rows.F(x)
    x_prev = g_prev = None
    k = 0
    while True:
        tested = _tested(rows, mon, x, fx, k, maxiter)
        if tested is None:
            break
        g, _ = tested
        active = mon.active
        g = _where(active, g, 0.0)
        if g_prev is not None:
            dX[:, count % m] = _where(active, x - x_prev, 0.0)
            dG[:, count % m] = _where(active, g - g_prev, 0.0)
            count += 1
        x_prev, g_prev = x, g
        step = tau * g
        if count:
            # gamma minimises ||g - dG^T gamma|| (the difference form of Walker & Ni 2011),
            # by the normal equations in double precision with a Tikhonov term relative to the
            # columns' mean square (scale-free).
            DG = dG[:, :min(count, m)]  # (B, mk, n)
            DX = dX[:, :min(count, m)]
            DGs = DG.to(sd)
            H = DGs @ DGs.transpose(1, 2)
            mk = H.shape[-1]
            tr = torch.diagonal(H, dim1=1, dim2=2).sum(-1)
            reg = torch.where(tr > 0, lam * tr / mk + torch.finfo(sd).tiny, 1.0)
            H = H + reg[:, None, None] * eye[:mk, :mk]
            rhs = (DGs @ g.to(sd)[:, :, None])
            gamma, _ = torch.linalg.solve_ex(H, rhs)
            gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)[:, :, 0].to(x.dtype)
            step = step - ((DX + tau * DG) * gamma[:, :, None]).sum(1)
        x_new = x + step
        fx_new = rows.F(x_new)
        x = _where(active, x_new, x)
        fx = _where(active, fx_new, fx)
        k += 1
    return mon.x_ok, k, {"m": m}


def _line_search(rows, x, dx, gnorm, alpha0, enabled, max_backtracks, active):
    """``x + alpha dx`` per row, backtracking (halving ``alpha``) until the Armijo test
    ``||g(x + alpha dx)|| <= (1 - 1e-4 alpha) ||g(x)||`` holds or ``max_backtracks`` halvings
    were tried, keeping each row's best trial. Returns the new state, its image and the count
    of extra evaluations."""
    alpha = torch.full((rows.B,), alpha0, dtype=x.dtype, device=x.device)
    xn = x + alpha[:, None] * dx
    fxn = rows.F(xn)
    if not enabled:
        return xn, fxn, 0
    nn = rows.norm(fxn - xn)
    nn = torch.where(torch.isfinite(nn), nn, math.inf)
    best_x, best_f, best_n = xn, fxn, nn
    extra = 0
    for _ in range(max_backtracks):
        ok = (nn <= (1.0 - 1e-4 * alpha.to(nn.dtype)) * gnorm) | ~active
        if bool(ok.all()):
            break
        alpha = torch.where(ok, alpha, alpha / 2)
        xn = _where(ok, xn, x + alpha[:, None] * dx)
        fxn = _where(ok, fxn, rows.F(xn))
        extra += 1
        nn = rows.norm(fxn - xn)
        nn = torch.where(torch.isfinite(nn), nn, math.inf)
        better = nn < best_n
        best_x, best_f = _where(better, xn, best_x), _where(better, fxn, best_f)
        best_n = torch.where(better, nn, best_n)
    return best_x, best_f, extra


class _LowRank:
    """``H = -I + U V^T`` per row, its columns in ``(B, cap, n)`` buffers that grow by doubling
    up to ``memory``; when full, the oldest column is overwritten (a ring)."""

    def __init__(self, memory):
        self.memory = memory
        self.U = self.V = None
        self.count = 0  # columns written

    def _cols(self):
        if self.U is None:
            return None, None
        c = min(self.count, self.U.shape[1])
        return self.U[:, :c], self.V[:, :c]

    def mv(self, v):  # H v
        U, V = self._cols()
        if U is None:
            return -v
        return -v + (U * (V @ v[:, :, None])).sum(1)

    def rmv(self, v):  # H^T v
        U, V = self._cols()
        if U is None:
            return -v
        return -v + (V * (U @ v[:, :, None])).sum(1)

    def append(self, u, v):
        B, n = u.shape
        cap = 0 if self.U is None else self.U.shape[1]
        if self.count < cap or (self.memory is not None and cap >= self.memory):
            i = self.count % cap
        else:  # grow (doubling, at most to memory)
            new = max(4, 2 * cap)
            if self.memory is not None:
                new = min(new, self.memory)
            U = u.new_zeros((B, new, n))
            V = u.new_zeros((B, new, n))
            if cap:
                U[:, :cap], V[:, :cap] = self.U, self.V
            self.U, self.V = U, V
            i = self.count
        self.U[:, i], self.V[:, i] = u, v
        self.count += 1


def _broyden(rows, x, maxiter, mon, memory, line_search, max_backtracks):
    # Inverse Jacobian of g(h) = f(h) - h approximated by H = -I + U V^T (Bai et al. 2019);
    # the good Broyden update H += (s - H y) s^T H / (s^T H y), s = dx, y = dg (Broyden 1965).
    H = _LowRank(memory)
    fx = rows.F(x)
    backtracks = 0
    k = 0
    while True:
        tested = _tested(rows, mon, x, fx, k, maxiter)
        if tested is None:
            break
        g, gnorm = tested
        active = mon.active
        dx = _where(active, -H.mv(g), 0.0)
        x_new, fx_new, extra = _line_search(rows, x, dx, gnorm, 1.0, line_search, max_backtracks, active)
        backtracks += extra
        x_new = _where(active, x_new, x)
        fx_new = _where(active, fx_new, fx)
        s = x_new - x
        y = (fx_new - x_new) - g
        Hy = H.mv(y)
        vT = H.rmv(s)
        den = (vT * y).sum(-1, keepdim=True)
        norm = torch.linalg.vector_norm
        scale = norm(vT, dim=-1, keepdim=True) * norm(y, dim=-1, keepdim=True)
        # No update where s^T H y vanishes (a converged or stalled row): H stays as it is.
        good = torch.isfinite(den) & (den.abs() > 1e-12 * scale) & active[:, None]
        safe = torch.where(good, den, 1.0)
        H.append(torch.where(good, (s - Hy) / safe, 0.0),
                 torch.where(good, vT, 0.0))
        x, fx = x_new, fx_new
        k += 1
    return mon.x_ok, k, {"memory": memory, "backtracks": backtracks}


def _newton(rows, x, maxiter, mon, batch_dims, inner_rtol, inner_maxiter, restart, line_search,
            tau, max_backtracks, jvp):
    inner = PreparedSolve("gmres", {
        "rtol": inner_rtol, "atol": 0.0, "maxiter": inner_maxiter,
        "restart": restart if restart is not None else min(inner_maxiter, 20),
        "batch_dims": batch_dims, "divtol": None,
    })
    fx = rows.F(x)
    jvps = 0
    inner_iterations, inner_success = [], []
    backtracks = 0
    jvp_mode = None if jvp == "auto" else jvp
    k = 0
    while True:
        tested = _tested(rows, mon, x, fx, k, maxiter)
        if tested is None:
            break
        g, gnorm = tested
        active = mon.active
        g = _where(active, g, 0.0)
        J = JacobianOperator._checked(rows.f, rows.state(x), jvp_mode or "auto", batch_dims)
        rows.evals += 1  # the recorded evaluation of f
        try:
            A = IdentityOperator(J.shape[0], like=g) - J
            res = inner(A, g if batch_dims == 1 else g[0])
        finally:
            rows.evals += J.f_evals - 1
            jvp_mode = J.jvp_mode or jvp_mode
            J.release()
        jvps += res.matvecs
        inner_iterations.append(res.iterations)
        inner_success.append(bool(res.success))
        dx = rows.rows(res.x)
        dx = _where(active & torch.isfinite(dx).all(-1), dx, g)  # a non-finite step: iterate instead
        x_new, fx_new, extra = _line_search(rows, x, dx, gnorm, tau, line_search, max_backtracks, active)
        backtracks += extra
        x = _where(active, x_new, x)
        fx = _where(active, fx_new, fx)
        k += 1
    info = {"jvps": jvps, "inner_iterations": inner_iterations, "inner_success": inner_success,
            "backtracks": backtracks, "jvp_mode": jvp_mode}
    return mon.x_ok, k, info, jvps


def zero_iterations(f, h0, fx, method, *, tol, batch_dims):
    """The forward result of ``forward_maxiter=0``: ``h0`` taken as the fixed point, no
    iteration. Its residual ``||f(h0) - h0||`` is measured on ``fx = f(h0)`` where the caller
    has evaluated it already (the layer's recorded evaluation; None: evaluated here, once,
    without a graph) and tested against ``tol`` as an iteration's would be (CONVERGED, or
    MAX_ITERATIONS when it is missed; COMPLETED with ``tol=None``). Returns
    ``(h0 detached, result)`` as :func:`solve_forward` does."""
    rows = _Rows(f, h0.detach(), batch_dims)
    with torch.no_grad():
        x = rows.rows(rows.h0)
        fx = rows.F(x) if fx is None else rows.rows(check_f_output(fx.detach(), rows.h0))
        # Both norms in one host read; the test is the iterations' (_Monitor.test), on the host.
        rnorm, fnorm = np.asarray(_b.to_numpy(torch.stack((rows.norm(fx - x), rows.norm(fx))))).astype(float)
        finite = np.isfinite(rnorm)
        end = Status.COMPLETED if tol is None else Status.MAX_ITERATIONS
        codes = np.where(finite, end.code, Status.NONFINITE.code)
        if tol is not None:
            codes = np.where(finite & (rnorm <= tol * np.maximum(fnorm, 1.0)), Status.CONVERGED.code, codes)
        h, result = _result(method, rows, x, codes, rnorm[None, :], tol, 0, {}, 0, True)
        if not result.success:
            _random_note(rows, x, result)
    return h, result


def solve_forward(f, h0, method, options, *, maxiter, tol, batch_dims):
    """Run the forward solver ``method`` (validated by ``check_forward``, with its
    ``options``) on ``h = f(h)`` from ``h0``, without a graph.

    Parameters
    ----------
    f : callable
        One tensor to one tensor of the same shape and dtype.
    h0 : torch.Tensor
        The start (detached here; not modified).
    method : str
        One of ``FORWARD_METHODS``.
    options : dict
        The method's options, as ``check_forward`` returns them.
    maxiter : int
        Iteration limit (``forward_maxiter``).
    tol : float or None
        Stop a sample when ``||f(h) - h|| <= tol * max(1, ||f(h)||)``; None runs ``maxiter``
        iterations (status COMPLETED).
    batch_dims : {0, 1}
        1: the leading axis indexes independent samples (per-sample tests and statuses).

    Returns
    -------
    h_star : torch.Tensor
        The state found, detached, of ``h0``'s shape.
    result : linsolve_rbp.SolveResult
        ``method`` the forward method, ``status`` (``statuses`` per sample with
        ``batch_dims=1``), ``iterations``, ``residual_norm`` and ``residual_history`` (for
        ``"iterate"`` the step norms ``||f(h) - h||`` of the iterations run; for the others
        the residual ``||f(h) - h||`` of each iterate, starting at ``h0``, so the last entry is
        the residual of ``h_star``), ``matvecs`` (Jacobian-vector products of ``"newton"``),
        ``info`` (``f_evals``: evaluations of ``f``; per method: ``"newton"`` ``jvps``,
        ``inner_iterations`` and ``inner_success`` per step, ``backtracks``, ``jvp_mode``;
        ``"broyden"`` ``backtracks``; after a failure ``f_random`` when ``f`` was checked for
        randomness). ``x`` is ``h_star``.
    """
    rows = _Rows(f, h0.detach(), batch_dims)
    with torch.no_grad():
        x = rows.rows(rows.h0)
        mon = _Monitor(rows, tol, x.device)
        matvecs = 0
        if method == "iterate":
            x, k, info = _iterate(rows, x, maxiter, mon, options["tau"])
        elif method == "anderson":
            x, k, info = _anderson(rows, x, maxiter, mon, options["m"], options["lam"], options["tau"])
        elif method == "broyden":
            x, k, info = _broyden(rows, x, maxiter, mon, options["memory"], options["line_search"],
                                  options["max_backtracks"])
        elif method == "newton":
            x, k, info, matvecs = _newton(rows, x, maxiter, mon, batch_dims, **options)
        else:
            raise ValueError(f"forward method must be one of {FORWARD_METHODS}, got {method!r}")
        h, result = _finish(method, rows, x, mon, k, info, matvecs, history_has_initial=method != "iterate")
        if not result.success:
            _random_note(rows, x, result)
    return h, result
