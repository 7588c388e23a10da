"""The public extension API: docs/adding_a_solver.rst works as written, with public names only."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest

import linsolve_rbp as lr

solve_module = importlib.import_module("linsolve_rbp.solve")  # the module, not lr.solve

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_solver.rst"


def _code_blocks(text):
    """The python code blocks of an rst text, dedented."""
    blocks = []
    for m in re.finditer(r"^\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", text, flags=re.M):
        blocks.append("\n".join(line[4:] for line in m.group(1).splitlines()))
    return blocks


@pytest.fixture
def registry(monkeypatch):
    """The method registry, restored after the test."""
    monkeypatch.setattr(solve_module, "_REGISTRY", dict(solve_module._REGISTRY))
    monkeypatch.setattr(solve_module, "_INSTANCES", {})


@pytest.fixture
def example(registry):
    """The namespace left by running the guide's example."""
    blocks = _code_blocks(DOC.read_text())
    assert blocks, "the guide has no python example"
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), ns)
    return ns


def test_example_uses_public_names_only():
    for code in _code_blocks(DOC.read_text()):
        for line in code.splitlines():
            if line.startswith(("import ", "from ")):
                assert "._" not in line and not re.search(r"\b_\w", line), line


def test_example_runs_and_converges(example):
    res = example["res"]
    assert res.status is lr.Status.CONVERGED
    A, b = example["A"], example["b"]
    assert np.linalg.norm(b - A @ res.x) <= 1e-10 * np.linalg.norm(b)
    assert "richardson" in lr.methods()


def test_registered_method_is_validated_like_the_builtins(example):
    A, b = example["A"], example["b"]
    with pytest.raises(ValueError, match="omega"):
        lr.solve(A, b, method="richardson", omega=-1.0)
    with pytest.raises(TypeError, match="did you mean 'omega'"):
        lr.solve(A, b, method="richardson", omgea=0.5)
    assert lr.solve(A, b, method="richardson", omega=0.9, maxiter=1).status is lr.Status.MAX_ITERATIONS


def test_registered_method_reports_divergence(example):
    A, b = example["A"], example["b"]
    res = lr.solve(-A, b, method="richardson", omega=0.9, on_failure="ignore")
    assert res.status in (lr.Status.DIVERGED, lr.Status.NONFINITE)


def test_registered_method_runs_on_the_array_api(example):
    xps = pytest.importorskip("array_api_strict")
    A, b = example["A"], example["b"]
    res = lr.solve(xps.asarray(A), xps.asarray(b), method="richardson", omega=0.9, rtol=1e-8)
    assert res.status is lr.Status.CONVERGED
    ref = np.linalg.solve(A, b)
    assert np.allclose(np.asarray(res.x), ref, rtol=1e-6)


def test_register_method_refuses_non_solvers(registry):
    with pytest.raises(TypeError, match="solver_cls"):
        lr.register_method("bad", object)
