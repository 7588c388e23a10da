"""Sphinx configuration of the linsolve_rbp documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import linsolve_rbp  # noqa: E402

project = "linsolve_rbp"
author = "linsolve_rbp contributors"
copyright = "linsolve_rbp contributors"
version = release = linsolve_rbp.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

templates_path = []
exclude_patterns = ["_build"]
html_theme = "pydata_sphinx_theme"
html_static_path = ["_static"] if os.path.isdir(os.path.join(os.path.dirname(__file__), "_static")) else []
html_title = f"linsolve_rbp {release}"
html_theme_options = {"navigation_with_keys": False}
