import argparse
import gzip
import pickle
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from linsolve_rbp.cli.reproduce import register  # noqa: E402
from linsolve_rbp.experiments import _backward, citation, hopfield, hyperopt  # noqa: E402
from linsolve_rbp.problems import corrupt, data, load_digits  # noqa: E402

SMALL = (12, 6, 3)


def _contraction(n=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W = 0.7 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(n, generator=g, dtype=dtype)
    target = torch.randn(n, generator=g, dtype=dtype)

    def step(h, W_):
        return torch.tanh(h @ W_.T + x)

    def loss(h):
        return ((h - target) ** 2).sum()

    return step, W.requires_grad_(True), loss, torch.zeros(n, dtype=dtype)


def test_paper_mlp_has_44860_parameters_and_16_hparams():
    assert hyperopt.n_params() == 44_860
    assert hyperopt.init_hparams().shape == (hyperopt.N_HPARAMS,)
    assert hyperopt.init_params(seed=0).shape == (44_860,)


@pytest.mark.parametrize("method", ["bptt", "tbptt", "neumann", "rbp", "gmres"])
def test_hypergradient_shapes_and_finite(method):
    X, y = hyperopt.random_data(n=60, dim=12, classes=3, seed=1, dtype=torch.float64)
    hp = hyperopt.init_hparams(n_groups=4, dtype=torch.float64)
    loss, g, info = hyperopt.hypergradient(method, hp, (X, y), steps=6, truncate=3, batch_size=20,
                                           layer_sizes=SMALL)
    assert g.shape == (8,) and torch.isfinite(g).all() and np.isfinite(loss)
    assert info["graph_steps"] == {"bptt": 6, "tbptt": 3}.get(method, 1)


def test_hypergradient_bptt_matches_finite_differences():
    X, y = hyperopt.random_data(n=40, dim=12, classes=3, seed=2, dtype=torch.float64)
    hp = hyperopt.init_hparams(n_groups=4, dtype=torch.float64) + 0.2
    kw = dict(steps=4, batch_size=20, layer_sizes=SMALL)
    _, g, _ = hyperopt.hypergradient("bptt", hp, (X, y), **kw)
    for i in (0, 6):
        e = torch.zeros(8, dtype=torch.float64)
        e[i] = 1e-6
        lp = hyperopt.hypergradient("bptt", hp + e, (X, y), **kw)[0]
        lm = hyperopt.hypergradient("bptt", hp - e, (X, y), **kw)[0]
        assert float(g[i]) == pytest.approx((lp - lm) / 2e-6, rel=1e-4, abs=1e-10)


def test_hypergradient_rejects_bad_input():
    X, y = hyperopt.random_data(n=20, dim=12, classes=3)
    hp = hyperopt.init_hparams(n_groups=4)
    with pytest.raises(ValueError, match="method"):
        hyperopt.hypergradient("nope", hp, (X, y), layer_sizes=SMALL)
    with pytest.raises(TypeError, match="data"):
        hyperopt.hypergradient("bptt", hp, X, layer_sizes=SMALL)
    with pytest.raises(ValueError, match="hparams"):
        hyperopt.hypergradient("bptt", torch.zeros(3), (X, y), layer_sizes=SMALL)


@pytest.mark.parametrize("method", ["neumann", "gmres", "cgne", "rbp"])
def test_rbp_family_matches_bptt_at_converged_fixed_point(method):
    step, W, loss, h0 = _contraction()
    _, g_bptt, _, _ = _backward.backward("bptt", step, h0, (W,), loss, 200, None)
    _, g, _, res = _backward.backward(method, step, h0, (W,), loss, 200, 150,
                                      generator=torch.Generator().manual_seed(0))
    assert res.success
    torch.testing.assert_close(g[0], g_bptt[0], rtol=1e-6, atol=1e-8)


def test_random_start_rbp_is_less_accurate_than_neumann_at_k10():
    errs = []
    for seed in range(5):
        step, W, loss, h0 = _contraction(n=40, seed=seed)
        _, exact, _, _ = _backward.backward("neumann", step, h0, (W,), loss, 200, 200)
        gen = torch.Generator().manual_seed(seed)
        _, g_rbp, _, _ = _backward.backward("rbp", step, h0, (W,), loss, 200, 10, generator=gen)
        _, g_neu, _, _ = _backward.backward("neumann", step, h0, (W,), loss, 200, 10)
        errs.append((float((g_rbp[0] - exact[0]).norm()), float((g_neu[0] - exact[0]).norm())))
    assert all(r > n for r, n in errs), errs


def test_hopfield_rbp_fails_more_often_than_neumann_at_k10():
    imgs = load_digits()[0]
    cfg = hopfield.HopfieldConfig(hidden=32, steps=20, lr=1e-2)
    neu = [hopfield.train("neumann", imgs[:3], truncate=10, epochs=6, seed=s, cfg=cfg) for s in range(3)]
    rbp = [hopfield.train("rbp", imgs[:3], truncate=10, epochs=6, seed=s, cfg=cfg) for s in range(3)]
    assert all(len(r["train_loss"]) == 7 and len(r["val_acc"]) == 7 for r in neu + rbp)
    final_neu = np.mean([r["train_loss"][-1] for r in neu])
    final_rbp = np.mean([r["train_loss"][-1] for r in rbp])
    assert sum(r["success"] for r in rbp) <= sum(r["success"] for r in neu)
    assert final_rbp > final_neu


@pytest.mark.parametrize("method", ["bptt", "tbptt", "neumann"])
def test_hopfield_weights_stay_symmetric_with_zero_diagonal(method):
    imgs = load_digits()[0]
    cfg = hopfield.HopfieldConfig(hidden=16, steps=6, lr=1e-2)
    out = hopfield.train(method, imgs[:2], truncate=3, epochs=2, cfg=cfg, keep_weights=True)
    W = out["W"]
    assert float((W - W.T).abs().max()) == 0.0
    assert float(W.diagonal().abs().max()) == 0.0
    assert out["train_loss"][-1] != out["train_loss"][0]


def test_hopfield_corrupt_turns_off_half_the_lit_pixels():
    imgs, labels, _ = load_digits()
    assert imgs.shape == (10, 784) and list(labels) == list(range(10))
    c = corrupt(imgs, 0.5, seed=0)
    assert np.all(c <= imgs)
    # int(fraction * lit) pixels go off, as in the paper's code.
    np.testing.assert_array_equal(c.sum(1), imgs.sum(1) - (0.5 * imgs.sum(1)).astype(int))
    np.testing.assert_array_equal(c, corrupt(imgs, 0.5, seed=0))
    odd = np.ones((1, 7))
    assert corrupt(odd, 0.5, seed=0).sum() == 7 - 3


def test_hopfield_success_criterion():
    assert hopfield.success([1.0, 0.6, 0.49])
    assert not hopfield.success([1.0, 0.3, 0.51])


def _write_idx(path, arr):
    codes = {np.uint8: 0x08}
    header = struct.pack(">HBB", 0, codes[arr.dtype.type], arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_mnist_loader_reads_idx_and_names_missing_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_mnist("test", tmp_path, download=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    X, y = data.load_mnist("test", tmp_path, download=False)
    np.testing.assert_array_equal(X, images.reshape(7, 784))
    np.testing.assert_array_equal(y, labels)
    with pytest.warns(UserWarning, match="stand-in"):
        Xh, yh, source = data.load_hyperopt_data(tmp_path, n=5, download=False)
    assert source == "mnist-test" and Xh.shape == (5, 784)
    np.testing.assert_allclose(Xh.mean(0), 0, atol=1e-6)


def _write_planetoid(folder, name="toy", with_allx=True):
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    n_all, n_test, d, c = 8, 4, 5, 3
    feats = rng.random((n_all + n_test, d)).astype(np.float32)
    lab = np.eye(c, dtype=np.int32)[rng.integers(0, c, n_all + n_test)]
    test_index = np.arange(n_all, n_all + n_test)[::-1]
    objs = {"x": sp.csr_matrix(feats[:3]), "y": lab[:3], "allx": sp.csr_matrix(feats[:n_all]),
            "ally": lab[:n_all], "tx": sp.csr_matrix(feats[test_index]), "ty": lab[test_index],
            "graph": {i: [(i + 1) % (n_all + n_test), (i - 1) % (n_all + n_test)] for i in range(n_all + n_test)}}
    for ext, obj in objs.items():
        if ext == "allx" and not with_allx:
            continue
        with open(folder / f"ind.{name}.{ext}", "wb") as f:
            pickle.dump(obj, f)
    np.savetxt(folder / f"ind.{name}.test.index", test_index, fmt="%d")
    return feats, lab.argmax(1)


def test_planetoid_loader_reorders_test_nodes(tmp_path):
    feats, labels = _write_planetoid(tmp_path)
    g = data.load_planetoid("toy", tmp_path, download=False)
    np.testing.assert_allclose(g["features"], feats)
    np.testing.assert_array_equal(g["labels"], labels)
    assert g["num_classes"] == 3 and not g["restricted"]
    assert g["edges"].shape == (24, 2)
    assert {tuple(e) for e in g["edges"]} == {tuple(e[::-1]) for e in g["edges"]}


def test_planetoid_missing_allx_is_named_or_restricted(tmp_path):
    _write_planetoid(tmp_path, with_allx=False)
    with pytest.raises(FileNotFoundError, match="ind.toy.allx"):
        data.load_planetoid("toy", tmp_path, download=False)
    with pytest.warns(UserWarning, match="allx"):
        g = data.load_planetoid("toy", tmp_path, download=False, missing_allx="restrict")
    assert g["restricted"] and g["features"].shape == (7, 5)
    assert g["edges"].max() < 7


def test_pca_matches_numpy_projection_variance():
    X = np.random.default_rng(2).standard_normal((50, 10)) @ np.diag(np.arange(10, 0, -1.0))
    P = citation.pca(X, 3)
    ev = np.sort(np.linalg.eigvalsh(np.cov(X.T)))[::-1][:3]
    np.testing.assert_allclose(np.var(P, axis=0, ddof=1), ev, rtol=1e-4)
    with pytest.raises(ValueError, match="dim"):
        citation.pca(X, 11)


def test_citation_split_and_training_on_toy_graph():
    tr, va, te = citation.split(200, seed=0)
    assert (len(tr), len(va), len(te)) == (2, 98, 100)
    assert len(set(tr) | set(va) | set(te)) == 200
    rng = np.random.RandomState(0)
    n = 100
    g = {"features": rng.rand(n, 6).astype("float32"), "labels": rng.randint(0, 2, n),
         "edges": np.array([[i, (i + 1) % n] for i in range(n)] + [[(i + 1) % n, i] for i in range(n)]),
         "num_classes": 2, "name": "toy"}
    for m in ["tbptt", "neumann", "cgne"]:
        out = citation.train_gnn(m, g, epochs=3, steps=4, truncate=2, dim=3, eval_every=1)
        assert len(out["train_loss"]) == 3 and 0 <= out["test_acc"] <= 1
    assert 0 <= citation.train_baseline(g, dim=3)["test_acc"] <= 1


def test_register_cli_adds_reproduce(tmp_path):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    a = p.parse_args(["reproduce", "hyperopt", "--quick", "--out", str(tmp_path), "--cost-steps", "0",
                      "--methods", "neumann"])
    assert a.func(a) == 0
    assert (tmp_path / "hyperopt.json").is_file() and (tmp_path / "hyperopt_meta.png").is_file()
    b = p.parse_args(["reproduce", "citation", "--dataset", "cora", "--data-dir", str(tmp_path),
                      "--no-download", "--out", str(tmp_path)])
    assert b.func(b) == 2  # missing data: an error message naming the file, not a traceback
