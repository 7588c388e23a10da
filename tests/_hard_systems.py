"""Hard linear systems for the honesty tests (tests/test_honesty.py), as dense float64 numpy
matrices with a right-hand side of norm about 1 and what is known about them.

Every generator is deterministic in its arguments (seeded), so a failing case can be rebuilt
from its name alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class System:
    name: str
    A: np.ndarray  # float64, (m, n)
    b: np.ndarray  # float64, (m,), norm O(1)
    symmetric: bool
    consistent: bool  # b is in the range of A (exactly, in float64)

    @property
    def square(self) -> bool:
        return self.A.shape[0] == self.A.shape[1]

    @property
    def n(self) -> int:
        return max(self.A.shape)


def _orthogonal(n, rng):
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def _sym(Q, eig):
    A = (Q * eig) @ Q.T
    return (A + A.T) / 2  # exactly symmetric, also after a cast to float32


def poisson(n):
    """The 1-D Poisson matrix ``diags([-1, 2, -1])`` (cond ~ 0.4 n^2)."""
    return 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)


def nonnormal_J(n=40):
    """``J = 0.5 I + 2 x superdiagonal``: spectral radius 0.5, ``||J^k||`` grows to ~1e10
    before it decays."""
    return 0.5 * np.eye(n) + 2 * np.eye(n, k=1)


def spd(n=40, cond=1e10, seed=0, spacing="log", b="random"):
    """SPD with eigenvalues from 1 down to 1/cond, log- or linearly spaced, in a random
    orthogonal basis; b random (unit norm) or ones / sqrt(n)."""
    rng = np.random.default_rng(seed)
    if spacing == "log":
        eig = np.logspace(0, -np.log10(cond), n)
    else:
        eig = np.linspace(1 / cond, 1, n)
    A = _sym(_orthogonal(n, rng), eig)
    rhs = rng.standard_normal(n) if b == "random" else np.ones(n)
    tag = "" if spacing == "log" else ",lin"
    tag += "" if b == "random" else ",b=ones"
    return System(f"spd(n={n},cond={cond:.0e},seed={seed}{tag})", A, rhs / np.linalg.norm(rhs), True, True)


def poisson_system(n=100):
    return System(f"poisson(n={n})", poisson(n), np.ones(n), True, True)


def nonnormal(n=40):
    """The adjoint system ``(I - J^T) z = b`` of the non-normal ``J``."""
    A = np.eye(n) - nonnormal_J(n).T
    return System(f"nonnormal(n={n})", A, np.ones(n) / np.sqrt(n), False, True)


def rbp_contraction(n=40, rho=0.8, seed=0):
    """``I - J^T`` with a random non-symmetric ``J`` of spectral radius ``rho`` (fixed-point
    iteration and Neumann converge)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n))
    J = rho * G / np.max(np.abs(np.linalg.eigvals(G)))
    b = rng.standard_normal(n)
    return System(f"rbp(n={n},rho={rho},seed={seed})", np.eye(n) - J.T, b / np.linalg.norm(b), False, True)


def nonsymmetric(n=40, seed=0):
    """Non-symmetric and well conditioned: ``2 I + G / sqrt(n)`` (eigenvalues in the disc of
    radius ~1 around 2)."""
    rng = np.random.default_rng(seed)
    A = 2 * np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n)
    b = rng.standard_normal(n)
    return System(f"nonsym(n={n},seed={seed})", A, b / np.linalg.norm(b), False, True)


def singular_consistent():
    """``diag(1..9, 0)`` with ``b = A 1`` in its range (the last entry of b is exactly 0)."""
    A = np.diag(np.r_[np.arange(1.0, 10.0), 0.0])
    return System("singular_consistent", A, A @ np.ones(10) / 10, True, True)


def singular_inconsistent():
    """``diag(1..9, 0)`` with ``b = 1``: the smallest residual is 1 = ||b|| / sqrt(10)."""
    A = np.diag(np.r_[np.arange(1.0, 10.0), 0.0])
    return System("singular_inconsistent", A, np.ones(10), True, False)


def sym_indefinite(n=40, cond=1e3, seed=0):
    rng = np.random.default_rng(seed)
    mag = np.logspace(0, -np.log10(cond), n)
    eig = mag * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    b = rng.standard_normal(n)
    return System(
        f"sym_indefinite(n={n},cond={cond:.0e},seed={seed})",
        _sym(_orthogonal(n, rng), eig), b / np.linalg.norm(b), True, True,
    )


def tall(m=60, n=30, consistent=True, seed=0):
    """A well-conditioned ``m x n`` matrix; b in its range or not (for the least-squares
    methods, which take rectangular operators)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, n)) / np.sqrt(m)
    if consistent:
        b = A @ rng.standard_normal(n)
    else:
        b = rng.standard_normal(m)
    name = f"tall_{'consistent' if consistent else 'inconsistent'}({m}x{n},seed={seed})"
    return System(name, A, b / np.linalg.norm(b), False, consistent)


def default_systems():
    """The small set the default (fast) run covers."""
    return [
        spd(30, 1e6, seed=1),
        spd(50, 1e10, seed=0, spacing="lin", b="ones"),
        spd(40, 1e14, seed=2),
        poisson_system(60),
        nonnormal(40),
        rbp_contraction(30, 0.8, seed=3),
        nonsymmetric(30, seed=4),
        singular_consistent(),
        singular_inconsistent(),
        sym_indefinite(30, 1e3, seed=5),
        tall(40, 20, True, seed=6),
        tall(40, 20, False, seed=7),
    ]


def all_systems():
    """The exhaustive set (the ``slow`` run)."""
    out = []
    for i, cond in enumerate([1e2, 1e6, 1e10, 1e14]):
        for n in (20, 60):
            out.append(spd(n, cond, seed=10 + i))
            out.append(spd(n, cond, seed=10 + i, spacing="lin", b="ones"))
    for n in (40, 71, 100):
        out.append(poisson_system(n))
    out.append(nonnormal(40))
    for rho in (0.5, 0.95):
        out.append(rbp_contraction(40, rho, seed=20))
    for seed in (30, 31):
        out.append(nonsymmetric(40, seed=seed))
    out += [singular_consistent(), singular_inconsistent()]
    for cond in (1e2, 1e8):
        out.append(sym_indefinite(40, cond, seed=40))
    out += [tall(60, 30, True, seed=50), tall(60, 30, False, seed=51)]
    return out
