"""The README's usage example runs as written, and the docstring examples hold."""

import doctest
import importlib
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    usage = text.split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_readme_usage_example_runs_and_prunes(capsys):
    source = readme_example()
    assert len(source.strip().splitlines()) <= 14
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    pruner = namespace["pruner"]
    assert pruner.finished and pruner.sparsity() == pytest.approx(0.9, abs=1e-4)
    model, optimizer = namespace["model"], namespace["optimizer"]
    inputs, targets = namespace["inputs"], namespace["targets"]
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    for name, param in pruner.params.items():
        assert (param[~pruner.masks[name]] == 0).all()
    assert "stage 14" in capsys.readouterr().out


@pytest.mark.parametrize(
    "module",
    [
        "lossprune.schedules",
        "lossprune.selection.prunable",
        "lossprune.pruning.scoring",
        "lossprune.pruning.pruner",
        "lossprune.criteria.magnitude",
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
