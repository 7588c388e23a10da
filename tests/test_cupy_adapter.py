"""The cupy adapter: operators on cupy data, closures, and DLPack bridges to torch.

The GPU tests skip without cupy or without a CUDA device; the import test runs everywhere.
"""

import importlib.util

import numpy as np
import pytest

import linsolve_rbp as lr
from linsolve_rbp.adapters import cupy as lrc  # importable without cupy: cupy is imported lazily

HAS_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.mark.skipif(HAS_CUPY, reason="checks the behaviour without cupy")
def test_module_imports_without_cupy_and_says_how_to_get_it():
    torch = pytest.importorskip("torch")
    with pytest.raises(ImportError, match=r"pip install linsolve_rbp\[cupy\]"):
        lrc.to_cupy(torch.zeros(2))
    with pytest.raises(TypeError, match="like must be a cupy array"):
        lrc.jacobian_operator(3, vjp=lambda u: u, like=np.zeros(3))
    with pytest.raises(TypeError, match="A must be cupy data"):
        lrc.aslinearoperator(np.eye(3))


@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cupy


def _system(n=30, seed=0):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    M = 0.5 * M / np.linalg.norm(M, 2)  # a contracting Jacobian
    g = rng.standard_normal(n)
    return M, g, np.linalg.solve(np.eye(n) - M.T, g)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["gmres", "neumann", "cgne"])
def test_dense_and_sparse_cupy_operators(cp, method):
    import cupyx.scipy.sparse as cps

    M, g, z = _system()
    for data in (cp.asarray(M), cps.csr_matrix(cp.asarray(M))):
        J = lrc.aslinearoperator(data)
        gc = cp.asarray(g)
        res = lr.solve(lr.IdentityOperator(30, like=gc) - J.T, gc, method=method, rtol=1e-10)
        assert res.success and isinstance(res.x, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(res.x), z, rtol=1e-8, atol=1e-10)


@pytest.mark.gpu
def test_jacobian_operator_from_closures(cp):
    M, g, z = _system()
    Mc, gc = cp.asarray(M), cp.asarray(g)
    J = lrc.jacobian_operator(30, vjp=lambda u: u @ Mc, like=gc)
    A = lr.IdentityOperator(30, like=gc) - J.T
    res = lr.solve(A, gc, method="gmres", rtol=1e-10)
    np.testing.assert_allclose(cp.asnumpy(res.x), z, rtol=1e-8, atol=1e-10)
    assert J.rmatvec_count == res.matvecs and J.matvec_count == 0
    with pytest.raises(TypeError, match="jvp="):
        lr.solve(A, gc, method="cgne")
    J2 = lrc.jacobian_operator(30, vjp=lambda u: u @ Mc, jvp=lambda v: v @ Mc.T, like=gc)
    res = lr.solve(lr.IdentityOperator(30, like=gc) - J2.T, gc, method="cgne", rtol=1e-10)
    np.testing.assert_allclose(cp.asnumpy(res.x), z, rtol=1e-8, atol=1e-10)


@pytest.mark.gpu
def test_dlpack_bridges_share_memory(cp):
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float64, device="cuda")
    a = lrc.to_cupy(t)
    assert a.data.ptr == t.data_ptr()
    a[0] = 42.0
    assert t[0].item() == 42.0
    back = lrc.to_torch(a)
    assert back.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="CUDA"):
        lrc.to_cupy(torch.zeros(3))


@pytest.mark.gpu
def test_torch_jacobian_solved_on_cupy(cp):
    torch = pytest.importorskip("torch")
    from linsolve_rbp.adapters import torch as lrt

    M, g, z = _system()
    Mt = torch.as_tensor(M, device="cuda")
    Jt = lrt.JacobianOperator(lambda h: h @ Mt.T, torch.zeros(30, dtype=torch.float64, device="cuda"))
    J = lrc.from_torch(Jt)
    gc = cp.asarray(g)
    res = lr.solve(lr.IdentityOperator(30, like=gc) - J.T, gc, method="gmres", rtol=1e-10)
    assert isinstance(res.x, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(res.x), z, rtol=1e-8, atol=1e-10)
    assert Jt.rmatvec_count == res.matvecs
    with pytest.raises(ValueError, match="CUDA"):
        lrc.from_torch(lrt.JacobianOperator(lambda h: h, torch.zeros(3, dtype=torch.float64)))

