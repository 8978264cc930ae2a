"""The ``lossprune`` command line, end to end on tiny settings."""

from __future__ import annotations

import gzip
import importlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lossprune.experiments import cli
from lossprune.experiments.checks import OutputFolderError, check_output_folder
from lossprune.experiments.cli import build_parser, main
from lossprune.experiments.locking import writer_lock
from lossprune.experiments.records import ResultsFile, SkippedLinesWarning


@pytest.mark.parametrize("command", ["train", "prune", "sweep", "figures"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--device" in capsys.readouterr().out or command == "figures"


def test_sweep_defaults_to_the_demo_preset() -> None:
    args = build_parser().parse_args(["sweep"])
    assert args.preset == "digits-quick" and args.out is None
    # --device auto is resolved (and checked) while parsing.
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_train_then_prune(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--epochs", "1", "--out", str(tmp_path), "--device", "cpu", "--threads", "1"]
    assert main(["train", *common]) == 0
    assert "best validation error" in capsys.readouterr().out
    assert len(list((tmp_path / "models").glob("*.pt"))) == 1
    prune = [
        "prune",
        *common,
        *("--criterion", "OBD", "--lam", "0.1", "--stages", "2", "--finetune-epochs", "1"),
    ]
    assert main(prune) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "ok" and summary["run"] == "OBD λ=0.1 π=2 exp seed 0"
    # The network trained by `train` was reused, not trained again.
    assert len(list((tmp_path / "models").glob("*.pt"))) == 1
    (record,) = ResultsFile(tmp_path / "results.jsonl").records()
    assert record["sparsity"] == pytest.approx(0.95, abs=1e-4)
    # The same configuration again: reported from the file, not run and recorded twice.
    assert main(prune) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == summary
    assert "already recorded" in captured.err and "not run again" in captured.err
    assert len(ResultsFile(tmp_path / "results.jsonl").records()) == 1


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


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit status and stderr of ``lossprune argv``, checking that it said one line on stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's errors
        status = int(exit_info.code or 0)
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("lossprune")]  # not tqdm's bar
    assert len(said) == 1 and "Traceback" not in err, err
    return status, said[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--threads", "0"], "argument --threads: the value must be an integer >= 1"),
        (["sweep", "--threads", "-2"], "argument --threads: the value must be an integer >= 1"),
        (["train", "--device", "foo"], "device must be cpu, cuda, cuda:N or auto, got 'foo'"),
        (["train", "--device", "cuda:x"], "device must be cpu, cuda, cuda:N or auto"),
        (["sweep", "--max-runs", "-1"], "argument --max-runs: the value must be an integer >= 1"),
        (["sweep", "--jobs", "0"], "argument --jobs: the value must be an integer >= 1"),
        (["sweep", "--seeds", "0", "-1"], "argument --seeds: the value must be an integer >= 0"),
        (["train", "--seed", str(2**32)], "argument --seed: the value must be an integer <= "),
        (["sweep", "--resume", "--overwrite"], "not allowed with argument --resume"),
        (["train", "--epochs", "0"], "argument --epochs: the value must be an integer >= 1"),
        (["train", "--lr", "inf"], "argument --lr: lr must be finite and > 0"),
        (["prune", "--sparsity", "1.5"], "sparsity must satisfy 0 <= sparsity < 1, got 1.5"),
        (["prune", "--sparsity", "half"], "argument --sparsity: expected a number, got 'half'"),
        (["prune", "--stages", "0"], "argument --stages: the value must be an integer >= 1"),
        (["prune", "--stages", "2.5"], "argument --stages: expected an integer, got '2.5'"),
        (["prune", "--lam", "-1"], "argument --lam: λ must be finite and >= 0, got -1.0"),
        (["prune", "--lam", "nan"], "argument --lam: λ must be finite and >= 0, got nan"),
        (["prune", "--examples", "0"], "argument --examples: the value must be an integer >= 1"),
        (["prune", "--finetune-epochs", "0"], "argument --finetune-epochs: the value must be"),
        (["prune", "--finetune-lr", "0"], "argument --finetune-lr: lr must be finite and > 0"),
        (["prune", "--dataset", "cifar10"], "--dataset cifar10 is read from local files: pass"),
        (["train", "--dataset", "mnist"], "--dataset mnist is read from local files: pass"),
        (["figures", "--results", "r.jsonl", "--formats", "jpeg"], "argument --formats: invalid"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors_before_any_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, err = _run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and err.startswith(f"lossprune {argv[0]}: error: ") and message in err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    status, err = _run(["sweep", "--device", "cuda", "--preset", "digits-smoke"], capsys)
    assert status == 2 and "CUDA is not available on this machine; use --device cpu" in err


def test_unwritable_output_folders_fail_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A path below a regular file cannot be created, whoever runs the test (root included).
    (tmp_path / "file").write_text("")
    for command in ("train", "prune", "sweep"):
        for out in ("/dev/null/x", str(tmp_path / "file" / "sub")):
            status, err = _run([command, "--out", out, "--device", "cpu"], capsys)
            assert status == 1 and f"cannot write to the output folder {out}: Not a dir" in err
    status, err = _run(
        ["figures", "--results", str(tmp_path / "file"), "--out", "/dev/null/x"], capsys
    )
    assert status == 1 and "cannot write to the output folder /dev/null/x" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_folder_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tmp_path.chmod(0o500)
    try:
        status, err = _run(["train", "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    finally:
        tmp_path.chmod(0o700)
    assert status == 1 and "Permission denied" in err


def test_the_output_folder_check_catches_what_permissions_hide(tmp_path: Path) -> None:
    # As root os.access says yes to everything; only a real write tells (here: below a file).
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputFolderError, match="Not a directory"):
        check_output_folder(tmp_path / "file" / "out")
    assert check_output_folder(tmp_path / "new" / "out").is_dir()
    assert list((tmp_path / "new" / "out").iterdir()) == []  # the probe file is gone


def _mnist_files(root: Path, train_labels: np.ndarray | None = None) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 5, 4)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12)
        if train_labels is None
        else train_labels,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 5, 4)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4),
    }
    for name, array in arrays.items():
        header = (0x0800 + array.ndim).to_bytes(4, "big")
        header += b"".join(n.to_bytes(4, "big") for n in array.shape)
        (root / f"{name}.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_broken_data_files_are_one_line_runtime_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path)]
    _mnist_files(tmp_path, train_labels=np.array([0, 1, 12] + [3] * 9))
    status, err = _run([*train, "--device", "cpu"], capsys)
    assert status == 1 and "labels must be in 0..9, found 0..12" in err
    _mnist_files(tmp_path)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:30])
    status, err = _run([*train, "--device", "cpu"], capsys)
    assert status == 1 and "train-images-idx3-ubyte.gz cannot be decompressed" in err
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (cifar / name).write_bytes(pickle.dumps({b"data": b"", b"labels": []}, protocol=2)[:9])
    status, err = _run([*train, "--device", "cpu", "--dataset", "cifar10"], capsys)
    assert status == 1 and "data_batch_1 is not a readable CIFAR-10 batch" in err
    assert not (tmp_path / "models").exists()


def test_a_busy_results_file_is_a_runtime_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with writer_lock(tmp_path / "results.jsonl"):
        status, err = _run(["prune", "--out", str(tmp_path), "--device", "cpu"], capsys)
    assert status == 1 and "is being written by another lossprune process" in err
    assert not (tmp_path / "models").exists()


_JUNK = [
    "[1, 2, 3]",
    '{"status": "ok"}',
    '{"config": {"dataset": "digits", "model": "mlp"}, "status": "ok"}',
]


def test_lines_that_are_not_records_are_counted_in_one_warning(
    smoke_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    lines = (smoke_dir / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join([lines[0], *_JUNK, *lines[1:]]) + "\n")
    argv = ["sweep", "--preset", "digits-smoke", "--out", str(out), "--resume", "--no-figures"]
    status, err = _run([*argv, "--device", "cpu"], capsys)
    assert status == 0 and "warning:" in err and "skipped 3 lines that are not run records" in err
    assert "line 2 is a JSON list" in err
    with pytest.warns(SkippedLinesWarning):
        assert len(ResultsFile(out / "results.jsonl").records()) == len(lines)  # nothing re-run


def _other_sweep(record: dict) -> dict:
    record = json.loads(json.dumps(record))
    record["preset"] = "digits-other"
    record["config"]["finetune"]["epochs"] = 2
    record["finetune_history"].append({**record["finetune_history"][-1], "epoch": 2})
    return record


def test_figures_of_a_file_with_two_sweeps_are_drawn_per_sweep(
    smoke_records: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = tmp_path / "results.jsonl"
    few = [r for r in smoke_records if r["config"]["criterion"] == "LM"]  # fast to draw
    mixed = [*few, *map(_other_sweep, few)]
    results.write_text("".join(json.dumps(r) + "\n" for r in [*mixed, *_JUNK]))
    argv = ["figures", "--results", str(results), "--out", str(tmp_path / "figs")]
    try:
        status = main([*argv, "--formats", "png"])
    finally:
        err = capsys.readouterr().err
    assert status == 0 and "Traceback" not in err
    assert "skipped 3 lines" in err and "records repeat" not in err
    for name in ("digits-smoke", "digits-other"):
        folder = tmp_path / "figs" / name
        assert (folder / "findings.md").read_text().startswith("|")
        assert (folder / "fig1_delta_loss_vs_lambda.png").is_file()
    assert not (tmp_path / "figs" / "findings.md").exists()


@pytest.mark.parametrize("missing", ["matplotlib", "sklearn"])
def test_without_the_experiments_extra_the_command_says_what_to_install(
    missing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # As if `pip install lossprune` without [experiments]: importing the module fails.
    monkeypatch.setitem(sys.modules, missing, None)
    for module in ("lossprune.experiments.cli", "lossprune.experiments.figures"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    fresh_cli = importlib.import_module("lossprune.experiments.cli")  # the console script's import
    assert fresh_cli.main(["train", "--help"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"lossprune: error: the command line needs the 'experiments' extra ({missing} not "
        "installed): pip install 'lossprune[experiments]'\n"
    )


def test_ctrl_c_is_one_line_and_exit_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "sweep", interrupted)
    status, err = _run(["sweep", "--device", "cpu"], capsys)
    assert status == 130 and err.startswith("lossprune sweep: interrupted;")
    assert "continue with --resume" in err
