"""Datasets of the reproduction, read from local files only (nothing is ever downloaded).

* ``digits`` -- scikit-learn's 8x8 handwritten digits (1797 examples, bundled with scikit-learn):
  a seconds-fast stand-in for MNIST used by the quick presets and the tests.
* ``mnist`` -- LeCun et al. (1998), the four idx files (optionally gzipped).
* ``cifar10`` -- Krizhevsky (2009), the "CIFAR-10 python version" pickle batches.
* ``imagenet`` -- Russakovsky et al. (2015), one folder per class (``root/train/<wnid>/*.JPEG``).

Every loader returns a :class:`Split` (train / validation / test) whose validation set is held out
of the official training set by a seeded permutation, so that the best-validation checkpoint of
Laurent et al. (2020, arXiv:2006.12279, Sec. 5) never looks at the test set. Small datasets live in
memory as ``float32`` / ``int64`` tensors, standardised per channel with training-set statistics.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

__all__ = [
    "Split",
    "DataFileError",
    "DATASET_NAMES",
    "load_digits_split",
    "read_idx",
    "load_mnist",
    "load_cifar10",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "imagenet_folder",
    "load_imagenet",
    "load_dataset",
    "make_loader",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "cifar10", "imagenet")
"""Names accepted by :func:`load_dataset`."""


@dataclass(frozen=True)
class Split:
    """A dataset cut into training, validation and test sets.

    Attributes:
        train: Examples to fit (and to score pruning criteria on).
        val: Held-out examples for model selection (best checkpoint).
        test: The official test set, for the numbers that get reported.
        in_shape: Shape of one input, e.g. ``(1, 28, 28)``.
        classes: Number of classes; targets are ``0 .. classes - 1``.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    in_shape: tuple[int, ...]
    classes: int


class DataFileError(ValueError):
    """A dataset file exists but does not hold what it should (corrupt, truncated, bad labels)."""


def _check_labels(path: Path, labels: np.ndarray, classes: int = 10) -> None:
    # A label outside 0..classes-1 would only fail as an IndexError deep inside training.
    if labels.size and not (labels.min() >= 0 and labels.max() < classes):
        raise DataFileError(
            f"{path}: labels must be in 0..{classes - 1}, found {labels.min()}..{labels.max()}"
        )


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """``(x - mean_c) / std_c`` with per-channel statistics of ``train`` (layout ``N, C, ...``)."""
    dims = [0, *range(2, train.dim())]
    mean = train.mean(dim=dims, keepdim=True)
    # A constant channel carries no information; leave its scale alone instead of dividing by 0.
    std = train.std(dim=dims, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def _tensor_split(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    classes: int,
    standardize: bool,
) -> Split:
    inputs = [train[0], val[0], test[0]]
    if standardize:
        inputs = _standardize(*inputs)
    datasets = [
        TensorDataset(x.float().contiguous(), part[1].long())
        for x, part in zip(inputs, (train, val, test), strict=True)
    ]
    return Split(*datasets, in_shape=tuple(train[0].shape[1:]), classes=classes)


def _unit_interval(pixels: np.ndarray) -> torch.Tensor:
    """``uint8`` pixels as ``float32`` in ``[0, 1]`` (converted before dividing, to save memory)."""
    return torch.tensor(pixels, dtype=torch.float32) / 255.0


def _holdout(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)`` of a seeded random split of ``range(n)``."""
    if not 0 < val_size < n:
        raise ValueError(
            f"val_size must satisfy 0 < val_size < {n} (training examples), got {val_size}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def _holdout_split(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    val_size: int,
    seed: int,
    standardize: bool,
) -> Split:
    """A 10-class :class:`Split` whose validation set is a seeded holdout of the training set."""
    train_idx, val_idx = _holdout(len(train_y), val_size, seed)
    return _tensor_split(
        (train_x[train_idx], train_y[train_idx]),
        (train_x[val_idx], train_y[val_idx]),
        test,
        classes=10,
        standardize=standardize,
    )


def load_digits_split(
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    *,
    standardize: bool = True,
) -> Split:
    """scikit-learn's 8x8 digits, split in a stratified way determined by ``seed``.

    Pixel counts ``0..16`` are scaled to ``[0, 1]`` (divided by 16), then standardised with the
    training set's mean and standard deviation. Inputs have shape ``(1, 8, 8)``.

    Args:
        seed: Determines the split (``sklearn.model_selection.train_test_split`` random state).
        val_fraction: Fraction of all 1797 examples held out for validation.
        test_fraction: Fraction of all examples held out for testing.
        standardize: Standardise with training statistics (``False`` leaves values in ``[0, 1]``).

    Returns:
        A :class:`Split` of ``TensorDataset`` s with ``float32`` inputs and ``int64`` targets.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be in (0, 1) with a sum below 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    targets = torch.from_numpy(digits.target).long()
    index = np.arange(len(targets))
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    # val_fraction is a fraction of the whole set, so rescale it to the remainder.
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=digits.target[rest],
        random_state=seed,
    )
    parts = [(images[i], targets[i]) for i in (np.sort(train), np.sort(val), np.sort(test))]
    return _tensor_split(*parts, classes=10, standardize=standardize)


# ---------------------------------------------------------------------------------------------
# MNIST


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_file(name: str, directories: Sequence[Path]) -> Path | None:
    for directory in directories:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (LeCun's MNIST format), gzipped or not.

    The header is a big-endian magic number ``0x0000 08 <ndim>`` (``0x08`` = unsigned byte),
    followed by ``ndim`` big-endian ``int32`` sizes and the data in C order.

    Args:
        path: File to read; a ``.gz`` suffix means gzip-compressed.
        ndim: Expected number of dimensions (3 for images, 1 for labels).

    Returns:
        A ``uint8`` array of the stored shape.

    Raises:
        DataFileError: If the file cannot be decompressed, or the magic number or the file
            size does not match.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataFileError(f"{path} cannot be decompressed ({error}): download it again") from None
    expected_magic = 0x0800 + ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected_magic:
        raise DataFileError(
            f"{path} is not a {ndim}-dimensional unsigned-byte idx file: magic number "
            f"{magic if magic is None else hex(magic)}, expected {hex(expected_magic)}"
        )
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(shape)):
        raise DataFileError(
            f"{path}: header announces shape {shape} ({int(np.prod(shape))} bytes of data), "
            f"but the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(
    root: str | Path, seed: int = 0, val_size: int = 5000, *, standardize: bool = True
) -> Split:
    """MNIST from the four idx files in ``root`` (or ``root/MNIST/raw``, torchvision's layout).

    Pixels are scaled to ``[0, 1]`` and standardised with training statistics; inputs have shape
    ``(1, rows, cols)``. ``val_size`` training examples, chosen by ``seed``, form the validation
    set.

    Args:
        root: Directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        seed: Determines which training examples are held out.
        val_size: Number of held-out training examples.
        standardize: Standardise with training statistics (``False`` leaves values in ``[0, 1]``).

    Raises:
        FileNotFoundError: Naming the missing files and the directories searched.
        DataFileError: For a malformed idx file, inconsistent image/label counts or labels
            outside ``0..9``.
    """
    root = Path(root)
    directories = (root, root / "MNIST" / "raw")
    paths = {key: _find_file(name, directories) for key, name in _MNIST_FILES.items()}
    missing = [_MNIST_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST files not found: {', '.join(missing)} (each optionally with .gz) in "
            f"{' or '.join(str(d) for d in directories)}"
        )
    arrays = {
        key: read_idx(path, 3 if key.endswith("images") else 1) for key, path in paths.items()
    }
    parts = []
    for prefix in ("train", "test"):
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if len(images) != len(labels):
            raise DataFileError(f"MNIST {prefix}: {len(images)} images but {len(labels)} labels")
        _check_labels(paths[f"{prefix}_labels"], labels)  # type: ignore[arg-type]
        parts.append((_unit_interval(images).unsqueeze(1), torch.tensor(labels, dtype=torch.int64)))
    (train_x, train_y), test = parts
    return _holdout_split(train_x, train_y, test, val_size, seed, standardize)


# ---------------------------------------------------------------------------------------------
# CIFAR-10

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a crafted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written by numpy < 2 (the originals)
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes this way
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` of one CIFAR-10 python batch."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        # The original batches were pickled by Python 2; "bytes" keeps their str keys as bytes.
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as error:
        # A truncated or damaged pickle fails in many ways, all meaning the same for the user.
        raise DataFileError(f"{path} is not a readable CIFAR-10 batch ({error})") from None
    if not isinstance(batch, dict):
        raise DataFileError(f"{path} is not a CIFAR-10 batch (expected a dict, got {type(batch)})")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFileError(
            f"{path} is not a CIFAR-10 batch: keys {sorted(batch)} lack data/labels"
        )
    try:
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (ValueError, TypeError) as error:
        raise DataFileError(f"{path}: data or labels have the wrong shape ({error})") from None
    if len(images) != len(labels):
        raise DataFileError(f"{path}: {len(images)} images but {len(labels)} labels")
    _check_labels(path, labels)
    return images, labels


def load_cifar10(
    root: str | Path, seed: int = 0, val_size: int = 5000, *, standardize: bool = True
) -> Split:
    """CIFAR-10 from the python pickle batches in ``root/cifar-10-batches-py`` or ``root``.

    Pixels are scaled to ``[0, 1]`` and standardised per channel with training statistics; inputs
    have shape ``(3, 32, 32)``. ``val_size`` training examples, chosen by ``seed``, form the
    validation set. The pickles are read with an unpickler that only accepts numpy arrays.

    Args:
        root: Directory containing ``cifar-10-batches-py/`` or the batch files themselves
            (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).
        seed: Determines which training examples are held out.
        val_size: Number of held-out training examples.
        standardize: Standardise with training statistics (``False`` leaves values in ``[0, 1]``).

    Raises:
        FileNotFoundError: Naming the missing files and the directories searched.
        DataFileError: For a file that is not a readable CIFAR-10 batch or has labels outside
            ``0..9``.
    """
    root = Path(root)
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    directories = (root / "cifar-10-batches-py", root)
    directory = next((d for d in directories if all((d / n).is_file() for n in names)), None)
    if directory is None:
        raise FileNotFoundError(
            f"CIFAR-10 batches not found: expected {', '.join(names)} in "
            f"{' or '.join(str(d) for d in directories)}"
        )
    batches = [_read_cifar_batch(directory / name) for name in _CIFAR_TRAIN]
    train_x = _unit_interval(np.concatenate([b[0] for b in batches]))
    train_y = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    test_images, test_labels = _read_cifar_batch(directory / _CIFAR_TEST)
    test = (_unit_interval(test_images), torch.from_numpy(test_labels))
    return _holdout_split(train_x, train_y, test, val_size, seed, standardize)


# ---------------------------------------------------------------------------------------------
# ImageNet

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# Per-channel statistics of the ImageNet training set, as used by torchvision's pretrained models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _import_pil() -> ModuleType:
    """The ``PIL.Image`` module, imported only when images are actually read."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "reading ImageNet images needs Pillow; install it with `pip install Pillow`"
        ) from error
    return Image


class ImageFolder(Dataset):
    """Images stored one folder per class (``directory/<class>/<file>``), decoded on access.

    Each image is converted to RGB, its shorter side resized to ``resize`` (bilinear), center
    cropped to ``crop`` x ``crop``, scaled to ``[0, 1]`` and normalised per channel. This is the
    standard ImageNet evaluation transform; it is deterministic, so it is used for every split.

    Args:
        directory: Folder containing one sub-folder per class; labels follow sorted folder names.
        resize: Length of the shorter side after resizing.
        crop: Side of the square center crop.
        mean: Per-channel mean subtracted after scaling to ``[0, 1]``.
        std: Per-channel standard deviation divided by.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        resize: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        _import_pil()  # fail here rather than in the first training step
        self.directory = Path(directory)
        self.classes = sorted(d.name for d in self.directory.iterdir() if d.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.directory / name).iterdir())
            if path.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(_IMAGE_SUFFIXES)}) found in {self.directory}/<class>/"
            )
        self.resize, self.crop = resize, crop
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pil_image = _import_pil()
        path, label = self.samples[index]
        with pil_image.open(path) as image:
            image = image.convert("RGB")
        scale = self.resize / min(image.size)
        width, height = (max(self.crop, round(side * scale)) for side in image.size)
        image = image.resize((width, height), pil_image.Resampling.BILINEAR)
        left, top = (width - self.crop) // 2, (height - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std, label


def imagenet_folder(root: str | Path, split: str) -> ImageFolder:
    """The ImageNet ``train`` or ``val`` split stored as ``root/<split>/<wnid>/<image>``.

    Args:
        root: ImageNet directory with ``train/`` and ``val/`` sub-folders of class folders.
        split: ``"train"`` or ``"val"``.

    Raises:
        ValueError: For another ``split``.
        FileNotFoundError: If ``root/<split>`` does not exist or holds no images.
        ImportError: If Pillow is not installed.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    directory = Path(root) / split
    if not directory.is_dir():
        raise FileNotFoundError(
            f"ImageNet {split} folder not found: expected {directory}/<wnid>/*.JPEG"
        )
    return ImageFolder(directory)


def load_imagenet(root: str | Path, seed: int = 0, val_size: int = 10000) -> Split:
    """ImageNet: ``val_size`` seeded training images for validation, the official val as test.

    Raises:
        FileNotFoundError: If ``root/train`` or ``root/val`` is missing.
        ValueError: If the two splits do not have the same class folders.
    """
    train = imagenet_folder(root, "train")
    test = imagenet_folder(root, "val")
    # Labels are positions in the sorted folder list, so both splits must list the same folders.
    if test.classes != train.classes:
        raise ValueError(f"class folders of {test.directory} differ from {train.directory}")
    train_idx, val_idx = _holdout(len(train), val_size, seed)
    return Split(
        Subset(train, train_idx.tolist()),
        Subset(train, val_idx.tolist()),
        test,
        in_shape=(3, train.crop, train.crop),
        classes=len(train.classes),
    )


def load_dataset(name: str, root: str | Path | None = None, seed: int = 0) -> Split:
    """Load one of :data:`DATASET_NAMES` with its default split sizes.

    Args:
        name: ``"digits"`` (bundled with scikit-learn, ``root`` ignored), ``"mnist"``,
            ``"cifar10"`` or ``"imagenet"`` (local files under ``root``).
        root: Directory of the dataset files (required except for digits).
        seed: Determines the train/validation split.

    Raises:
        ValueError: For an unknown name or a missing ``root``.
        FileNotFoundError: If the dataset's files are absent (the message names them).
    """
    if name == "digits":
        return load_digits_split(seed)
    loaders = {"mnist": load_mnist, "cifar10": load_cifar10, "imagenet": load_imagenet}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}")
    if root is None:
        raise ValueError(f"dataset {name!r} is read from local files: pass root=<directory>")
    return loaders[name](root, seed)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, *, num_workers: int = 0
) -> DataLoader:
    """A ``DataLoader`` whose shuffling is drawn from its own generator seeded with ``seed``.

    Successive epochs see different orders, and the whole sequence of orders is fixed by ``seed``.
    For an in-memory ``TensorDataset`` the loader fetches each mini-batch with one indexing
    operation instead of collating ``batch_size`` single examples; the batches are identical to
    those of ``DataLoader(dataset, batch_size, shuffle, generator=...)``.

    Args:
        dataset: Map-style dataset of ``(input, target)`` pairs.
        batch_size: Examples per mini-batch (the last one may be smaller).
        shuffle: Draw a new random order every epoch.
        seed: Seed of the loader's generator.
        num_workers: Worker processes (``0`` loads in the main process).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, TensorDataset):
        order = (
            RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        )
        return DataLoader(
            dataset,
            sampler=BatchSampler(order, batch_size, drop_last=False),
            batch_size=None,
            generator=generator,
            num_workers=num_workers,
        )
    return DataLoader(
        dataset, batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers
    )
