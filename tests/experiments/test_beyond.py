"""Runs beyond the paper: compensation updates, auto λ, min_density and their records/figures."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from lossprune.experiments.analysis import paper_records, update_label
from lossprune.experiments.figures import (
    BEYOND_FIGURES,
    fig_compensation,
    fig_predicted_vs_measured,
    write_figures,
)
from lossprune.experiments.findings import beyond_table
from lossprune.experiments.presets import Grid, TrainSetup, Update, get_preset
from lossprune.experiments.records import ResultsFile, RunConfig
from lossprune.experiments.sweep import plan, run_sweep
from tests.experiments.conftest import make_config

_BEYOND_FIELDS = ("update", "update_lam", "auto_lam", "min_density", "diagnostics")


def test_new_fields_round_trip_and_stay_out_of_the_key_at_their_defaults() -> None:
    paper = make_config()
    assert not set(_BEYOND_FIELDS) & set(paper.as_dict())  # keys of old records unchanged
    assert paper.key() == make_config(update="zero", min_density=0.0, diagnostics=False).key()
    # update_lam and auto_lam mean nothing without compensation.
    assert make_config(update_lam=5.0, auto_lam=True) == paper
    compensate = make_config(update="compensate", update_lam=0.1, diagnostics=True)
    auto = make_config(update="compensate", auto_lam=True, min_density=0.01)
    for config in (compensate, auto):
        assert RunConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config
        assert config.key() != paper.key()
    assert auto.update_lam == 1e-3  # the library's default start
    assert compensate.key() != make_config(update="compensate", update_lam=1.0).key()
    assert compensate.label() == "QM λ=0.01 π=14 exp comp λu=0.1 seed 0"
    assert auto.label() == "QM λ=0.01 π=14 exp comp auto min_density=0.01 seed 0"
    with pytest.raises(ValueError, match="update"):
        make_config(update="newton")
    with pytest.raises(ValueError, match="compensate"):
        Update("zero", lam=0.1)


def test_old_records_resume_under_the_extendedmake_config(tmp_path: Path) -> None:
    # A record written before the new fields existed: the paper's fields only.
    old = {k: v for k, v in asdict(make_config()).items() if k not in _BEYOND_FIELDS}
    results = ResultsFile(tmp_path / "results.jsonl")
    results.append({"config": old, "status": "diverged"})
    assert results.keys() == {make_config().key()}
    assert RunConfig.from_dict(old) == make_config()
    quick = plan(get_preset("digits-quick"))
    assert all(not set(_BEYOND_FIELDS) & set(r.config.as_dict()) for r in quick)


def test_beyond_preset_is_listed_and_expands_as_asked() -> None:
    runs = [r.config for r in plan(get_preset("digits-beyond"))]
    assert len(runs) == len({c.key() for c in runs}) == 2 * (2 * 2 * 2 * 4 + 1)
    assert {(c.update, c.update_lam, c.auto_lam) for c in runs} == {
        ("zero", None, False),
        ("compensate", 0.1, False),
        ("compensate", 1.0, False),
        ("compensate", 1e-3, True),
    }
    protected = [c for c in runs if c.min_density]
    assert {(c.criterion, c.stages, c.lam, c.update) for c in protected} == {
        ("OBD", 1, 0.0, "zero")
    }
    assert all(c.diagnostics for c in runs)


@pytest.fixture(scope="module")
def beyond_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny runs: QM π=2 zeroing and compensating (with diagnostics), OBD min_density."""
    preset = replace(
        get_preset("digits-beyond"),
        name="tiny-beyond",
        grids=(
            Grid(
                ("QM",),
                (0.0,),
                (2,),
                updates=(Update(), Update("compensate", 0.1)),
                diagnostics=True,
            ),
            Grid(("OBD",), (0.0,), (1,), min_density=0.01),
        ),
        seeds=(0,),
        train=TrainSetup(epochs=1),
        finetune=TrainSetup(epochs=1),
        jobs=1,
        dense_from=None,
    )
    out = tmp_path_factory.mktemp("beyond")
    run_sweep(preset, out, device="cpu", max_runs=2, progress=False)
    run_sweep(preset, out, device="cpu", resume=True, progress=False)
    run_sweep(preset, out, device="cpu", resume=True, progress=False)  # nothing left to run
    return out / "results.jsonl"


def test_compensate_run_records_cg_and_diagnostics(beyond_results: Path) -> None:
    records = ResultsFile(beyond_results).records()
    keys = [RunConfig.from_dict(r["config"]).key() for r in records]
    assert len(keys) == len(set(keys)) == 3  # resumed without duplicates
    by_label = {update_label(r): r for r in records}
    assert set(by_label) == {"zero", "comp λu=0.1", "zero min_density=0.01"}
    assert all(r["status"] == "ok" for r in records)
    compensated = by_label["comp λu=0.1"]["stages"]
    assert len(compensated["cg_iterations"]) == 2 and all(
        n >= 1 for n in compensated["cg_iterations"]
    )
    assert compensated["update_lam"] == [0.1, 0.1] and compensated["compensated"] == [True, True]
    zero = by_label["zero"]["stages"]
    assert len(zero["predicted_delta"]) == len(zero["loss_after"]) == 2
    assert "cg_iterations" not in zero
    protected = by_label["zero min_density=0.01"]
    assert min(protected["layer_density"].values()) >= 0.01
    assert "predicted_delta" not in protected["stages"]  # no diagnostics asked for
    assert paper_records(records) == [by_label["zero"]]


def test_beyond_figures_and_table_from_a_tiny_results_file(
    beyond_results: Path, tmp_path: Path
) -> None:
    records = ResultsFile(beyond_results).records()
    assert fig_predicted_vs_measured(records) is not None
    assert fig_compensation(records) is not None
    written = {p.name for p in write_figures(records, tmp_path, formats=("png",))}
    assert {f"{stem}.png" for stem in BEYOND_FIGURES} <= written
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)
    table = beyond_table(records)
    assert "comp λu=0.1" in table and "min_density=0.01" in table
    assert table.count("\n") == 2 + 3
    # Runs done as in the paper only: no beyond figures, no table.
    paper = paper_records(records)
    assert fig_compensation(paper) is None and beyond_table([]) == ""
