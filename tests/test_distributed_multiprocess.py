"""Sharded solves and DDP training over real processes on one machine: two gloo ranks on
127.0.0.1 started by ``torch.multiprocessing.spawn``, and two MPI ranks started by
``mpiexec -n 2`` (when mpi4py and an ``mpiexec`` are installed). Each rank's answer must be
the single-process one: the same iterations and status, x to 1e-12, and, for a DEQ trained
under DistributedDataParallel, the parameters of training on the whole batch in one process.

Marked ``multiprocess`` (a few seconds each); ``-m "not multiprocess"`` leaves them out.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import linsolve_rbp as lr

import _distributed_workers as W

pytestmark = pytest.mark.multiprocess

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(outdir, world):
    return [pickle.loads((Path(outdir) / f"rank{r}.pkl").read_bytes()) for r in range(world)]


def _check_solves(ranks, methods):
    for method in methods:
        A, b = W.system(method)
        ref = lr.solve(A, b, method=method, **W.options(method))
        got = [r[method] for r in ranks]
        x = np.concatenate([g["x"] for g in got])
        assert all(g["iterations"] == ref.iterations for g in got), (method, ref.iterations, got)
        assert all(g["status"] == ref.status.name for g in got), method
        assert np.max(np.abs(x - ref.x)) <= 1e-12 * max(1.0, np.max(np.abs(ref.x))), method
        # The ranks made the same collectives, and the result says how many.
        assert len({g["allreduces"] for g in got}) == 1 and got[0]["allreduces"] == got[0]["counted"] > 0


def _check_empty_rank(ranks):
    """Rank 0 held no rows: both ranks made the single-process iterations, x is rank 1's."""
    A, b = W.system("cg")
    for method in ("cg", "auto"):
        ref = lr.solve(A, b, method=method, **W.options("cg"))
        got = [r["empty_rank"][method] for r in ranks]
        assert [g["iterations"] for g in got] == [ref.iterations] * 2, method
        assert {g["status"] for g in got} == {ref.status.name}
        assert got[0]["x"].shape == (0,)
        np.testing.assert_allclose(got[1]["x"], ref.x, rtol=0, atol=1e-12 * max(1.0, np.max(np.abs(ref.x))))


@pytest.fixture(scope="module")
def gloo_ranks(tmp_path_factory):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = tmp_path_factory.mktemp("gloo")
    mp.spawn(W.gloo_worker, args=(2, _free_port(), str(outdir)), nprocs=2, join=True)
    return _load(outdir, 2)


def test_gloo_sharded_solves_match_one_process(gloo_ranks):
    assert [r["rank"] for r in gloo_ranks] == [0, 1] and gloo_ranks[0]["size"] == 2
    _check_solves([r["torch"] for r in gloo_ranks], W.METHODS)
    # numpy vectors through a torch.distributed group (copied through torch tensors).
    _check_solves([r["numpy"] for r in gloo_ranks], ("cg", "gmres"))
    _check_empty_rank(gloo_ranks)


@pytest.mark.parametrize("kind", list(W.BACKWARDS))
def test_ddp_training_of_a_deq_matches_one_process(gloo_ranks, kind):
    ref = W.reference_training(kind)
    for r in gloo_ranks:
        got = r["ddp"][kind]
        for name in ("W", "U"):
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-10)
    # And training moved the parameters (the comparison is not between two untouched copies).
    _, _, W0, _ = W.deq_data()
    assert np.max(np.abs(ref["W"] - W0)) > 1e-3


def _mpiexec():
    """The MPI launcher: on PATH, or beside this Python (the mpich wheel installs it into the
    environment's bin, which is not on PATH when the environment is not activated)."""
    here = os.path.dirname(sys.executable)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name) or shutil.which(name, path=here)
        if found:
            return found
    return None


def test_mpi_sharded_solves_match_one_process(tmp_path):
    pytest.importorskip("mpi4py")
    launcher = _mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec on PATH or beside this Python")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [launcher, "-n", "2", sys.executable, str(HERE / "_distributed_workers.py"), "mpi", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = _load(tmp_path, 2)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["size"] == 2
    _check_solves([r["numpy"] for r in ranks], W.METHODS)
    _check_empty_rank(ranks)
