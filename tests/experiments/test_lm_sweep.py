"""The language-model sweep (``tinylm-quick``): records, figures and findings per sparsity."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from lossprune.experiments import lm_run
from lossprune.experiments.analysis import by_sparsity
from lossprune.experiments.cli import _report
from lossprune.experiments.lm import LMConfig, build_tiny_lm
from lossprune.experiments.lm_run import NextTokenLogits, lm_steps
from lossprune.experiments.presets import LOSS_MODELS, Grid, TrainSetup, get_preset
from lossprune.experiments.records import ResultsFile
from lossprune.experiments.sweep import run_sweep
from lossprune.experiments.text import TextSplit, load_text_split

pytest.importorskip("transformers")

_TINY = "gpt2-1x16-test"
_SETUP = TrainSetup(1, lr=3e-3, lr_schedule="cosine", batch_size=64, momentum=0.0)


@pytest.fixture(scope="module")
def split() -> TextSplit:
    return load_text_split(max_bytes=4_000, block_size=16)


@pytest.fixture(scope="module")
def lm_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-sparsity sweep of a 1-layer, width-16 GPT-2 on 8 kB of docstrings (seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(lm_run.LM_MODELS, _TINY, LMConfig(layers=1, width=16, heads=2, block_size=16))
        patch.setattr(lm_run, "TEXT_BYTES", 8_000)
        preset = replace(
            get_preset("tinylm-quick"),
            model=_TINY,
            sparsities=(0.5, 0.7),
            grids=(Grid(("QM",), (0.0, 1e-2), (1, 2)), Grid(("MP",), (0.0,), (2,))),
            train=_SETUP,
            finetune=_SETUP,
            examples=4,
            loss_examples=32,
        )
        out = tmp_path_factory.mktemp("tinylm")
        results = run_sweep(preset, out, jobs=1, progress=False)
        # Resuming finds every configuration recorded: nothing runs twice.
        run_sweep(preset, out, jobs=1, resume=True, progress=False)
    return results


def test_records_carry_the_preset_and_every_measurement(lm_sweep: Path) -> None:
    records = ResultsFile(lm_sweep).records()
    assert len(records) == 2 * (2 * 2 + 1)  # sparsities x (QM's λ x π + MP)
    for record in records:
        config = record["config"]
        assert record["preset"] == "tinylm-quick" and record["status"] == "ok"
        assert config["dataset"] == "stdlib-docstrings" and config["curvature"] in (
            "fisher_mc",
            "none",
        )
        expected = record["pruned"]["train_loss"] - record["dense"]["train_loss"]
        assert math.isclose(record["delta_loss"], expected)
        for phase in ("dense", "pruned", "finetuned"):
            metrics = record[phase]
            assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
            assert 0.0 <= metrics["val_error"] <= 1.0
        assert record["stages"]["sparsity"][-1] == pytest.approx(config["sparsity"], abs=1e-3)
        assert record["finetuned_sparsity"] >= config["sparsity"] - 1e-3  # masks held
        assert [e["epoch"] for e in record["finetune_history"]] == [0, 1]
        # The projections of the GPT-2 blocks are pruned; the tied embedding and head are not.
        assert "transformer.h.0.attn.c_attn.weight" in record["layer_density"]
        assert not any("wte" in name or "lm_head" in name for name in record["layer_density"])


def test_report_splits_figures_and_findings_by_sparsity(lm_sweep: Path, tmp_path: Path) -> None:
    _report(lm_sweep, tmp_path, ("png",))
    assert (tmp_path / "lm_perplexity_vs_lambda.png").stat().st_size > 1000
    findings = (tmp_path / "findings.md").read_text()
    assert "## Sparsity 50%" in findings and "## Sparsity 70%" in findings
    for part in ("sparsity-50", "sparsity-70"):
        assert (tmp_path / part / "fig1_delta_loss_vs_lambda.png").exists()
        assert (tmp_path / part / "findings.md").read_text().count("\n") == 7


def test_records_group_by_sparsity_in_increasing_order(lm_sweep: Path) -> None:
    groups = by_sparsity(ResultsFile(lm_sweep).records())
    assert list(groups) == [0.5, 0.7]
    assert all(r["config"]["sparsity"] == s for s, runs in groups.items() for r in runs)


def test_the_adapter_loss_is_the_models_own_loss(split: TextSplit) -> None:
    model = build_tiny_lm(LMConfig(layers=1, width=16, heads=2, block_size=16))
    ids = split.train.blocks[:3]
    own = model(input_ids=ids, labels=ids).loss
    adapted = nn.CrossEntropyLoss()(NextTokenLogits(model)(ids), ids[:, 1:])
    assert torch.allclose(adapted, own, atol=1e-6)


def test_the_preset_matches_the_issue() -> None:
    preset = get_preset("tinylm-quick")
    assert preset.sparsities == (0.5, 0.7, 0.9) and preset.curvature == "fisher_mc"
    criteria = {c for grid in preset.grids for c in grid.criteria}
    assert criteria == {*LOSS_MODELS, "MP"}
    assert {s for grid in preset.grids for s in grid.stages} == {1, 14}
    assert len({lam for grid in preset.grids for lam in grid.lams}) >= 3


def test_lm_training_needs_the_cosine_schedule(split: TextSplit) -> None:
    assert lm_steps(_SETUP, split) == math.ceil(len(split.train) / 64)
    with pytest.raises(ValueError, match="cosine schedule, got lr_schedule='step'"):
        lm_steps(TrainSetup(1, lr_schedule="step"), split)
