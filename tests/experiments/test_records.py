"""Run configurations, canonical keys and the append-only results file."""

from __future__ import annotations

from pathlib import Path

from lossprune.experiments.presets import TrainSetup
from lossprune.experiments.records import ResultsFile, RunConfig


def _config(**changes) -> RunConfig:
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


def test_key_is_canonical_and_round_trips() -> None:
    config = _config()
    assert RunConfig.from_dict(config.as_dict()) == config
    assert RunConfig.from_dict(config.as_dict()).key() == config.key()
    assert _config(lam=0.01).key() == _config(lam=1e-2).key()
    assert _config(lam=0.1).key() != config.key()


def test_lambda_and_curvature_are_normalised_away_where_unused() -> None:
    assert _config(criterion="MP", lam=3.0).key() == _config(criterion="MP", lam=None).key()
    assert _config(criterion="LM", curvature="fisher_mc").curvature == "none"
    assert _config(criterion="MP").label() == "MP π=14 exp seed 0"


def test_results_file_appends_and_skips_a_truncated_line(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "sub" / "results.jsonl")
    assert results.records() == [] and results.keys() == set()
    results.append({"config": _config().as_dict(), "x": 1})
    with open(results.path, "a") as file:
        file.write('{"config": {"half')  # a run killed in the middle of writing its line
    assert len(results.records()) == 1
    results.append({"config": _config(seed=1).as_dict(), "x": 2})
    assert [r["x"] for r in results] == [1, 2]
    assert results.keys() == {_config().key(), _config(seed=1).key()}
