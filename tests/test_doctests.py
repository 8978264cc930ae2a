"""Every docstring example of the package runs (``doctest`` over every module of lossprune)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lossprune

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lossprune.__path__, prefix="lossprune.")
    if not info.name.endswith("__main__")
)


def test_the_package_has_examples():
    finder = doctest.DocTestFinder()
    examples = sum(
        len(test.examples)
        for name in MODULES
        for test in finder.find(importlib.import_module(name), name)
    )
    assert examples >= 3


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
