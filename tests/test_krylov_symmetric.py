"""cg and minres: what is their own (the contract of solve() for every method is in
test_solve_registry.py; cg's iteration counts against scipy's are its scipy-twin test there).

MINRES on indefinite systems, with a monotone residual; breakdown of one singular system in a
batch; an indefinite preconditioner; MINRES's iteration counts against scipy's, whose
stopping test differs.
"""

import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import linsolve_rbp as lr
from linsolve_rbp.problems import convection_diffusion
from registry import spd

METHODS = ["cg", "minres"]


def test_minres_solves_indefinite_system():
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    A = (Q * np.concatenate([-np.linspace(1, 10, 20), np.linspace(1, 20, 20)])) @ Q.T
    A = (A + A.T) / 2
    b = np.random.default_rng(4).standard_normal(40)
    res = lr.solve(A, b, method="minres", rtol=1e-10)
    assert res.converged
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
    # The residual of MINRES never grows.
    assert np.all(np.diff(res.residual_history) <= 1e-12 * res.residual_history[0])


@pytest.mark.parametrize("method", METHODS)
def test_breakdown_of_one_system_leaves_the_others_intact(method):
    # A singular: the first right-hand side is in its range, the second is not.
    A = np.diag([1.0, 2.0, 0.0])
    B = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    res = lr.solve(A, B, method=method, rtol=1e-10, batch_dims=1)
    assert res.statuses == (lr.Status.CONVERGED, lr.Status.BREAKDOWN)
    assert not res.success and res.status is lr.Status.BREAKDOWN
    assert np.all(np.isfinite(res.x))
    np.testing.assert_allclose(res.x[0], [1.0, 0.5, 0.0], atol=1e-12)


def test_minres_rejects_indefinite_preconditioner():
    A, _ = spd(10, 1.0, 5.0, seed=14)
    res = lr.solve(A, np.ones(10), method="minres", rtol=1e-8, M=-np.eye(10))
    assert res.status is lr.Status.BREAKDOWN and not res.success
    assert np.all(np.isfinite(res.x))


def test_minres_iteration_counts_match_scipy():
    """On the SPD 2-D Laplacian, within 5% of scipy's minres. scipy stops on
    rnorm <= rtol (||A|| ||x|| + ||b||), a looser test than ours, so scipy runs to a far
    tighter rtol and we count the iterations its iterates take to meet our test on the true
    residual."""
    A = convection_diffusion(16, peclet=0.0)
    b = np.random.default_rng(15).standard_normal(A.shape[0])
    rtol = 1e-8
    ours = lr.solve(A, b, method="minres", rtol=rtol)
    assert ours.converged
    resid = []
    sla.minres(A, b, rtol=1e-14, maxiter=2 * ours.iterations,
               callback=lambda xk: resid.append(np.linalg.norm(b - A @ xk)))
    hits = np.nonzero(np.array(resid) <= rtol * np.linalg.norm(b))[0]
    assert hits.size, "scipy never reached the tolerance"
    theirs = int(hits[0]) + 1
    assert abs(ours.iterations - theirs) <= max(1, math.ceil(0.05 * theirs))
