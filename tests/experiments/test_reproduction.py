"""Findings 1 and 2 of PAPER.md on digits (slow: about a minute on 2 CPU cores)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lossprune.experiments.analysis import by_lam, delta_loss, mean_std, select
from lossprune.experiments.presets import LOSS_MODELS, Grid, TrainSetup, get_preset
from lossprune.experiments.records import ResultsFile
from lossprune.experiments.sweep import run_sweep


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    preset = replace(
        get_preset("digits-quick"),
        seeds=(0,),
        grids=(Grid(LOSS_MODELS, (0.0, 1e-2, 1e-1), (1, 14)), Grid(("MP",), (0.0,), (1, 14))),
        finetune=TrainSetup(epochs=1),
        jobs=1,
    )
    path = run_sweep(preset, tmp_path_factory.mktemp("findings"), device="cpu", progress=False)
    return ResultsFile(Path(path)).records()


def _best(records: list[dict], **where: object) -> float:
    return min(mean_std(v)[0] for v in by_lam(select(records, **where), delta_loss).values())


@pytest.mark.slow
def test_finding_1_more_stages_reduce_the_loss_change(records: list[dict]) -> None:
    for criterion in LOSS_MODELS:
        assert _best(records, criterion=criterion, stages=14) < 0.6 * _best(
            records, criterion=criterion, stages=1
        ), criterion
    magnitude = [delta_loss(r) for r in select(records, criterion="MP")]
    # Magnitude ignores λ (one run per π) and its global ranking does not change between stages.
    assert len(magnitude) == 2 and magnitude[0] == pytest.approx(magnitude[1], rel=1e-6)


@pytest.mark.slow
def test_finding_2_moderate_lambda_helps_and_obd_one_shot_is_worst(records: list[dict]) -> None:
    for criterion in ("LM", "QM"):
        for stages in (1, 14):
            means = by_lam(select(records, criterion=criterion, stages=stages), delta_loss)
            assert min(mean_std(means[lam])[0] for lam in (1e-2, 1e-1)) < means[0.0][0]
    one_shot = {
        (r["config"]["criterion"], r["config"]["lam"]): delta_loss(r)
        for r in select(records, criterion=LOSS_MODELS, stages=1)
    }
    assert max(one_shot, key=one_shot.__getitem__) == ("OBD", 0.0)
