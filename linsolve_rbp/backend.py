"""Backend detection and conversions: the one place that knows about numpy, torch and cupy.

Everything else in the package gets array behaviour from here: the array namespace of an
array (through ``array_api_compat``), its device and dtype, conversions between frameworks by
DLPack, and lazy detection of optional packages. No optional framework is imported at module
level; torch and cupy are imported only when an array of theirs is seen or a conversion to
them is asked for.
"""

from __future__ import annotations

import importlib
import sys
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
    "BACKENDS",
    "namespace",
    "to_backend",
    "synchronize",
]

#: The array libraries :func:`namespace` and :func:`to_backend` know by name.
BACKENDS = ("numpy", "torch", "cupy")


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
        extra = {"torch": "torch", "cupy": "cupy", "cupyx": "cupy", "matplotlib": "cli",
                 "tqdm": "cli"}.get(name.split(".")[0], name)
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
    # The module once imported (to_numpy asks for it on every call, for bfloat16).
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
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
    """Share a CUDA torch tensor with cupy through DLPack (no copy).

    Parameters
    ----------
    t : torch.Tensor
        A tensor on a CUDA device. Gradients are not tracked through the result.

    Returns
    -------
    cupy.ndarray
        A cupy array on the same device, viewing the same memory.

    Raises
    ------
    TypeError
        If ``t`` is not a torch tensor.
    ValueError
        If ``t`` is not on a CUDA device.
    ImportError
        If cupy is not installed.
    """
    cupy = import_optional("cupy", "torch-to-cupy conversion")
    if not is_torch_array(t):
        raise TypeError(f"t must be a torch tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"t must be on a CUDA device to share with cupy, got device {t.device}")
    return cupy.from_dlpack(t.detach())


def cupy_to_torch(a):
    """Share a cupy array with torch through DLPack (no copy).

    Parameters
    ----------
    a : cupy.ndarray

    Returns
    -------
    torch.Tensor
        A CUDA tensor on the same device, viewing the same memory.

    Raises
    ------
    TypeError
        If ``a`` is not a cupy array.
    """
    torch = _torch()
    if not is_cupy_array(a):
        raise TypeError(f"a must be a cupy array, got {type(a).__name__}")
    return torch.from_dlpack(a)


# -- backends by name: namespaces, conversions, synchronisation ----------------------------------

def _arg(name: str, value) -> str:
    """How a message names an argument: ``--device cuda:0`` for a command-line flag,
    ``device='cuda:0'`` for a keyword."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value!r}"


def _backend_of(backend_or_like):
    """``(name, device)`` of a backend name or of an array (its library and device)."""
    if isinstance(backend_or_like, str):
        if backend_or_like not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend_or_like!r}")
        return backend_or_like, None
    name = backend_name(backend_or_like)
    if name not in BACKENDS:
        raise TypeError(f"backend_or_like must be a backend name ({', '.join(BACKENDS)}) or a numpy, "
                        f"torch or cupy array, got {type(backend_or_like).__name__}")
    return name, (None if name == "numpy" else device_of(backend_or_like))


def _dtype_name(dtype) -> str:
    """The name (``"float32"``) of a dtype given as a string or a numpy, torch or cupy dtype."""
    if type(dtype).__module__.startswith("torch"):
        return np.dtype(str(dtype).rsplit(".", 1)[-1]).name  # torch.float32 -> float32
    return np.dtype(dtype).name  # names, numpy (and so cupy) dtypes and scalar types


def _backend_dtype(backend: str, dtype):
    """``dtype`` as the dtype object of ``backend`` (None stays None)."""
    if dtype is None:
        return None
    name = _dtype_name(dtype)
    if backend == "torch":
        return getattr(_torch(), name)
    if backend == "cupy":
        return getattr(import_optional("cupy", "cupy support"), name)
    return np.dtype(name)


def _cupy_device(device, name: str = "device"):
    cupy = import_optional("cupy", "cupy support")
    if isinstance(device, cupy.cuda.Device):
        return device
    text = "0" if device is None else str(device)
    try:
        return cupy.cuda.Device(int(text.split(":")[-1]))
    except ValueError:
        raise ValueError(f"{_arg(name, device)}: a cupy device is a number (0, 1, ...) or cuda:N") from None


def namespace(backend: str, device=None, dtype="float64", *, names=("backend", "device")):
    """The array namespace, dtype, device and a converter for the backend named ``backend``.

    Parameters
    ----------
    backend : {"numpy", "torch", "cupy"}
    device : str, int or device object, optional
        ``None`` or ``"cpu"`` for numpy; a torch device (``"cpu"``, ``"cuda:0"``; default cpu);
        a cupy device number (default 0).
    dtype : str or dtype
        A floating dtype (``"float32"``, ``"float64"``, ...).
    names : (str, str)
        How error messages name the backend and device arguments (a command line passes
        ``("--backend", "--device")``).

    Returns
    -------
    xp : module
        The array-API namespace (numpy, or ``array_api_compat``'s torch / cupy).
    dtype : dtype
        ``dtype`` as the backend's dtype object.
    device : str or device object
    convert : callable
        ``convert(a)`` is :func:`to_backend` of a numpy array or scipy.sparse matrix ``a`` with
        this dtype and device.

    Raises
    ------
    ValueError
        An unknown backend, a device the backend does not have or cannot see, a dtype that is
        not floating; the message names the argument with ``names``.
    ImportError
        torch or cupy is asked for but not installed (the message says how to install it).

    Examples
    --------
    >>> from linsolve_rbp.backend import namespace
    >>> xp, dtype, device, convert = namespace("numpy", dtype="float32")
    >>> convert([1, 2]).dtype, device
    (dtype('float32'), 'cpu')
    """
    bname, dname = names
    if backend not in BACKENDS:
        raise ValueError(f"{bname} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        if not np.issubdtype(np.dtype(_dtype_name(dtype)), np.inexact):
            raise TypeError
    except TypeError:
        raise ValueError(f"dtype must be a floating dtype (float32, float64, ...), got {dtype!r}") from None
    if backend == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"{_arg(dname, device)} needs {bname} torch or cupy (numpy runs on the cpu)")
        dt = _backend_dtype("numpy", dtype)
        dev = "cpu"
        xp = np
    elif backend == "torch":
        if not has_module("torch"):
            raise ImportError(f"{_arg(bname, 'torch')} needs PyTorch: pip install linsolve_rbp[torch]")
        torch = _torch()
        from array_api_compat import torch as xp

        try:
            dev = torch.device(device or "cpu")
        except (RuntimeError, TypeError):
            raise ValueError(f"{_arg(dname, device)}: not a torch device (cpu, cuda, cuda:0, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{_arg(dname, device)}: PyTorch sees no CUDA device")
        dt = _backend_dtype("torch", dtype)
    else:
        if not has_module("cupy"):
            raise ImportError(f"{_arg(bname, 'cupy')} needs CuPy, which is not installed: "
                              "pip install linsolve_rbp[cupy]")
        from array_api_compat import cupy as xp

        dev = _cupy_device(device, dname)
        dt = _backend_dtype("cupy", dtype)

    def convert(a):
        return to_backend(a, backend, dtype=dt, device=dev)

    return xp, dt, dev, convert


def to_backend(a, backend_or_like, *, dtype=None, device=None):
    """A numpy array (or anything ``numpy.asarray`` takes) or a scipy.sparse matrix, in another
    backend.

    Parameters
    ----------
    a : array_like or scipy.sparse matrix
        Dense input becomes a dense array; sparse input a CSR matrix of the backend
        (scipy.sparse ``csr_matrix``, torch sparse CSR tensor, ``cupyx.scipy.sparse.csr_matrix``).
        A torch or cupy array is first brought to numpy.
    backend_or_like : {"numpy", "torch", "cupy"} or array
        The backend by name, or an array whose library and device to use.
    dtype : str or dtype, optional
        Default: ``a``'s dtype.
    device : optional
        A torch device or cupy device number; default the device of ``backend_or_like`` where
        it is an array, else the cpu (torch) or device 0 (cupy).

    Returns
    -------
    array or sparse matrix

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from linsolve_rbp.backend import to_backend
    >>> to_backend(sp.eye(3), "numpy", dtype="float32").format, to_backend([1, 2], "numpy").dtype
    ('csr', dtype('int64'))
    """
    name, like_device = _backend_of(backend_or_like)
    device = like_device if device is None else device
    dt = _backend_dtype(name, dtype)
    if is_sparse(a) and type(a).__module__.startswith("scipy"):
        return _sparse_to_backend(a.tocsr(), name, dt, device)
    if not isinstance(a, np.ndarray):
        a = to_numpy(a) if is_array(a) else np.asarray(a)
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"numpy arrays live on the cpu, got device={device!r}")
        return a if dt is None else a.astype(dt, copy=False)
    if name == "torch":
        torch = _torch()
        if a.dtype == np.bool_ or a.dtype.kind in "iufc":
            t = torch.from_numpy(np.ascontiguousarray(a))
        else:
            raise TypeError(f"cannot convert a numpy array of dtype {a.dtype} to torch")
        return t.to(device=torch.device(device or "cpu"), dtype=dt)
    cupy = import_optional("cupy", "cupy support")
    with _cupy_device(device):
        return cupy.asarray(a, dtype=dt)


def _sparse_to_backend(M, name, dt, device):
    """A scipy CSR matrix in backend ``name``: scipy, torch sparse CSR or cupyx CSR."""
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"scipy.sparse matrices live on the cpu, got device={device!r}")
        return M if dt is None else M.astype(dt)
    if name == "torch":
        import warnings

        torch = _torch()
        dev = torch.device(device or "cpu")
        data = torch.from_numpy(np.ascontiguousarray(M.data)).to(device=dev, dtype=dt)
        with warnings.catch_warnings():
            # torch flags sparse CSR as beta on every construction.
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                torch.from_numpy(M.indptr.astype(np.int64)).to(dev),
                torch.from_numpy(M.indices.astype(np.int64)).to(dev),
                data, size=M.shape)
    cupy = import_optional("cupy", "cupy support")
    csp = import_optional("cupyx.scipy.sparse", "cupy sparse support")
    with _cupy_device(device):
        return csp.csr_matrix((cupy.asarray(M.data, dtype=dt), cupy.asarray(M.indices, dtype=np.int32),
                               cupy.asarray(M.indptr, dtype=np.int32)), shape=M.shape)


def synchronize(x_or_device=None) -> None:
    """Wait until the device of an array (or a device) has finished its queued work, so that
    a timing covers the work and not only its launch.

    A CUDA torch tensor or device synchronises that device; a cupy array or device its current
    stream; numpy arrays, the cpu and None return at once. Neither torch nor cupy is imported
    for this unless the argument is one of theirs (or a ``"cuda..."`` string with torch
    installed).
    """
    x = x_or_device
    if x is None or isinstance(x, np.ndarray):
        return
    mod = type(x).__module__
    if is_torch_array(x) or mod.startswith("torch"):
        torch = _torch()
        dev = x.device if is_torch_array(x) else torch.device(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return
    if is_cupy_array(x) or mod.startswith("cupy"):
        cupy = import_optional("cupy", "cupy support")
        dev = x.device if is_cupy_array(x) else getattr(x, "device", x)
        with dev:
            cupy.cuda.get_current_stream().synchronize()
        return
    if isinstance(x, str) and x.startswith("cuda") and has_module("torch"):
        torch = _torch()
        if torch.cuda.is_available():
            torch.cuda.synchronize(torch.device(x))
