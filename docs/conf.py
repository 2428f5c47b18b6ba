"""Sphinx configuration for the attnax docs (`make docs` builds them with -W)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import attnax  # noqa: E402

project = "attnax"
author = "attnax authors"
copyright = "2026, attnax authors"
release = attnax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_parser",
    "api_coverage",  # docs/_ext: fails the build when a public symbol is missing from docs/api/
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# External references (jax.Array, typing.Any, ...) would need intersphinx
# inventories, i.e. the network; references to attnax names are checked by
# the api_coverage extension instead.
nitpicky = False

# -- autodoc / napoleon -------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # no "Call self as a function." under every __call__
autosummary_generate = False
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- doctest --------------------------------------------------------------------
# Docstring examples run under pytest (`pytest --doctest-modules attnax`, part
# of `make test`); here only the examples in the narrative pages run.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import jax
import jax.numpy as jnp
import attnax
"""

# -- MyST -------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]
myst_heading_anchors = 3

# -- HTML -------------------------------------------------------------------------
html_theme = "furo"
html_title = f"attnax {release}"
html_theme_options = {"navigation_with_keys": True}


def _class_signature(app, what, name, obj, options, signature, return_annotation):
    """Replaces the ``(*args, **kwargs)`` that some classes show with something useful.

    A Protocol's constructor says nothing (its ``__call__`` is the contract): no
    signature. Flax NNX modules construct through a metaclass ``__call__``, which
    hides their ``__init__``: show the ``__init__`` signature.
    """
    if what != "class" or signature is None or not signature.startswith("(*args"):
        return None
    if getattr(obj, "_is_protocol", False):
        return "", None
    if "__init__" in vars(obj):
        from sphinx.ext.autodoc.preserve_defaults import update_defvalue
        from sphinx.util.inspect import signature as sphinx_signature
        from sphinx.util.inspect import stringify_signature

        update_defvalue(app, obj.__init__, True)  # defaults as written in the source
        sig = sphinx_signature(obj.__init__, bound_method=True)
        return stringify_signature(sig, show_return_annotation=False, unqualified_typehints=True), None
    return None


def setup(app):
    app.connect("autodoc-process-signature", _class_signature)
