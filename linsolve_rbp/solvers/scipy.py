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

import dataclasses
import importlib
import inspect
import math

import numpy as np

from .. import backend as _b
from ._base import (
    safe_norm,
    BREAKDOWN,
    CONVERGED,
    DIVERGED,
    LEAST_SQUARES,
    MAX_ITERATIONS,
    NONFINITE,
    Monitor,
    Outcome,
    Problem,
    Solver,
)

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

# scipy's lsqr / lsmr ``istop`` codes: 1 and 4, the residual test (``||r|| <= btol ||b|| +
# atol ||A|| ||x||``, or the same with eps); 2 and 5, the least-squares test (``||A^H r|| <=
# atol ||A|| ||r||``, or the same with eps): x minimises ||b - A x||; 3 and 6, a
# condition-number estimate past ``conlim`` or 1/eps (the operator is numerically singular);
# 7, the iteration limit; 0, x = x0 solves the system. Every code is checked against the
# true residual.
_LSQ_SOLVED = (1, 4)
_LSQ_LEAST_SQUARES = (2, 5)
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


class _Stop(Exception):
    """Raised from scipy's callback to end a solve the Monitor has stopped (divergence,
    non-finite residual); caught by :meth:`ScipyBridge.run`."""


class ScipyBridge(Solver):
    """Run ``scipy.sparse.linalg.<function>`` (``cupyx.scipy.sparse.linalg.<function>`` on GPU
    data) on the package's operator, one system at a time, and report it like the package's
    own methods, on the same per-system :class:`~linsolve_rbp.solvers._base.Monitor`.

    Subclasses set ``function`` (the scipy function name), ``lsq_interface`` (lsqr / lsmr
    calling convention), the capabilities and the pass-through options.

    Data
        numpy ``b`` is used as is; CPU torch tensors through numpy views of the same memory
        (no copy of ``b``), with ``x`` returned as a torch tensor of ``b``'s dtype; other CPU
        array libraries through DLPack (or a copy). GPU data (cupy arrays; CUDA torch tensors,
        shared with cupy by DLPack) runs ``cupyx.scipy.sparse.linalg`` when it has the
        function, and raises a ValueError naming the method otherwise. With ``batch_dims=1``
        the systems are solved one after another and the operator gets ``(n,)`` vectors
        (``batched_products`` is False).
    Tolerances
        ``rtol`` and ``atol`` are passed as scipy's ``rtol`` / ``atol`` (older cupyx:
        ``tol``), which test ``||b - A x|| <= max(rtol ||b||, atol)`` as the package does. For
        ``lsqr`` / ``lsmr`` scipy's test is ``||r|| <= btol ||b|| + atol ||A|| ||x||``; the
        bridge passes ``btol = max(rtol, atol / ||b||)``, which is the package's test, and
        ``atol=0`` (dropping the ``||A||`` term, which would make the test depend on an
        estimate of ``||A||``). With ``atol=0`` scipy's least-squares stopping test (on
        ``||A^H r||``) is off, so inconsistent (least-squares) problems run to ``maxiter``,
        unless the option ``least_squares=True`` says that a least-squares solution is what
        is wanted: then scipy gets ``atol=rtol``, which switches its least-squares test on
        (as the package's ``lsqr`` does) but also widens its residual test by
        ``rtol ||A|| ||x||``; where that widened test stops scipy (``istop`` 1 or 4) with the
        true residual missing the tolerance (a consistent system) and ``damp=0``, the bridge
        runs scipy again from that ``x`` with ``atol=0`` for the iterations left, so that a
        consistent system is solved (CONVERGED) as without the option. Fixed-budget mode
        (``rtol=None, atol=None``) is rejected with a ValueError: scipy's solvers always test
        a tolerance.
    Iterations
        ``maxiter`` goes to scipy as its iteration limit (``iter_lim`` for lsqr), except for
        ``gmres``, where the bridge makes it count inner steps (products) as the package's
        own gmres does (see :class:`ScipyGMRES`). For ``lgmres`` and ``gcrotmk`` an
        iteration is an outer iteration (scipy's meaning), which runs a whole inner GMRES of
        up to ``inner_m`` (lgmres) or ``m`` (gcrotmk) steps: ``maxiter=1`` may solve the
        system (CONVERGED) and may cost many products.
    Monitor: divergence, non-finite values, ``check_every``
        Each system has a :class:`~linsolve_rbp.solvers._base.Monitor`, fed from scipy's
        callback with the residual norm of each iteration (below). It applies ``divtol``
        (a residual past ``divtol`` times the initial one) and the non-finite test, keeps
        the best finite iterate, the history and the user's callback, and is consulted every
        ``check_every`` iterations, as in the package's own methods; when it stops a system
        the bridge ends scipy's run from inside the callback and takes the Monitor's verdict
        (DIVERGED or NONFINITE). Convergence stays scipy's decision: the bridge does not
        stop scipy early when a residual meets the tolerance, so products and ``x`` are
        those of scipy. For ``gmres`` with ``M`` the Monitor's initial residual is that of
        the left-preconditioned system, ``||M (b - A x0)||`` (one extra application of
        ``M``), which is what scipy's estimates measure. Every product with ``A``, ``A^H``
        and ``M`` is checked for non-finite values (scipy's ``lgmres`` and ``gcrotmk`` end
        silently on one).
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
        between (their Monitor sees no iterations: ``divtol`` applies to the final
        residual). The user's callback sees ``x_k`` (a copy, in ``b``'s backend), or None
        for ``gmres``, which does not form it. A batched solve (``batch_dims=1``) runs the
        systems one after another and calls the callback afterwards, once per iteration,
        with ``x=None`` and the ``(B,)`` residual norms (a system that finished earlier
        repeats its last value).
    Status
        The final residual ``||b - A x||`` of the returned ``x`` is computed with one
        uncounted product. CONVERGED when it meets the tolerance, and only then; otherwise,
        in this order: NONFINITE when ``x`` or its residual is not finite, when the Monitor
        saw a non-finite residual, or when a product returned NaN or inf; DIVERGED when the
        Monitor saw a residual past ``divtol`` times the initial one, or the final residual
        is past it (GMRES's estimates never grow, its true residual may); BREAKDOWN when
        scipy reported one (``info < 0``; lsqr / lsmr: ``istop`` 3 or 6, a condition number
        past ``conlim`` or ``1/eps``); LEAST_SQUARES (lsqr / lsmr) when scipy stopped on its
        least-squares test (``istop`` 2 or 5: ``x`` minimises ``||b - A x||`` but does not
        solve the system), or, with ``least_squares=True``, when scipy stopped on its
        ``||A|| ||x||``-widened residual test and ``||A^H r - damp^2 (x - x0)||`` (one
        uncounted product with ``A^H``) meets ``rtol`` times scipy's estimates of ``||A||``
        and ``||r||``; else MAX_ITERATIONS (``info > 0``, or scipy stopped on its own
        estimate while the true residual misses the tolerance; the message then says so).
        LEAST_SQUARES is a success only with ``least_squares=True``. After DIVERGED,
        NONFINITE, BREAKDOWN and MAX_ITERATIONS, ``x`` is the iterate of smallest true
        residual among the Monitor's best finite iterate (``x0``, zero without one, for
        ``gmres``, ``lsqr`` and ``lsmr``, whose iterates are not seen) and the one scipy
        returned (scipy's, on a tie), never NaN, and ``residual_norm`` is its residual.

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
    # lsqr / lsmr calling convention: btol, no callback, (x, istop, itn, ...) returned.
    lsq_interface = False
    limit_keyword = "maxiter"
    accepts_preconditioner = True
    batched_products = False
    #: scipy (and cupyx) see only the arrays handed to them: a vector sharded over ranks would
    #: be solved as if the local shard were the whole system.
    accepts_reduction = False
    accepts_fixed_budget = False  # scipy's solvers always test a tolerance
    # CONVERGED only where the true residual of the returned x meets the tolerance (one
    # uncounted product per system).
    checks_claims = True
    # scipy calls the callback with x0 before the first iteration (lgmres, gcrotmk).
    callback_sees_x0 = False
    # scipy may return an iterate without calling the callback on it.
    may_return_unreported = False

    def _kwargs(self, prob: Problem, env: _Env, threshold: float, bnorm: float) -> dict:
        kw = dict(prob.options)
        want_ls = bool(kw.pop("least_squares", False))
        params = env.params
        if self.lsq_interface:
            # atol=rtol switches scipy's least-squares test on (and widens its residual test
            # by rtol ||A|| ||x||, which the final true-residual test makes up for).
            kw["atol"] = float(prob.rtol or 0.0) if want_ls else 0.0
            kw["btol"] = threshold / bnorm if bnorm > 0 else 0.0
            kw[self.limit_keyword] = prob.maxiter
            need = {"btol", self.limit_keyword}
        else:
            rtol = 0.0 if prob.rtol is None else prob.rtol
            atol = 0.0 if prob.atol is None else prob.atol
            if getattr(prob, "scale", None) is not None:
                # The facade divided b by a power of two (run_scaled): atol too.
                atol = atol / float(np.asarray(_b.to_numpy(prob.scale)).reshape(-1)[0])
            kw["rtol" if "rtol" in params or "tol" not in params else "tol"] = rtol
            kw["atol"] = atol
            kw["maxiter"] = prob.maxiter
            need = {"maxiter"}
        options = set(prob.options) - {"least_squares"}
        missing = sorted(k for k in need | options if params and k not in params)
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
        if prob.fixed_budget and not self.accepts_fixed_budget:
            raise ValueError(
                f"method {self.name!r} cannot run a fixed budget (rtol=None, atol=None): scipy's "
                "solvers always test a tolerance; give rtol or atol, or use a package method "
                "such as gmres, neumann or fixed_point"
            )
        if not self.accepts_callback and prob.callback is not None:
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
        want_ls = bool(prob.options.get("least_squares", False))
        rdt, dev = prob.real_dtype, prob.device
        # Per system: whether every product so far was finite (a lib bool, read once at the
        # end, so that checking costs no host synchronisation on a GPU).
        products = {"ok": True}

        def checked(y):
            y = env.to_lib(y)
            xpl = _b.array_namespace(y)
            products["ok"] = products["ok"] & xpl.all(xpl.isfinite(y))
            return y

        def mv(v):
            return checked(A._mv(env.vec(v, n, like)))

        def rmv(v):
            return checked(A._rmv(env.vec(v, m, like)))

        def residual_norm(b_lib, x_native):
            r = b_lib - env.to_lib(A._matvec(x_native))
            # Scale-safe, so that a tiny tolerance is not met by squares that underflow.
            return float(safe_norm(_b.array_namespace(r), r[None, ...])[0])

        op_kw = dict(matvec=mv, dtype=lib_dtype)
        if self.needs_rmatvec:
            op_kw["rmatvec"] = rmv
        A_lib = env.lib.LinearOperator((m, n), **op_kw)
        M_lib = None
        if prob.psolve is not None:
            def psolve(v):
                return checked(prob.psolve(env.vec(v, n, like)[None, ...])[0, ...])

            M_lib = env.lib.LinearOperator((n, n), matvec=psolve, dtype=lib_dtype)

        thresholds = np.asarray(_b.to_numpy(prob.thresholds()), dtype=float).reshape(-1)
        xs, codes, rnorms, histories, iters = [], [], [], [], []
        unbacked = []  # systems scipy called solved whose true residual misses the tolerance
        for i in range(B):
            b_nat = prob.b[i, ...]
            b_lib = env.to_lib(b_nat)
            x0_nat = None if prob.x0 is None else prob.x0[i, ...]
            x_init = xp.zeros((1, n), dtype=prob.dtype, device=dev) if x0_nat is None else prob.x0[i:i + 1, ...]
            bnorm = float(_b.array_namespace(b_lib).linalg.vector_norm(b_lib))
            r0 = bnorm if x0_nat is None else residual_norm(b_lib, x0_nat)
            thr = float(thresholds[i])
            products["ok"] = True
            mon = self._monitor(prob, i, r0, x_init, b_nat, x0_nat)
            hist = [r0]
            # skip: the next x-callback is scipy's report of x0 (lgmres, gcrotmk), not an
            # iterate; last: the iterate the history ends with (lib array; None: x0 or 0).
            state = {"skip": self.callback_sees_x0, "last": None}

            def record(arg, hist=hist, b_lib=b_lib, bnorm=bnorm, state=state, mon=mon):
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
                hist.append(rn)
                r_arr = xp.asarray([rn], dtype=rdt, device=dev)
                if mon.update(r_arr, None if x_nat is None else x_nat[None, ...]):
                    if int(mon.codes[0]) in (DIVERGED, NONFINITE):
                        raise _Stop

            kw = self._kwargs(_one_system(prob, i), env, thr, bnorm)
            if M_lib is not None:
                kw["M"] = M_lib
            if x0_nat is not None:
                kw["x0"] = env.to_lib(x0_nat)
            if not self.lsq_interface:
                kw.update(self._callback_kwargs(record))
            out, stopped = None, False
            if not math.isfinite(r0):
                # x0's residual is not finite: there is nothing to start from.
                stopped = True
            else:
                try:
                    out = self._call(env, A_lib, b_lib, kw, prob, n)
                    x_lib, info = out[0], out[1]
                    x_nat = env.vec(x_lib, n, like)
                    finite = bool(xp.all(xp.isfinite(x_nat)))
                    if finite and self.may_return_unreported and info >= 0:
                        state["skip"] = False
                        if self._differs(x_lib, state["last"], kw.get("x0")):
                            # scipy returned an iterate its callback has not seen (bicgstab's
                            # half step; lgmres / gcrotmk after their last outer iteration):
                            # report it, so that the history and the callback end with the
                            # returned x.
                            record(x_lib)
                except _Stop:
                    stopped = True
            seen = int(mon.codes[0])
            if stopped:
                code = NONFINITE if not math.isfinite(r0) else seen
                x_nat, rn, its = None, float("nan"), len(hist) - 1
            else:
                its = int(out[2]) if self.lsq_interface else len(hist) - 1
                # x_nat may alias scipy's array (or b itself, which scipy returns when b = 0);
                # the final stack copies.
                rn = residual_norm(b_lib, x_nat) if finite else float("nan")
                if (self.lsq_interface and want_ls and out[1] in _LSQ_SOLVED and math.isfinite(rn)
                        and rn > thr and its < prob.maxiter and not prob.options.get("damp")):
                    # atol=rtol widened scipy's residual test by rtol ||A|| ||x||, and it fired
                    # on a system that is nearly consistent: go on from x on the package's
                    # residual test alone (atol=0) for the iterations left.
                    more = self._call(env, A_lib, b_lib, {
                        **kw, "atol": 0.0, "x0": x_lib, self.limit_keyword: prob.maxiter - its,
                    }, prob, n)
                    its += int(more[2])
                    out = more
                    x_lib = out[0]
                    x_nat = env.vec(x_lib, n, like)
                    finite = bool(xp.all(xp.isfinite(x_nat)))
                    rn = residual_norm(b_lib, x_nat) if finite else float("nan")
                code = self._verdict(prob, out, rn, thr, r0, seen, bool(products["ok"]), want_ls,
                                     b_nat, x_nat, x0_nat)
                said_solved = out[1] in (0,) + _LSQ_SOLVED if self.lsq_interface else out[1] == 0
                if code == MAX_ITERATIONS and said_solved:
                    unbacked.append(i)
            if code in (DIVERGED, NONFINITE, MAX_ITERATIONS, BREAKDOWN):
                # The best finite iterate: the Monitor's (x0 or 0 where scipy's iterates are
                # not seen), or the returned x if it is better. (A failed solve never returns
                # an x worse than one it has seen.)
                xb = mon.best_x[0, ...]
                # (gmres: the Monitor's residuals are estimates, its best iterate is x0)
                rb = r0 if self._history_is_norm() else float(_b.to_numpy(mon.best_r)[0])
                if x_nat is not None and math.isfinite(rn) and (not math.isfinite(rb) or rn <= rb):
                    xb, rb = x_nat, rn
                x_nat, rn = xp.asarray(xb, copy=True), rb
                if not bool(xp.all(xp.isfinite(x_nat))):
                    x_nat = xp.zeros_like(x_nat)
            if self.lsq_interface:
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
                prob.callback(k, None, xp.asarray(padded[k], dtype=rdt, device=dev))
        x = xp.stack(xs, axis=0)
        outcome = Outcome(
            x=x,
            codes=np.asarray(codes, dtype=np.int64),
            iterations=max(iters),
            residual_norm=np.asarray(rnorms),
            history=history,
            info={"backend": "cupyx" if env.gpu else "scipy"},
            accept_least_squares=want_ls,
        )
        if unbacked:
            which = "" if not prob.batched else " (systems " + ", ".join(map(str, unbacked)) + ")"
            outcome.note = (
                f"scipy stopped on its own residual estimate{which}, but the true residual "
                "||b - A x|| misses the tolerance: tighten rtol a little, or use the package's "
                "method, which checks the true residual before it stops"
            )
        return outcome

    def _monitor(self, prob: Problem, i: int, r0: float, x_init, b_nat, x0_nat) -> Monitor:
        """The Monitor of system ``i``: its divergence and non-finite tests, best iterate,
        history and callback (called live for an ordinary solve; afterwards, from the
        padded histories, for a batched one). Its threshold is zero: convergence is scipy's
        decision, checked on the true residual at the end."""
        xp = prob.xp
        sub = _one_system(prob, i)
        sub = dataclasses.replace(
            sub, rtol=0.0, atol=0.0, batched=False,
            callback=None if prob.batched else prob.callback,
        )
        r0_mon = r0
        if self._history_is_norm() and prob.psolve is not None and math.isfinite(r0):
            # scipy's gmres estimates the left-preconditioned residual ||M r||.
            r = b_nat if x0_nat is None else b_nat - prob.A._matvec(x0_nat)
            z = prob.psolve(r[None, ...])
            r0_mon = float(_b.to_numpy(xp.linalg.vector_norm(z)))
        return Monitor(sub, xp.asarray([r0_mon], dtype=prob.real_dtype, device=prob.device), x0=x_init)

    def _verdict(self, prob, out, rn, thr, r0, seen, products_ok, want_ls, b_nat, x_nat,
                 x0_nat) -> int:
        """The status of a run scipy ended itself, from the true residual ``rn`` of its ``x``."""
        if math.isfinite(rn) and rn <= thr:
            return CONVERGED
        if not math.isfinite(rn) or not products_ok or seen == NONFINITE:
            return NONFINITE
        if seen == DIVERGED or (prob.divtol is not None and r0 > 0 and rn > prob.divtol * r0):
            return DIVERGED
        info = out[1]
        if not self.lsq_interface:
            return BREAKDOWN if info < 0 else MAX_ITERATIONS
        if info in _LSQ_ILL_CONDITIONED:
            return BREAKDOWN
        if info in _LSQ_LEAST_SQUARES:
            return LEAST_SQUARES
        if want_ls and info in _LSQ_SOLVED and self._normal_test(prob, out, rn, b_nat, x_nat, x0_nat):
            return LEAST_SQUARES
        return MAX_ITERATIONS

    def _normal_test(self, prob, out, rn, b_nat, x_nat, x0_nat) -> bool:
        """Whether ``x`` passes the package's least-squares test ``||A^H r - damp^2 (x - x0)||
        <= rtol ||Abar|| ||rbar||`` (one uncounted product with ``A^H``; ``||Abar||`` is
        scipy's estimate, ``||rbar||^2 = ||r||^2 + damp^2 ||x - x0||^2``)."""
        xp = prob.xp
        A = prob.A
        rtol = float(prob.rtol or 0.0)
        anorm = float(out[5])
        damp = float(prob.options.get("damp", 0.0) or 0.0)
        g = A._rmatvec(b_nat - A._matvec(x_nat))
        rbar = rn
        if damp:
            dx = x_nat if x0_nat is None else x_nat - x0_nat
            g = g - damp**2 * dx
            rbar = math.hypot(rn, damp * float(_b.to_numpy(xp.linalg.vector_norm(dx))))
        gnorm = float(_b.to_numpy(xp.linalg.vector_norm(g)))
        return math.isfinite(gnorm) and gnorm <= rtol * anorm * rbar


def _one_system(prob: Problem, i: int) -> Problem:
    """System ``i`` of ``prob`` as a problem of its own (``B = 1``)."""
    changes = {"b": prob.b[i:i + 1, ...], "x0": None if prob.x0 is None else prob.x0[i:i + 1, ...]}
    if getattr(prob, "scale", None) is not None:
        changes["scale"] = prob.scale[i:i + 1]
    return dataclasses.replace(prob, **changes)


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
    option_kinds = {"restart": "positive_int"}

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
    outer_iterations = {"inner_m": 1, "outer_k": 1}
    option_kinds = {"inner_m": "positive_int", "outer_k": "nonnegative_int"}
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
    outer_iterations = {"m": 2, "k": 1}
    option_kinds = {"m": "positive_int", "k": "positive_int_or_none",
                    "truncate": ("oldest", "smallest"), "discard_C": "bool"}
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

    Options
        ``damp`` (0: a nonzero value solves the regularised problem, whose residual does not
        meet the package's test), ``conlim`` (1e8), ``least_squares`` (False: a solution of
        ``A x = b`` is wanted; True: a least-squares solution is wanted, scipy's
        least-squares test is switched on with ``atol=rtol``, and LEAST_SQUARES is a
        success).

    A stop on scipy's least-squares test with the system unsolved is LEAST_SQUARES, not
    CONVERGED, whatever ``least_squares`` says. See :class:`ScipyBridge`."""

    name = "scipy.lsqr"
    function = "lsqr"
    limit_keyword = "iter_lim"
    lsq_interface = True
    accepts_callback = False
    needs_rmatvec = True
    needs_square = False
    accepts_preconditioner = False
    options = {"damp": 0.0, "conlim": 1e8, "least_squares": False}
    option_kinds = {"damp": "nonnegative", "conlim": "nonnegative_or_inf", "least_squares": "bool"}


class ScipyLSMR(ScipyLSQR):
    """``scipy.sparse.linalg.lsmr`` (Fong & Saunders, SIAM J. Sci. Comput. 33, 2011): MINRES
    on the normal equations by Golub-Kahan bidiagonalisation; needs ``A^H``, takes no
    preconditioner and no callback. Options ``damp`` (0), ``conlim`` (1e8),
    ``least_squares`` (False), as for :class:`ScipyLSQR`. See :class:`ScipyBridge`."""

    name = "scipy.lsmr"
    function = "lsmr"
    limit_keyword = "maxiter"  # scipy names the limit of lsqr iter_lim, that of lsmr maxiter
