"""The example notebooks are stored executed, and they still run.

Storing them with outputs lets a reader see the results without running anything; executing
them here (``make test-notebooks``, part of CI) keeps those outputs honest. Together they take
one to two minutes on two CPU cores, so execution is marked ``slow`` and needs the ``notebooks``
extra (nbclient, ipykernel).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# What each notebook must print when it runs: the point it makes.
NOTEBOOKS = {
    "quickstart.ipynb": ["stage 14: sparsity 0.9500", "test accuracy after pruning"],
    "criteria_comparison.ipynb": [
        f"{name}: ΔL = +"
        for name in ("Magnitude", "LinearModel", "QuadraticModel", "OBD", "GraSP", "SynFlow")
    ],
    "fine_tuning.ipynb": [
        "non-zero pruned weights after fine-tuning: {'0.weight': 0, '2.weight': 0, '4.weight': 0}"
    ],
    "own_model_and_data.ipynb": [
        "is in training mode",
        "same masks as an uninterrupted run: True",
    ],
    "structured_removal.ipynb": [
        "stem.0            16 channels, read by blocks.0.conv1",
        "group OBS + refit  test accuracy",
        "speed-up of the removed network",
    ],
    "layerwise_pruning.ipynb": [
        "ADMM           perplexity",
        "weights whose mask differs with padding: 0",
        "π = 16: layer error",
    ],
    "pruning_transformers.ipynb": [
        "validation perplexity after pruning",
        "weight matrix of Conv1D (Hugging Face)",
        "non-zero pruned weights after fine-tuning: 0",
    ],
}


def test_every_notebook_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(NOTEBOOKS)


def _text(cells: list) -> str:
    return "".join(
        "".join(output.get("text", ""))
        for cell in cells
        if cell["cell_type"] == "code"
        for output in cell["outputs"]
    )


def _errors(cells: list) -> list:
    return [
        output
        for cell in cells
        if cell["cell_type"] == "code"
        for output in cell["outputs"]
        if output["output_type"] == "error"
    ]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_executed_with_outputs(name):
    notebook = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1)), (
        f"{name} is not stored executed top to bottom: run `make notebooks`"
    )
    assert not _errors(code)
    assert any(o["output_type"] == "display_data" for cell in code for o in cell["outputs"])
    text = _text(code)
    for expected in NOTEBOOKS[name]:
        assert expected in text, f"{name}: stored outputs lack {expected!r}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes(name, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="needs the notebooks extra")
    nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra")
    # The kernel inherits this: the notebooks' small models gain nothing from several threads,
    # and on a busy two-core machine oversubscribed threads slow torch down many times over.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": EXAMPLES}}
    )
    client.execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not _errors(code)
    text = _text(code)
    for expected in NOTEBOOKS[name]:
        assert expected in text, f"{name}: outputs lack {expected!r}"
