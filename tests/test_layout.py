"""The package's architecture, checked from its source: the import graph has no cycle and no
arrow pointing up the layers, and importing the library changes nothing outside it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "linsolve_rbp"

# Layers, bottom first: a module may import modules of its own layer or of a lower one.
LAYERS = [
    ("linsolve_rbp.backend",),
    ("linsolve_rbp._result", "linsolve_rbp._validate"),
    ("linsolve_rbp._warnings",),
    ("linsolve_rbp.operators",),
    ("linsolve_rbp.distributed",),
    ("linsolve_rbp.solvers",),
    ("linsolve_rbp.solve", "linsolve_rbp.diagnostics"),
    ("linsolve_rbp",),  # the package's public names (its __init__)
    ("linsolve_rbp.adapters",),
    ("linsolve_rbp.problems",),
    ("linsolve_rbp.experiments",),
    ("linsolve_rbp.cli", "linsolve_rbp.__main__"),
]

# What importing the library and its numerical modules must not pull in.
APPLICATION_ONLY = ("matplotlib", "tqdm")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = []
            for a in node.names:
                sub = f"{mod}.{a.name}"
                targets.append(sub if sub in MODULES else mod)
        else:
            continue
        for t in targets:
            # The nearest module of the package that the import names.
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"module {name} belongs to no layer; add it to LAYERS"
    return best[0]


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_import_points_up_the_layers():
    upward = sorted(
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in GRAPH.items()
        for b in deps
        if _layer(b) > _layer(a)
    )
    assert not upward, "\n".join(upward)


def test_import_graph_has_no_cycle():
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _numerical_modules():
    app = ("linsolve_rbp.cli", "linsolve_rbp.experiments", "linsolve_rbp.__main__")
    return sorted(n for n in MODULES if not n.startswith(app) and n != "linsolve_rbp.adapters.cupy")


def test_library_import_pulls_in_no_application_dependency():
    """Importing the library, every numerical module and the command line's modules loads
    neither matplotlib nor tqdm (they are imported where a figure is drawn or progress shown).
    What the libraries underneath load themselves (torch may import tqdm) is the baseline."""
    mods = _numerical_modules() + sorted(n for n in MODULES if n.startswith("linsolve_rbp.cli"))
    code = (
        "import sys, importlib, importlib.util\n"
        "for dep in ('numpy', 'scipy.sparse.linalg', 'array_api_compat', 'torch'):\n"
        "    if importlib.util.find_spec(dep.split('.')[0]):\n"
        "        importlib.import_module(dep)\n"
        f"before = {{m for m in {APPLICATION_ONLY!r} if m in sys.modules}}\n"
        "has_torch = 'torch' in sys.modules\n"
        f"for m in {mods!r}:\n"
        "    if m.startswith('linsolve_rbp.adapters.torch') and not has_torch:\n"
        "        continue\n"
        "    importlib.import_module(m)\n"
        f"bad = [m for m in {APPLICATION_ONLY!r} if m in sys.modules and m not in before]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at import time: {out.stdout.strip()}"


def test_importing_the_command_line_changes_no_global_state():
    """Importing the command line and the report module leaves matplotlib's backend alone."""
    mpl = pytest.importorskip("matplotlib")
    code = (
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import linsolve_rbp.cli, linsolve_rbp.cli.compare, linsolve_rbp.cli.report\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "svg", mpl.__version__
