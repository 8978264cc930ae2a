r"""2:4 sparsity on digits: how much of the loss each criterion keeps (issue 14's quality table).

Every method prunes the same trained digits MLP (64-300-100-10, tanh) to 2:4 along each
weight matrix's input dimension (:class:`~lossprune.NM`), scoring on the whole training set:

=============================== =============================================================
2:4 magnitude                   :class:`~lossprune.Magnitude`, one stage
2:4 Wanda                       :class:`~lossprune.Wanda` (Sun et al. 2024), one stage
2:4 QM (π = 1)                  :class:`~lossprune.QuadraticModel`, one stage
2:4 QM (π = 2)                  two stages: 1:4, then 2:4 (the most an N:M schedule can have)
2:4 QM + compensation (π = 2)   two stages, the kept weights moved by
                                :class:`~lossprune.Compensation`
2:4 magnitude + compensation    the same update after magnitude selection: which of the two
                                does the work
=============================== =============================================================

Measured as in :mod:`~lossprune.experiments.run`: ΔL is the mean training-set loss (eval
mode) after minus before pruning; validation loss and error are taken before and after a short
fine-tune with the mask fixed. The share of the magnitude gap a method closes is

.. math:: \text{closed} = \frac{L_\text{magnitude} - L_\text{method}}{L_\text{magnitude} -
   L_\text{dense}}

in training loss before fine-tuning (SparseGPT closes about 90 % of it on LLaMA-2-7B).

Run ``python -m lossprune.experiments.nm_quality`` (a few minutes on 2 cores); it writes the
JSON and the figure that ``docs/structured.md`` shows.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lossprune import (
    NM,
    Compensation,
    Criterion,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
    Wanda,
)
from lossprune.sparse import is_nm

from .data import Split, load_digits_split
from .models import MLP
from .presets import TrainSetup
from .training import evaluate, train

__all__ = ["NMQualitySetup", "Method", "methods", "run_nm_quality", "plot_nm_quality", "main"]

CE = nn.CrossEntropyLoss()


@dataclass(frozen=True)
class NMQualitySetup:
    """What the table is measured on.

    Attributes:
        seeds: one trained network (and data split) per seed.
        hidden: hidden widths of the MLP (each must be divisible by ``m``).
        train: training of the dense network.
        finetune: fine-tuning with the mask fixed.
        lam: λ of the quadratic model's step-size constraint.
        compensation_lam: λ of the compensation update.
        n, m: the N:M pattern.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    hidden: tuple[int, ...] = (300, 100)
    train: TrainSetup = field(default_factory=lambda: TrainSetup(epochs=20))
    finetune: TrainSetup = field(default_factory=lambda: TrainSetup(epochs=5))
    lam: float = 1e-2
    compensation_lam: float = 1e-2
    n: int = 2
    m: int = 4


@dataclass(frozen=True)
class Method:
    """One row of the table: a criterion, a number of stages and an optional update."""

    name: str
    criterion: Criterion
    stages: int
    update: Compensation | None = None


def methods(setup: NMQualitySetup) -> list[Method]:
    """The rows of the table (module docstring)."""
    qm = QuadraticModel(lam=setup.lam)
    compensation = Compensation(lam=setup.compensation_lam, cg_iters=50)
    pattern = f"{setup.n}:{setup.m}"
    return [
        Method(f"{pattern} magnitude", Magnitude(), 1),
        Method(f"{pattern} Wanda", Wanda(), 1),
        Method(f"{pattern} QM (π = 1)", qm, 1),
        Method(f"{pattern} QM (π = 2)", qm, 2),
        Method(f"{pattern} QM + compensation (π = 2)", qm, 2, compensation),
        Method(f"{pattern} magnitude + compensation (π = 2)", Magnitude(), 2, compensation),
    ]


def _measure(model: nn.Module, split: Split) -> dict[str, float]:
    train_loss, train_error = evaluate(model, split.train)
    val_loss, val_error = evaluate(model, split.val)
    return {"train_loss": train_loss, "val_loss": val_loss, "val_error": val_error}


def _finetune(model: nn.Module, split: Split, setup: TrainSetup, seed: int, masks: Any) -> None:
    train(
        model, split, epochs=setup.epochs, lr=setup.lr, momentum=setup.momentum,
        weight_decay=setup.weight_decay, batch_size=setup.batch_size,
        lr_schedule=setup.lr_schedule, seed=seed, masks=masks,
    )  # fmt: skip


def _one_seed(setup: NMQualitySetup, seed: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    dense = MLP(in_features=64, hidden=setup.hidden, classes=split.classes)
    _finetune(dense, split, setup.train, seed, None)
    dense.eval()
    before = _measure(dense, split)
    inputs, targets = split.train.tensors  # type: ignore[attr-defined]
    records = [{"seed": seed, "method": "dense", **before, "delta_loss": 0.0}]
    records[0].update({f"{k}_finetuned": v for k, v in before.items()})
    final = 1.0 - setup.n / setup.m
    for method in methods(setup):
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        pruner = Pruner(
            model, method.criterion, LinearSchedule(final, method.stages), loss_fn=CE,
            data=(inputs, targets), scope=NM(setup.n, setup.m), update=method.update,
            diagnostics=False,
        )  # fmt: skip
        pruner.run()
        weights = pruner.params
        assert all(is_nm(weights[k] != 0, setup.n, setup.m, dim=1) for k in weights)
        pruned = _measure(model, split)
        _finetune(model, split, setup.finetune, seed, pruner.masks)
        tuned = _measure(model, split)
        record = {
            "seed": seed,
            "method": method.name,
            **pruned,
            "delta_loss": pruned["train_loss"] - before["train_loss"],
            **{f"{k}_finetuned": v for k, v in tuned.items()},
            "sparsity": pruner.sparsity(),
            "seconds": time.perf_counter() - start,
        }
        records.append(record)
        log(f"seed {seed} {method.name}: ΔL {record['delta_loss']:.4f}")
    return records


def _summary(records: list[dict[str, Any]], setup: NMQualitySetup) -> dict[str, Any]:
    names = list(dict.fromkeys(r["method"] for r in records))
    keys = ("delta_loss", "train_loss", "val_loss", "val_error", "val_loss_finetuned",
            "val_error_finetuned")  # fmt: skip
    table = {}
    for name in names:
        rows = [r for r in records if r["method"] == name]
        table[name] = {k: statistics.fmean(r[k] for r in rows) for k in keys}
    magnitude = f"{setup.n}:{setup.m} magnitude"
    closed = {}
    for name in names:
        shares = []
        for seed in setup.seeds:
            by_method = {r["method"]: r for r in records if r["seed"] == seed}
            gap = by_method[magnitude]["train_loss"] - by_method["dense"]["train_loss"]
            shares.append(
                (by_method[magnitude]["train_loss"] - by_method[name]["train_loss"]) / gap
            )
        closed[name] = statistics.fmean(shares)
    best = f"{setup.n}:{setup.m} QM + compensation (π = 2)"
    return {
        "table": table,
        "gap_closed": closed,
        "compensation_closes_85_percent": closed[best] >= 0.85,
    }


def run_nm_quality(
    setup: NMQualitySetup = NMQualitySetup(), log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Every method on every seed; records, the per-method means and the share of the gap closed.

    Returns:
        ``{"setup", "records", "table", "gap_closed", "compensation_closes_85_percent"}``.
    """
    records = [r for seed in setup.seeds for r in _one_seed(setup, seed, log)]
    return {"setup": asdict(setup), "records": records, **_summary(records, setup)}


def plot_nm_quality(result: dict[str, Any]) -> Any:
    """Training loss after pruning (log scale); validation error before and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    table = result["table"]
    names = [n for n in table if n != "dense"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    positions = range(len(names))
    # The training loss itself, not ΔL: compensation can end below the dense loss (ΔL < 0).
    left.bar(positions, [table[n]["train_loss"] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        points = [r["train_loss"] for r in result["records"] if r["method"] == name]
        left.scatter([i] * len(points), points, color="black", s=10, zorder=3)
    left.axhline(table["dense"]["train_loss"], color="black", ls="--", label="dense")
    left.set_yscale("log")
    left.set_ylabel("training loss after pruning")
    left.set_title("Training loss at 2:4, before fine-tuning (ΔL = bar − dense)")
    left.legend()
    width = 0.38
    right.bar([i - width / 2 for i in positions], [100 * table[n]["val_error"] for n in names],
              width, label="before fine-tuning")  # fmt: skip
    right.bar([i + width / 2 for i in positions],
              [100 * table[n]["val_error_finetuned"] for n in names], width,
              label="after fine-tuning")  # fmt: skip
    right.axhline(100 * table["dense"]["val_error"], color="black", ls="--", label="dense")
    right.set_ylabel("validation error (%)")
    right.set_title("Validation error")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(list(positions))
        ax.set_xticklabels([n.removeprefix("2:4 ") for n in names], rotation=25, ha="right")
    figure.tight_layout()
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lossprune.experiments.nm_quality --json ... --figure ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results-nm-quality.json"))
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/nm_quality.png"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    setup = NMQualitySetup(seeds=tuple(range(args.seeds)))
    start = time.perf_counter()
    result = run_nm_quality(setup, log=print)
    result["seconds"] = time.perf_counter() - start
    args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    plot_nm_quality(result).savefig(args.figure, dpi=110)
    for name, row in result["table"].items():
        closed = result["gap_closed"][name]
        print(
            f"{name:40s} ΔL {row['delta_loss']:.4f}  val err {row['val_error']:.4f} -> "
            f"{row['val_error_finetuned']:.4f}  closed {closed:.3f}"
        )


if __name__ == "__main__":
    main()
