"""Loaders of the experiments' data: MNIST (idx files) and the Planetoid citation networks
(pickled scipy/numpy objects). The ten Hopfield digits ship with the package
(:func:`linsolve_rbp.problems.hopfield.load_digits`).

Files are looked for in ``data_dir`` (and its ``mnist/`` or ``planetoid/`` subfolder), then in
the cache directory (``$LINSOLVE_RBP_DATA``, default ``~/.cache/linsolve_rbp``), and are
downloaded into the cache when missing and ``download=True``. A file that cannot be found gets
a :class:`FileNotFoundError` naming it and the places searched.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import urllib.request
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "cache_dir",
    "find_file",
    "read_idx",
    "load_mnist",
    "load_hyperopt_data",
    "load_planetoid",
]

MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
PLANETOID_URLS = ("https://github.com/kimiyoung/planetoid/raw/master/data/",)
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def cache_dir() -> Path:
    """Where downloaded files go: ``$LINSOLVE_RBP_DATA`` or ``~/.cache/linsolve_rbp``."""
    env = os.environ.get("LINSOLVE_RBP_DATA")
    return Path(env) if env else Path.home() / ".cache" / "linsolve_rbp"


def find_file(name: str, subdir: str, data_dir=None, urls=(), download: bool = True,
              timeout: float = 30.0) -> Path:
    """Path of data file ``name``, downloading it into the cache when missing.

    Parameters
    ----------
    name : str
        File name, e.g. ``"ind.cora.x"``.
    subdir : str
        Subfolder (``"mnist"``, ``"planetoid"``) searched under ``data_dir`` and the cache.
    data_dir : str or Path, optional
        Folder given by the user.
    urls : sequence of str
        Base URLs tried in turn when ``download`` is True.
    download : bool
        Try to download a missing file.
    timeout : float
        Seconds allowed per download attempt.

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        Naming the file and every place searched, when it is neither present nor
        downloadable.
    """
    places = []
    if data_dir is not None:
        places += [Path(data_dir) / name, Path(data_dir) / subdir / name]
    cache = cache_dir() / subdir
    places.append(cache / name)
    for p in places:
        if p.is_file():
            return p
    errors = []
    if download:
        for base in urls:
            url = base + name
            try:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = cache / (name + ".part")
                with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                    f.write(r.read())
                tmp.replace(cache / name)
                return cache / name
            except Exception as exc:  # network errors of every kind end in the message below
                errors.append(f"{url}: {exc}")
    msg = f"data file {name!r} not found; looked in: {', '.join(str(p) for p in places)}"
    if errors:
        msg += "; download failed: " + "; ".join(errors)
    elif not download:
        msg += " (download disabled)"
    msg += f". Put {name} in --data-dir or in {cache}."
    raise FileNotFoundError(msg)


def read_idx(path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims).astype(dtypes[dtype_code][1:])


def load_mnist(split: str = "train", data_dir=None, download: bool = True):
    """MNIST images ``(N, 784)`` uint8 and labels ``(N,)`` int64 of ``split`` ("train"/"test")."""
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_name, lab_name = _MNIST_FILES[split]
    images = read_idx(find_file(img_name, "mnist", data_dir, MNIST_URLS, download))
    labels = read_idx(find_file(lab_name, "mnist", data_dir, MNIST_URLS, download))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_name} has {images.shape[0]} images but {lab_name} {labels.shape[0]} labels")
    return images.reshape(images.shape[0], -1), labels.astype(np.int64)


def load_hyperopt_data(data_dir=None, n: int = 10_000, download: bool = True,
                       allow_test_standin: bool = True):
    """The hyperparameter experiment's data: the first ``n`` MNIST training images scaled to
    [0, 1] and mean-centred, with labels.

    When the training images cannot be had and ``allow_test_standin`` is True, the first ``n``
    test images stand in (with a warning); the returned ``source`` says which were used.

    Returns
    -------
    X : numpy.ndarray, float32, shape (n, 784)
    y : numpy.ndarray, int64, shape (n,)
    source : str
        ``"mnist-train"`` or ``"mnist-test"``.
    """
    try:
        images, labels = load_mnist("train", data_dir, download)
        source = "mnist-train"
    except FileNotFoundError as exc:
        if not allow_test_standin:
            raise
        warnings.warn(f"{exc} -- using the MNIST test images as a stand-in", stacklevel=2)
        images, labels = load_mnist("test", data_dir, download)
        source = "mnist-test"
    X = images[:n].astype(np.float32) / 255.0
    X -= X.mean(axis=0, keepdims=True)
    return X, labels[:n], source


def _unpickle(path):
    # The Planetoid files were pickled by Python 2; latin1 reads their numpy buffers.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_planetoid(name: str, data_dir=None, download: bool = True, missing_allx: str = "error"):
    """A Planetoid citation network (Yang et al., 2016): ``"cora"``, ``"citeseer"`` or
    ``"pubmed"``.

    Parameters
    ----------
    name : str
    data_dir : str or Path, optional
    download : bool
    missing_allx : {"error", "restrict"}
        What to do when ``ind.<name>.allx`` cannot be had (it is over 7 MB for Pubmed and absent
        from some offline copies): raise the :class:`FileNotFoundError`, or keep only the nodes
        whose features are in ``x`` and ``tx`` (the labelled training nodes and the test nodes)
        and the edges among them, with a warning.

    Returns
    -------
    dict
        ``features`` (numpy float32, ``(N, d)``), ``labels`` (int64 ``(N,)``), ``edges`` (int64
        ``(E, 2)``, both directions, no self loops), ``num_classes``, ``name``, ``restricted``
        (bool).

    Raises
    ------
    FileNotFoundError
        Naming the missing file.
    ValueError
        Unknown ``missing_allx``.
    """
    import scipy.sparse as sp

    if missing_allx not in ("error", "restrict"):
        raise ValueError(f"missing_allx must be 'error' or 'restrict', got {missing_allx!r}")
    name = name.lower()

    def get(ext):
        return _unpickle(find_file(f"ind.{name}.{ext}", "planetoid", data_dir, PLANETOID_URLS, download))

    x, y, tx, ty, graph = get("x"), get("y"), get("tx"), get("ty"), get("graph")
    test_index = np.loadtxt(find_file(f"ind.{name}.test.index", "planetoid", data_dir,
                                      PLANETOID_URLS, download), dtype=np.int64).reshape(-1)
    ally = get("ally")
    restricted = False
    try:
        allx = get("allx")
    except FileNotFoundError:
        if missing_allx == "error":
            raise
        warnings.warn(f"ind.{name}.allx is missing: keeping only the {x.shape[0]} training and "
                      f"{tx.shape[0]} test nodes that have features", stacklevel=2)
        allx = None
        restricted = True
    n_nodes = max(len(graph), int(test_index.max()) + 1)
    d = x.shape[1]
    n_classes = y.shape[1]
    feats = np.zeros((n_nodes, d), dtype=np.float32)
    labels = np.full(n_nodes, -1, dtype=np.int64)
    has = np.zeros(n_nodes, dtype=bool)

    def dense(m):
        return np.asarray(m.todense() if sp.issparse(m) else m, dtype=np.float32)

    if allx is not None:
        feats[:allx.shape[0]] = dense(allx)
        has[:allx.shape[0]] = True
    else:
        feats[:x.shape[0]] = dense(x)
        has[:x.shape[0]] = True
    labels[:ally.shape[0]] = np.where(ally.sum(1) > 0, ally.argmax(1), -1)
    feats[test_index] = dense(tx)
    has[test_index] = True
    labels[test_index] = np.where(ty.sum(1) > 0, ty.argmax(1), -1)
    src, dst = [], []
    for u, nbrs in graph.items():
        for v in nbrs:
            if u != v:
                src.append(u)
                dst.append(v)
    edges = np.unique(np.array([src + dst, dst + src], dtype=np.int64).T, axis=0)
    keep = has & (labels >= 0)
    if restricted or not keep.all():
        new = -np.ones(n_nodes, dtype=np.int64)
        new[keep] = np.arange(int(keep.sum()))
        feats, labels = feats[keep], labels[keep]
        e = new[edges]
        edges = e[(e >= 0).all(axis=1)]
    return {"name": name, "features": feats, "labels": labels, "edges": edges,
            "num_classes": int(n_classes), "restricted": restricted}
