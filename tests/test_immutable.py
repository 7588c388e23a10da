"""The own methods run on arrays without item assignment (JAX's are immutable).

Without JAX installed (CI does not need it), array_api_strict stands in: its arrays are made
immutable for the test by a ``__setitem__`` that raises as JAX's does, so any in-place item
assignment left in a method (or in the facade around it) fails here. Each method's result is
compared with its numpy result: same status and iteration count, same ``x`` to rounding.
A real-JAX test runs when jax is installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import linsolve_rbp as lr
from linsolve_rbp.problems import random_contractive

xs = pytest.importorskip("array_api_strict")

#: The own methods (not the scipy bridges), each with the options it is run with.
METHODS = {
    "cg": {}, "cgne": {}, "minres": {}, "lsqr": {}, "gmres": {"restart": 8},
    "bicgstab": {}, "neumann": {}, "fixed_point": {},
}
SYMMETRIC = {"cg", "minres"}


def _immutable_setitem(self, key, value):
    raise TypeError("immutable test arrays do not support in-place item assignment")


@pytest.fixture
def immutable(monkeypatch):
    """array_api_strict arrays without item assignment, for the duration of a test."""
    monkeypatch.setattr(type(xs.asarray([0.0])), "__setitem__", _immutable_setitem)
    a = xs.asarray([0.0, 1.0])
    with pytest.raises(TypeError, match="immutable"):
        a[0] = 1.0
    return xs


def problem(method, n=24, batch=False):
    if method in SYMMETRIC:
        rng = np.random.default_rng(1)
        G = rng.standard_normal((n, n))
        S = (G + G.T) / 2
        S *= 0.5 / np.max(np.abs(np.linalg.eigvalsh(S)))
        M = np.eye(n) - S
    else:
        M = np.eye(n) - random_contractive(n, 0.5, seed=2).T
    b = np.random.default_rng(3).standard_normal((3, n) if batch else n)
    return M, b


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_own_methods_on_immutable_arrays(immutable, method, batch):
    M, b = problem(method, batch=batch)
    kw = dict(method=method, rtol=1e-10, maxiter=400, **METHODS[method])
    if batch:
        kw["batch_dims"] = 1
    ref = lr.solve(M, b, **kw)
    res = lr.solve(immutable.asarray(M), immutable.asarray(b), **kw)
    assert res.status == ref.status and res.iterations == ref.iterations
    assert res.matvecs == ref.matvecs
    x = np.asarray(lr.backend.to_numpy(res.x))
    assert np.allclose(x, ref.x, rtol=1e-8, atol=1e-12)
    assert np.allclose(np.asarray(lr.backend.to_numpy(res.residual_norm)), ref.residual_norm, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("method", ["gmres", "bicgstab"])
def test_gmres_bicgstab_fixed_budget_and_callback_on_immutable_arrays(immutable, method):
    M, b = problem(method)
    seen = []
    kw = dict(method=method, rtol=None, atol=None, maxiter=12, callback=lambda k, x, r: seen.append(k))
    if method == "gmres":
        kw["restart"] = 5
    ref = lr.solve(M, b, **kw)
    n_ref = len(seen)
    seen.clear()
    res = lr.solve(immutable.asarray(M), immutable.asarray(b), **kw)
    assert res.status == ref.status == lr.Status.COMPLETED
    assert len(seen) == n_ref == ref.iterations
    assert np.allclose(np.asarray(lr.backend.to_numpy(res.x)), ref.x, rtol=1e-8, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_own_methods_on_jax(method):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    M, b = problem(method)
    kw = dict(method=method, rtol=1e-10, maxiter=400, **METHODS[method])
    ref = lr.solve(M, b, **kw)
    res = lr.solve(jnp.asarray(M), jnp.asarray(b), **kw)
    assert res.status == ref.status and res.iterations == ref.iterations
    assert np.allclose(np.asarray(res.x), ref.x, rtol=1e-8, atol=1e-12)
