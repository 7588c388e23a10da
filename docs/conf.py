"""Sphinx configuration of the linsolve_rbp documentation.

The build needs no network: mathematics is rendered by a MathJax copy shipped with the
``sphinx-mathjax-offline`` package (the ``docs`` extra), and cross-references to Python and
scipy resolve against inventories kept in ``docs/_inv``. Build with
``python -m sphinx -W -n -b html docs docs/_build/html``.
"""

import importlib
import os
import sys

from docutils import nodes

sys.path.insert(0, os.path.abspath(".."))

import linsolve_rbp  # noqa: E402
from linsolve_rbp.experiments.fresh import MEMORY_ENV  # noqa: E402

project = "linsolve_rbp"
author = "linsolve_rbp contributors"
copyright = "linsolve_rbp contributors"
version = release = linsolve_rbp.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    # Ships MathJax 3 and points ``mathjax_path`` at the copy in ``_static/mathjax``, so that
    # formulas render without a network (the default loads MathJax from a CDN).
    "sphinx-mathjax-offline",
    "sphinx.ext.intersphinx",
    "numpydoc",
]

autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# Every cross-reference must resolve (``-n``/``nitpicky`` with ``-W`` makes a dead one an error).
nitpicky = True

# Cross-references to other projects' documentation, resolved offline from inventories kept in
# docs/_inv (the ``objects.inv`` of the Debian 12 packages python3.11-doc 3.11.2-6+deb12u8 and
# python-scipy-doc 1.10.1-2, whose HTML is the upstream documentation of those versions).
_INV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_inv")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3.11/", os.path.join(_INV, "python.inv")),
    "scipy": ("https://docs.scipy.org/doc/scipy-1.10.1/", os.path.join(_INV, "scipy.inv")),
}

# Projects without a packaged inventory: references to their names (``:func:`torch.no_grad```)
# are rendered as plain literals, not as links and not as unresolved cross-references.
_NO_INVENTORY = ("torch", "numpy", "cupy", "cupyx", "array_api_compat", "matplotlib", "tqdm")


def _import(dotted):
    """The object named ``dotted`` (``pkg.module.attr...``), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            try:
                module = importlib.import_module(".".join(parts[:i]))
            except Exception:
                continue
        obj = module
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _candidates(node):
    """Full names a ``py`` reference may mean, as Sphinx's own lookup tries them."""
    target = node.get("reftarget", "").lstrip(".~")
    module, cls = node.get("py:module"), node.get("py:class")
    names = [target]
    if module:
        names.append(f"{module}.{target}")
        if cls:
            names.append(f"{module}.{cls}.{target}")
        # a public module that documents names from its private submodules (``solvers`` and
        # ``solvers._base``): the docstring's own relative names live there
        names += [f"{sub}.{target}" for sub in sorted(sys.modules)
                  if sub.startswith(module + "._") and sub.count(".") == module.count(".") + 1]
    return names


def _documented(app, env):
    """``id(object) -> full name`` of every object this site documents (kept on the
    application, which lives for one build; the environment is pickled between builds)."""
    cache = getattr(app, "_lr_documented", None)
    if cache is None:
        cache = {}
        for name in env.domains["py"].objects:
            obj = _import(name)
            if obj is not None and not isinstance(obj, (str, int, float, bool, tuple, type(None))):
                cache.setdefault(id(obj), name)
        app._lr_documented = cache
    return cache


def _missing_reference(app, env, node, contnode):
    """Resolve what Sphinx's lookup cannot, or make it a plain literal, or leave it missing.

    - a name of a project without an inventory (``_NO_INVENTORY``): a plain literal;
    - a name of this package that is documented under another path (a re-export, such as
      ``linsolve_rbp.problems.hopfield.load_digits`` documented as
      ``linsolve_rbp.problems.load_digits``, or a relative name such as ``methods`` in a module
      that imported :func:`linsolve_rbp.methods`): a link to the documented object;
    - a private name of this package (a part of its name or of its module's starting with
      ``_``: ``experiments._backward``, ``LinearOperator._detect_symmetric``,
      ``solvers._base.run_scaled``), which the site does not document on purpose: a plain
      literal;
    - anything else stays missing, and fails the ``-n -W`` build.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    text = contnode.astext()
    if target.split(".")[0] in _NO_INVENTORY:
        return nodes.literal(text, text)
    for name in _candidates(node):
        if not name.startswith("linsolve_rbp."):
            continue
        obj = _import(name)
        if obj is None:
            continue
        documented = _documented(app, env).get(id(obj))
        if documented is not None:
            return env.domains["py"].resolve_xref(
                env, node["refdoc"], app.builder, "obj", documented, node, contnode)
        where = name.split(".") + str(getattr(obj, "__module__", "") or "").split(".")
        if any(part.startswith("_") and not part.startswith("__") for part in where):
            return nodes.literal(text, text)
    return None


# One source for a value that two pages state: the environment of the fresh process that
# measures peak memory (``linsolve_rbp.experiments.fresh.MEMORY_ENV``).
rst_epilog = ".. |memory_env| replace:: ``{}``\n".format(
    " ".join(f"{name}={value}" for name, value in MEMORY_ENV.items()))

templates_path = ["_templates"]
exclude_patterns = ["_build", "_inv"]
html_theme = "pydata_sphinx_theme"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_title = f"linsolve_rbp {release}"
html_theme_options = {
    "navigation_with_keys": False,
    # The pages are one flat list; the left sidebar shows all of them, with the current page's
    # sections (so no right-hand "on this page" column takes width from the text), and the top
    # bar only the project name, search and theme switch.
    "navbar_center": [],
    "secondary_sidebar_items": [],
}
html_sidebars = {"**": ["sidebar-pages.html", "page-toc.html"]}


def setup(app):
    app.connect("missing-reference", _missing_reference)
