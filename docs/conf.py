"""Sphinx configuration of the API reference: sphinx-build -W docs docs/_build/html."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the source tree, installed or not

import noisy_softmax_jax  # noqa: E402

project = "noisy-softmax-jax"
author = "The noisy-softmax-jax authors"
copyright = "2026, The noisy-softmax-jax authors"
version = release = noisy_softmax_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the Optax-style Args/Returns/Examples docstrings
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",  # the README's examples, included as they are tested
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
# The Args sections say what each argument is; jax.typing.ArrayLike, spelled out, is a
# ten-member Union that would bury them.
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields of the class, not a second description
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"noisy-softmax-jax {release}"
