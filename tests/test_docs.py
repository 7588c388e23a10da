"""The documentation: docstring examples run, and the Sphinx site builds without warnings and
shows a reader what it should (offline mathematics, table headers, a sidebar, links)."""

import doctest
import importlib
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import linsolve_rbp

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(linsolve_rbp.__path__, prefix="linsolve_rbp.")
    if not m.name.endswith("__main__")
)
# The hand-written pages (api.html is made of docstrings).
PAGES = ("getting_started", "theory", "guide", "torch", "deq", "torchdeq", "cli", "reproduction",
         "benchmarks", "distributed", "adding_a_solver")
# Code blocks this wide fit the article at a 1280 px window without scrolling.
MAX_CODE_COLUMNS = 100


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (cupy, ...) that is not installed
        pytest.skip(f"{name}: {exc}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    has_torch = importlib.util.find_spec("torch") is not None
    failed = 0
    for test in finder.find(module, name, globs={}):
        runner = _Runner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, out=lambda text: None)
        if not has_torch and runner.needs_torch:
            continue  # an example of the torch extra, on an install without it
        failed += runner.failures
        for text in runner.reports:
            print(text)
    assert failed == 0, f"{failed} docstring example(s) of {name} failed (output above)"


class _Runner(doctest.DocTestRunner):
    """A doctest runner that keeps its reports and notes an example that needed torch."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.reports, self.needs_torch = [], False

    def report_failure(self, out, test, example, got):
        super().report_failure(self.reports.append, test, example, got)

    def report_unexpected_exception(self, out, test, example, exc_info):
        if isinstance(exc_info[1], ImportError) and "torch" in str(exc_info[1]):
            self.needs_torch = True
        super().report_unexpected_exception(self.reports.append, test, example, exc_info)


def test_every_public_name_has_an_example():
    missing = [n for n in ("solve", "LinearOperator", "IdentityOperator", "aslinearoperator")
               if ">>>" not in (getattr(linsolve_rbp, n).__doc__ or "")]
    assert not missing


# --- the built site ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site once with ``-W -n`` (every warning, and every unresolved cross-reference,
    is an error) and return ``(html_dir, page)``, ``page(name)`` the parsed HTML of a page."""
    for module in ("sphinx", "numpydoc", "pydata_sphinx_theme", "bs4"):
        pytest.importorskip(module)
    pytest.importorskip("torch", reason="the site documents the torch adapter")
    if importlib.util.find_spec("sphinx-mathjax-offline") is None:
        pytest.skip("sphinx-mathjax-offline (the docs extra) is not installed")
    from bs4 import BeautifulSoup

    out = tmp_path_factory.mktemp("docs") / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
         str(ROOT / "docs"), str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    cache = {}

    def page(name):
        if name not in cache:
            cache[name] = BeautifulSoup((out / f"{name}.html").read_text(encoding="utf-8"),
                                        "html.parser")
        return cache[name]

    return out, page


def test_site_has_every_page(site):
    out, page = site
    index = (out / "index.html").read_text(encoding="utf-8")
    for name in PAGES + ("api",):
        assert f"{name}.html" in index
    assert "linsolve_rbp.solve" in (out / "api.html").read_text(encoding="utf-8")


def test_mathematics_renders_offline(site):
    out, page = site
    for path in out.glob("*.html"):
        for script in page(path.stem).find_all("script", src=True):
            assert "//" not in script["src"], f"{path.name} loads {script['src']} from the network"
    for name in ("theory", "torch"):
        soup = page(name)
        mathjax = [s["src"] for s in soup.find_all("script", src=True) if "mathjax" in s["src"]]
        assert mathjax, f"{name}.html loads no MathJax"
        for src in mathjax:
            assert (out / src).is_file(), f"{name}.html loads {src}, which the build lacks"
        assert soup.select("div.math"), name  # the TeX, for MathJax to typeset
    theory = page("theory")
    assert theory.select("span.math")  # inline, too
    assert any("\\frac{dL}{dw}" in d.get_text() for d in theory.select("div.math"))


def test_every_table_has_its_header(site):
    out, page = site
    for name in PAGES:
        for table in page(name).find_all("table"):
            head = table.find("thead")
            if head is not None:
                cells = [th.get_text(" ", strip=True) for th in head.find_all("th")]
                assert all(cells), f"{name}.html: a header cell is empty: {cells}"
    tables = [t for t in page("reproduction").find_all("table")
              if t.find("caption") and "Table 3" in t.find("caption").get_text()]
    assert len(tables) == 1
    header = [th.get_text(" ", strip=True) for th in tables[0].find("thead").find_all("th")]
    assert header == ["quantity", "paper (GPU)", "here (CPU, one thread)"]


def test_sidebar_lists_the_pages(site):
    out, page = site
    for name in ("theory", "torch", "api"):
        nav = page(name).select_one(".bd-sidebar-primary nav.bd-docs-nav")
        assert nav is not None, name
        links = {a["href"] for a in nav.find_all("a", href=True)}
        others = {f"{p}.html" for p in PAGES + ("api",) if p != name}
        assert others <= links, f"{name}.html: the sidebar lacks {sorted(others - links)}"
        # and the current page's sections
        assert page(name).select(".bd-sidebar-primary nav.page-toc a[href^='#']"), name


def test_code_blocks_fit_the_article(site):
    out, page = site
    assert (out / "_static" / "custom.css").is_file()
    for name in PAGES:
        for pre in page(name).select("div.highlight pre"):
            for line in pre.get_text().splitlines():
                assert len(line) <= MAX_CODE_COLUMNS, f"{name}.html: {line!r}"


def test_no_dead_cross_references(site):
    # A reference Sphinx resolved is a link around the name (``<a class="reference ...">
    # <code class="xref ...">``); one it did not is the bare ``<code class="xref ...">``.
    out, page = site
    for path in out.glob("*.html"):
        soup = page(path.stem)
        dead = [c.get_text() for c in soup.select("code.xref") if c.parent.name != "a"]
        assert not dead, f"{path.name}: unresolved references {dead}"
    # the package's own names link into the site, other projects' to their documentation
    cli = page("cli")
    internal = {a.get_text() for a in cli.select("a.reference.internal code.xref")}
    assert {"linsolve_rbp.methods()", "linsolve_rbp.solve()"} <= internal
    external = [a["href"] for a in cli.select("a.reference.external[href]")
                if "scipy.sparse.save_npz" in a["href"]]
    assert external and all(h.startswith("https://docs.scipy.org/") for h in external)


def test_reproduce_options_are_documented(site):
    out, page = site
    section = page("cli").find(id="linsolve-rbp-reproduce")
    assert section is not None
    text = section.get_text(" ")
    for option in ("--quick", "--progress", "--methods", "--cost-steps", "--data-dir"):
        assert option in text, option
    text = page("reproduction").get_text(" ")
    assert "--quick" in text and "--progress" in text


def test_pages_state_the_memory_setting_of_the_code(site):
    # The memory process's environment, stated on two pages, is the one the code sets.
    from linsolve_rbp.experiments.fresh import MEMORY_ENV

    out, page = site
    assert list(MEMORY_ENV) == ["MALLOC_MMAP_THRESHOLD_"]
    value = MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"]
    for name in ("reproduction", "benchmarks"):
        stated = re.findall(r"MALLOC_MMAP_THRESHOLD_=(\S+)", page(name).get_text())
        assert stated, f"{name}.html does not state the threshold"
        assert set(stated) == {value}, f"{name}.html states {stated}, the code sets {value}"


def test_table3_is_read_from_the_committed_json(site):
    # "Every number below is read from the JSON file named beside it": the cost table.
    import json

    out, page = site
    cost = json.loads((ROOT / "docs" / "_static" / "reproduction" / "hyperopt.json")
                      .read_text())["cost"]
    Ks = sorted(cost["neumann"], key=int)
    table = next(t for t in page("reproduction").find_all("table")
                 if t.find("caption") and "Table 3" in t.find("caption").get_text())
    here = {}
    for tr in table.find("tbody").find_all("tr"):
        cells = [td.get_text(" ", strip=True) for td in tr.find_all("td")]
        here[cells[0]] = cells[2]
    assert here["BPTT, time"] == f"{cost['bptt']['time_s']:.2f} s"
    assert here["BPTT, memory"] == f"{cost['bptt']['memory_mb']:.0f} MB"
    assert here["Neumann-RBP, time"] == " / ".join(
        f"{cost['neumann'][k]['time_s']:.2f}" for k in Ks) + " s"
    assert here["Neumann-RBP, memory"] == " / ".join(
        f"{cost['neumann'][k]['memory_mb']:.1f}" for k in Ks) + " MB"
    assert here["time ratio"] == " / ".join(f"{cost['ratios'][k]['time']:.2f}" for k in Ks)
    assert here["memory ratio"] == " / ".join(f"{cost['ratios'][k]['memory']:.1f}" for k in Ks)


def test_theory_and_torch_agree_on_products_per_iteration(site):
    # "products per iteration" of each method, in the tables of the Theory and Torch pages
    out, page = site

    def table(name):
        rows = {}
        for tr in page(name).select("table tbody tr"):
            cells = [td.get_text(" ", strip=True) for td in tr.find_all("td")]
            if len(cells) >= 2 and cells[0] in ("bicgstab", "gmres", "cgne", "lsqr", "neumann"):
                rows[cells[0]] = cells[1]
        return rows

    theory, torch_page = table("theory"), table("torch")
    assert theory.get("bicgstab") == "2 VJPs"
    for method in set(theory) & set(torch_page):
        assert theory[method] == torch_page[method], method
