"""Sphinx configuration of the scale_scvi documentation."""

from __future__ import annotations

import os
import sys
from importlib.metadata import version as _version

sys.path.insert(0, os.path.abspath(".."))

project = "scale_scvi"
author = "scale_scvi developers"
copyright = "2026, scale_scvi developers"
release = _version("scale-scvi")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Notebooks are committed with their outputs and never executed by the build.
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "remove"  # Lightning's and PyTorch's log lines, not results
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_member_order = "bysource"
# Members inherited from scvi-tools, PyTorch and Lightning are documented there, not here:
# autodoc skips a member that one of these classes defines (and the documented class does
# not override). Their docstrings are not all numpydoc and would not build with -W: torch's
# optimizer under FusedAdamW and Lightning's data module under SparseDataSplitter among
# them. The methods of SCALE that users call but scvi-tools defines are listed on the API
# page (docs/api.md), each with a page of its own.
autodoc_default_options = {
    "members": True,
    "inherited-members": (
        "ArchesMixin, VAEMixin, UnsupervisedTrainingMixin, BaseModelClass, BaseModuleClass, "
        "Module, Callback, Exception, "
        "AdamW, Adam, Optimizer, "
        "DataSplitter, LightningDataModule, DataHooks, HyperparametersMixin"
    ),
}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "comma"
always_document_param_types = False

html_theme = "sphinx_book_theme"
html_title = "scale_scvi"
html_theme_options = {
    "repository_url": "https://github.com/scale-scvi/scale-scvi",
    "use_repository_button": True,
    "show_toc_level": 2,
}
suppress_warnings = ["mystnb.unknown_mime_type"]


def _write_cli_help() -> None:
    """Write ``scale-scvi --help`` for docs/cli.md, so the page always matches the tool."""
    os.environ["COLUMNS"] = "92"
    from scale_scvi.cli import build_parser

    target = os.path.join(os.path.dirname(__file__), "_generated")
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "cli_help.txt"), "w") as handle:
        handle.write(build_parser().format_help())


_write_cli_help()
