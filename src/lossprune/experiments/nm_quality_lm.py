r"""2:4 sparsity on the tiny language model: the transformer half of issue 14's quality table.

The same rows as :mod:`~lossprune.experiments.nm_quality` (magnitude, Wanda, QM in one and two
stages, QM and magnitude followed by :class:`~lossprune.Compensation`), on the byte-level GPT-2 of
:mod:`~lossprune.experiments.lm` trained on the standard library's docstrings
(:mod:`~lossprune.experiments.text`). Every model is pruned to 2:4 along the input dimension of
its eight ``Conv1D`` projections (dim 0 of their ``(in, out)`` weights) with the model's own
loss (``loss_fn`` omitted) on ``score_sequences`` training sequences. QM uses the Monte-Carlo
Fisher (one sampled label per token): the exact Fisher costs :math:`T \cdot V` backward passes per
sequence.

Measured: the loss on the scoring sequences (what the loss models and the compensation see) and
the validation loss / perplexity, before and after a short fine-tune with the masks fixed. The
share of the magnitude gap a method closes is computed on both losses, as in
:mod:`~lossprune.experiments.nm_quality`.

Run ``python -m lossprune.experiments.nm_quality_lm``; it writes
``benchmarks/results-nm-quality-lm.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from lossprune import NM, Compensation, LinearSchedule, Magnitude, Pruner, QuadraticModel, Wanda

from .lm import LMConfig, build_tiny_lm, evaluate_lm, train_lm
from .nm_quality import Method
from .text import load_text_split

__all__ = ["LMQualitySetup", "lm_methods", "run_nm_quality_lm", "main"]


@dataclass(frozen=True)
class LMQualitySetup:
    """What the language-model table is measured on (one seed: a trained model is minutes)."""

    seed: int = 0
    model: LMConfig = LMConfig(layers=2, width=64, heads=4, block_size=32)
    corpus_bytes: int = 100_000
    train_steps: int = 300
    finetune_steps: int = 30
    batch_size: int = 32
    score_sequences: int = 256
    lam: float = 1e-2
    compensation_lam: float = 1.0
    cg_iters: int = 10


def lm_methods(setup: LMQualitySetup) -> list[Method]:
    """The rows of the table (module docstring)."""
    qm = QuadraticModel(lam=setup.lam, curvature="fisher_mc")
    compensation = Compensation(lam=setup.compensation_lam, cg_iters=setup.cg_iters)
    return [
        Method("2:4 magnitude", Magnitude(), 1),
        Method("2:4 Wanda", Wanda(), 1),
        Method("2:4 QM (π = 1)", qm, 1),
        Method("2:4 QM (π = 2)", qm, 2),
        Method("2:4 QM + compensation (π = 2)", qm, 2, compensation),
        Method("2:4 magnitude + compensation (π = 2)", Magnitude(), 2, compensation),
    ]


def _losses(model: torch.nn.Module, score: DataLoader, val: DataLoader) -> dict[str, float]:
    validation = evaluate_lm(model, val)
    return {
        "score_loss": evaluate_lm(model, score).loss,
        "val_loss": validation.loss,
        "val_perplexity": validation.perplexity,
    }


def _gap_closed(rows: dict[str, dict[str, Any]], key: str) -> dict[str, float]:
    gap = rows["2:4 magnitude"][key] - rows["dense"][key]
    return {name: (rows["2:4 magnitude"][key] - row[key]) / gap for name, row in rows.items()}


def run_nm_quality_lm(
    setup: LMQualitySetup = LMQualitySetup(), log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Train the dense model once, then prune and fine-tune a copy per method.

    Returns:
        ``{"setup", "rows", "gap_closed_score", "gap_closed_val"}``; ``rows`` maps each method
        (and ``"dense"``) to its losses before and after fine-tuning.
    """
    split = load_text_split(max_bytes=setup.corpus_bytes, block_size=setup.model.block_size)
    dense = build_tiny_lm(setup.model, seed=setup.seed)
    train_lm(dense, split, steps=setup.train_steps, seed=setup.seed, batch_size=setup.batch_size)
    score = DataLoader(
        Subset(split.train, range(setup.score_sequences)), batch_size=setup.batch_size
    )
    val = split.loader("val", 64, shuffle=False)
    rows: dict[str, dict[str, Any]] = {"dense": _losses(dense, score, val)}
    rows["dense"].update({f"{k}_finetuned": v for k, v in rows["dense"].items()})
    for method in lm_methods(setup):
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        pruner = Pruner(
            model, method.criterion, LinearSchedule(0.5, method.stages), data=score,
            scope=NM(2, 4), update=method.update, diagnostics=False, generator=setup.seed,
        )  # fmt: skip
        pruner.run()
        row = _losses(model, score, val)
        train_lm(
            model, split, steps=setup.finetune_steps, seed=setup.seed,
            batch_size=setup.batch_size, lr=1e-3, pruner=pruner,
        )  # fmt: skip
        row.update({f"{k}_finetuned": v for k, v in _losses(model, score, val).items()})
        row["sparsity"] = pruner.sparsity()
        row["seconds"] = time.perf_counter() - start
        rows[method.name] = row
        log(f"{method.name}: val loss {row['val_loss']:.4f} -> {row['val_loss_finetuned']:.4f}")
    return {
        "setup": asdict(setup),
        "rows": rows,
        "gap_closed_score": _gap_closed(rows, "score_loss"),
        "gap_closed_val": _gap_closed(rows, "val_loss"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lossprune.experiments.nm_quality_lm --json ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results-nm-quality-lm.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run_nm_quality_lm(log=print)
    result["seconds"] = time.perf_counter() - start
    args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    for name, row in result["rows"].items():
        print(
            f"{name:40s} val loss {row['val_loss']:.4f} -> {row['val_loss_finetuned']:.4f}  "
            f"closed (scoring loss) {result['gap_closed_score'][name]:.3f}  "
            f"(validation) {result['gap_closed_val'][name]:.3f}"
        )


if __name__ == "__main__":
    main()
