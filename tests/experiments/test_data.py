"""Digits split, local-file readers (on generated files) and seeded loaders."""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lossprune.experiments.data import (
    DataFileError,
    Split,
    imagenet_folder,
    load_cifar10,
    load_dataset,
    load_digits_split,
    load_imagenet,
    load_mnist,
    make_loader,
    read_idx,
)

# ---------------------------------------------------------------------------------------------
# digits


def _raw_rows(dataset: TensorDataset) -> np.ndarray:
    """Pixel counts 0..16 (exact: k/16 is representable) with the label appended, one row each."""
    inputs, targets = dataset.tensors
    counts = (inputs.reshape(len(inputs), -1) * 16).round().long()
    return torch.cat([counts, targets[:, None]], dim=1).numpy()


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_split_is_a_stratified_partition() -> None:
    split = load_digits_split(seed=0, standardize=False)
    assert isinstance(split, Split)
    assert split.in_shape == (1, 8, 8) and split.classes == 10
    sizes = [len(split.train), len(split.val), len(split.test)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 360
    # The union of the three parts is exactly the data set: no example lost or duplicated.
    digits = load_digits()
    everything = np.concatenate([digits.data.astype(np.int64), digits.target[:, None]], axis=1)
    parts = np.concatenate([_raw_rows(part) for part in (split.train, split.val, split.test)])
    np.testing.assert_array_equal(_sorted_rows(parts), _sorted_rows(everything))
    # Stratified: every class is represented in proportion in every part (up to rounding).
    totals = np.bincount(digits.target, minlength=10)
    for part, fraction in ((split.train, 0.6), (split.val, 0.2), (split.test, 0.2)):
        counts = np.bincount(part.tensors[1].numpy(), minlength=10)
        assert np.all(np.abs(counts - fraction * totals) <= 1.5), (counts, fraction * totals)


def test_digits_split_dtypes_and_standardization() -> None:
    raw = load_digits_split(seed=3, standardize=False)
    split = load_digits_split(seed=3)
    for part in (split.train, split.val, split.test):
        assert part.tensors[0].dtype == torch.float32 and part.tensors[1].dtype == torch.int64
        assert part.tensors[0].shape[1:] == (1, 8, 8)
    # One affine map fitted on the training inputs is applied to all three parts.
    mean, std = raw.train.tensors[0].mean(), raw.train.tensors[0].std()
    for name in ("train", "val", "test"):
        raw_part, part = getattr(raw, name), getattr(split, name)
        torch.testing.assert_close(part.tensors[0], (raw_part.tensors[0] - mean) / std)
        assert torch.equal(part.tensors[1], raw_part.tensors[1])
    assert abs(split.train.tensors[0].mean().item()) < 1e-5
    assert split.train.tensors[0].std().item() == pytest.approx(1.0, abs=1e-5)


def test_digits_split_is_determined_by_seed() -> None:
    first, again, other = load_digits_split(0), load_digits_split(0), load_digits_split(1)
    for a, b in zip(first.train.tensors, again.train.tensors, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.test.tensors[1], other.test.tensors[1])


def test_digits_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits_split(val_fraction=0.6, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------
# MNIST idx files


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_mnist(root: Path, n_train: int = 12, n_test: int = 4, gz: bool = False):
    # Non-square 5x4 images catch a swapped rows/cols; pixel (0, 0) holds the example's index.
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][:, 0, 0] = np.arange(n_train)
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write_idx(root / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("images.gz" if gz else "images")
    _write_idx(path, array)
    result = read_idx(path, ndim=3)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


def test_read_idx_validates_magic_and_size(tmp_path: Path) -> None:
    _write_idx(tmp_path / "bad", np.zeros((2, 3), np.uint8), magic=0x0D02)  # float data
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "bad", ndim=2)
    _write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "labels", ndim=3)  # a label file where images are expected
    (tmp_path / "short").write_bytes((0x0801).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"ab")
    with pytest.raises(ValueError, match="shape"):
        read_idx(tmp_path / "short", ndim=1)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_values_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = _fake_mnist(tmp_path, gz=gz)
    split = load_mnist(tmp_path, seed=0, val_size=3, standardize=False)
    assert split.in_shape == (1, 5, 4) and split.classes == 10
    assert (len(split.train), len(split.val), len(split.test)) == (9, 3, 4)
    images = torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32) / 255
    labels = torch.tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.int64)
    # Recover each example's index from pixel (0, 0): train and val partition the training file.
    index = {}
    for name, part in (("train", split.train), ("val", split.val)):
        inputs, targets = part.tensors
        assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
        index[name] = (inputs[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(inputs[:, 0], images[index[name]])
        assert torch.equal(targets, labels[index[name]])
    assert sorted(torch.cat(list(index.values())).tolist()) == list(range(12))
    test_images = torch.tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32) / 255
    assert torch.equal(split.test.tensors[0][:, 0], test_images)
    assert split.test.tensors[1].tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_load_mnist_standardizes_and_splits_by_seed(tmp_path: Path) -> None:
    _fake_mnist(tmp_path / "MNIST" / "raw")  # torchvision's download layout
    split = load_mnist(tmp_path, seed=0, val_size=3)
    assert abs(split.train.tensors[0].mean().item()) < 1e-5
    again, other = (
        load_mnist(tmp_path, seed=0, val_size=3),
        load_mnist(tmp_path, seed=5, val_size=3),
    )
    assert torch.equal(split.val.tensors[0], again.val.tensors[0])
    assert not torch.equal(split.val.tensors[0], other.val.tensors[0])
    with pytest.raises(ValueError, match="val_size"):
        load_mnist(tmp_path, val_size=12)


def test_corrupt_gzip_file_is_named(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # truncated download
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte.gz cannot be decompressed"):
        load_mnist(tmp_path, val_size=3)
    path.write_bytes(b"not gzip at all, but named .gz")
    with pytest.raises(DataFileError, match="cannot be decompressed"):
        load_mnist(tmp_path, val_size=3)


def test_mnist_labels_outside_the_ten_classes_are_refused(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 10] + [2] * 9))
    with pytest.raises(DataFileError, match=r"labels must be in 0\.\.9, found 0\.\.10"):
        load_mnist(tmp_path, val_size=3)


def test_load_mnist_missing_files_are_named(tmp_path: Path) -> None:
    arrays = _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte" not in str(info.value)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path / "nowhere")
    for name in arrays:
        assert name in str(info.value)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickle batches


def _fake_cifar(directory: Path, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, 0] = number * per_batch + np.arange(per_batch)  # red (0, 0) = global index
        labels = rng.integers(0, 10, per_batch).tolist()
        batches[name] = (data, labels)
        # Bytes keys, as the original Python 2 pickles have when loaded with encoding="bytes".
        content = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
        with open(directory / name, "wb") as file:
            pickle.dump(content, file, protocol=2)
    return batches


@pytest.mark.parametrize("nested", [True, False])
def test_load_cifar10_reads_values_exactly(tmp_path: Path, nested: bool) -> None:
    directory = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = _fake_cifar(directory)
    split = load_cifar10(tmp_path, seed=0, val_size=5, standardize=False)
    assert split.in_shape == (3, 32, 32) and split.classes == 10
    assert (len(split.train), len(split.val), len(split.test)) == (10, 5, 3)
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    images = torch.tensor(train.reshape(-1, 3, 32, 32), dtype=torch.float32) / 255
    seen = []
    for part in (split.train, split.val):
        inputs, targets = part.tensors
        index = (inputs[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(inputs, images[index])
        assert targets.tolist() == [labels[i] for i in index]
        seen += index.tolist()
    assert sorted(seen) == list(range(15))
    test_data, test_labels = batches["test_batch"]
    expected = torch.tensor(test_data.reshape(-1, 3, 32, 32), dtype=torch.float32) / 255
    assert torch.equal(split.test.tensors[0], expected)
    assert split.test.tensors[1].tolist() == test_labels


def test_load_cifar10_standardizes_per_channel(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    inputs = load_cifar10(tmp_path, val_size=5).train.tensors[0]
    torch.testing.assert_close(inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(inputs.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)


def test_load_cifar10_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_5") as info:
        load_cifar10(tmp_path)
    assert "test_batch" in str(info.value) and "cifar-10-batches-py" in str(info.value)


def test_load_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as file:
        pickle.dump({b"data": print, b"labels": []}, file, protocol=2)  # a global, not an array
    with pytest.raises(DataFileError, match="refusing to load .*print"):
        load_cifar10(tmp_path, val_size=5)


@pytest.mark.parametrize("keep", [0, 10, 2000])
def test_truncated_cifar_batch_is_named(tmp_path: Path, keep: int) -> None:
    _fake_cifar(tmp_path)
    whole = (tmp_path / "data_batch_3").read_bytes()
    (tmp_path / "data_batch_3").write_bytes(whole[:keep])  # a download cut short
    with pytest.raises(DataFileError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path, val_size=5)


def test_cifar_labels_outside_the_ten_classes_are_refused(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    data = np.zeros((3, 3072), dtype=np.uint8)
    with open(tmp_path / "test_batch", "wb") as file:
        pickle.dump({b"data": data, b"labels": [0, 10, 3]}, file, protocol=2)
    with pytest.raises(DataFileError, match=r"test_batch: labels must be in 0\.\.9, found 0\.\.10"):
        load_cifar10(tmp_path, val_size=5)


# ---------------------------------------------------------------------------------------------
# ImageNet folders


def _fake_imagenet(root: Path) -> dict[str, tuple[int, int, int]]:
    from PIL import Image

    colors = {"n01": (255, 0, 0), "n02": (10, 200, 30)}
    for split, sizes in (("train", [(300, 260), (40, 30)]), ("val", [(256, 256)])):
        for wnid, color in colors.items():
            (root / split / wnid).mkdir(parents=True)
            for number, size in enumerate(sizes):
                Image.new("RGB", size, color).save(root / split / wnid / f"{number}.png")
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    Image.new("L", (230, 240), 128).save(root / "train" / "n02" / "gray.JPEG")
    return colors


def test_imagenet_folder_decodes_resizes_and_normalizes(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    colors = _fake_imagenet(tmp_path)
    train = imagenet_folder(tmp_path, "train")
    assert train.classes == ["n01", "n02"]
    assert len(train) == 5  # 2 + 3 images, the text file skipped
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for index in range(len(train)):
        image, label = train[index]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        path = train.samples[index][0]
        color = (128,) * 3 if path.name == "gray.JPEG" else colors[train.classes[label]]
        # A uniform image stays uniform through resizing and cropping.
        expected = (torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
        torch.testing.assert_close(image, expected.expand(3, 224, 224), atol=2e-2, rtol=0)
    assert [label for _, label in train.samples] == [0, 0, 1, 1, 1]


def test_load_imagenet_split(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _fake_imagenet(tmp_path)
    split = load_imagenet(tmp_path, seed=0, val_size=2)
    assert split.in_shape == (3, 224, 224) and split.classes == 2
    assert (len(split.train), len(split.val), len(split.test)) == (3, 2, 2)
    assert sorted(split.train.indices + split.val.indices) == list(range(5))


def test_imagenet_missing_folder_is_named(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match=r"train/<wnid>/\*\.JPEG"):
        imagenet_folder(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        imagenet_folder(tmp_path, "test")


def test_imagenet_without_pillow_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train" / "n01").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` raise ImportError
    with pytest.raises(ImportError, match="Pillow"):
        imagenet_folder(tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# dispatcher and loaders


def test_load_dataset_dispatches() -> None:
    split = load_dataset("digits", seed=2)
    assert torch.equal(split.train.tensors[0], load_digits_split(2).train.tensors[0])
    with pytest.raises(ValueError, match="digits, mnist, cifar10, imagenet"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="root"):
        load_dataset("mnist")


def test_load_dataset_reads_local_files(tmp_path: Path) -> None:
    _fake_cifar(tmp_path, per_batch=1001)  # the default validation set holds 5000 examples
    split = load_dataset("cifar10", root=tmp_path)
    assert (len(split.train), len(split.val)) == (5, 5000)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path)


def _batches(loader: DataLoader) -> list[torch.Tensor]:
    return [targets for _, targets in loader]


def test_make_loader_is_seeded_and_matches_dataloader() -> None:
    dataset = TensorDataset(torch.randn(23, 2), torch.arange(23))
    loader = make_loader(dataset, 5, shuffle=True, seed=7)
    epoch1, epoch2 = _batches(loader), _batches(loader)
    assert [len(b) for b in epoch1] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(epoch1).tolist()) == list(range(23))
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2)), "a new order every epoch"
    again = make_loader(dataset, 5, shuffle=True, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, _batches(again), strict=True))
    # The one-index-per-batch fast path gives exactly the standard DataLoader's batches.
    standard = DataLoader(dataset, 5, shuffle=True, generator=torch.Generator().manual_seed(7))
    for ours, theirs in zip(epoch1 + epoch2, _batches(standard) + _batches(standard), strict=True):
        assert torch.equal(ours, theirs)
    other = _batches(make_loader(dataset, 5, shuffle=True, seed=8))
    assert not torch.equal(torch.cat(epoch1), torch.cat(other))
    ordered = _batches(make_loader(dataset, 10, shuffle=False, seed=0))
    assert torch.equal(torch.cat(ordered), torch.arange(23))


def test_make_loader_generic_dataset() -> None:
    dataset = [(torch.tensor([float(i)]), i) for i in range(7)]
    loader = make_loader(dataset, 3, shuffle=True, seed=0)
    targets = torch.cat(_batches(loader))
    assert sorted(targets.tolist()) == list(range(7))
    assert torch.equal(targets, torch.cat(_batches(make_loader(dataset, 3, shuffle=True, seed=0))))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(dataset, 0, shuffle=False, seed=0)
