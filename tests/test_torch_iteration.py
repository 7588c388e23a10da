"""The torch iteration of the own methods, on CPU tensors.

CPU torch solves run the numpy iteration on views of the tensors' memory (see
``linsolve_rbp.solve._host_views``); CUDA tensors run the torch iteration itself. So that a
machine without a GPU tests that iteration too, this module collects the registry's tests
again and keeps their torch cases of the own methods (see ``conftest.py``), with the view route switched off:
every torch case then runs the iteration a CUDA tensor runs, on the CPU.
"""

import importlib

import pytest

import test_solve_registry as _registry

#: The registry's tests, collected again here (their torch cases only).
for _name in dir(_registry):
    if _name.startswith("test_") and callable(getattr(_registry, _name)):
        globals()[_name] = getattr(_registry, _name)
del _name

TORCH_ONLY = True


@pytest.fixture(autouse=True)
def _torch_iteration(monkeypatch):
    """CPU torch data runs the torch iteration, as CUDA data does."""
    monkeypatch.setattr(importlib.import_module("linsolve_rbp.solve"), "_host_views",
                        lambda opts, b: False)
