"""The backend helpers by name: :func:`namespace`, :func:`to_backend`, :func:`synchronize`,
and the optional-dependency errors. numpy always; torch and cupy where installed."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from linsolve_rbp import backend as _b

HAS_TORCH = _b.has_module("torch")


def _has_cuda_cupy():
    if not _b.has_module("cupy"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no device
        return False


BACKENDS = [
    "numpy",
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")),
    pytest.param("cupy", marks=pytest.mark.skipif(not _has_cuda_cupy(), reason="cupy or a GPU is missing")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_namespace_converts_dense_and_sparse(backend, dtype):
    xp, dt, dev, convert = _b.namespace(backend, dtype=dtype)
    M = sp.random(7, 7, density=0.4, random_state=0, format="csr") + sp.eye(7)
    v = np.arange(7.0)
    x = convert(v)
    assert _b.backend_name(x) == backend and x.dtype == dt
    assert _b.array_namespace(x) is xp or _b.backend_name(xp.asarray(x)) == backend
    np.testing.assert_array_equal(_b.to_numpy(x), v.astype(dtype))
    S = convert(M)
    assert _b.is_sparse(S) and _b.backend_name(S) == backend
    dense = S.toarray() if hasattr(S, "toarray") else S.to_dense()
    np.testing.assert_allclose(_b.to_numpy(dense), M.toarray().astype(dtype))
    if backend == "numpy":
        assert dev == "cpu" and S.format == "csr"
    if backend == "torch":
        import torch

        assert S.layout == torch.sparse_csr and dev == torch.device("cpu")
        # The operator the command line builds from it multiplies like the matrix.
        np.testing.assert_allclose(_b.to_numpy(S @ x), M.astype(dtype) @ v.astype(dtype), rtol=1e-5)


def test_namespace_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^backend must be one of numpy, torch, cupy, got 'jax'"):
        _b.namespace("jax")
    with pytest.raises(ValueError, match=r"^--backend must be one of"):
        _b.namespace("jax", names=("--backend", "--device"))
    with pytest.raises(ValueError, match=r"--device cuda:0 needs --backend torch or cupy"):
        _b.namespace("numpy", "cuda:0", names=("--backend", "--device"))
    with pytest.raises(ValueError, match=r"device='cuda:0' needs backend torch or cupy"):
        _b.namespace("numpy", "cuda:0")
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        _b.namespace("numpy", dtype="int32")
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        _b.namespace("numpy", dtype="float48")


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_namespace_torch_device_errors():
    import torch

    with pytest.raises(ValueError, match="--device gpu: not a torch device"):
        _b.namespace("torch", "gpu", names=("--backend", "--device"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:0: PyTorch sees no CUDA device"):
            _b.namespace("torch", "cuda:0", names=("--backend", "--device"))


@pytest.mark.parametrize("backend, extra", [("torch", "torch"), ("cupy", "cupy")])
def test_namespace_missing_package_says_how_to_install(backend, extra, monkeypatch):
    monkeypatch.setattr(_b, "has_module", lambda name: False)
    with pytest.raises(ImportError, match=rf"--backend {backend} needs .*pip install linsolve_rbp\[{extra}\]"):
        _b.namespace(backend, names=("--backend", "--device"))


@pytest.mark.parametrize("name", ["matplotlib", "tqdm.auto"])
def test_cli_packages_point_at_the_cli_extra(name, monkeypatch):
    monkeypatch.setattr(_b, "has_module", lambda n: False)
    with pytest.raises(ImportError, match=r"pip install linsolve_rbp\[cli\]"):
        _b.import_optional(name, "plotting")


def test_to_backend_numpy():
    a = _b.to_backend([1, 2, 3], "numpy")
    assert isinstance(a, np.ndarray) and a.dtype.kind == "i"
    f = _b.to_backend(np.arange(3), "numpy", dtype="float32")
    assert f.dtype == np.float32
    M = _b.to_backend(sp.eye(4, format="coo"), "numpy", dtype=np.float32)
    assert sp.issparse(M) and M.format == "csr" and M.dtype == np.float32
    same = np.ones(3)
    assert _b.to_backend(same, "numpy") is same  # no copy when nothing changes
    assert _b.to_backend(np.ones(2), np.zeros(1)).dtype == np.float64  # like= a numpy array
    with pytest.raises(ValueError, match="cpu"):
        _b.to_backend(np.ones(2), "numpy", device="cuda:0")
    with pytest.raises(ValueError, match="backend must be one of"):
        _b.to_backend(np.ones(2), "jax")
    with pytest.raises(TypeError, match="backend_or_like"):
        _b.to_backend(np.ones(2), 3.0)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_to_backend_torch():
    import torch

    like = torch.zeros(2, dtype=torch.float32)
    t = _b.to_backend(np.arange(3.0), like)
    assert isinstance(t, torch.Tensor) and t.device == like.device and t.dtype == torch.float64
    t32 = _b.to_backend(np.arange(3.0), "torch", dtype="float32")
    assert t32.dtype == torch.float32
    assert _b.to_backend(np.arange(3.0), "torch", dtype=torch.float16).dtype == torch.float16
    S = _b.to_backend(sp.diags([1.0, 2.0, 3.0]), "torch")
    assert S.layout == torch.sparse_csr and S.crow_indices().dtype == torch.int64
    np.testing.assert_array_equal(S.to_dense().numpy(), np.diag([1.0, 2.0, 3.0]))
    back = _b.to_backend(torch.arange(3.0), "numpy")  # torch in, numpy out
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, [0.0, 1.0, 2.0])


def test_synchronize_is_a_no_op_on_the_cpu_and_imports_nothing():
    code = (
        "import sys, numpy as np\n"
        "from linsolve_rbp import backend as b\n"
        "for x in (None, np.ones(2), 'cpu'):\n"
        "    b.synchronize(x)\n"
        "assert 'torch' not in sys.modules and 'cupy' not in sys.modules, sorted(sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_synchronize_torch():
    import torch

    _b.synchronize(torch.ones(2))
    _b.synchronize(torch.device("cpu"))
    if torch.cuda.is_available():
        x = torch.ones(1000, device="cuda") * 2
        _b.synchronize(x)
        _b.synchronize(x.device)
        _b.synchronize("cuda:0")
