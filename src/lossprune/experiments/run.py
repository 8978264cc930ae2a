"""One pruning run: prune a trained network, measure it, fine-tune it, measure it again.

Measurements follow PAPER.md ("What is measured"): ΔL is the mean training-set loss in eval mode
after minus before pruning (all stages together), ‖Δθ‖² per stage comes from the
:class:`~lossprune.StageReport` s, and the validation gap is taken before and after fine-tuning
with the mask fixed (best validation checkpoint kept).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import lossprune
from lossprune import (
    OBD,
    Compensation,
    Criterion,
    ExponentialSchedule,
    GraSP,
    LinearModel,
    LinearSchedule,
    Magnitude,
    NonFiniteError,
    Pruner,
    QuadraticModel,
    Schedule,
    SynFlow,
)

from .checkpoints import fresh_model
from .data import Split, make_loader
from .records import RunConfig
from .training import evaluate, train

__all__ = [
    "make_criterion",
    "make_schedule",
    "loss_set",
    "measure",
    "tracked_stage",
    "stage_record",
    "run_stages",
    "diverged_record",
    "prune_run",
]

# At most this many points of the loss-vs-sparsity curve per run: a full evaluation after each
# of 140 stages would cost more than the pruning itself.
_TRACKED_POINTS = 20

# StageReport fields recorded per stage (under "stages") where the run produced them: the
# diagnostics (loss on the scoring data, quadratic model's prediction), the compensation and the
# output units cut off from the input (checked for chains of Linear / convolution layers).
_STAGE_EXTRAS = (
    "disconnected_outputs",
    "loss_before",
    "loss_after",
    "predicted_delta",
    "update_lam",
    "compensated",
    "cg_iterations",
    "cg_residual",
    "cg_negative_curvature",
)


# Labels sampled per unit by the presets that use the Monte-Carlo Fisher (the paper's ImageNet
# runs; the records of the language-model presets were made with it too): explicit, so that the
# library's default (one label per unit) does not change a reproduction.
PAPER_MC_SAMPLES = 10


def make_criterion(
    name: str, lam: float | None, curvature: str, in_shape: tuple[int, ...]
) -> Criterion:
    """The library criterion called ``name`` in configs (see ``presets.CRITERIA``)."""
    lam = 0.0 if lam is None else lam
    if name == "LM":
        return LinearModel(lam=lam)
    if name == "QM":
        return QuadraticModel(lam=lam, curvature=curvature, mc_samples=PAPER_MC_SAMPLES)
    if name == "OBD":
        return OBD(lam=lam, curvature=curvature, mc_samples=PAPER_MC_SAMPLES)
    if name == "MP":
        return Magnitude()
    if name == "GraSP":
        return GraSP()
    if name == "SynFlow":
        return SynFlow(input_shape=in_shape)
    raise ValueError(f"unknown criterion {name!r}")


def make_schedule(name: str, sparsity: float, stages: int) -> Schedule:
    """``"exponential"`` or ``"linear"`` schedule reaching ``sparsity`` in ``stages`` stages."""
    if name == "exponential":
        return ExponentialSchedule(sparsity, stages)
    if name == "linear":
        return LinearSchedule(sparsity, stages)
    raise ValueError(f"schedule must be 'exponential' or 'linear', got {name!r}")


def loss_set(split: Split, examples: int | None, seed: int) -> Dataset:
    """The training examples ΔL is measured on: all of them, or a fixed seeded subset."""
    if examples is None or examples >= len(split.train):  # type: ignore[arg-type]
        return split.train
    order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(seed))
    return Subset(split.train, order[:examples].tolist())


def measure(model: nn.Module, split: Split, train_set: Dataset, device: torch.device) -> dict:
    """Loss and error (eval mode) on the training set, validation set and test set."""
    metrics: dict[str, float] = {}
    for part, dataset in (("train", train_set), ("val", split.val), ("test", split.test)):
        loss, error = evaluate(model, dataset, device=device)
        metrics[f"{part}_loss"], metrics[f"{part}_error"] = loss, error
    return metrics


def _scoring_data(split: Split, device: torch.device) -> Any:
    """Training data in the form the Pruner samples from cheaply: tensors if in memory."""
    if isinstance(split.train, TensorDataset):
        inputs, targets = split.train.tensors
        return inputs.to(device), targets.to(device)
    return make_loader(split.train, 100, shuffle=False, seed=0)


def tracked_stage(stage: int, stages: int) -> bool:
    """Whether the loss-vs-sparsity curve gets a point after ``stage`` of ``stages``."""
    every = math.ceil(stages / _TRACKED_POINTS)
    return stage % every == 0 or stage == stages


def prune_run(
    config: RunConfig,
    split: Split,
    dense_state: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    track_stages: bool = False,
) -> dict[str, Any]:
    """Prune a fresh copy of the dense network as ``config`` says; return the run's record.

    A run whose loss or fine-tuning diverges (non-finite values) is recorded with
    ``"status": "diverged"`` and the error message, since divergence is itself a result
    (PAPER.md, finding 2).
    """
    device = torch.device(device)
    start = time.perf_counter()
    model = fresh_model(config.model, split, config.seed)
    model.load_state_dict(dense_state)
    model.to(device)
    train_set = loss_set(split, config.loss_examples, config.seed)
    record: dict[str, Any] = {
        "config": config.as_dict(),
        "status": "ok",
        "lossprune_version": lossprune.__version__,
    }
    dense = measure(model, split, train_set, device)
    record["dense"] = dense
    prune_start = time.perf_counter()

    scoring = _scoring_data(split, device)
    pruner = Pruner(
        model,
        make_criterion(config.criterion, config.lam, config.curvature, split.in_shape),
        make_schedule(config.schedule, config.sparsity, config.stages),
        loss_fn=nn.CrossEntropyLoss(),
        data=scoring,
        examples=min(config.examples, len(split.train)),  # type: ignore[arg-type]
        generator=config.seed,
        eval_mode=True,
        # ΔL is measured on the whole training set below; the per-stage predictions cost one
        # extra gradient and Hessian-vector pass per stage, so only where the config asks.
        diagnostics=config.diagnostics,
        min_density=config.min_density,
        update=_update(config),
    )
    try:
        run_stages(
            pruner, record, stages=config.stages, dense_loss=dense["train_loss"],
            train_loss=lambda: evaluate(model, train_set, device=device)[0],
            track_stages=track_stages,
        )  # fmt: skip
    except NonFiniteError as error:
        return diverged_record(record, error, start)
    prune_seconds = time.perf_counter() - prune_start
    pruned = measure(model, split, train_set, device)
    record["pruned"] = pruned
    record["delta_loss"] = pruned["train_loss"] - dense["train_loss"]

    finetune_start = time.perf_counter()
    try:
        history = train(
            model,
            split,
            epochs=config.finetune.epochs,
            lr=config.finetune.lr,
            momentum=config.finetune.momentum,
            weight_decay=config.finetune.weight_decay,
            batch_size=config.finetune.batch_size,
            lr_schedule=config.finetune.lr_schedule,
            seed=config.seed,
            device=device,
            masks=pruner.masks,
        )
    except FloatingPointError as error:
        return diverged_record(record, error, start)
    record["finetune_history"] = [
        {"epoch": 0, "val_loss": pruned["val_loss"], "val_error": pruned["val_error"]},
        *history,
    ]
    record["finetuned"] = measure(model, split, train_set, device)
    # A check that the mask held through fine-tuning: counted on the weights, not the masks.
    zeros = sum(int((p == 0).sum()) for p in pruner.params.values())
    record["finetuned_sparsity"] = zeros / sum(p.numel() for p in pruner.params.values())
    record["seconds"] = {
        "prune": prune_seconds,
        "finetune": time.perf_counter() - finetune_start,
        "total": time.perf_counter() - start,
    }
    return record


def stage_record(pruner: Pruner) -> dict[str, Any]:
    """What a record keeps of a finished pruner: per-stage columns, final densities, sparsity."""
    reports = pruner.reports
    stages: dict[str, list[Any]] = {
        "step_norm_sq": [r.step_norm_sq for r in reports],
        "sparsity": [r.sparsity for r in reports],
        "pruned": [r.pruned for r in reports],
    }
    for name in _STAGE_EXTRAS:
        column = [getattr(r, name) for r in reports]
        if any(v is not None for v in column):
            stages[name] = column
    density = reports[-1].layer_density
    return {
        "stages": stages,
        "layer_density": density,
        "collapsed_layers": [k for k, v in density.items() if v == 0.0],
        "sparsity": pruner.sparsity(),
    }


def _update(config: RunConfig) -> Compensation | None:
    """The Pruner's weight update for ``config`` (``None``: the paper's zeroing)."""
    if config.update == "zero":
        return None
    assert config.update_lam is not None
    return Compensation(lam=config.update_lam, auto_lam=config.auto_lam)


def diverged_record(record: dict[str, Any], error: Exception, start: float) -> dict[str, Any]:
    """``record`` marked as diverged (a non-finite loss or score stopped the run)."""
    record["status"] = "diverged"
    record["error"] = str(error)
    record["seconds"] = {"total": time.perf_counter() - start}
    return record


def run_stages(
    pruner: Pruner,
    record: dict[str, Any],
    *,
    stages: int,
    dense_loss: float,
    train_loss: Callable[[], float],
    track_stages: bool,
) -> None:
    """Run every stage of ``pruner``; warnings, stage record and loss curve go in ``record``.

    ``train_loss()`` measures the model at tracked stages (:func:`tracked_stage`) when
    ``track_stages``; the curve starts at the dense loss.

    Raises:
        NonFiniteError: a stage met a non-finite loss or score (the caller records divergence).
    """
    curve = [{"stage": 0, "sparsity": 0.0, "train_loss": dense_loss}]
    # Layer-collapse warnings are a result here (PAPER.md, finding 2): keep them in the record.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not pruner.finished:
            report = pruner.step()
            if track_stages and tracked_stage(report.stage, stages):
                curve.append(
                    {"stage": report.stage, "sparsity": report.sparsity, "train_loss": train_loss()}
                )
    record["warnings"] = sorted({str(w.message) for w in caught})
    record.update(stage_record(pruner))
    if track_stages:
        record["loss_curve"] = curve
