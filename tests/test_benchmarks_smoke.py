"""The benchmark suite stays runnable: the asv modules import and describe their benchmarks,
a benchmark's setup builds a problem its solve handles, the fresh-process measurement helper
works, and the peer comparison (``python -m asv_benchmarks.peers``) runs end to end (at toy
sizes) and writes both tables."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import linsolve_rbp as lr

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["asv_benchmarks.common", "asv_benchmarks.bench_solvers", "asv_benchmarks.bench_rbp",
           "asv_benchmarks.peers"]
#: Parameter combinations of the whole default grid (every asv class, skipped ones included):
#: what ``asv run --quick`` runs each benchmark of a class over. The grid of 15 methods x 3
#: sizes up to n = 4000 x 3 backends took more than 8 minutes for one class; the default grid
#: stays under this bound and the full grid (``LINSOLVE_RBP_BENCH_FULL=1``) adds the sizes.
MAX_DEFAULT_COMBINATIONS = 240


@pytest.fixture(scope="module", autouse=True)
def _on_path():
    sys.path.insert(0, str(ROOT))
    yield
    sys.path.remove(str(ROOT))


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_modules_import(name):
    importlib.import_module(name)


def _asv_conf():
    # asv accepts // comments in its configuration; strip them to read it as JSON.
    text = "\n".join(line for line in (ROOT / "asv.conf.json").read_text().splitlines()
                     if not line.lstrip().startswith("//"))
    return json.loads(text)


def test_asv_config_points_at_the_benchmarks():
    conf = _asv_conf()
    assert conf["benchmark_dir"] == "asv_benchmarks"
    assert (ROOT / conf["benchmark_dir"] / "__init__.py").exists()
    assert "constraints.txt" in " ".join(conf["install_command"])


def test_asv_install_uses_the_configured_index():
    # No index named: pip's own configuration (pip.conf, PIP_INDEX_URL, ...) decides, so that
    # the command works on a machine that reaches only its own mirror.
    conf = _asv_conf()
    commands = " ".join(conf["install_command"] + conf["build_command"] + conf.get("uninstall_command", []))
    for flag in ("--index-url", "--extra-index-url", "-i ", "--find-links", "http://", "https://"):
        assert flag not in commands, flag
    assert "-c {build_dir}/constraints.txt" in commands


def _combinations(module):
    """``{class name: number of parameter combinations}`` of the asv classes of ``module``."""
    import math

    counts = {}
    for name, cls in vars(module).items():
        if not isinstance(cls, type) or cls.__module__ != module.__name__:
            continue
        if not any(k.startswith(("time_", "peakmem_", "track_", "mem_")) for k in dir(cls)):
            continue
        params = getattr(cls, "params", [])
        counts[name] = math.prod(len(p) for p in params) if params else 1
    return counts


def test_default_grid_is_small():
    from asv_benchmarks import bench_rbp, bench_solvers, common

    assert not common.FULL, "LINSOLVE_RBP_BENCH_FULL is set in the test environment"
    counts = {**_combinations(bench_solvers), **_combinations(bench_rbp)}
    assert {"DenseNonsymmetric", "Batched", "Poisson", "DenseGmres", "MillisecondProduct",
            "DEQBackward", "HyperoptMetaGradient"} <= set(counts)
    assert sum(counts.values()) <= MAX_DEFAULT_COMBINATIONS, counts
    # One size each for the dense and batched classes, the small Poisson grid, T = 100 only.
    assert bench_solvers.DenseNonsymmetric.params[1] == [200]
    assert bench_solvers.Batched.params[1] == [64]
    assert bench_solvers.Poisson.params[1] == [100]
    assert bench_rbp.HyperoptMetaGradient.params[1] == [100]


def test_full_grid_is_behind_the_environment_variable():
    code = ("import json; from asv_benchmarks import bench_rbp as r, bench_solvers as s; "
            "print(json.dumps([s.DenseNonsymmetric.params[1], s.Batched.params[1], s.Poisson.params[1], "
            "r.HyperoptMetaGradient.params[1], r.HyperoptMetaGradient.params[2]]))")
    import os

    env = dict(os.environ, LINSOLVE_RBP_BENCH_FULL="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         env=env, timeout=120, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [[100, 1000, 4000], [1, 64, 256], [100, 300],
                                                        [100, 1000], [10, 50, 100]]


def test_issue_workloads_in_the_suite_solve():
    pytest.importorskip("torch")
    from asv_benchmarks import bench_rbp, bench_solvers, common

    P = common.poisson2d(4)
    assert P.shape == (16, 16) and P.diagonal().tolist() == [4.0] * 16 and abs(P - P.T).max() == 0
    bench = bench_solvers.Poisson()
    bench.setup("cg", 100, "numpy")
    assert bench.track_converged_fraction() == 1.0
    g = bench_solvers.DenseGmres()
    g.setup(g.setup_cache(), "gmres", "torch-cpu")
    assert g.track_converged_fraction() == 1.0
    deq = bench_rbp.DEQBackward()
    deq.setup("neumann")
    deq.time_backward("neumann")
    assert deq.W.grad is not None and deq.W.grad.dtype.is_floating_point


def test_row_format():
    from asv_benchmarks.common import Row, format_rows

    rows = [Row("cg Poisson 100^2", 20.0, "scipy cg", 10.0, "306 / 306", "ok"), Row("x", None)]
    text = format_rows(rows, title="cg")
    lines = text.splitlines()
    assert lines[0] == "### cg" and lines[2].startswith("| workload | ours (ms) | peer |")
    assert "| cg Poisson 100^2 | 20.0 | scipy cg | 10.0 | 2.00 | 306 / 306 | ok |" in lines
    assert rows[1].ratio is None and lines[-1].startswith("| x | - |")


def test_solver_benchmarks_cover_every_method():
    bs = importlib.import_module("asv_benchmarks.bench_solvers")
    for cls in (bs.DenseNonsymmetric, bs.ConvectionDiffusion, bs.Batched, bs.TorchJacobian):
        assert cls.params[0] == lr.methods()
        assert len(cls.params) == len(cls.param_names)


def test_batched_benchmark_solves_and_skips():
    bs = importlib.import_module("asv_benchmarks.bench_solvers")
    bench = bs.Batched()
    bench.setup("gmres", 64, "numpy")
    assert bench.track_converged_fraction() == 1.0
    assert bench.track_products() >= bench.track_iterations() > 0
    with pytest.raises(NotImplementedError, match="symmetric"):
        bs.Batched().setup("cg", 64, "numpy")  # cg on a nonsymmetric system is skipped
    if not _cuda():
        # Skipped for want of a CUDA device, or of torch itself.
        with pytest.raises(NotImplementedError, match="CUDA|torch is not installed"):
            bs.Batched().setup("gmres", 64, "torch-cuda")


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_run_fresh_measures_a_call_in_another_process():
    import os
    from functools import partial

    import numpy as np

    from linsolve_rbp.experiments.fresh import MEMORY_ENV, FreshRun, run_fresh

    run = run_fresh(os.getpid)
    assert isinstance(run, FreshRun) and run.value != os.getpid() and run.seconds >= 0
    # 40 MB allocated in the call are seen; the 80 MB made by the setup are not charged to it.
    run = run_fresh(np.add, 1.0, setup=partial(np.ones, 10_000_000), repeats=2, env=MEMORY_ENV)
    assert run.value.shape == (10_000_000,)
    assert 60e6 <= run.peak_bytes <= 120e6
    env = run_fresh(os.getenv, "MALLOC_MMAP_THRESHOLD_", env=MEMORY_ENV).value
    assert env == MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ or os.environ["MALLOC_MMAP_THRESHOLD_"] != "131072"
    with pytest.raises(RuntimeError, match="ValueError"):
        run_fresh(int, "not a number")


def test_peers_quick_run_writes_both_tables(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "-m", "asv_benchmarks.peers", "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=str(ROOT), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = out.read_text()
    rst = out.with_suffix(".inc").read_text()
    peers = importlib.import_module("asv_benchmarks.peers")
    for title in peers.SECTIONS.values():
        assert f"## {title}" in md
    for text in ("scipy gmres loop", "batch_dims=1", "grad rel. error", "BPTT through", "Neumann-RBP"):
        assert text in md
    rbp = md.split(f"## {peers.SECTIONS['rbp']}", 1)[1]
    rows = [line for line in rbp.splitlines() if line.startswith("| ") and line.endswith(("PASS |", "MISS |"))]
    # Two rows per K and one growth row (Neumann-RBP vs BPTT, one variant in the quick run).
    assert len(rows) == 2 * 2 + 1
    rst_rbp = rst.split(peers.SECTIONS["rbp"], 1)[1]
    assert rst_rbp.count("     - PASS") + rst_rbp.count("     - MISS") == len(rows)
    assert rst.count(".. list-table::") >= 1 + len(peers.SECTIONS) - 1


def test_peers_rows_from_lean_modules():
    peers = importlib.import_module("asv_benchmarks.peers")
    from asv_benchmarks.common import Row

    r = peers.as_row(("cg Poisson 100^2 scipy CSR", 0.02, 0.01, 306, 305), "lean")
    assert r == Row("cg Poisson 100^2 scipy CSR", 20.0, "scipy cg", 10.0, "306 / 305", "")
    r = peers.as_row(("gmres dense n=200, torch vs our numpy", 0.002, 0.001, 90, 90, "CONVERGED"), "lean_gmres")
    assert (r.peer, r.note, r.ratio) == ("our numpy", "CONVERGED", 2.0)
    rows, text = peers.lean_rows("no_such_module", quick=True)
    assert len(rows) == 1 and "does not import" in rows[0].note and text == ""


def test_lean_modules_run_returns_rows():
    """Each lean module's ``run()`` returns its rows (what ``peers`` tabulates), at toy sizes."""
    pytest.importorskip("torch")
    from asv_benchmarks.common import Row

    for name in ("lean_gmres", "lean_deq"):
        mod = importlib.import_module(f"asv_benchmarks.{name}")
        rows = mod.run(quick=True)
        assert rows and all(isinstance(r, Row) for r in rows), name
        timed = [r for r in rows if r.ours_ms is not None and r.peer_ms is not None]
        assert timed and all(r.ratio > 0 for r in timed), name
