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
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

from .allocator import keep_freed_memory
from .analysis import by_sparsity, by_sweep
from .checkpoints import load_or_train
from .checks import (
    SEED_LIMIT,
    OutputFolderError,
    UsageError,
    check_device,
    check_fraction,
    check_int,
    check_number,
    check_output_folder,
)
from .data import DATASET_NAMES, DataFileError, load_dataset
from .findings import beyond_table, findings, findings_table
from .locking import ResultsBusyError, writer_lock
from .models import MODEL_NAMES
from .presets import CRITERIA, PRESETS, SCHEDULES, TrainSetup, get_preset
from .records import ResultsFile, RunConfig, SkippedLinesWarning
from .run import prune_run
from .sweep import FIGURES_NAME, RESULTS_NAME, run_sweep

__all__ = ["main", "build_parser"]

FIGURE_FORMATS = ("png", "pdf", "svg", "eps", "ps")
"""File formats of ``lossprune figures --formats`` (checked before anything is drawn)."""

EXTRA_MODULES = ("matplotlib", "sklearn")
"""Modules of the ``experiments`` extra that the command line needs (figures, digits)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``lossprune sweep: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _argument(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a check: its :class:`UsageError` becomes argparse's message."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = check.__name__  # argparse names the type in "invalid ... value"
    return convert


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"expected a number, got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"expected an integer, got {text!r}") from None


def _int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    return _argument(lambda text: check_int("the value", _integer(text), minimum, maximum))


_POSITIVE_INT = _int_in(1)
_SEED = _int_in(0, SEED_LIMIT)
_DEVICE = _argument(check_device)
_SPARSITY = _argument(lambda text: check_fraction("sparsity", _number(text)))
_LAM = _argument(lambda text: check_number("λ", _number(text), positive=False))
_LEARNING_RATE = _argument(lambda text: check_number("lr", _number(text), positive=True))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=_DEVICE,
        default="auto",
        help="cpu, cuda, cuda:N or auto (cuda when available; default)",
    )
    parser.add_argument(
        "--threads",
        type=_POSITIVE_INT,
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
        type=_SEED,
        default=0,
        help="fixes the data split, initialisation, training and pruning",
    )
    parser.add_argument("--epochs", type=_POSITIVE_INT, default=20, help="training epochs")
    parser.add_argument("--lr", type=_LEARNING_RATE, default=0.1, help="training learning rate")
    parser.add_argument("--lr-schedule", default="step", choices=("constant", "step", "cosine"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lossprune`` (exposed for the documentation and tests)."""
    parser = _Parser(
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
    prune.add_argument("--lam", type=_LAM, default=1e-2, help="step-size strength λ (LM/QM/OBD)")
    prune.add_argument("--stages", type=_POSITIVE_INT, default=14, help="number of stages π")
    prune.add_argument("--schedule", default="exponential", choices=SCHEDULES)
    prune.add_argument("--sparsity", type=_SPARSITY, default=0.95, help="fraction removed")
    prune.add_argument("--examples", type=_POSITIVE_INT, default=1000, help="scoring examples")
    prune.add_argument("--curvature", default="fisher", choices=("fisher", "fisher_mc"))
    prune.add_argument("--finetune-epochs", type=_POSITIVE_INT, default=5)
    prune.add_argument("--finetune-lr", type=_LEARNING_RATE, default=0.1)
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
        "--seeds", type=_SEED, nargs="+", default=None, help="override the preset's seeds"
    )
    sweep.add_argument("--data-root", default=None, help="dataset folder for file presets")
    existing = sweep.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="skip the runs already in <out>/results.jsonl"
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="set <out>/results.jsonl and <out>/figures aside as *.bak-<time> and start again "
        "(trained networks are kept)",
    )
    sweep.add_argument(
        "--jobs",
        type=_POSITIVE_INT,
        default=None,
        help="worker processes (default: the preset's on CPU, 1 on GPU)",
    )
    sweep.add_argument(
        "--max-runs",
        type=_POSITIVE_INT,
        default=None,
        help="stop after this many new runs (continue later with --resume)",
    )
    sweep.add_argument("--no-figures", action="store_true", help="skip figures and findings")
    _add_common(sweep)

    figures = commands.add_parser("figures", help="draw the figures of a results file")
    figures.add_argument("--results", required=True, help="a results.jsonl written by sweep")
    figures.add_argument("--out", required=True, help="folder for the PNG/PDF files")
    figures.add_argument("--formats", nargs="+", default=["png", "pdf"], choices=FIGURE_FORMATS)
    return parser


def _set_threads(threads: int | None) -> None:
    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)


def _report(results: Path, out: Path, formats: Sequence[str] = ("png", "pdf")) -> None:
    """Write figures and ``findings.md`` next to them; print the findings.

    Runs of different sweeps (dataset, model, training setup) are never averaged together: a
    file holding several gets one sub-folder of figures per sweep.
    """
    check_output_folder(out)
    groups = by_sweep(ResultsFile(results).records()) or {"": []}  # empty: empty findings
    if len(groups) > 1:
        print(f"{results} holds {len(groups)} sweeps ({', '.join(groups)}): one folder each")
    for name, records in groups.items():
        folder = check_output_folder(out / name) if len(groups) > 1 else out
        _report_sweep(records, folder, formats)


def _report_sweep(records: list[dict], folder: Path, formats: Sequence[str]) -> None:
    """Figures and findings of one sweep; one sub-folder ``sparsity-<percent>`` per target.

    The paper's findings and figures compare runs at one target sparsity; a sweep over several
    (``tinylm-quick``: 50/70/90%) gets them per sparsity, plus the language-model figures over
    all of them in ``folder`` and every sparsity's findings in one ``findings.md``.
    """
    # Imported here, not above: without matplotlib this module must still import, so that main
    # can say which extra to install.
    from .figures import write_lm_figures

    parts = by_sparsity(records)
    if len(parts) <= 1:
        _report_part(records, folder, formats)
        return
    sections = []
    for sparsity, part in parts.items():
        sections.append(
            f"## Sparsity {sparsity:.0%}\n\n"
            + _report_part(
                part, check_output_folder(folder / f"sparsity-{sparsity * 100:g}"), formats
            )
        )
    (folder / "findings.md").write_text("\n".join(sections))
    written = write_lm_figures(records, folder, formats)
    print(f"{len(written)} figure files over all sparsities written to {folder}")


def _report_part(records: list[dict], folder: Path, formats: Sequence[str]) -> str:
    """Write ``findings.md``, ``beyond.md`` and the figures of ``records``; return the table."""
    from .figures import write_figures

    # The findings first: they are plain text and must not depend on drawing succeeding.
    table = findings_table(findings(records))
    (folder / "findings.md").write_text(table)
    beyond = beyond_table(records)
    if beyond:
        (folder / "beyond.md").write_text(beyond)
    written = write_figures(records, folder, formats)
    print(f"{len(written)} figure files and findings.md written to {folder}")
    print(table)
    return table


def _check_data_root(args: argparse.Namespace) -> None:
    if args.dataset != "digits" and args.data_root is None:
        raise UsageError(
            f"--dataset {args.dataset} is read from local files: pass --data-root DIR "
            "(nothing is downloaded)"
        )


def _train(args: argparse.Namespace) -> None:
    _check_data_root(args)
    out = check_output_folder(args.out)
    _set_threads(args.threads)
    split = load_dataset(args.dataset, args.data_root, args.seed)
    setup = TrainSetup(args.epochs, args.lr, args.lr_schedule)
    _, log = load_or_train(
        out,
        args.dataset,
        args.model,
        args.seed,
        setup,
        split,
        device=args.device,
        progress=True,
    )
    best = min(log["history"], key=lambda epoch: epoch["val_error"])
    print(
        f"dense {args.model} on {args.dataset}, seed {args.seed}: best validation error "
        f"{best['val_error']:.4f} (epoch {best['epoch']}); cached under {args.out}/models"
    )


def _prune(args: argparse.Namespace) -> None:
    _check_data_root(args)
    out = check_output_folder(args.out)
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
    results = ResultsFile(out / RESULTS_NAME)
    with writer_lock(results.path):
        recorded = [r for r in results if RunConfig.from_dict(r["config"]).key() == config.key()]
        if recorded:
            print(
                f"lossprune prune: {config.label()} is already recorded in {results.path}; "
                "not run again",
                file=sys.stderr,
            )
            record = recorded[0]
        else:
            _set_threads(args.threads)
            split = load_dataset(args.dataset, args.data_root, args.seed)
            state, _ = load_or_train(
                out,
                args.dataset,
                args.model,
                args.seed,
                config.train,
                split,
                device=args.device,
                progress=True,
            )
            record = prune_run(config, split, state, device=args.device)
            results.append(record)
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
        device=args.device,
        data_root=args.data_root,
        resume=args.resume,
        overwrite=args.overwrite,
        jobs=args.jobs,
        max_runs=args.max_runs,
    )
    print(f"results: {results}")
    if not args.no_figures:
        _report(results, out / FIGURES_NAME)


def _figures(args: argparse.Namespace) -> None:
    results = Path(args.results)
    if not results.is_file():
        raise FileNotFoundError(f"results file not found: {results}")
    _report(results, Path(args.out), args.formats)


_COMMANDS = {"train": _train, "prune": _prune, "sweep": _sweep, "figures": _figures}

# Exit status 2: the arguments cannot work (as argparse's own errors). Exit status 1: they were
# fine, but a file or the machine failed (corrupt data, unwritable folder, busy results file).
# Checked in this order: DataFileError is a ValueError and OutputFolderError an OSError.
_RUNTIME_ERRORS = (DataFileError, OutputFolderError, ResultsBusyError, FloatingPointError)
_USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


class MissingExtraError(ImportError):
    """``lossprune`` was installed without the ``experiments`` extra the command line needs."""


def _check_extra() -> None:
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            "the command line needs the 'experiments' extra "
            f"({', '.join(missing)} not installed): pip install 'lossprune[experiments]'"
        )


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # Replaces warnings.showwarning inside main: the message only, no source line.
    print(f"lossprune: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lossprune`` console script; returns the exit status.

    Every error is one line on stderr: exit status 2 for arguments that cannot work, 1 for
    files or machines that fail, 130 for Ctrl-C (finished runs stay recorded).
    """
    try:
        _check_extra()  # before parsing: even --help must not end in a traceback
    except MissingExtraError as error:
        print(f"lossprune: error: {error}", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    prefix = f"lossprune {args.command}: error:"
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        warnings.simplefilter("always", SkippedLinesWarning)  # every reading is counted anew
        try:
            _COMMANDS[args.command](args)
        except _RUNTIME_ERRORS as error:
            print(f"{prefix} {error}", file=sys.stderr)
            return 1
        except _USAGE_ERRORS as error:
            print(f"{prefix} {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"{prefix} {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            hint = "; the finished runs are recorded: continue with --resume"
            print(
                f"lossprune {args.command}: interrupted{hint if args.command == 'sweep' else ''}",
                file=sys.stderr,
            )
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
