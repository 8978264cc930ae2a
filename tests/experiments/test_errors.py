"""Errors of the reproduction (docs/errors.csv) that no other experiments test reaches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lossprune.experiments.checks import UsageError, check_device
from lossprune.experiments.data import (
    DataFileError,
    imagenet_folder,
    load_cifar10,
    load_imagenet,
    load_mnist,
)
from lossprune.experiments.presets import Grid, Update
from lossprune.experiments.run import make_criterion, make_schedule
from lossprune.experiments.sweep import run_sweep
from lossprune.experiments.training import evaluate
from tests.experiments.test_data import _fake_cifar, _fake_imagenet, _fake_mnist, _write_idx


def test_a_cuda_device_this_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == "cuda:0"
    with pytest.raises(UsageError, match="device 'cuda:3': this machine has 1 CUDA devices"):
        check_device("cuda:3")
    with pytest.raises(UsageError, match="got 'mps'"):
        check_device("mps")


def test_mnist_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))  # 4 test images
    with pytest.raises(DataFileError, match="MNIST test: 4 images but 3 labels"):
        load_mnist(tmp_path, val_size=3)


@pytest.mark.parametrize(
    "content, match",
    [
        ([1, 2], "expected a dict, got <class 'list'>"),
        ({b"data": np.zeros((1, 3072), np.uint8)}, "lack data/labels"),
        ({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}, "have the wrong shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ],
)
def test_cifar_batches_must_hold_images_and_labels(
    tmp_path: Path, content: object, match: str
) -> None:
    _fake_cifar(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as file:
        pickle.dump(content, file, protocol=2)
    with pytest.raises(DataFileError, match=match):
        load_cifar10(tmp_path, val_size=5)


def test_imagenet_folders_must_hold_images_of_the_same_classes(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _fake_imagenet(tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        imagenet_folder(tmp_path, "test")
    (tmp_path / "val" / "n03").mkdir()
    (tmp_path / "val" / "n03" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="class folders of .*val differ from .*train"):
        load_imagenet(tmp_path, val_size=1)
    empty = tmp_path / "empty"
    (empty / "val" / "n01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        imagenet_folder(empty, "val")


def test_presets_refuse_bad_grids_and_updates() -> None:
    with pytest.raises(ValueError, match="update must be one of"):
        Update("newton")
    with pytest.raises(ValueError, match="update lam must be >= 0, got -1"):
        Update("compensate", -1.0)
    for grid, match in [
        (dict(stages=(0,)), "stages must be >= 1"),
        (dict(lams=(-1.0,)), "lams must be >= 0"),
        (dict(updates=()), "updates must be a non-empty tuple of Update"),
        (dict(min_density=2.0), "min_density must be in \\[0, 1\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            Grid(("QM",), **grid)  # type: ignore[arg-type]


def test_runs_refuse_unknown_criteria_and_schedules() -> None:
    with pytest.raises(ValueError, match="unknown criterion 'XX'"):
        make_criterion("XX", 0.0, "fisher", (1, 8, 8))
    with pytest.raises(ValueError, match="schedule must be 'exponential' or 'linear'"):
        make_schedule("cubic", 0.5, 2)


def test_run_sweep_refuses_resume_with_overwrite(tmp_path: Path, tiny_preset) -> None:
    with pytest.raises(UsageError, match="resume and overwrite exclude each other"):
        run_sweep(tiny_preset, tmp_path, resume=True, overwrite=True, progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_evaluate_refuses_an_empty_dataset() -> None:
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot evaluate on an empty dataset"):
        evaluate(torch.nn.Linear(4, 2), empty)


def test_training_masks_must_be_a_mapping() -> None:
    from lossprune.experiments.data import load_digits_split
    from lossprune.experiments.training import train

    with pytest.raises(TypeError, match="masks must be a dict name -> bool tensor, got list"):
        train(torch.nn.Linear(64, 10), load_digits_split(), epochs=1, seed=0, masks=[])


def test_training_refuses_negative_weight_decay() -> None:
    from lossprune.experiments.data import load_digits_split
    from lossprune.experiments.training import train

    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1.0"):
        train(torch.nn.Linear(64, 10), load_digits_split(), epochs=1, seed=0, weight_decay=-1.0)
