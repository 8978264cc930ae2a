"""Presets and their expansion into runs."""

from __future__ import annotations

import pytest

from lossprune.experiments.presets import PRESETS, Grid, get_preset
from lossprune.experiments.sweep import plan


def test_every_preset_expands_to_distinct_runs() -> None:
    for preset in PRESETS.values():
        runs = plan(preset)
        keys = [run.config.key() for run in runs]
        assert len(keys) == len(set(keys)), preset.name


def test_magnitude_runs_once_per_stages_schedule_and_seed() -> None:
    runs = plan(get_preset("digits-quick"))
    magnitude = [r.config for r in runs if r.config.criterion == "MP"]
    assert {(c.stages, c.seed) for c in magnitude} == {(s, k) for s in (1, 14, 140) for k in (0, 1)}
    assert len(magnitude) == 6 and all(c.lam is None for c in magnitude)


def test_quick_preset_matches_the_issue() -> None:
    preset = get_preset("digits-quick")
    runs = [r.config for r in plan(preset)]
    assert {c.criterion for c in runs} >= {"LM", "QM", "OBD", "MP", "GraSP", "SynFlow"}
    assert {c.stages for c in runs if c.criterion == "QM"} == {1, 14, 140}
    assert {c.seed for c in runs} == {0, 1}
    assert preset.sparsities == (0.95,) and all(c.examples == 1000 for c in runs)


def test_stage_tracking_survives_deduplication() -> None:
    # QM exponential at pi=14 is in both the main grid and the tracked schedule grid.
    runs = plan(get_preset("digits-quick"), seeds=[0])
    tracked = {
        (r.config.criterion, r.config.lam, r.config.stages, r.config.schedule)
        for r in runs
        if r.track_stages
    }
    assert ("QM", 0.01, 14, "exponential") in tracked
    assert ("LM", 0.01, 14, "exponential") not in tracked


def test_seeds_override() -> None:
    runs = plan(get_preset("digits-smoke"), seeds=[3, 4])
    assert {r.config.seed for r in runs} == {3, 4}


def test_bad_grid_and_unknown_preset_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown criteria"):
        Grid(("Magic",))
    with pytest.raises(ValueError, match="unknown schedules"):
        Grid(("QM",), schedules=("cosine",))
    with pytest.raises(ValueError, match="valid presets are"):
        get_preset("nope")
