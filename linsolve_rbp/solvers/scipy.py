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
        ``gmres``, where scipy counts restart cycles: the bridge passes
        ``ceil(maxiter / restart)``, so up to ``restart - 1`` more steps than ``maxiter`` may
        run. ``lgmres`` and ``gcrotmk`` count outer cycles (scipy's meaning).
    History and callback
        The residual history comes from scipy's callback: for ``gmres`` the residual norm
        scipy estimates (``callback_type="pr_norm"``, times ``||b||``; with ``M`` it is the
        left-preconditioned residual scipy tests); for ``cg``, ``bicgstab``, ``lgmres`` and
        ``gcrotmk`` ``||b - A x_k||`` computed with one extra product per iteration that is
        NOT counted in ``matvecs`` (it calls the operator's ``_matvec``; children of a
        composite operator still count it). ``lsqr`` and ``lsmr`` take no callback: their
        history holds the initial and final residual norms with NaN for the steps in
        between (scipy does not expose them), and a ``callback`` is rejected. The user's callback sees ``x_k`` (a copy, in ``b``'s backend), or None for
        ``gmres``, which does not form it. A batched solve (``batch_dims=1``) runs the systems
        one after another and calls the callback afterwards, once per iteration, with
        ``x=None`` and the ``(B,)`` residual norms (a system that finished earlier repeats
        its last value).
    Status
        The final residual ``||b - A x||`` is computed with one uncounted product. CONVERGED
        when it meets the tolerance; otherwise BREAKDOWN when scipy reported one (``info <
        0``; lsqr / lsmr: condition number past ``conlim``), else MAX_ITERATIONS (``info >
        0``, or scipy stopped on its own estimate while the true residual misses the
        tolerance). NONFINITE when ``x`` is not finite (``x`` is then ``x0``, or zero).

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

    def _scipy_maxiter(self, prob: Problem) -> int:
        return prob.maxiter

    def _kwargs(self, prob: Problem, env: _Env, threshold: float, bnorm: float) -> dict:
        kw = dict(prob.options)
        params = env.params
        if self.least_squares:
            kw["atol"] = 0.0
            kw["btol"] = threshold / bnorm if bnorm > 0 else 0.0
            kw[self.limit_keyword] = self._scipy_maxiter(prob)
            need = {"btol", self.limit_keyword}
        else:
            rtol = 0.0 if prob.rtol is None else prob.rtol
            atol = 0.0 if prob.atol is None else prob.atol
            kw["rtol" if "rtol" in params or "tol" not in params else "tol"] = rtol
            kw["atol"] = atol
            kw["maxiter"] = self._scipy_maxiter(prob)
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

    def run(self, prob: Problem) -> Outcome:
        if prob.fixed_budget:
            raise ValueError(
                f"method {self.name!r} cannot run a fixed budget (rtol=None, atol=None): scipy's "
                "solvers always test a tolerance; give rtol or atol, or use a package method "
                "such as gmres, neumann or fixed_point"
            )
        if self.least_squares and prob.callback is not None:
            raise ValueError(
                f"method {self.name!r} takes no callback (scipy's {self.function} has none); "
                "use the package's lsqr for per-iteration callbacks"
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

            def record(arg, hist=hist, b_lib=b_lib, bnorm=bnorm):
                if self._history_is_norm():
                    rn, x_nat = float(arg) * bnorm, None
                else:
                    x_nat = env.vec(arg.copy(), n, like)
                    rn = residual_norm(b_lib, x_nat)
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
            out = env.fn(A_lib, b_lib, **kw)
            x_lib, info = out[0], out[1]
            if self.least_squares:
                its = int(out[2])
                bad = info in _LSQ_ILL_CONDITIONED
            else:
                its = len(hist) - 1
                bad = info < 0
            # May alias scipy's array (or b itself, which scipy returns when b = 0); the
            # final stack copies.
            x_nat = env.vec(x_lib, n, like)
            finite = bool(xp.all(xp.isfinite(x_nat)))
            rn = residual_norm(b_lib, x_nat) if finite else float("inf")
            if not finite:
                code = _NONFINITE
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
    in scipy. Option ``restart`` (default 20). ``maxiter`` counts inner steps and is passed as
    ``ceil(maxiter / restart)`` cycles; see :class:`ScipyBridge`."""

    name = "scipy.gmres"
    function = "gmres"
    options = {"restart": 20}

    def _scipy_maxiter(self, prob):
        return max(1, math.ceil(prob.maxiter / int(prob.options["restart"])))

    def _callback_kwargs(self, record):
        return {"callback": record, "callback_type": "pr_norm"}

    def _history_is_norm(self):
        return True


class ScipyLGMRES(ScipyBridge):
    """``scipy.sparse.linalg.lgmres``: GMRES augmented with error approximations from earlier
    cycles (Baker, Jessup & Manteuffel, SIAM J. Matrix Anal. Appl. 26, 2005). Options
    ``inner_m`` (30), ``outer_k`` (3); ``maxiter`` counts outer cycles. See
    :class:`ScipyBridge`."""

    name = "scipy.lgmres"
    function = "lgmres"
    options = {"inner_m": 30, "outer_k": 3}


class ScipyGCROTMK(ScipyBridge):
    """``scipy.sparse.linalg.gcrotmk``: GCROT(m, k) (Hicken & Zingg, SIAM J. Sci. Comput. 32,
    2010). Options ``m`` (20), ``k`` (None: ``m``), ``truncate`` ("oldest"), ``discard_C``
    (False); ``maxiter`` counts outer cycles. See :class:`ScipyBridge`."""

    name = "scipy.gcrotmk"
    function = "gcrotmk"
    options = {"m": 20, "k": None, "truncate": "oldest", "discard_C": False}


class ScipyBiCGStab(ScipyBridge):
    """``scipy.sparse.linalg.bicgstab`` (van der Vorst, 1992). See :class:`ScipyBridge`."""

    name = "scipy.bicgstab"
    function = "bicgstab"


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
