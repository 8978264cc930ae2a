"""Dense networks trained once per seed and cached on disk.

Every run of a sweep prunes a fresh copy of the same trained network, so the network of a seed
is trained once and its ``state_dict`` saved under ``<out>/models/``. The file name carries a
hash of the training configuration: changing the epochs or learning rate trains a new network
instead of silently reusing an old one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Split
from .models import build_model
from .presets import TrainSetup
from .records import canonical_key
from .training import train

__all__ = ["checkpoint_path", "fresh_model", "load_or_train"]


def checkpoint_path(
    out_dir: str | Path, dataset: str, model: str, seed: int, setup: TrainSetup
) -> Path:
    """Where the dense network of this dataset, architecture, seed and training setup lives."""
    identity = {"dataset": dataset, "model": model, "seed": seed, "train": asdict(setup)}
    digest = hashlib.sha1(canonical_key(identity).encode()).hexdigest()[:8]
    return Path(out_dir) / "models" / f"{model}-{dataset}-seed{seed}-{digest}.pt"


def fresh_model(model: str, split: Split, seed: int) -> nn.Module:
    """A newly initialised network; its initialisation is fixed by ``seed``."""
    torch.manual_seed(seed)
    return build_model(model, in_shape=split.in_shape, classes=split.classes)


def load_or_train(
    out_dir: str | Path,
    dataset: str,
    model: str,
    seed: int,
    setup: TrainSetup,
    split: Split,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained dense ``state_dict`` (on CPU) and its training log, training it if needed.

    The log (``<checkpoint>.json``) holds the training configuration, the per-epoch history and
    the training time.
    """
    path = checkpoint_path(out_dir, dataset, model, seed, setup)
    cached = read_cached(path)
    if cached is not None:
        return cached
    network = fresh_model(model, split, seed)
    start = time.perf_counter()
    history = train(
        network,
        split,
        epochs=setup.epochs,
        lr=setup.lr,
        momentum=setup.momentum,
        weight_decay=setup.weight_decay,
        batch_size=setup.batch_size,
        lr_schedule=setup.lr_schedule,
        seed=seed,
        device=device,
        progress=progress,
    )
    log = {
        "dataset": dataset,
        "model": model,
        "seed": seed,
        "train": asdict(setup),
        "history": history,
        "seconds": time.perf_counter() - start,
    }
    return write_cached(path, network, log)


def read_cached(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The cached ``state_dict`` (on CPU) and log at ``path`` (and its ``.json``), if both exist."""
    log_path = path.with_suffix(".json")
    if not (path.exists() and log_path.exists()):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, json.loads(log_path.read_text())


def write_cached(
    path: Path, network: nn.Module, log: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Cache ``network``'s ``state_dict`` (on CPU) and ``log``; return both."""
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    log_path = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to temporary names first: a killed process must not leave a half-written cache.
    torch.save(state, path.with_suffix(".pt.tmp"))
    log_path.with_suffix(".json.tmp").write_text(json.dumps(log, indent=1))
    path.with_suffix(".pt.tmp").replace(path)
    log_path.with_suffix(".json.tmp").replace(log_path)
    return state, log
