"""Backend detection and conversions: the one place that knows about numpy, torch and cupy.

Everything else in the package gets array behaviour from here: the array namespace of an
array (through ``array_api_compat``), its device and dtype, conversions between frameworks by
DLPack, and lazy detection of optional packages. No optional framework is imported at module
level; torch and cupy are imported only when an array of theirs is seen or a conversion to
them is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

import numpy as np
import array_api_compat
from array_api_compat import (
    array_namespace as _array_namespace,
    is_cupy_array,
    is_numpy_array,
    is_torch_array,
)

__all__ = [
    "array_namespace",
    "device_of",
    "is_array",
    "is_numpy_array",
    "is_torch_array",
    "is_cupy_array",
    "is_sparse",
    "has_module",
    "import_optional",
    "backend_name",
    "to_numpy",
    "from_numpy",
    "torch_to_cupy",
    "cupy_to_torch",
    "is_floating_dtype",
    "is_complex_dtype",
    "real_dtype",
    "is_half_dtype",
    "array_kind",
    "same_device",
]


@lru_cache(maxsize=None)
def has_module(name: str) -> bool:
    """Return whether the optional package ``name`` is installed, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_optional(name: str, feature: str):
    """Import the optional package ``name``, or raise an ImportError saying how to get it."""
    if not has_module(name):
        extra = {"torch": "torch", "cupy": "cupy", "cupyx": "cupy"}.get(name.split(".")[0], name)
        raise ImportError(
            f"{feature} needs the optional package {name!r}; install it with "
            f"`pip install linsolve_rbp[{extra}]`"
        )
    return importlib.import_module(name)


def is_array(x) -> bool:
    """Return whether ``x`` is an array of an array-API compatible library (dense only)."""
    if is_sparse(x):
        return False
    return array_api_compat.is_array_api_obj(x)


_NUMPY_NATIVE = int(np.__version__.split(".")[0]) >= 2


def array_namespace(*arrays):
    """The array-API namespace shared by ``arrays``: numpy itself for numpy >= 2 (which
    implements the standard natively, without the per-call cost of a wrapper), the
    ``array_api_compat`` wrappers for torch, cupy and older numpy, and the library itself for
    array-API native libraries."""
    if _NUMPY_NATIVE and arrays and all(isinstance(a, np.ndarray) for a in arrays):
        return np
    return _array_namespace(*arrays)


def device_of(x):
    """The device of array ``x`` (``"cpu"`` for numpy)."""
    return array_api_compat.device(x)


def same_device(a, b) -> bool:
    """Whether arrays ``a`` and ``b`` live on the same device."""
    return str(device_of(a)) == str(device_of(b))


def backend_name(x) -> str:
    """A short name of the library that owns ``x``: numpy, torch, cupy, or the module name."""
    if is_numpy_array(x):
        return "numpy"
    if is_torch_array(x):
        return "torch"
    if is_cupy_array(x):
        return "cupy"
    if is_sparse(x):
        mod = type(x).__module__
        if mod.startswith("scipy"):
            return "numpy"
        if mod.startswith("cupyx"):
            return "cupy"
    return type(x).__module__.split(".")[0]


def is_sparse(x) -> bool:
    """Whether ``x`` is a scipy.sparse / cupyx.scipy.sparse matrix or a sparse torch tensor."""
    mod = type(x).__module__
    if mod.startswith("scipy.sparse"):
        import scipy.sparse

        return scipy.sparse.issparse(x)
    if mod.startswith("cupyx.scipy.sparse"):
        return True
    if is_torch_array(x):
        return x.layout != _torch().strided
    return False


def _torch():
    return import_optional("torch", "torch support")


def is_floating_dtype(xp, dtype) -> bool:
    """Whether ``dtype`` is a real or complex floating dtype of namespace ``xp``."""
    return xp.isdtype(dtype, ("real floating", "complex floating"))


def is_complex_dtype(xp, dtype) -> bool:
    """Whether ``dtype`` is a complex floating dtype of namespace ``xp``."""
    return xp.isdtype(dtype, "complex floating")


def real_dtype(xp, dtype):
    """The real floating dtype matching ``dtype`` (float32 for complex64, ...)."""
    if dtype == xp.complex64:
        return xp.float32
    if dtype == xp.complex128:
        return xp.float64
    return dtype


def is_half_dtype(xp, dtype) -> bool:
    """Whether ``dtype`` is a 16-bit real floating dtype (float16, torch's bfloat16), which
    :func:`linsolve_rbp.solve` iterates in float32."""
    try:
        if not xp.isdtype(dtype, "real floating"):
            return False
        return int(xp.finfo(dtype).bits) <= 16
    except (TypeError, ValueError, AttributeError):
        return False


def array_kind(x_or_backend) -> str:
    """"a numpy array", "a torch tensor", ...: how messages name an array of a backend."""
    name = x_or_backend if isinstance(x_or_backend, str) else backend_name(x_or_backend)
    if name == "torch":
        return "a torch tensor"
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name} array"


def to_numpy(x) -> np.ndarray:
    """A numpy view of ``x`` where possible (CPU torch tensors share memory), else a copy.

    GPU arrays are copied to the host. Gradients are not tracked through the result.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch_array(x):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.is_conj():
            x = x.resolve_conj()
        if x.dtype == _torch().bfloat16:
            # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
            x = x.float()
        return x.numpy()
    if is_cupy_array(x):
        return x.get()
    try:
        return np.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        return np.asarray(x)


def from_numpy(a: np.ndarray, like):
    """Convert numpy array ``a`` to the library, device and dtype family of array ``like``.

    CPU torch tensors share memory with ``a`` where the dtype allows.
    """
    if isinstance(like, np.ndarray) or like is None:
        return a
    if is_torch_array(like):
        torch = _torch()
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=like.device)
    if is_cupy_array(like):
        cupy = import_optional("cupy", "cupy support")
        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(a)
    xp = array_namespace(like)
    return xp.asarray(a, device=device_of(like))


def torch_to_cupy(t):
    """Share a CUDA torch tensor with cupy through DLPack (no copy)."""
    cupy = import_optional("cupy", "torch-to-cupy conversion")
    if not is_torch_array(t):
        raise TypeError(f"t must be a torch tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"t must be on a CUDA device to share with cupy, got device {t.device}")
    return cupy.from_dlpack(t.detach())


def cupy_to_torch(a):
    """Share a cupy array with torch through DLPack (no copy)."""
    torch = _torch()
    if not is_cupy_array(a):
        raise TypeError(f"a must be a cupy array, got {type(a).__name__}")
    return torch.from_dlpack(a)
