"""The ``linsolve-rbp`` command line and the problems behind ``compare``."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from linsolve_rbp import backend as _b
from linsolve_rbp.cli import main
from linsolve_rbp.problems import HopfieldNetwork, corrupt, load_digits


# compare draws its plot with matplotlib, from the cli extra.
needs_matplotlib = pytest.mark.skipif(not _b.has_module("matplotlib"), reason="needs matplotlib (the cli extra)")


def run_compare(tmp_path, capsys, *args):
    js = tmp_path / "out.json"
    rc = main(["compare", "--out", str(tmp_path / "plots"), "--json", str(js), *args])
    out = capsys.readouterr().out
    return rc, out, json.loads(js.read_text())


def by_method(doc):
    return {r["method"]: r for r in doc["results"]}


@needs_matplotlib
def test_compare_contractive_writes_table_plot_and_json(tmp_path, capsys):
    rc, out, doc = run_compare(tmp_path, capsys, "--problem", "contractive", "--size", "60", "--rho", "0.8",
                               "--methods", "fixed_point,gmres,cg,cgne")
    assert rc == 0
    header = out.splitlines()[1]
    for col in ("method", "status", "iters", "VJPs", "JVPs", "time [s]", "rel. residual", "rel. error"):
        assert col in header
    rows = by_method(doc)
    assert list(rows) == ["fixed_point", "gmres", "cg", "cgne"]
    assert rows["cg"]["status"] == "n/a: needs symmetric A"
    for m in ("fixed_point", "gmres", "cgne"):
        r = rows[m]
        assert r["status"] == "converged" and r["success"]
        assert r["rel_residual"] <= 1e-6 * 1.01
        assert r["rel_error"] < 1e-4
        assert len(r["history"]["products"]) == len(r["history"]["rel_residual"]) == r["iterations"] + 1
    assert rows["gmres"]["jvps"] == 0 and rows["gmres"]["vjps"] > 0
    assert rows["cgne"]["jvps"] > 0
    assert doc["problem"]["n"] == 60 and doc["settings"]["rtol"] == 1e-6
    png = tmp_path / "plots" / "compare-contractive.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in out.splitlines():
        if line.startswith("cg "):
            assert "n/a: needs symmetric A" in line


@needs_matplotlib
def test_compare_reports_failures(tmp_path, capsys):
    rc, out, doc = run_compare(tmp_path, capsys, "--problem", "contractive", "--size", "40", "--rho", "0.95",
                               "--maxiter", "3", "--methods", "fixed_point,neumann")
    assert rc == 0
    for r in doc["results"]:
        assert r["status"] == "max_iterations" and not r["success"]
        assert r["rel_residual"] > 1e-6
    assert out.count("max_iterations") == 2


@needs_matplotlib
def test_compare_symmetric_matrix_file_with_stored_rhs(tmp_path, capsys):
    M = sp.diags([-1.0, 2.5, -1.0], [-1, 0, 1], shape=(30, 30)).tocsr()
    b = np.arange(30.0)
    np.savez(tmp_path / "sys.npz", A=M.toarray(), b=b)
    rc, out, doc = run_compare(tmp_path, capsys, "--problem", str(tmp_path / "sys.npz"), "--methods", "cg,minres,gmres")
    assert rc == 0
    assert doc["problem"]["symmetric"] and not doc["problem"]["adjoint"]
    for r in doc["results"]:
        assert r["status"] == "converged"
        assert r["rel_error"] < 1e-4
    assert "A x" in out.splitlines()[1]
    scipy.io.mmwrite(tmp_path / "m.mtx", M)
    rc, out, doc = run_compare(tmp_path, capsys, "--problem", str(tmp_path / "m.mtx"), "--batch", "3",
                               "--methods", "cg")
    assert by_method(doc)["cg"]["status"] == "converged" and doc["problem"]["batch"] == 3


@needs_matplotlib
def test_compare_convdiff_batched(tmp_path, capsys):
    rc, _, doc = run_compare(tmp_path, capsys, "--problem", "convdiff", "--size", "8", "--batch", "3",
                             "--methods", "gmres,bicgstab,minres")
    rows = by_method(doc)
    assert rows["minres"]["status"] == "n/a: needs symmetric A"
    for m in ("gmres", "bicgstab"):
        assert rows[m]["status"] == "converged" and rows[m]["statuses"] == ["converged"] * 3
        assert rows[m]["rel_error"] < 1e-4


@needs_matplotlib
def test_compare_hopfield_batch_of_digits(tmp_path, capsys):
    # Each digit has its own Jacobian; the scipy bridge solves them one at a time.
    rc, out, doc = run_compare(tmp_path, capsys, "--batch", "2", "--methods", "gmres,scipy.gmres,neumann,cg")
    rows = by_method(doc)
    assert doc["problem"]["n"] == 2592 and doc["problem"]["batch"] == 2
    assert rows["cg"]["status"] == "n/a: needs symmetric A"
    for m in ("gmres", "scipy.gmres", "neumann"):
        assert rows[m]["status"] == "converged", rows[m]["message"]
        assert rows[m]["rel_error"] < 1e-4
    assert min(doc["problem"]["info"]["recall"]) > 0.95
    assert rows["neumann"]["vjps"] > rows["gmres"]["vjps"]


@needs_matplotlib
def test_compare_hopfield_torch_backend_matches_numpy(tmp_path, capsys):
    pytest.importorskip("torch")
    _, _, doc_t = run_compare(tmp_path, capsys, "--batch", "1", "--backend", "torch", "--methods", "gmres,lsqr")
    _, _, doc_n = run_compare(tmp_path, capsys, "--batch", "1", "--methods", "gmres,lsqr")
    for m in ("gmres", "lsqr"):
        rt, rn = by_method(doc_t)[m], by_method(doc_n)[m]
        assert rt["status"] == rn["status"] == "converged"
        # The numpy path takes its inner products from BLAS, torch from its own kernels: a
        # stop that falls on the tolerance may move by one iteration, no more.
        assert abs(rt["iterations"] - rn["iterations"]) <= 1, m
        assert rt["rel_error"] < 1e-4


@needs_matplotlib
def test_compare_gnn(tmp_path, capsys):
    pytest.importorskip("torch")
    _, _, doc = run_compare(tmp_path, capsys, "--problem", "gnn", "--size", "12", "--methods", "gmres,cgne,fixed_point")
    for r in doc["results"]:
        assert r["status"] == "converged", r["message"]
        assert r["rel_error"] < 1e-4
    assert doc["problem"]["n"] == 12 * 16


def test_hopfield_operator_matches_autograd_jacobian():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    n_obs, n = 5, 14
    W = rng.standard_normal((n, n))
    W = 0.4 * (W + W.T)
    np.fill_diagonal(W, 0.0)
    inputs = rng.integers(0, 2, (2, n_obs)).astype(float)
    net = HopfieldNetwork(W, inputs=inputs, targets=1.0 - inputs, n_obs=n_obs)
    h = rng.standard_normal((2, n))
    Wt = torch.tensor(W)
    for row in range(2):
        clamp = torch.tensor(net.clamp[row])
        free = torch.tensor(net.free)

        def F(s):  # the paper's update with a = 1, b = 0.5, observed units clamped
            return clamp + free * (Wt @ torch.sigmoid(0.5 * s))

        Jref = torch.autograd.functional.jacobian(F, torch.tensor(h[row])).numpy()
        np.testing.assert_allclose(net.jacobian(h, row), Jref, rtol=1e-12, atol=1e-14)
    J = net.adjoint_operator(h)
    V = rng.standard_normal((2, n))
    Jv, JTv = J.matvec(V), J.rmatvec(V)
    for row in range(2):
        np.testing.assert_allclose(Jv[row], net.jacobian(h, row) @ V[row], rtol=1e-12)
        np.testing.assert_allclose(JTv[row], net.jacobian(h, row).T @ V[row], rtol=1e-12)
    with pytest.raises(ValueError, match="2 systems"):
        J.matvec(V[:1])
    # dL/dh of the L1 loss, against autograd
    hv = torch.tensor(h, requires_grad=True)
    loss = (hv[:, -n_obs:] - torch.tensor(1.0 - inputs)).abs().mean(dim=1).sum()
    loss.backward()
    np.testing.assert_allclose(net.loss_grad(h), hv.grad.numpy(), rtol=1e-12)


def test_shipped_digits_and_corruption():
    images, labels, indices = load_digits()
    assert images.shape == (10, 784) and set(np.unique(images)) <= {0, 1}
    noisy = corrupt(images, 0.5, seed=1)
    assert np.all(noisy <= images)
    np.testing.assert_array_equal(noisy.sum(1), images.sum(1) - (images.sum(1) // 2))


@pytest.mark.parametrize(
    "args",
    [
        ["compare", "--rtol", "abc"],
        ["compare", "--rtol", "-1"],
        ["compare", "--maxiter", "0"],
        ["compare", "--batch", "0"],
        ["compare", "--backend", "jax"],
        ["compare", "--dtype", "float16"],
        ["compare", "--methods", "nope,gmres"],
        ["compare", "--rho", "0.5"],
        ["compare", "--size", "10"],
        ["compare", "--batch", "11"],
        ["compare", "--problem", "/no/such/file.mtx"],
        ["compare", "--problem", "convdiff", "--device", "cuda:0", "--backend", "numpy"],
        ["compare", "--problem", "gnn", "--backend", "numpy"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error" in err and "Traceback" not in err


def test_bad_matrix_file_exits_2(tmp_path, capsys):
    np.savez(tmp_path / "rect.npz", A=np.ones((3, 4)))
    (tmp_path / "junk.mtx").write_text("not a matrix market file\n")
    for f in ("rect.npz", "junk.mtx"):
        with pytest.raises(SystemExit) as exc:
            main(["compare", "--problem", str(tmp_path / f)])
        assert exc.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@needs_matplotlib
@pytest.mark.skipif(_b.has_module("cupy"), reason="cupy is installed")
def test_cupy_backend_without_cupy_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--backend", "cupy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cupy" in err.lower()


def test_python_m_help():
    out = subprocess.run([sys.executable, "-m", "linsolve_rbp", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "compare" in out.stdout
    out = subprocess.run([sys.executable, "-m", "linsolve_rbp", "compare", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--problem" in out.stdout


def test_run_compare_on_a_user_built_torch_case():
    """The docs' recipe: a Case from one's own model's Jacobian at its fixed point."""
    torch = pytest.importorskip("torch")
    import linsolve_rbp as lr
    from linsolve_rbp.adapters import torch as lrt
    from linsolve_rbp.cli.compare import Case, run_compare
    from linsolve_rbp.cli.report import format_table

    torch.manual_seed(0)
    n = 30
    W = torch.randn(n, n, dtype=torch.float64) * 0.8 / n**0.5
    x = torch.randn(n, dtype=torch.float64)

    def f(h):
        return torch.tanh(h @ W.T + x)

    h_star = lrt.fixed_point(f, torch.zeros(n, dtype=torch.float64), forward_tol=1e-12,
                             forward_maxiter=500).detach()
    grad_h = h_star - 1.0
    A = lr.IdentityOperator(n, like=grad_h) - lrt.JacobianOperator(f, h_star).T
    Jd = torch.autograd.functional.jacobian(f, h_star)
    z_ref = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - Jd.T, grad_h).numpy()[None, :]
    case = Case(name="mine", description="tanh RNN", A=A, b=grad_h, batched=False,
                symmetric=False, reference=lambda: z_ref)
    rows = {r["method"]: r for r in run_compare(case, ["gmres", "cgne", "cg"], rtol=1e-10)}
    assert rows["gmres"]["status"] == "converged" and rows["gmres"]["jvps"] == 0
    assert rows["cgne"]["status"] == "converged"
    # One JVP and one VJP per iteration; one more VJP (A = I - J^T) checks the claim.
    assert rows["cgne"]["jvps"] + 1 == rows["cgne"]["vjps"] and rows["cgne"]["jvps"] > 0
    assert rows["cg"]["status"].startswith("n/a")
    assert rows["gmres"]["rel_error"] < 1e-8 and rows["cgne"]["rel_error"] < 1e-8
    assert "gmres" in format_table(list(rows.values()))


def test_imports_load_no_plotting_or_progress_package():
    """Importing the library, the problems, the experiments and even the command line imports
    neither matplotlib nor tqdm: they load only when a plot is drawn or a bar is shown."""
    code = (
        "import sys\n"
        "import linsolve_rbp, linsolve_rbp.problems, linsolve_rbp.problems.data\n"
        "import linsolve_rbp.cli, linsolve_rbp.cli.compare, linsolve_rbp.cli.report, linsolve_rbp.cli.reproduce\n"
        "import linsolve_rbp.experiments.hopfield, linsolve_rbp.experiments.hyperopt\n"
        "import linsolve_rbp.experiments.citation, linsolve_rbp.experiments.fresh\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'tqdm')]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@needs_matplotlib
def test_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    code = (
        "import matplotlib\n"
        "from linsolve_rbp.cli import main\n"
        f"main(['compare', '--problem', 'contractive', '--size', '20', '--methods', 'gmres', '--out', {str(tmp_path)!r}])\n"
        "print(matplotlib.get_backend())\n"
    )
    env = dict(__import__("os").environ, MPLBACKEND="svg")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "svg"
    assert (tmp_path / "compare-contractive.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_without_matplotlib_names_the_cli_extra(monkeypatch, capsys):
    from linsolve_rbp import backend

    real = backend.has_module
    monkeypatch.setattr(backend, "has_module", lambda name: False if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--problem", "contractive", "--size", "20"])
    assert exc.value.code == 2
    assert "pip install linsolve_rbp[cli]" in capsys.readouterr().err
