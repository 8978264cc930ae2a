"""Shared fixtures of the experiment tests: one smoke sweep, reused by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lossprune.experiments.cli import main
from lossprune.experiments.presets import Grid, Preset, TrainSetup, get_preset
from lossprune.experiments.records import ResultsFile, RunConfig


def make_config(**changes) -> RunConfig:
    """A digits-quick-like run configuration with ``changes`` applied."""
    fields = dict(
        dataset="digits",
        model="mlp",
        sparsity=0.95,
        criterion="QM",
        lam=1e-2,
        stages=14,
        schedule="exponential",
        seed=0,
        examples=1000,
        curvature="fisher",
        loss_examples=None,
        train=TrainSetup(20),
        finetune=TrainSetup(5),
    )
    fields.update(changes)
    return RunConfig(**fields)


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    # The CLI and the presets set torch's thread count; keep it from leaking into other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of ``lossprune sweep --preset digits-smoke`` (run once per session)."""
    out = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    try:
        status = main(
            [
                "sweep",
                "--preset",
                "digits-smoke",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-figures",
                "--jobs",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return out


@pytest.fixture(scope="session")
def smoke_records(smoke_dir: Path) -> list[dict]:
    return ResultsFile(smoke_dir / "results.jsonl").records()


@pytest.fixture
def tiny_preset() -> Preset:
    """Six cheap runs: LM at two lambdas and MP, each at pi in {1, 2}; one training epoch."""
    return replace(
        get_preset("digits-smoke"),
        name="tiny",
        grids=(Grid(("LM",), (0.0, 1e-2), (1, 2)), Grid(("MP",), (0.0, 1.0), (1, 2))),
        train=TrainSetup(epochs=1),
        finetune=TrainSetup(epochs=1),
        jobs=1,
    )
