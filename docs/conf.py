"""Sphinx configuration: ``make docs`` builds it with ``sphinx-build -W`` (warnings are errors)."""

from __future__ import annotations

import csv
import re
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).resolve().parent

project = "lossprune"
author = "lossprune developers"
copyright = "lossprune developers, MIT License"
release = _version("lossprune")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# reproduction.md is owned by the reproduction and included by reproducing.md; _build is output.
exclude_patterns = ["_build", "reproduction.md", "figures/**", "Thumbs.db", ".DS_Store"]

html_theme = "furo"
html_title = f"lossprune {release}"

# Google-style docstrings; `Attributes:` as :ivar: fields, so that dataclass fields documented in
# the class docstring are not described twice.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Pages included from outside docs/ that may not exist yet: the include is replaced by a note.
OPTIONAL_INCLUDES = {
    "reproducing": ("reproduction.md", "Reproducing the paper", "The reproduction report"),
    "benchmarks": ("../benchmarks/README.md", None, "The benchmark report"),
}


def _optional_include(app, docname: str, source: list[str]) -> None:
    """Replace the ``{include}`` of a missing optional page by a note; give it a title."""
    if docname not in OPTIONAL_INCLUDES:
        return
    path, title, what = OPTIONAL_INCLUDES[docname]
    target = HERE / path
    if target.exists():
        has_title = target.read_text(encoding="utf-8").lstrip().startswith("# ")
        if title and not has_title:
            source[0] = f"# {title}\n\n" + source[0]
        return
    note = f":::{{note}}\n{what} (`{path}`) is not written yet.\n:::\n"
    pattern = r"```\{include\} " + re.escape(path) + r"\n(:[^\n]*\n)*```\n"
    source[0] = (f"# {title}\n\n" if title else "") + re.sub(pattern, note, source[0])


def _error_table(app, docname: str, source: list[str]) -> None:
    """Render ``errors.csv`` (checked against the source by tests/test_docs.py) as a table."""
    if docname != "errors":
        return
    with (HERE / "errors.csv").open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 12 38 22 28", ""]
    lines += ["   * - Exception", "     - Message", "     - Raised by", "     - Test"]
    for row in rows:
        test = row["Test"].replace("::", " :: ")
        lines += [
            f"   * - ``{row['Exception']}``",
            f"     - ``{row['Message']}``",
            f"     - {row['Raised by']} (``{row['Source']}``)",
            f"     - ``{test}``",
        ]
    source[0] = source[0].replace(".. error-table::\n", "\n".join(lines) + "\n")


def setup(app):
    """Connect the source rewrites above."""
    app.connect("source-read", _optional_include)
    app.connect("source-read", _error_table)
