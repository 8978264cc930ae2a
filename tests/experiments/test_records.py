"""Run configurations, canonical keys and the append-only results file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lossprune.experiments.records import ResultsFile, RunConfig, SkippedLinesWarning, set_aside
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
    results.append({"config": make_config().as_dict(), "status": "diverged", "x": 1})
    with open(results.path, "a") as file:
        file.write('{"config": {"half')  # a run killed in the middle of writing its line
    with pytest.warns(SkippedLinesWarning, match="skipped 1 lines .*line 2 is not complete JSON"):
        assert len(results.records()) == 1
    results.append({"config": make_config(seed=1).as_dict(), "status": "diverged", "x": 2})
    with pytest.warns(SkippedLinesWarning):
        assert [r["x"] for r in results] == [1, 2]
    with pytest.warns(SkippedLinesWarning):
        assert results.keys() == {make_config().key(), make_config(seed=1).key()}


_VALID = {"config": make_config().as_dict(), "status": "diverged"}
_OK = {
    **_VALID,
    "status": "ok",
    **{"dense": {}, "pruned": {}, "finetuned": {}, "delta_loss": 0.1, "sparsity": 0.9},
    "finetune_history": [],
}


@pytest.mark.parametrize(
    "line, reason",
    [
        ("[1, 2, 3]", "is a JSON list, not an object"),
        ('{"status": "ok"}', "has no config object"),
        ('{"config": {"dataset": "digits"}, "status": "ok"}', "has an invalid config"),
        (json.dumps({**_VALID, "status": "done"}), "has status 'done'"),
        (json.dumps({**_VALID, "status": "ok"}), "lacks dense, pruned"),
        (json.dumps({**_OK, "delta_loss": "0.1"}), "has delta_loss of the wrong type"),
        (json.dumps({**_OK, "dense": 1, "sparsity": True}), "has dense, sparsity of the wrong"),
        ("\udcff\udcfe not text", "is not complete JSON"),
    ],
)
def test_lines_that_are_not_records_are_skipped_and_counted(
    tmp_path: Path, line: str, reason: str
) -> None:
    path = tmp_path / "results.jsonl"
    text = f"{json.dumps(_VALID)}\n{line}\n{json.dumps(_OK)}\n"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))  # raw bytes stay raw
    with pytest.warns(SkippedLinesWarning, match=f"skipped 1 lines .*line 2 {re.escape(reason)}"):
        assert ResultsFile(path).records() == [_VALID, _OK]


def test_set_aside_renames_and_never_overwrites(tmp_path: Path) -> None:
    assert set_aside(tmp_path / "absent") is None
    first = tmp_path / "results.jsonl"
    first.write_text("one")
    moved = set_aside(first)
    first.write_text("two")
    moved_again = set_aside(first)
    assert moved is not None and moved_again is not None and moved != moved_again
    assert not first.exists() and moved.name.startswith("results.jsonl.bak-")
    assert (moved.read_text(), moved_again.read_text()) == ("one", "two")
