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


def _torch_case(item):
    """Whether a test item is parametrized with the torch CPU backend and no scipy bridge (the
    bridges hand numpy to scipy whatever the route)."""
    callspec = getattr(item, "callspec", None)
    values = [] if callspec is None else [v for v in callspec.params.values() if isinstance(v, str)]
    return "torch" in values and not any(v.startswith("scipy.") for v in values)


def pytest_collection_modifyitems(config, items):
    # Modules with TORCH_ONLY = True (test_torch_iteration.py) keep their torch cases only.
    keep = [it for it in items if not getattr(it.module, "TORCH_ONLY", False) or _torch_case(it)]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep
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
