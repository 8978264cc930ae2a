"""Sweeps: records, resume without duplicates, cached dense networks, worker processes."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from lossprune.experiments.presets import Grid, Preset, get_preset
from lossprune.experiments.records import ResultsFile, RunConfig
from lossprune.experiments.sweep import SweepExistsError, plan, run_sweep


def _keys(path: Path) -> list[str]:
    return [RunConfig.from_dict(r["config"]).key() for r in ResultsFile(path)]


def test_smoke_records_hold_every_measurement(smoke_records: list[dict]) -> None:
    assert smoke_records and all(r["status"] == "ok" for r in smoke_records)
    for record in smoke_records:
        config = record["config"]
        # ΔL is the training-loss difference measured in eval mode, all stages together.
        expected = record["pruned"]["train_loss"] - record["dense"]["train_loss"]
        assert math.isclose(record["delta_loss"], expected)
        assert len(record["stages"]["step_norm_sq"]) == config["stages"]
        assert record["stages"]["sparsity"][-1] == pytest.approx(config["sparsity"], abs=1e-4)
        assert record["finetuned_sparsity"] >= config["sparsity"] - 1e-4  # mask held
        assert set(record["layer_density"]) == {
            "layers.0.weight",
            "layers.2.weight",
            "layers.4.weight",
        }
        for phase in ("dense", "pruned", "finetuned"):
            assert set(record[phase]) >= {"train_loss", "train_error", "val_loss", "val_error"}
        history = record["finetune_history"]
        assert [e["epoch"] for e in history] == list(range(config["finetune"]["epochs"] + 1))
        assert record["seconds"]["total"] > 0


def test_stage_tracking_only_where_asked(smoke_records: list[dict]) -> None:
    tracked = [r for r in smoke_records if "loss_curve" in r]
    assert {r["config"]["schedule"] for r in tracked} == {"exponential", "linear"}
    assert all(r["config"]["criterion"] == "QM" for r in tracked)
    assert all(r["loss_curve"][-1]["sparsity"] == pytest.approx(0.95, abs=1e-4) for r in tracked)


def test_dense_network_is_trained_once_per_seed(smoke_dir: Path) -> None:
    assert len(list((smoke_dir / "models").glob("*.pt"))) == 1
    assert len(list((smoke_dir / "models").glob("*.json"))) == 1


def test_interrupted_sweep_resumes_without_duplicates(tmp_path: Path, tiny_preset: Preset) -> None:
    expected = {run.config.key() for run in plan(tiny_preset)}
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=2, progress=False)
    assert len(_keys(tmp_path / "results.jsonl")) == 2
    with open(tmp_path / "results.jsonl", "a") as file:
        file.write('{"config": {"trunc')  # killed while writing the third record
    with pytest.raises(SweepExistsError, match="--resume"):
        run_sweep(tiny_preset, tmp_path, device="cpu", progress=False)
    run_sweep(tiny_preset, tmp_path, device="cpu", resume=True, progress=False)
    keys = _keys(tmp_path / "results.jsonl")
    assert len(keys) == len(set(keys)) and set(keys) == expected
    run_sweep(tiny_preset, tmp_path, device="cpu", resume=True, progress=False)
    assert len(_keys(tmp_path / "results.jsonl")) == len(expected)


def test_overwrite_starts_again(tmp_path: Path, tiny_preset: Preset) -> None:
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=1, progress=False)
    run_sweep(tiny_preset, tmp_path, device="cpu", overwrite=True, max_runs=1, progress=False)
    assert len(_keys(tmp_path / "results.jsonl")) == 1


def test_worker_processes_give_the_same_records(tmp_path: Path, tiny_preset: Preset) -> None:
    tiny_preset = replace(tiny_preset, grids=(Grid(("LM",), (0.0,), (1, 2)),))

    def measured(path: Path) -> dict[str, tuple]:
        return {
            RunConfig.from_dict(r["config"]).key(): (r["delta_loss"], r["finetuned"])
            for r in ResultsFile(path)
        }

    run_sweep(tiny_preset, tmp_path / "one", device="cpu", jobs=1, progress=False)
    run_sweep(tiny_preset, tmp_path / "two", device="cpu", jobs=2, progress=False)
    one, two = (measured(tmp_path / name / "results.jsonl") for name in ("one", "two"))
    assert one == two and len(one) == 2


def test_file_presets_need_their_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data-root"):
        run_sweep(get_preset("mnist-paper"), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        run_sweep(get_preset("mnist-paper"), tmp_path, data_root=tmp_path, progress=False)
