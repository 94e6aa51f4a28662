"""Sphinx configuration of the workbench docs site.

The site is built from the repository root (``sphinx-build -c docs . build/docs/html``, what
``bash scripts/docs.sh`` runs): the front page, the reference pages in ``docs/``, the committed
notebooks as they are (never executed here) and the API pages from the docstrings.
"""

from __future__ import annotations

project = "workbench"
author = "the workbench authors"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx-mathjax-offline"]  # MathJax served with the site: no network needed

root_doc = "docs/index"
include_patterns = ["docs/**", "notebooks/*.ipynb", "data/README.md", "README.md"]
exclude_patterns = ["build", ".venv", "docs/conf.py", "docs/_root"]

nb_execution_mode = "off"  # the committed outputs are the ones shown
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]

napoleon_use_ivar = True  # dataclass attributes once, in their class

autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"

html_theme = "furo"
html_title = "workbench"
html_static_path: list[str] = []
html_extra_path = ["_root"]  # index.html at the site root points to docs/index.html
