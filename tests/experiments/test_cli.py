"""The ``lossprune`` command line, end to end on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lossprune.experiments.cli import build_parser, main
from lossprune.experiments.records import ResultsFile


@pytest.mark.parametrize("command", ["train", "prune", "sweep", "figures"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--device" in capsys.readouterr().out or command == "figures"


def test_sweep_defaults_to_the_demo_preset() -> None:
    args = build_parser().parse_args(["sweep"])
    assert args.preset == "digits-quick" and args.out is None and args.device == "auto"


def test_train_then_prune(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--epochs", "1", "--out", str(tmp_path), "--device", "cpu", "--threads", "1"]
    assert main(["train", *common]) == 0
    assert "best validation error" in capsys.readouterr().out
    assert len(list((tmp_path / "models").glob("*.pt"))) == 1
    assert (
        main(
            [
                "prune",
                *common,
                "--criterion",
                "OBD",
                "--lam",
                "0.1",
                "--stages",
                "2",
                "--finetune-epochs",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "ok" and summary["run"] == "OBD λ=0.1 π=2 exp seed 0"
    # The network trained by `train` was reused, not trained again.
    assert len(list((tmp_path / "models").glob("*.pt"))) == 1
    (record,) = ResultsFile(tmp_path / "results.jsonl").records()
    assert record["sparsity"] == pytest.approx(0.95, abs=1e-4)


def test_sweep_refuses_to_mix_results(smoke_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "--preset", "digits-smoke", "--out", str(smoke_dir)]) == 2
    assert "--resume" in capsys.readouterr().err
    before = len(ResultsFile(smoke_dir / "results.jsonl").records())
    assert (
        main(
            [
                "sweep",
                "--preset",
                "digits-smoke",
                "--out",
                str(smoke_dir),
                "--resume",
                "--device",
                "cpu",
                "--no-figures",
            ]
        )
        == 0
    )
    assert len(ResultsFile(smoke_dir / "results.jsonl").records()) == before


def test_file_presets_name_the_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "--preset", "cifar10-vgg11", "--out", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--preset",
                "cifar10-vgg11",
                "--out",
                str(tmp_path),
                "--data-root",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "data_batch_1" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--preset",
                "imagenet-resnet50",
                "--out",
                str(tmp_path),
                "--data-root",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "train" in capsys.readouterr().err


def test_figures_command(smoke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = smoke_dir / "results.jsonl"
    assert (
        main(["figures", "--results", str(results), "--out", str(tmp_path), "--formats", "png"])
        == 0
    )
    assert "| 1 |" in capsys.readouterr().out
    names = {p.name for p in tmp_path.iterdir()}
    assert {"fig1_delta_loss_vs_lambda.png", "fig16_grasp_synflow.png", "findings.md"} <= names
    assert main(["figures", "--results", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2


def test_list_presets(capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "--list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "digits-quick",
        "digits-full",
        "mnist-paper",
        "cifar10-vgg11",
        "cifar10-preactresnet18",
        "imagenet-resnet50",
    ):
        assert name in out
