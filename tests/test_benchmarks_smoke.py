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


@pytest.fixture(scope="module", autouse=True)
def _on_path():
    sys.path.insert(0, str(ROOT))
    yield
    sys.path.remove(str(ROOT))


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_modules_import(name):
    importlib.import_module(name)


def test_asv_config_points_at_the_benchmarks():
    # asv accepts // comments in its configuration; strip them to read it as JSON.
    text = "\n".join(line for line in (ROOT / "asv.conf.json").read_text().splitlines()
                     if not line.lstrip().startswith("//"))
    conf = json.loads(text)
    assert conf["benchmark_dir"] == "asv_benchmarks"
    assert (ROOT / conf["benchmark_dir"] / "__init__.py").exists()
    assert "constraints.txt" in " ".join(conf["install_command"])


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
        with pytest.raises(NotImplementedError, match="CUDA"):
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
        capture_output=True, text=True, cwd=str(ROOT), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = out.read_text()
    rst = out.with_suffix(".inc").read_text()
    own = [m for m in lr.methods() if not m.startswith("scipy.")]
    for method in own:
        assert f"`{method}`" in md
    for section in ("scipy.sparse.linalg.gmres", "batch_dims=1", "Neumann-RBP", "BPTT"):
        assert section in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.endswith(("PASS |", "MISS |"))]
    # One row per own method, two for gmres, two batched (one matrix / B matrices), two per K
    # and one growth row.
    assert len(rows) == len(own) + 4 + 2 * 2 + 1
    assert ".. list-table:: Measurements" in rst
    assert rst.count("     - PASS") + rst.count("     - MISS") == len(rows)
