import os

import pytest

# Keep BLAS and torch to one thread each so that test timings stay stable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _fresh_convergence_warnings():
    """Each test sees ConvergenceWarnings as a fresh process would: the deduplication
    counts of one test do not hide the warnings another test expects."""
    import linsolve_rbp

    linsolve_rbp.reset_convergence_warnings()
    yield


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    runslow = config.getoption("--runslow")
    cuda = None
    for item in items:
        if "slow" in item.keywords and not runslow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            if cuda is None:
                cuda = _has_cuda()
            if not cuda:
                item.add_marker(skip_gpu)
