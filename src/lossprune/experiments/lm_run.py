"""One pruning run of the tiny language model: the transformer counterpart of :mod:`.run`.

The question is whether the findings of Laurent et al. (2020, arXiv:2006.12279) hold beyond
classifiers: a byte-level GPT-2 (:mod:`.lm`) trained on the standard library's docstrings
(:mod:`.text`) is pruned with the same criteria, schedules and λ grid, and measured the same way.
ΔL is the token-mean training loss (eval mode, a fixed seeded subset of the training blocks)
after minus before pruning; the validation set gives the loss, its perplexity and the next-byte
error rate (the "validation error" of the figures and findings) before pruning, right after it
and after a short fine-tune with the masks fixed (:func:`.lm.train_lm` with the pruner).

Training setups reuse :class:`~.presets.TrainSetup`: ``epochs`` passes over the training blocks
with AdamW (weight decay ``weight_decay``), a cosine learning rate from ``lr`` with 5% warm-up
and gradient clipping, so ``lr_schedule`` must be ``"cosine"`` and ``momentum`` is not used.
The fine-tune keeps its last weights (a short fine-tune has no earlier checkpoint worth keeping).

How the pruner sees the model is decided in ONE place, :func:`lm_pruner`; see its docstring.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, Subset

import lossprune
from lossprune import Criterion, NonFiniteError, Pruner, Schedule

from .checkpoints import checkpoint_path, read_cached, write_cached
from .lm import LMConfig, build_tiny_lm, evaluate_lm, train_lm
from .presets import TEXT_DATASET, TrainSetup
from .records import RunConfig
from .run import diverged_record, make_criterion, make_schedule, run_stages
from .text import TextSplit, load_text_split

__all__ = [
    "TEXT_DATASET",
    "TEXT_BYTES",
    "LM_MODELS",
    "NextTokenLogits",
    "load_lm_split",
    "lm_steps",
    "fresh_lm",
    "load_or_train_lm",
    "lm_pruner",
    "measure_lm",
    "lm_prune_run",
]

TEXT_BYTES = 200_000
"""Corpus size: the first 200 kB of docstrings (enough for a model trained for a minute)."""

LM_MODELS: dict[str, LMConfig] = {
    # 2 layers of width 64: ~0.1M prunable weights, a few ms per training step on one core.
    "gpt2-2x64": LMConfig(layers=2, width=64, heads=4, block_size=64),
    "gpt2-2x128": LMConfig(layers=2, width=128, heads=4, block_size=64),
}
"""Model names of presets -> the shape of the byte-level GPT-2."""


def load_lm_split(model: str) -> TextSplit:
    """The docstring corpus cut into blocks of the model's context length (seed-independent)."""
    return load_text_split(max_bytes=TEXT_BYTES, block_size=LM_MODELS[model].block_size)


def lm_steps(setup: TrainSetup, split: TextSplit) -> int:
    """AdamW steps of ``setup``: its epochs over the training blocks, in batches.

    Raises:
        ValueError: when ``setup.lr_schedule`` is not ``"cosine"`` (the only schedule
            :func:`.lm.train_lm` follows).
    """
    if setup.lr_schedule != "cosine":
        raise ValueError(
            f"the language model trains with a cosine schedule, got lr_schedule="
            f"{setup.lr_schedule!r}"
        )
    return setup.epochs * math.ceil(len(split.train) / setup.batch_size)


def fresh_lm(model: str, seed: int) -> nn.Module:
    """A newly initialised byte-level GPT-2 called ``model``; its initialisation is ``seed``'s."""
    return build_tiny_lm(LM_MODELS[model], seed=seed)


def load_or_train_lm(
    out_dir: str | Path,
    model: str,
    seed: int,
    setup: TrainSetup,
    split: TextSplit,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained dense ``state_dict`` (on CPU) and its log, training the model if needed.

    Cached like the classifiers (:func:`.checkpoints.checkpoint_path`): the file name carries a
    hash of the training setup.
    """
    path = checkpoint_path(out_dir, TEXT_DATASET, model, seed, setup)
    cached = read_cached(path)
    if cached is not None:
        return cached
    network = fresh_lm(model, seed)
    start = time.perf_counter()
    history = train_lm(
        network,
        split,
        steps=lm_steps(setup, split),
        seed=seed,
        lr=setup.lr,
        batch_size=setup.batch_size,
        weight_decay=setup.weight_decay,
        device=device,
        progress=progress,
    )
    val = evaluate_lm(network, split.loader("val", 64, shuffle=False), device)
    log = {
        "dataset": TEXT_DATASET,
        "model": model,
        "seed": seed,
        "train": asdict(setup),
        "history": history,
        "val": val._asdict(),
        "seconds": time.perf_counter() - start,
    }
    return write_cached(path, network, log)


class NextTokenLogits(nn.Module):
    """A causal LM seen as a classifier of next tokens: ``input_ids -> (N, V, T - 1)`` logits.

    The common tensor-in, tensor-out interface through which ``benchmarks/run.py`` compares
    lossprune with double-backward, ``torch.func`` and curvlinops on one model (the pruner itself
    takes the Hugging Face model directly, see :func:`lm_pruner`).

    Position ``t`` predicts token ``t + 1``, so with targets ``input_ids[:, 1:]``
    :class:`torch.nn.CrossEntropyLoss` is exactly the model's own shifted token-mean loss, in
    PyTorch's class-dim-1 layout, for which the library has closed forms (no output Hessian is
    ever formed). Attention runs under the math SDPA backend: the fused kernels have neither a
    double backward nor forward-mode derivatives, which the curvature passes need.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            logits = self.lm(input_ids=input_ids).logits
        return logits[:, :-1].transpose(1, 2)


_SCORING_BATCH = 32  # sequences per statistics batch


def lm_pruner(
    model: nn.Module,
    criterion: Criterion,
    schedule: Schedule,
    split: TextSplit,
    *,
    examples: int,
    seed: int,
    min_density: float = 0.0,
) -> Pruner:
    """The :class:`lossprune.Pruner` of a run: scores on ``examples`` fresh blocks per stage.

    The Hugging Face model itself, on a DataLoader of dict batches ``{"input_ids", "labels"}``
    with ``loss_fn`` omitted: the loss is the model's own (causal shift, token mean), and the
    library runs attention with its math kernel inside its curvature passes.
    """
    return Pruner(
        model,
        criterion,
        schedule,
        data=DataLoader(split.train, batch_size=_SCORING_BATCH),
        examples=min(examples, len(split.train)),
        generator=seed,
        eval_mode=True,
        # ΔL is measured on the training blocks below; per-stage predictions would cost one
        # more gradient and Hessian-vector pass per stage.
        diagnostics=False,
        min_density=min_density,
    )


def _loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=64, shuffle=False)


def loss_blocks(split: TextSplit, examples: int | None, seed: int) -> Dataset:
    """The training blocks ΔL is measured on: all of them, or a fixed seeded subset."""
    if examples is None or examples >= len(split.train):
        return split.train
    order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(seed))
    return Subset(split.train, order[:examples].tolist())


def measure_lm(
    model: nn.Module, split: TextSplit, train_set: Dataset, device: torch.device
) -> dict[str, float]:
    """Loss, perplexity and next-byte error (eval mode) on the training and validation blocks."""
    metrics: dict[str, float] = {}
    for part, dataset in (("train", train_set), ("val", split.val)):
        result = evaluate_lm(model, _loader(dataset), device)
        metrics[f"{part}_loss"] = result.loss
        metrics[f"{part}_perplexity"] = result.perplexity
        metrics[f"{part}_error"] = result.error
    return metrics


def lm_prune_run(
    config: RunConfig,
    split: TextSplit,
    dense_state: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    track_stages: bool = False,
) -> dict[str, Any]:
    """Prune a fresh copy of the dense language model as ``config`` says; return the record.

    The record has the fields of :func:`.run.prune_run` (``dense``, ``pruned``, ``finetuned``,
    ``delta_loss``, ``stages``...), each measurement also with its perplexity.
    ``finetune_history`` holds the validation metrics right after pruning (epoch 0) and at the
    end of the fine-tune (epoch ``config.finetune.epochs``).
    """
    device = torch.device(device)
    start = time.perf_counter()
    model = fresh_lm(config.model, config.seed)
    model.load_state_dict(dense_state)
    model.to(device)
    train_set = loss_blocks(split, config.loss_examples, config.seed)
    record: dict[str, Any] = {
        "config": config.as_dict(),
        "status": "ok",
        "lossprune_version": lossprune.__version__,
        "corpus": split.fingerprint,
    }
    dense = measure_lm(model, split, train_set, device)
    record["dense"] = dense
    prune_start = time.perf_counter()
    pruner = lm_pruner(
        model,
        make_criterion(config.criterion, config.lam, config.curvature, (split.block_size,)),
        make_schedule(config.schedule, config.sparsity, config.stages),
        split,
        examples=config.examples,
        seed=config.seed,
        min_density=config.min_density,
    )
    try:
        run_stages(
            pruner, record, stages=config.stages, dense_loss=dense["train_loss"],
            train_loss=lambda: evaluate_lm(model, _loader(train_set), device).loss,
            track_stages=track_stages,
        )  # fmt: skip
    except NonFiniteError as error:
        return diverged_record(record, error, start)
    prune_seconds = time.perf_counter() - prune_start
    pruned = measure_lm(model, split, train_set, device)
    record["pruned"] = pruned
    record["delta_loss"] = pruned["train_loss"] - dense["train_loss"]

    finetune_start = time.perf_counter()
    setup = config.finetune
    try:
        train_lm(
            model,
            split,
            steps=lm_steps(setup, split),
            seed=config.seed,
            lr=setup.lr,
            batch_size=setup.batch_size,
            weight_decay=setup.weight_decay,
            device=device,
            pruner=pruner,
        )
    except FloatingPointError as error:
        return diverged_record(record, error, start)
    finetuned = measure_lm(model, split, train_set, device)
    # One cosine schedule over the whole fine-tune: its end is the only point where the
    # learning rate has come down, so the history is right after pruning and at the end.
    history = [
        {"epoch": 0, **_val_metrics(pruned)},
        {"epoch": setup.epochs, **_val_metrics(finetuned)},
    ]
    record["finetune_history"] = history
    record["finetuned"] = finetuned
    zeros = sum(int((p == 0).sum()) for p in pruner.params.values())
    record["finetuned_sparsity"] = zeros / sum(p.numel() for p in pruner.params.values())
    record["seconds"] = {
        "prune": prune_seconds,
        "finetune": time.perf_counter() - finetune_start,
        "total": time.perf_counter() - start,
    }
    return record


def _val_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("val_")}
