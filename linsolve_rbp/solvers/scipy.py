"""Bridges to scipy's iterative solvers (and to cupyx's, for data on a GPU).

Needs: scipy; for GPU data (cupy arrays, CUDA torch tensors) cupy, whose
``cupyx.scipy.sparse.linalg`` must provide the method. Products with ``A`` (and ``A^H`` for
lsqr and lsmr) go through the package's operator, so they are counted as for the package's own
solvers.

References: the methods are those of ``scipy.sparse.linalg`` (P. Virtanen et al., "SciPy 1.0:
fundamental algorithms for scientific computing in Python", Nature Methods 17, 2020): CG
(Hestenes & Stiefel 1952), GMRES (Saad & Schultz 1986), LGMRES (Baker, Jessup & Manteuffel
2005), GCROT(m, k) (de Sturler 1999; Hicken & Zingg 2010), BiCGStab (van der Vorst 1992), LSQR
(Paige & Saunders 1982), LSMR (Fong & Saunders 2011).
"""

from __future__ import annotations

import importlib
import inspect
import math

import numpy as np

from .. import backend as _b
from .._result import Status
from ._base import Outcome, Problem, Solver

__all__ = [
    "ScipyBridge",
    "ScipyCG",
    "ScipyGMRES",
    "ScipyLGMRES",
    "ScipyGCROTMK",
    "ScipyBiCGStab",
    "ScipyLSQR",
    "ScipyLSMR",
]

_CONVERGED = Status.CONVERGED.code
_MAX_ITERATIONS = Status.MAX_ITERATIONS.code
_BREAKDOWN = Status.BREAKDOWN.code
_NONFINITE = Status.NONFINITE.code

# lsqr / lsmr ``istop`` codes 3 and 6: a condition-number estimate past ``conlim`` or 1/eps
# (the operator is numerically singular). The iteration limit (7) and success codes are left
# to the final residual test.
_LSQ_ILL_CONDITIONED = (3, 6)


def _import_cupyx():
    """``cupyx.scipy.sparse.linalg``, imported on first use of GPU data."""
    return _b.import_optional("cupyx.scipy.sparse.linalg", "scipy.* methods on GPU data")


def _on_gpu(b) -> bool:
    if _b.is_cupy_array(b):
        return True
    return _b.is_torch_array(b) and b.device.type != "cpu"


class _Env:
    """Where a bridged solve runs: the scipy-like module, its LinearOperator, and the
    conversions between ``b``'s backend ("native") and that module's arrays ("lib")."""

    def __init__(self, prob: Problem, fn_name: str, method: str):
        b = prob.b
        self.gpu = _on_gpu(b)
        if self.gpu:
            lib = _import_cupyx()
            if not hasattr(lib, fn_name):
                raise ValueError(
                    f"method {method!r} cannot run on GPU data: cupyx.scipy.sparse.linalg has "
                    f"no {fn_name!r}; use the package's own method (gmres, bicgstab, cg, lsqr, "
                    "minres run on the GPU), or move the data to the CPU"
                )
            if _b.is_torch_array(b):
                self.to_lib = _b.torch_to_cupy
                self.from_lib = _b.cupy_to_torch
            else:
                self.to_lib = self.from_lib = _identity
        else:
            lib = importlib.import_module("scipy.sparse.linalg")
            np_dtype = _b.to_numpy(b[0:1, ...]).dtype
            if _b.is_numpy_array(b):
                self.to_lib = self.from_lib = _identity
            else:
                # CPU torch tensors share memory with the numpy views (no copies); other
                # array-API libraries go through DLPack or a copy.
                self.to_lib = _b.to_numpy
                self.from_lib = lambda a: _b.from_numpy(np.asarray(a).astype(np_dtype, copy=False), like=b)
        self.lib = lib
        self.fn = getattr(lib, fn_name)
        self.params = _parameters(self.fn)

    def vec(self, v, n, like):
        """A lib vector (maybe ``(n, 1)`` or of another dtype) as a native ``(n,)`` vector."""
        v = self.from_lib(v.reshape(n))
        return v if v.dtype == like.dtype else _b.array_namespace(like).astype(v, like.dtype)


def _identity(a):
    return a


def _parameters(fn):
    """The keyword names ``fn`` takes; empty when unknown or open (``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set()
    return set(params)


class ScipyBridge(Solver):
    """Run ``scipy.sparse.linalg.<function>`` (``cupyx.scipy.sparse.linalg.<function>`` on GPU
    data) on the package's operator, one system at a time, and report it like the package's
    own methods.

    Subclasses set ``function`` (the scipy function name), ``least_squares`` (lsqr / lsmr
    calling convention), the capabilities and the pass-through options.

    Data
        numpy ``b`` is used as is; CPU torch tensors through numpy views of the same memory
        (no copy of ``b``), with ``x`` returned as a torch tensor of ``b``'s dtype; other CPU
        array libraries through DLPack (or a copy). GPU data (cupy arrays; CUDA torch tensors,
        shared with cupy by DLPack) runs ``cupyx.scipy.sparse.linalg`` when it has the
        function, and raises a ValueError naming the method otherwise.
    Tolerances
        ``rtol`` and ``atol`` are passed as scipy's ``rtol`` / ``atol`` (older cupyx:
        ``tol``), which test ``||b - A x|| <= max(rtol ||b||, atol)`` as the package does. For
        ``lsqr`` / ``lsmr`` scipy's test is ``||r|| <= btol ||b|| + atol ||A|| ||x||``; the
        bridge passes ``atol=0`` (dropping the ``||A||`` term, which would make the test
        depend on an estimate of ``||A||``) and ``btol = max(rtol, atol / ||b||)``, which is the
        package's test. With ``atol=0`` scipy's least-squares stopping test (on ``||A^H r||``)
        is off, so inconsistent (least-squares) problems run to ``maxiter``: use the
        package's ``lsqr`` for those. Fixed-budget mode (``rtol=None, atol=None``) is rejected
        with a ValueError: scipy's solvers always test a tolerance.
    Iterations
        ``maxiter`` goes to scipy as its iteration limit (``iter_lim`` for lsqr), except for
        ``gmres``, where the bridge makes it count inner steps (products) as the package's
        own gmres does (see :class:`ScipyGMRES`). For ``lgmres`` and ``gcrotmk`` an
        iteration is an outer iteration (scipy's meaning), which runs a whole inner GMRES of
        up to ``inner_m`` (lgmres) or ``m`` (gcrotmk) steps: ``maxiter=1`` may solve the
        system (CONVERGED) and may cost many products.
    History and callback
        The residual history comes from scipy's callback: for ``gmres`` the residual norm
        scipy estimates (``callback_type="pr_norm"``, times ``||b||``; with ``M`` it is the
        left-preconditioned residual scipy tests); for ``cg``, ``bicgstab``, ``lgmres`` and
        ``gcrotmk`` ``||b - A x_k||`` computed with one extra product per iteration that is
        NOT counted in ``matvecs`` (it calls the operator's ``_matvec``; children of a
        composite operator still count it). Where scipy returns an iterate its callback has
        not seen (bicgstab converging at its half step ``x + alpha p_hat``; lgmres and
        gcrotmk, which call the callback at the start of each outer iteration, after their
        last one), the bridge reports it as the last iteration, so that the history and the
        callback end with the returned ``x``; the report of ``x0`` that lgmres and gcrotmk
        make before their first outer iteration is not an iteration and is dropped.
        ``lsqr`` and ``lsmr`` take no callback: scipy gives them no per-iteration hook and
        does not expose their iterates, so a ``callback`` is rejected with a ValueError, and
        their history holds the initial and final residual norms with NaN for the steps in
        between. The user's callback sees ``x_k`` (a copy, in ``b``'s backend), or None for
        ``gmres``, which does not form it. A batched solve (``batch_dims=1``) runs the systems
        one after another and calls the callback afterwards, once per iteration, with
        ``x=None`` and the ``(B,)`` residual norms (a system that finished earlier repeats
        its last value).
    Status
        The final residual ``||b - A x||`` is computed with one uncounted product. CONVERGED
        when it meets the tolerance; otherwise BREAKDOWN when scipy reported one (``info <
        0``; lsqr / lsmr: condition number past ``conlim``), else MAX_ITERATIONS (``info >
        0``, or scipy stopped on its own estimate while the true residual misses the
        tolerance). NONFINITE when ``x`` or its residual is not finite (an operator that
        returned NaN or inf): ``x`` is then the reported iterate of smallest finite residual,
        or ``x0`` (zero without one) when there is none, and ``residual_norm`` is its residual.

    References
    ----------
    P. Virtanen et al., "SciPy 1.0: fundamental algorithms for scientific computing in
    Python", Nature Methods 17:261-272, 2020; the method papers are cited by each subclass.

    Examples
    --------
    >>> import numpy as np, linsolve_rbp as lr
    >>> from linsolve_rbp.problems import convection_diffusion
    >>> A = convection_diffusion(10)
    >>> res = lr.solve(A, np.ones(100), method="scipy.gmres", rtol=1e-8, restart=30)
    >>> res.status.name, res.info["backend"], bool(np.linalg.norm(np.ones(100) - A @ res.x) <= 1e-7)
    ('CONVERGED', 'scipy', True)
    """

    name = "scipy.?"
    function = ""
    least_squares = False
    limit_keyword = "maxiter"
    accepts_preconditioner = True
    batched_products = False
    # scipy calls the callback with x0 before the first iteration (lgmres, gcrotmk).
    callback_sees_x0 = False
    # scipy may return an iterate without calling the callback on it.
    may_return_unreported = False

    def _kwargs(self, prob: Problem, env: _Env, threshold: float, bnorm: float) -> dict:
        kw = dict(prob.options)
        params = env.params
        if self.least_squares:
            kw["atol"] = 0.0
            kw["btol"] = threshold / bnorm if bnorm > 0 else 0.0
            kw[self.limit_keyword] = prob.maxiter
            need = {"btol", self.limit_keyword}
        else:
            rtol = 0.0 if prob.rtol is None else prob.rtol
            atol = 0.0 if prob.atol is None else prob.atol
            kw["rtol" if "rtol" in params or "tol" not in params else "tol"] = rtol
            kw["atol"] = atol
            kw["maxiter"] = prob.maxiter
            need = {"maxiter"}
        missing = sorted(k for k in need | set(prob.options) if params and k not in params)
        if missing:
            raise ValueError(
                f"method {self.name!r}: {env.lib.__name__}.{self.function} does not take "
                f"{', '.join(missing)}; use the package's own solvers for this data"
            )
        return kw

    def _callback_kwargs(self, record):
        return {"callback": record}

    def _history_is_norm(self) -> bool:
        """Whether scipy's callback hands over a residual norm (gmres) rather than x_k."""
        return False

    def _call(self, env: _Env, A_lib, b_lib, kw: dict, prob: Problem, n: int):
        """Run the scipy function on one system; returns scipy's output tuple."""
        return env.fn(A_lib, b_lib, **kw)

    @staticmethod
    def _differs(x_lib, last, x0_lib) -> bool:
        """Whether ``x_lib`` differs from ``last`` (or, when None, from ``x0_lib`` or 0)."""
        xpl = _b.array_namespace(x_lib)
        x = xpl.reshape(x_lib, (-1,))
        ref = last if last is not None else x0_lib
        if ref is None:
            return bool(xpl.any(x != 0))
        return not bool(xpl.all(x == xpl.reshape(ref, (-1,))))

    def run(self, prob: Problem) -> Outcome:
        if prob.fixed_budget:
            raise ValueError(
                f"method {self.name!r} cannot run a fixed budget (rtol=None, atol=None): scipy's "
                "solvers always test a tolerance; give rtol or atol, or use a package method "
                "such as gmres, neumann or fixed_point"
            )
        if self.least_squares and prob.callback is not None:
            raise ValueError(
                f"method {self.name!r} takes no callback: scipy.sparse.linalg.{self.function} "
                "has no per-iteration hook and does not expose its iterates; leave callback "
                "unset, or use method='lsqr' (the package's), which calls it every iteration"
            )
        env = _Env(prob, self.function, self.name)
        xp = prob.xp
        A = prob.A
        m, n = A.shape
        B = prob.nsys
        like = prob.b[0, ...]
        lib_dtype = env.to_lib(like).dtype

        def mv(v):
            return env.to_lib(A._mv(env.vec(v, n, like)))

        def rmv(v):
            return env.to_lib(A._rmv(env.vec(v, m, like)))

        def residual_norm(b_lib, x_native):
            r = b_lib - env.to_lib(A._matvec(x_native))
            return float(_b.array_namespace(r).linalg.vector_norm(r))

        op_kw = dict(matvec=mv, dtype=lib_dtype)
        if self.needs_rmatvec:
            op_kw["rmatvec"] = rmv
        A_lib = env.lib.LinearOperator((m, n), **op_kw)
        M_lib = None
        if prob.psolve is not None:
            def psolve(v):
                return env.to_lib(prob.psolve(env.vec(v, n, like)[None, ...])[0, ...])

            M_lib = env.lib.LinearOperator((n, n), matvec=psolve, dtype=lib_dtype)

        xs, codes, rnorms, histories, iters = [], [], [], [], []
        live_cb = prob.callback if not prob.batched else None
        for i in range(B):
            b_nat = prob.b[i, ...]
            b_lib = env.to_lib(b_nat)
            x0_nat = None if prob.x0 is None else prob.x0[i, ...]
            bnorm = float(_b.array_namespace(b_lib).linalg.vector_norm(b_lib))
            r0 = bnorm if x0_nat is None else residual_norm(b_lib, x0_nat)
            thr = max((prob.rtol or 0.0) * bnorm, prob.atol or 0.0)
            hist = [r0]
            # skip: the next x-callback is scipy's report of x0 (lgmres, gcrotmk), not an
            # iterate; last: the iterate the history ends with (lib array; None: x0 or 0);
            # best: the reported iterate of smallest finite residual, the fallback when
            # the operator turns non-finite.
            state = {"skip": self.callback_sees_x0, "last": None, "best": None}

            def record(arg, hist=hist, b_lib=b_lib, bnorm=bnorm, state=state):
                if self._history_is_norm():
                    rn, x_nat = float(arg) * bnorm, None
                else:
                    if state["skip"]:
                        state["skip"] = False
                        return
                    x_own = arg.copy()
                    x_nat = env.vec(x_own, n, like)
                    rn = residual_norm(b_lib, x_nat)
                    state["last"] = x_own
                    if math.isfinite(rn) and (state["best"] is None or rn < state["best"][0]):
                        state["best"] = (rn, x_nat)
                hist.append(rn)
                if live_cb is not None:
                    live_cb(len(hist) - 1, x_nat, xp.asarray(rn, dtype=prob.real_dtype, device=prob.device))

            kw = self._kwargs(prob, env, thr, bnorm)
            if M_lib is not None:
                kw["M"] = M_lib
            if x0_nat is not None:
                kw["x0"] = env.to_lib(x0_nat)
            if not self.least_squares:
                kw.update(self._callback_kwargs(record))
            out = self._call(env, A_lib, b_lib, kw, prob, n)
            x_lib, info = out[0], out[1]
            x_nat = env.vec(x_lib, n, like)
            finite = bool(xp.all(xp.isfinite(x_nat)))
            if finite and self.may_return_unreported and info >= 0:
                state["skip"] = False
                if self._differs(x_lib, state["last"], kw.get("x0")):
                    # scipy returned an iterate its callback has not seen (bicgstab's half
                    # step; lgmres / gcrotmk after their last outer iteration): report it,
                    # so that the history and the callback end with the returned x.
                    record(x_lib)
            if self.least_squares:
                its = int(out[2])
                bad = info in _LSQ_ILL_CONDITIONED
            else:
                its = len(hist) - 1
                bad = info < 0
            # x_nat may alias scipy's array (or b itself, which scipy returns when b = 0);
            # the final stack copies.
            rn = residual_norm(b_lib, x_nat) if finite else float("nan")
            if not math.isfinite(rn):
                # A non-finite x, or a finite x whose residual the operator no longer gives
                # finitely: report the best iterate with a finite residual, else x0 (or 0).
                code = _NONFINITE
                if state["best"] is not None:
                    rn, x_nat = state["best"]
                else:
                    x_nat = xp.zeros_like(x_nat) if x0_nat is None else xp.asarray(x0_nat, copy=True)
                    rn = r0
            elif rn <= thr:
                code = _CONVERGED
            elif bad:
                code = _BREAKDOWN
            else:
                code = _MAX_ITERATIONS
            if self.least_squares:
                # scipy does not expose lsqr's / lsmr's iterates: the steps in between are
                # unknown (NaN), so the history keeps its length of iterations + 1.
                if its > 0:
                    hist.extend([float("nan")] * (its - 1) + [rn])
            xs.append(x_nat)
            codes.append(code)
            rnorms.append(rn)
            histories.append(hist)
            iters.append(its)

        K = max(len(h) for h in histories)
        padded = np.array([h + [h[-1]] * (K - len(h)) for h in histories]).T
        history = [padded[k] for k in range(K)]
        if prob.batched and prob.callback is not None:
            for k in range(1, K):
                prob.callback(k, None, xp.asarray(padded[k], dtype=prob.real_dtype, device=prob.device))
        x = xp.stack(xs, axis=0)
        return Outcome(
            x=x,
            codes=np.asarray(codes, dtype=np.int64),
            iterations=max(iters),
            residual_norm=np.asarray(rnorms),
            history=history,
            info={"backend": "cupyx" if env.gpu else "scipy"},
        )


class ScipyCG(ScipyBridge):
    """``scipy.sparse.linalg.cg``: conjugate gradients for Hermitian positive-definite ``A``
    (Hestenes & Stiefel, 1952). See :class:`ScipyBridge` for data, tolerances, history and
    status."""

    name = "scipy.cg"
    function = "cg"
    needs_symmetric = True


class ScipyGMRES(ScipyBridge):
    """``scipy.sparse.linalg.gmres``: restarted GMRES (Saad & Schultz, 1986), left-preconditioned
    in scipy. Option ``restart`` (default 20; scipy caps it at ``n``).

    ``maxiter`` counts inner steps (one product with ``A`` each), as in the package's gmres,
    while scipy's counts restart cycles. With ``maxiter = q * restart + rem`` the bridge runs
    scipy for ``q`` cycles and, if they do not converge and ``rem > 0``, once more from their
    ``x`` with ``restart=rem`` and one cycle. So ``maxiter=1`` is one step (one callback), and
    a solve that converges within the ``q`` full cycles makes exactly the products of scipy
    run with ``ceil(maxiter / restart)`` cycles. The short last cycle costs one product more
    than scipy would spend on those steps (it recomputes the residual of its starting
    point); products are counted on the operator, so ``matvecs`` includes it. See
    :class:`ScipyBridge`."""

    name = "scipy.gmres"
    function = "gmres"
    options = {"restart": 20}

    def _call(self, env, A_lib, b_lib, kw, prob, n):
        # scipy's maxiter counts restart cycles of min(restart, n) steps (scipy clamps the
        # basis size to n): run maxiter = q cycles + rem steps as q full cycles and, if they
        # do not converge, one cycle of rem steps from where they stopped.
        restart = min(20 if kw.get("restart") is None else int(kw["restart"]), n)
        q, rem = divmod(prob.maxiter, restart)
        if q:
            out = env.fn(A_lib, b_lib, **{**kw, "restart": restart, "maxiter": q})
            xpl = _b.array_namespace(out[0])
            if out[1] <= 0 or rem == 0 or not bool(xpl.all(xpl.isfinite(out[0]))):
                return out
            x = out[0]
            kw = {**kw, "x0": x}
        return env.fn(A_lib, b_lib, **{**kw, "restart": rem, "maxiter": 1})

    def _callback_kwargs(self, record):
        return {"callback": record, "callback_type": "pr_norm"}

    def _history_is_norm(self):
        return True


class ScipyLGMRES(ScipyBridge):
    """``scipy.sparse.linalg.lgmres``: GMRES augmented with error approximations from earlier
    cycles (Baker, Jessup & Manteuffel, SIAM J. Matrix Anal. Appl. 26, 2005). Options
    ``inner_m`` (30), ``outer_k`` (3).

    ``maxiter`` counts outer iterations, as scipy does: each runs an inner GMRES of up to
    ``inner_m`` steps augmented with up to ``outer_k`` earlier error approximations, and
    costs about ``inner_m + 1`` products; ``iterations``, the history and the callback count
    the same outer iterations (one entry, one call each). So ``maxiter=1`` can solve a
    system with ``n <= inner_m`` (then CONVERGED, after one callback). See
    :class:`ScipyBridge`."""

    name = "scipy.lgmres"
    function = "lgmres"
    options = {"inner_m": 30, "outer_k": 3}
    callback_sees_x0 = True
    may_return_unreported = True


class ScipyGCROTMK(ScipyBridge):
    """``scipy.sparse.linalg.gcrotmk``: GCROT(m, k) (Hicken & Zingg, SIAM J. Sci. Comput. 32,
    2010). Options ``m`` (20), ``k`` (None: ``m``), ``truncate`` ("oldest"), ``discard_C``
    (False).

    ``maxiter`` counts outer iterations, as scipy does: each runs an inner flexible GMRES of
    up to ``m`` steps (more while fewer than ``k`` recycled vectors are kept), one product
    each; ``iterations``, the history and the callback count the same outer iterations (one
    entry, one call each). So ``maxiter=1`` can solve a system with ``n <= m`` (then
    CONVERGED, after one callback). See :class:`ScipyBridge`."""

    name = "scipy.gcrotmk"
    function = "gcrotmk"
    options = {"m": 20, "k": None, "truncate": "oldest", "discard_C": False}
    callback_sees_x0 = True
    may_return_unreported = True


class ScipyBiCGStab(ScipyBridge):
    """``scipy.sparse.linalg.bicgstab`` (van der Vorst, 1992). An iteration makes two products;
    when scipy converges at the half step (one product, ``x + alpha p_hat``, without calling
    its callback) the bridge reports that iterate as the last iteration, as the package's
    bicgstab counts it. See :class:`ScipyBridge`."""

    name = "scipy.bicgstab"
    function = "bicgstab"
    may_return_unreported = True


class ScipyLSQR(ScipyBridge):
    """``scipy.sparse.linalg.lsqr`` (Paige & Saunders, ACM TOMS 8, 1982): least squares by
    Golub-Kahan bidiagonalisation; needs ``A^H``, takes no preconditioner and no callback.
    Options ``damp`` (0: a nonzero value solves the regularised problem, whose residual does
    not meet the package's test), ``conlim`` (1e8). See :class:`ScipyBridge`."""

    name = "scipy.lsqr"
    function = "lsqr"
    limit_keyword = "iter_lim"
    least_squares = True
    needs_rmatvec = True
    needs_square = False
    accepts_preconditioner = False
    options = {"damp": 0.0, "conlim": 1e8}


class ScipyLSMR(ScipyBridge):
    """``scipy.sparse.linalg.lsmr`` (Fong & Saunders, SIAM J. Sci. Comput. 33, 2011): MINRES
    on the normal equations by Golub-Kahan bidiagonalisation; needs ``A^H``, takes no
    preconditioner and no callback. Options ``damp`` (0), ``conlim`` (1e8). See
    :class:`ScipyBridge`."""

    name = "scipy.lsmr"
    function = "lsmr"
    least_squares = True
    needs_rmatvec = True
    needs_square = False
    accepts_preconditioner = False
    options = {"damp": 0.0, "conlim": 1e8}
