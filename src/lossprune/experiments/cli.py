"""The ``lossprune`` command line: ``train``, ``prune``, ``sweep`` and ``figures``.

Examples::

    lossprune sweep --preset digits-quick              # the demo: runs/digits-quick/
    lossprune sweep --preset digits-quick --resume     # finish an interrupted sweep
    lossprune figures --results runs/digits-quick/results.jsonl --out figs/
    lossprune train --dataset digits --epochs 20 --out runs/dense
    lossprune prune --criterion QM --lam 1e-2 --stages 14 --out runs/single
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .checkpoints import load_or_train
from .data import DATASET_NAMES, load_dataset
from .figures import write_figures
from .findings import beyond_table, findings, findings_table
from .models import MODEL_NAMES
from .presets import CRITERIA, PRESETS, SCHEDULES, TrainSetup, get_preset
from .records import ResultsFile, RunConfig
from .run import prune_run
from .sweep import RESULTS_NAME, SweepExistsError, run_sweep

__all__ = ["main", "build_parser"]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's; presets may set 1)",
    )


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", choices=DATASET_NAMES)
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder of the MNIST / CIFAR-10 / ImageNet files (never downloaded)",
    )
    parser.add_argument("--model", default="mlp", choices=MODEL_NAMES)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="fixes the data split, initialisation, training and pruning",
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.1, help="training learning rate")
    parser.add_argument("--lr-schedule", default="step", choices=("constant", "step", "cosine"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lossprune`` (exposed for the documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="lossprune",
        description="Reproduce 'Revisiting Loss Modelling for Unstructured Pruning' "
        "(Laurent et al. 2020) with the lossprune library.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a dense network (cached per seed)")
    _add_data(train)
    train.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    _add_common(train)

    prune = commands.add_parser("prune", help="prune one trained network, then fine-tune it")
    _add_data(prune)
    prune.add_argument("--criterion", default="QM", choices=CRITERIA)
    prune.add_argument("--lam", type=float, default=1e-2, help="step-size strength λ (LM/QM/OBD)")
    prune.add_argument("--stages", type=int, default=14, help="number of pruning stages π")
    prune.add_argument("--schedule", default="exponential", choices=SCHEDULES)
    prune.add_argument("--sparsity", type=float, default=0.95, help="fraction of weights removed")
    prune.add_argument("--examples", type=int, default=1000, help="scoring examples per stage")
    prune.add_argument("--curvature", default="fisher", choices=("fisher", "fisher_mc"))
    prune.add_argument("--finetune-epochs", type=int, default=5)
    prune.add_argument("--finetune-lr", type=float, default=0.1)
    prune.add_argument(
        "--out",
        default="runs/prune",
        help="output folder: models/ and results.jsonl (default runs/prune)",
    )
    _add_common(prune)

    sweep = commands.add_parser("sweep", help="run a preset grid of pruning runs, then figures")
    sweep.add_argument(
        "--preset",
        default="digits-quick",
        choices=sorted(PRESETS),
        help="default digits-quick; see --list",
    )
    sweep.add_argument("--list", action="store_true", help="describe the presets and exit")
    sweep.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    sweep.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="override the preset's seeds"
    )
    sweep.add_argument("--data-root", default=None, help="dataset folder for file presets")
    sweep.add_argument(
        "--resume", action="store_true", help="skip the runs already in <out>/results.jsonl"
    )
    sweep.add_argument(
        "--overwrite",
        action="store_true",
        help="discard <out>/results.jsonl (trained networks are kept)",
    )
    sweep.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (default: the preset's on CPU, 1 on GPU)",
    )
    sweep.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help="stop after this many new runs (continue later with --resume)",
    )
    sweep.add_argument("--no-figures", action="store_true", help="skip figures and findings")
    _add_common(sweep)

    figures = commands.add_parser("figures", help="draw the figures of a results file")
    figures.add_argument("--results", required=True, help="a results.jsonl written by sweep")
    figures.add_argument("--out", required=True, help="folder for the PNG/PDF files")
    figures.add_argument("--formats", nargs="+", default=["png", "pdf"])
    return parser


def _set_threads(threads: int | None) -> None:
    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)


def _report(results: Path, out: Path, formats: Sequence[str] = ("png", "pdf")) -> None:
    """Write figures and ``findings.md`` next to them; print the findings."""
    records = ResultsFile(results).records()
    written = write_figures(records, out, formats)
    beyond = beyond_table(records)
    if beyond:
        (out / "beyond.md").write_text(beyond)
    table = findings_table(findings(records))
    (out / "findings.md").write_text(table)
    print(f"{len(written)} figure files and findings.md written to {out}")
    print(table)


def _train(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    split = load_dataset(args.dataset, args.data_root, args.seed)
    setup = TrainSetup(args.epochs, args.lr, args.lr_schedule)
    _, log = load_or_train(
        args.out,
        args.dataset,
        args.model,
        args.seed,
        setup,
        split,
        device=_device(args.device),
        progress=True,
    )
    best = min(log["history"], key=lambda epoch: epoch["val_error"])
    print(
        f"dense {args.model} on {args.dataset}, seed {args.seed}: best validation error "
        f"{best['val_error']:.4f} (epoch {best['epoch']}); cached under {args.out}/models"
    )


def _prune(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    device = _device(args.device)
    split = load_dataset(args.dataset, args.data_root, args.seed)
    config = RunConfig(
        dataset=args.dataset,
        model=args.model,
        sparsity=args.sparsity,
        criterion=args.criterion,
        lam=args.lam,
        stages=args.stages,
        schedule=args.schedule,
        seed=args.seed,
        examples=args.examples,
        curvature=args.curvature,
        loss_examples=None,
        train=TrainSetup(args.epochs, args.lr, args.lr_schedule),
        finetune=TrainSetup(args.finetune_epochs, args.finetune_lr),
    )
    state, _ = load_or_train(
        args.out,
        args.dataset,
        args.model,
        args.seed,
        config.train,
        split,
        device=device,
        progress=True,
    )
    record = prune_run(config, split, state, device=device)
    ResultsFile(Path(args.out) / RESULTS_NAME).append(record)
    summary = {"run": config.label(), "status": record["status"]}
    if record["status"] == "ok":
        summary |= {
            "delta_loss": record["delta_loss"],
            "val_error": {k: record[k]["val_error"] for k in ("dense", "pruned", "finetuned")},
            "layer_density": record["layer_density"],
        }
    print(json.dumps(summary, indent=1, ensure_ascii=False))


def _sweep(args: argparse.Namespace) -> None:
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:24s} {preset.description}")
        return
    preset = get_preset(args.preset)
    _set_threads(args.threads)
    out = Path(args.out or f"runs/{preset.name}")
    results = run_sweep(
        preset,
        out,
        seeds=args.seeds,
        device=_device(args.device),
        data_root=args.data_root,
        resume=args.resume,
        overwrite=args.overwrite,
        jobs=args.jobs,
        max_runs=args.max_runs,
    )
    print(f"results: {results}")
    if not args.no_figures:
        _report(results, out / "figures")


def _figures(args: argparse.Namespace) -> None:
    results = Path(args.results)
    if not results.is_file():
        raise FileNotFoundError(f"results file not found: {results}")
    _report(results, Path(args.out), args.formats)


_COMMANDS = {"train": _train, "prune": _prune, "sweep": _sweep, "figures": _figures}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lossprune`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except (FileNotFoundError, SweepExistsError, ValueError) as error:
        # Expected user errors (missing files, existing results, bad values): one clear line.
        print(f"lossprune {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
