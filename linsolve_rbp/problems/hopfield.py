"""The continuous Hopfield associative memory of Liao et al. (2018) and its adjoint system.

The network has ``784`` observed, ``1024`` hidden and ``784`` output units (``n = 2592``). Its
state follows ``h <- (1 - a) h + W sigmoid(b h)`` with ``a = 1`` and ``b = 0.5``, and the observed
units are clamped to an image through a mask, so the map is

    F(h) = m * x + (1 - m) * (W sigmoid(h / 2)),

with ``m`` the 0/1 mask of the observed units and ``x`` the clamped values. The loss is the L1
distance between the output units and the image. At the fixed point ``h* = F(h*)`` the gradient
of the loss with respect to the weights is ``z^T dF/dW`` with ``(I - J^T) z = dL/dh*`` and
``J = dF/dh = diag(1 - m) W diag(sigmoid'(h* / 2) / 2)``: the linear system that
``linsolve-rbp compare`` solves.

The weights are not trained; :func:`hopfield_weights` builds them in closed form so that the ten
shipped digits are exact fixed points and the map contracts at the fixed points reached from
corrupted digits (see its Notes).
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from .. import backend as _b
from .._validate import nonnegative_real
from ..operators import LinearOperator

__all__ = [
    "N_PIXELS",
    "N_HIDDEN",
    "N_UNITS",
    "load_digits",
    "hopfield_weights",
    "corrupt",
    "HopfieldNetwork",
]

N_PIXELS = 784
N_HIDDEN = 1024
N_UNITS = 2 * N_PIXELS + N_HIDDEN
GAIN = 0.5  # b in h <- (1 - a) h + W sigmoid(b h); a = 1 so the leak term vanishes


def load_digits():
    """The ten binarised MNIST digits shipped with the package.

    Returns
    -------
    images : numpy.ndarray of uint8, shape (10, 784)
        0/1 pixels, row-major 28 x 28; row ``k`` is a ``k``.
    labels : numpy.ndarray of int64, shape (10,)
    indices : numpy.ndarray of int64, shape (10,)
        The MNIST training-set index of each image (provenance in ``linsolve_rbp/data/README.md``).

    Examples
    --------
    >>> from linsolve_rbp.problems import load_digits
    >>> images, labels, indices = load_digits()
    >>> images.shape, labels.tolist()
    ((10, 784), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    with resources.files("linsolve_rbp").joinpath("data/hopfield_digits.npz").open("rb") as fh:
        with np.load(fh) as data:
            return data["images"].copy(), data["labels"].copy(), data["indices"].copy()


def _act(h):
    return 1.0 / (1.0 + np.exp(-GAIN * h))


def hopfield_weights(images=None, *, code_scale: float = 2.0, hebbian_gain: float = 7.0,
                     seed: int = 0) -> np.ndarray:
    """Symmetric, zero-diagonal weights that store ``images`` in the Hopfield network.

    Parameters
    ----------
    images : array of shape (K, 784), optional
        0/1 patterns to store; default the ten shipped digits.
    code_scale : float
        Magnitude ``c`` of the hidden code of each pattern (its entries are ``+c`` or ``-c``).
    hebbian_gain : float
        Gain ``beta`` of the Hebbian coupling among the hidden units; it sets how strongly the
        hidden layer pulls a noisy state towards a stored code, and with it the contraction
        rate of the map at the fixed point (0.88 to 0.97 for the ten digits with the defaults).
    seed : int
        Seed of the hidden codes.

    Returns
    -------
    numpy.ndarray of float64, shape (2592, 2592)

    Notes
    -----
    Units are ordered observed (``o``, 784), hidden (``z``, 1024), output (``y``, 784), and
    ``s(h) = sigmoid(h / 2)``. Each pattern ``x_k`` gets a random hidden code
    ``c_k in {-1, +1}^1024`` and the target state ``(x_k, c c_k, x_k)``. The weights have three
    blocks and their transposes, nothing else (so ``W`` is symmetric with a zero diagonal):

    - hidden-hidden, Hebbian (Hopfield, 1982): ``W_zz = (beta / 1024) sum_k c_k c_k^T`` with
      the diagonal removed;
    - output <- hidden, by the pseudo-inverse (projection) rule of Personnaz et al. (1985):
      ``W_yz = X^T pinv(S_z)^T``, so that ``W_yz s(c c_k) = x_k`` for every ``k``;
    - hidden <- observed, again by pseudo-inverse: ``W_zo`` solves
      ``s(X) W_zo^T = c C - S_z W_zz - s(X) W_zy^T`` in the least-norm sense, which makes every
      target state an exact fixed point of the clamped map.

    Here ``X`` stacks the ``x_k``, ``C`` the codes and ``S_z = s(c C)``. With the defaults the
    network recalls the ten digits from copies with half of their lit pixels turned off (the
    paper's validation corruption) with at least 99 % of the output pixels right after
    thresholding at 0.5; :class:`HopfieldNetwork` reports the recall of each solve.

    References
    ----------
    J. J. Hopfield, "Neural networks and physical systems with emergent collective computational
    abilities", PNAS 79 (1982). L. Personnaz, I. Guyon, G. Dreyfus, "Information storage and
    retrieval in spin-glass like neural networks", J. Physique Lettres 46 (1985).

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.problems import hopfield_weights
    >>> W = hopfield_weights()
    >>> W.shape, bool(np.all(W == W.T)), bool(np.all(np.diag(W) == 0))
    ((2592, 2592), True, True)
    """
    if images is None:
        images = load_digits()[0]
    X = np.asarray(images, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != N_PIXELS:
        raise ValueError(f"images must have shape (K, {N_PIXELS}), got {X.shape}")
    if not code_scale > 0:
        raise ValueError(f"code_scale must be positive, got {code_scale!r}")
    if not hebbian_gain >= 0:
        raise ValueError(f"hebbian_gain must be non-negative, got {hebbian_gain!r}")
    rng = np.random.default_rng(seed)
    C = rng.choice([-1.0, 1.0], size=(X.shape[0], N_HIDDEN))
    Z = code_scale * C
    Wzz = (hebbian_gain / N_HIDDEN) * (C.T @ C)
    np.fill_diagonal(Wzz, 0.0)
    Sz, Sx = _act(Z), _act(X)
    Wyz = (np.linalg.pinv(Sz) @ X).T
    Wzo = (np.linalg.pinv(Sx) @ (Z - Sz @ Wzz - Sx @ Wyz)).T
    o, z, y = _blocks()
    W = np.zeros((N_UNITS, N_UNITS))
    W[z, o], W[o, z] = Wzo, Wzo.T
    W[z, z] = Wzz
    W[y, z], W[z, y] = Wyz, Wyz.T
    return W


def _blocks(n_obs=N_PIXELS, n_hidden=N_HIDDEN):
    return (slice(0, n_obs), slice(n_obs, n_obs + n_hidden),
            slice(n_obs + n_hidden, 2 * n_obs + n_hidden))


def corrupt(images, fraction: float = 0.5, seed: int = 1234) -> np.ndarray:
    """Copies of ``images`` with ``fraction`` of the lit pixels of each turned off.

    This is the validation corruption of the paper's public code: ``int(fraction * lit)``
    pixels (rounded down, as ``rand_corrupt`` in ``runner/hopfield_runner.py`` of
    github.com/lrjconan/RBP) drawn from a fixed random state. One random stream serves all
    the images in turn.

    Parameters
    ----------
    images : array of shape (K, p) with 0/1 entries
    fraction : float in [0, 1]
    seed : int

    Returns
    -------
    numpy.ndarray of float64, shape (K, p)

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.problems import corrupt
    >>> float(corrupt(np.ones((1, 8)), 0.5, seed=0).sum())
    4.0
    """
    fraction = nonnegative_real(fraction, "fraction")
    if fraction > 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    rng = np.random.RandomState(seed)
    out = np.array(images, dtype=np.float64)
    for row in out:
        lit = np.flatnonzero(row)
        row[rng.choice(lit, int(len(lit) * fraction), replace=False)] = 0.0
    return out


class HopfieldNetwork:
    """The clamped Hopfield map ``F(h) = m * x + (1 - m) * (W sigmoid(h / 2))`` for a batch of
    clamped inputs, with its fixed point, loss and exact Jacobian products.

    Parameters
    ----------
    W : numpy.ndarray, shape (n, n)
        Symmetric weights (:func:`hopfield_weights` for the full-size network).
    inputs : numpy.ndarray, shape (B, n_obs)
        The values clamped on the observed units, one row per system.
    targets : numpy.ndarray, shape (B, n_obs)
        The images the output units should reproduce (the L1 loss compares them).
    n_obs : int
        Number of observed units (and of output units); the hidden units are the rest.

    Notes
    -----
    Units are ordered observed, hidden, output. Everything is float64 numpy; the adjoint
    operator of :meth:`adjoint_operator` is then moved to the backend asked for.
    :mod:`linsolve_rbp.experiments.hopfield` trains the same network's weights in torch. With
    ``d = sigmoid'(h / 2) / 2`` at ``h*``, ``J v = (1 - m) * (W (d * v))`` and, since ``W`` is
    symmetric, ``J^T u = d * (W ((1 - m) * u))``: one product with ``W`` each.

    Examples
    --------
    >>> import numpy as np
    >>> from linsolve_rbp.problems import HopfieldNetwork
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((7, 7)); W = 0.3 * (W + W.T); np.fill_diagonal(W, 0)
    >>> net = HopfieldNetwork(W, inputs=np.ones((1, 2)), targets=np.ones((1, 2)), n_obs=2)
    >>> h, iters = net.fixed_point()
    >>> bool(np.allclose(net.step(h), h))
    True
    """

    def __init__(self, W, inputs, targets, n_obs: int = N_PIXELS):
        W = np.asarray(W, dtype=np.float64)
        inputs = np.atleast_2d(np.asarray(inputs, dtype=np.float64))
        targets = np.atleast_2d(np.asarray(targets, dtype=np.float64))
        n = W.shape[0]
        if W.ndim != 2 or W.shape != (n, n) or n <= 2 * n_obs:
            raise ValueError(f"W must be square with more than 2 * n_obs = {2 * n_obs} rows, got {W.shape}")
        if not np.allclose(W, W.T):
            raise ValueError("W must be symmetric")
        if inputs.shape[1] != n_obs or targets.shape != inputs.shape:
            raise ValueError(
                f"inputs and targets must both have shape (B, {n_obs}), got {inputs.shape} and {targets.shape}"
            )
        self.W, self.n, self.n_obs = W, n, n_obs
        self.blocks = _blocks(n_obs, n - 2 * n_obs)
        self.free = np.ones(n)
        self.free[self.blocks[0]] = 0.0
        self.clamp = np.zeros((inputs.shape[0], n))
        self.clamp[:, self.blocks[0]] = inputs
        self.targets = targets

    @property
    def batch(self) -> int:
        return self.clamp.shape[0]

    def step(self, h):
        """One update ``F(h)`` of a ``(B, n)`` state."""
        return self.clamp + self.free * (_act(h) @ self.W)

    def fixed_point(self, h0=None, tol: float = 1e-12, maxiter: int = 5000):
        """Iterate ``h <- F(h)`` from ``h0`` (default zero) until
        ``||F(h) - h|| <= tol ||F(h)||`` for every row.

        Returns
        -------
        h : numpy.ndarray, shape (B, n)
        iterations : int

        Raises
        ------
        RuntimeError
            When the iteration has not met ``tol`` after ``maxiter`` updates.
        """
        h = np.zeros((self.batch, self.n)) if h0 is None else np.array(h0, dtype=np.float64)
        for k in range(1, maxiter + 1):
            hn = self.step(h)
            done = np.linalg.norm(hn - h, axis=1) <= tol * np.linalg.norm(hn, axis=1)
            h = hn
            if done.all():
                return h, k
        raise RuntimeError(f"the Hopfield forward iteration did not reach tol={tol} in {maxiter} updates")

    def outputs(self, h):
        return h[:, self.blocks[2]]

    def loss(self, h):
        """Per-row L1 loss ``mean |y - target|`` over the output units."""
        return np.mean(np.abs(self.outputs(h) - self.targets), axis=1)

    def loss_grad(self, h):
        """``dL/dh`` of :meth:`loss` (a subgradient: ``sign(0) = 0``), shape ``(B, n)``."""
        g = np.zeros_like(h)
        g[:, self.blocks[2]] = np.sign(self.outputs(h) - self.targets) / self.n_obs
        return g

    def slopes(self, h):
        """``d = dF/d(W sigmoid)`` slopes ``sigmoid'(h / 2) / 2`` at ``h``, shape ``(B, n)``."""
        s = _act(h)
        return GAIN * s * (1.0 - s)

    def jacobian(self, h, row: int = 0):
        """The dense Jacobian ``J = dF/dh`` of system ``row`` at ``h`` (for references)."""
        d = self.slopes(h)[row]
        return self.free[:, None] * self.W * d[None, :]

    def adjoint_operator(self, h, backend="numpy", *, dtype=None, device=None):
        """The operator ``J`` at ``h`` (rows are systems) with matvec ``J v`` and rmatvec
        ``J^T u``, both exact (no differentiation), in ``backend`` (a name or an array to
        match, as for :func:`linsolve_rbp.backend.to_backend`; default numpy float64).

        The products act row by row with each system's own Jacobian, so they accept ``(B, n)``
        batches (and ``(n,)`` vectors when ``B = 1``) only.
        """
        dtype = np.float64 if dtype is None else dtype

        def conv(a):
            return _b.to_backend(a, backend, dtype=dtype, device=device)

        W = conv(self.W)
        d = conv(self.slopes(h))
        free = conv(self.free)
        B, n = d.shape

        def rows(v, what):
            if v.ndim == 1:
                if B != 1:
                    raise ValueError(f"this operator holds {B} systems; {what} takes (B, n) batches")
                return d[0, ...], v
            if v.shape[0] != B:
                raise ValueError(f"this operator holds {B} systems; {what} got {v.shape[0]} rows")
            return d, v

        def jv(v):
            dd, v = rows(v, "J v")
            return free * ((dd * v) @ W)

        def jtu(u):
            dd, u = rows(u, "J^T u")
            return dd * ((free * u) @ W)

        like = conv(np.zeros(1))
        return LinearOperator((n, n), matvec=jv, rmatvec=jtu, like=like)
