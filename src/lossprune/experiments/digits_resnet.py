"""A small residual CNN with batch norm on scikit-learn's digits: the channel-removal benchmark.

It has the couplings that make channel removal non-trivial — a batch norm after every
convolution, identity skip additions (the channels of a residual stream are removed together in
every block that adds into it) and one 1x1 projection shortcut — yet trains in seconds on one
core and needs no download (the 1,797 8x8 images ship with scikit-learn).

Architecture (38,266 parameters): stem conv 1→16 + BN + ReLU; residual blocks 16→16 (identity
skip), 16→32 stride 2 (1x1 projection + BN), 32→32 (identity); global average pool; linear
32→10. Training: SGD with Nesterov momentum, one-cycle learning rate, random shifts of up to one
pixel, seeded batch order. The split is scikit-learn's stratified ``train_test_split`` (25 % test,
``random_state=0``): 1,347 training and 450 test images.

The checkpoint (``digits_resnet-<key>.pt``, ``key`` a hash of :class:`DigitsConfig`) stores the
configuration and test accuracy it was trained with; a mismatch retrains instead of loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "DigitsConfig",
    "DigitsData",
    "DigitsResNet",
    "accuracy",
    "digits_data",
    "load_trained",
    "train",
]

_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    """Architecture, split and training settings; part of the checkpoint's identity."""

    widths: tuple[int, ...] = (16, 32, 32)
    strides: tuple[int, ...] = (1, 2, 1)
    test_size: float = 0.25
    seed: int = 0
    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift_augment: int = 1

    def key(self) -> str:
        """A hash of every field (the checkpoint name)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(f"{_FORMAT_VERSION}:{blob}".encode()).hexdigest()[:16]

    def stored(self) -> dict[str, Any]:
        """The configuration as the checkpoint stores it (tuples as lists)."""
        return dataclasses.asdict(self) | {
            "widths": list(self.widths),
            "strides": list(self.strides),
        }


class DigitsData(NamedTuple):
    """Images ``(N, 1, 8, 8)`` in [0, 1] and int64 labels, split into train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_data(test_size: float = 0.25, seed: int = 0) -> DigitsData:
    """The fixed, stratified, seeded split of :func:`sklearn.datasets.load_digits`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    tensors = (
        torch.from_numpy(np.ascontiguousarray(a)) for a in (x_train, y_train, x_test, y_test)
    )
    x_train_t, y_train_t, x_test_t, y_test_t = tensors
    return DigitsData(x_train_t.unsqueeze(1), y_train_t, x_test_t.unsqueeze(1), y_test_t)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity or 1x1 conv + BN), then ReLU."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem, one residual block per width, global average pooling, a linear classifier."""

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 32),
        strides: tuple[int, ...] = (1, 2, 1),
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, channels = [], widths[0]
        for width, stride in zip(widths, strides, strict=True):
            blocks.append(BasicBlock(channels, width, stride))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _shifted(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by integers in [-shift, shift]², zero-filled."""
    if shift <= 0:
        return x
    n, _, height, width = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(height)[None, :]
    cols = dx[:, None] + torch.arange(width)[None, :]
    index = torch.arange(n)[:, None, None]
    return padded[index, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train(config: DigitsConfig, data: DigitsData) -> DigitsResNet:
    """Train from scratch (module docstring); the model is returned in eval mode."""
    torch.manual_seed(config.seed)
    model = DigitsResNet(config.widths, config.strides)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, nesterov=True,
    )  # fmt: skip
    n = len(data.y_train)
    steps = config.epochs * ((n + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            images = _shifted(data.x_train[index], config.shift_augment, generator)
            loss = F.cross_entropy(model(images), data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        predicted = model(x[start : start + batch_size]).argmax(1)
        correct += int((predicted == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def load_trained(
    cache_dir: str | os.PathLike[str], config: DigitsConfig | None = None
) -> tuple[DigitsResNet, DigitsData, dict[str, Any]]:
    """The trained model (eval mode), its data split and its record; trains once and caches."""
    config = config or DigitsConfig()
    path = Path(cache_dir) / f"digits_resnet-{config.key()}.pt"
    data = digits_data(config.test_size, config.seed)
    if path.exists():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("config") == config.stored():
            model = DigitsResNet(config.widths, config.strides)
            model.load_state_dict(checkpoint["state_dict"])
            model.eval()
            if abs(accuracy(model, data.x_test, data.y_test) - checkpoint["test_accuracy"]) < 1e-9:
                return model, data, {k: v for k, v in checkpoint.items() if k != "state_dict"}
    model = train(config, data)
    record = {
        "format_version": _FORMAT_VERSION,
        "config": config.stored(),
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "train_accuracy": accuracy(model, data.x_train, data.y_train),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(record | {"state_dict": model.state_dict()}, partial)
    os.replace(partial, path)  # a crash never leaves a half-written checkpoint
    return model, data, record
