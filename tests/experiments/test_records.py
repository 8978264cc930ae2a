"""Run configurations, canonical keys and the append-only results file."""

from __future__ import annotations

from pathlib import Path

from lossprune.experiments.records import ResultsFile, RunConfig
from tests.experiments.conftest import make_config


def test_key_is_canonical_and_round_trips() -> None:
    config = make_config()
    assert RunConfig.from_dict(config.as_dict()) == config
    assert RunConfig.from_dict(config.as_dict()).key() == config.key()
    assert make_config(lam=0.01).key() == make_config(lam=1e-2).key()
    assert make_config(lam=0.1).key() != config.key()


def test_lambda_and_curvature_are_normalised_away_where_unused() -> None:
    assert make_config(criterion="MP", lam=3.0).key() == make_config(criterion="MP", lam=None).key()
    assert make_config(criterion="LM", curvature="fisher_mc").curvature == "none"
    assert make_config(criterion="MP").label() == "MP π=14 exp seed 0"


def test_results_file_appends_and_skips_a_truncated_line(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "sub" / "results.jsonl")
    assert results.records() == [] and results.keys() == set()
    results.append({"config": make_config().as_dict(), "x": 1})
    with open(results.path, "a") as file:
        file.write('{"config": {"half')  # a run killed in the middle of writing its line
    assert len(results.records()) == 1
    results.append({"config": make_config(seed=1).as_dict(), "x": 2})
    assert [r["x"] for r in results] == [1, 2]
    assert results.keys() == {make_config().key(), make_config(seed=1).key()}
