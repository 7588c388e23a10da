"""The documentation: docstring examples run, and the Sphinx site builds without warnings."""

import doctest
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import linsolve_rbp

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(linsolve_rbp.__path__, prefix="linsolve_rbp.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (cupy, ...) that is not installed
        pytest.skip(f"{name}: {exc}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (output above)"


def test_every_public_name_has_an_example():
    missing = [n for n in ("solve", "LinearOperator", "IdentityOperator", "aslinearoperator")
               if ">>>" not in (getattr(linsolve_rbp, n).__doc__ or "")]
    assert not missing


def test_sphinx_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("pydata_sphinx_theme")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    index = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    for page in ("theory", "guide", "cli", "api", "adding_a_solver", "getting_started"):
        assert f"{page}.html" in index
    assert "linsolve_rbp.solve" in (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
