"""The documentation keeps up with the code: every public name documented, every error listed.

- every name in ``lossprune.__all__`` and every public function and class of
  ``lossprune.curvature``, ``lossprune.selection`` and ``lossprune.sparse`` has a docstring and an
  entry in ``docs/api.rst``;
- ``docs/errors.csv`` (rendered by ``docs/errors.rst``) lists every ``raise`` of the library and
  of the reproduction (``lossprune.experiments``, whose command line prints each as one line),
  each with a test function that exists;
- the Python examples of the user guide run.

``make docs`` builds the HTML with warnings as errors; it is not run here (it needs the ``docs``
extra).
"""

from __future__ import annotations

import ast
import csv
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import lossprune

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lossprune"
DOCS = ROOT / "docs"
ERROR_TABLE = DOCS / "errors.csv"
ERROR_COLUMNS = ["Exception", "Message", "Raised by", "Source", "Test"]
# Raised and caught inside the library, or abstract-method placeholders: never reach a user.
INTERNAL_EXCEPTIONS = {"NotImplementedError", "NotAChain", "_Stop"}


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no ``_`` component.

    ``lossprune.experiments`` (the reproduction and its command line) is documented in
    docs/reproducing.md and docs/reproduction.md instead of the API reference.
    """
    return sorted(
        info.name
        for info in pkgutil.walk_packages(lossprune.__path__, prefix="lossprune.")
        if not any(part.startswith("_") for part in info.name.split("."))
        and not info.name.startswith("lossprune.experiments")
    )


def public_names() -> list[tuple[str, object]]:
    """(documented name, object) for every public function and class of every public module."""
    names = [(f"lossprune.{n}", getattr(lossprune, n)) for n in lossprune.__all__]
    seen = {id(obj) for _, obj in names}  # NonFiniteError is lossprune.NonFiniteError
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and id(obj) not in seen:
                names.append((f"{module_name}.{name}", obj))
                seen.add(id(obj))
    return names


@pytest.mark.parametrize("name, obj", public_names(), ids=[n for n, _ in public_names()])
def test_public_name_has_a_docstring(name, obj):
    if name == "lossprune.__version__":
        assert isinstance(obj, str) and obj
        return
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"{name} has no docstring"


def test_public_methods_have_docstrings():
    missing = []
    for name, obj in public_names():
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            documentable = inspect.isfunction(value) or isinstance(value, property)
            if attr.startswith("_") or not documentable:
                continue
            if not inspect.getdoc(value):
                missing.append(f"{name}.{attr}")
    assert not missing, f"public methods without a docstring: {missing}"


def test_api_reference_lists_every_public_name():
    text = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. (?:auto\w+|py:data):: (\S+)", text, re.M))
    current = "lossprune"
    full = set()
    for line in text.splitlines():
        if match := re.match(r"\.\. currentmodule:: (\S+)", line):
            current = match.group(1)
        elif match := re.match(r"\.\. (?:auto\w+|py:data):: (\S+)", line):
            name = match.group(1)
            full.add(name if name.startswith("lossprune") else f"{current}.{name}")
    assert documented
    missing = [name for name, _ in public_names() if name not in full]
    assert not missing, f"not in docs/api.rst: {missing}"


# --------------------------------------------------------------------------------------------
# The error table
# --------------------------------------------------------------------------------------------


def _message(node: ast.AST | None) -> str:
    """The literal text of an error message, ``…`` for every formatted value."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message(node.left) + _message(node.right)
    return "…"


def raise_sites(src: Path = SRC) -> list[dict[str, str]]:
    """Every ``raise Exception(message)`` of the library, as the table's key columns."""
    sites = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src.parent)
        module = ".".join(relative.with_suffix("").parts)
        tree = ast.parse(path.read_text())
        scopes: list[str] = []

        def visit(
            node: ast.AST, scopes: list[str] = scopes, module: str = module, path: Path = path
        ) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scopes = [*scopes, node.name]
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc
                call = exc if isinstance(exc, ast.Call) else None
                target = call.func if call else exc
                name = getattr(target, "id", getattr(target, "attr", "?"))
                if name not in INTERNAL_EXCEPTIONS:
                    message = _message(call.args[0] if call and call.args else None)
                    source = f"{module.removeprefix('lossprune.')}.{'.'.join(scopes)}"
                    sites.append(
                        {
                            "Exception": name,
                            "Message": message,
                            "Source": source,
                            "line": f"{path}:{node.lineno}",
                        }
                    )
            for child in ast.iter_child_nodes(node):
                visit(child, scopes, module, path)

        visit(tree)
    return sites


def error_table() -> list[dict[str, str]]:
    with ERROR_TABLE.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert rows and list(rows[0]) == ERROR_COLUMNS
    return rows


def _key(row: dict[str, str]) -> tuple[str, str, str]:
    return row["Exception"], row["Message"], row["Source"]


def test_error_table_lists_every_raise_of_the_library():
    rows = {_key(row) for row in error_table()}
    missing = [site for site in raise_sites() if _key(site) not in rows]
    suggestion = "\n".join(
        ",".join(f'"{v}"' for v in (s["Exception"], s["Message"], "?", s["Source"], "?"))
        for s in missing
    )
    assert not missing, f"add these rows to docs/errors.csv:\n{suggestion}"


def test_error_table_has_no_stale_rows():
    sites = {_key(site) for site in raise_sites()}
    stale = [row for row in error_table() if _key(row) not in sites]
    assert not stale, f"docs/errors.csv rows that match no raise in the source: {stale}"


def test_error_table_names_existing_tests():
    test_functions: dict[str, set[str]] = {}
    for row in error_table():
        assert row["Raised by"].strip(), row
        for test in row["Test"].split():
            path, _, function = test.partition("::")
            if path not in test_functions:
                tree = ast.parse((ROOT / path).read_text())
                test_functions[path] = {
                    node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                }
            assert function.startswith("test_") and function in test_functions[path], (
                f"{test} (for {row['Message']!r}) does not exist"
            )
        assert row["Test"].strip(), f"no test named for {row['Message']!r}"


# --------------------------------------------------------------------------------------------
# The user guide's examples run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "page",
    [
        "getting_started.md",
        "concepts.md",
        "sparse.md",
        "structured.md",
        "structured_removal.md",
        "transformers.md",
        "layerwise.md",
    ],
)
def test_user_guide_python_examples_run(page, capsys):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks
    namespace: dict = {}
    for number, source in enumerate(blocks, start=1):
        exec(compile(source, f"docs/{page} (python block {number})", "exec"), namespace)
    capsys.readouterr()
