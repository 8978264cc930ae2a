"""Sweeps: expand a preset into runs, run the missing ones, append each record as it finishes.

Resuming is keyed on the canonical configuration (:meth:`RunConfig.key`), so running the same
sweep again, or a larger grid over a partly finished one, only runs what is not yet recorded.
Runs may be spread over worker processes (``jobs``); every run is fully determined by its
configuration, so the records do not depend on ``jobs``, only their order in the file does.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .checkpoints import checkpoint_path, load_or_train
from .checks import SEED_LIMIT, UsageError, check_device, check_int, check_output_folder
from .data import Split, load_dataset
from .lm_run import TEXT_DATASET, lm_prune_run, load_lm_split, load_or_train_lm
from .locking import writer_lock
from .presets import LOSS_MODELS, Preset
from .records import ResultsFile, RunConfig, set_aside
from .run import prune_run
from .text import TextSplit
from .workers import die_with_parent

__all__ = [
    "PlannedRun",
    "SweepExistsError",
    "MixedResultsError",
    "plan",
    "run_sweep",
    "check_same_sweep",
    "RESULTS_NAME",
    "FIGURES_NAME",
]

RESULTS_NAME = "results.jsonl"
FIGURES_NAME = "figures"
"""Folder of ``<out>`` that ``lossprune sweep`` draws the figures into."""


class SweepExistsError(FileExistsError):
    """The output folder already holds results and neither resume nor overwrite was asked for."""


class MixedResultsError(UsageError):
    """A resumed sweep would add runs of one preset to the results of another."""


@dataclass(frozen=True)
class PlannedRun:
    """A configuration to run, and whether to record its loss after the stages (Fig. 2)."""

    config: RunConfig
    track_stages: bool


def plan(preset: Preset, seeds: Sequence[int] | None = None) -> list[PlannedRun]:
    """Every distinct run of ``preset`` for ``seeds`` (default: the preset's), seed by seed.

    Criteria without a step-size strength (MP, GraSP, SynFlow) run once whatever the lambdas:
    they are invariant to it. A configuration listed by several grids runs once, with stage
    tracking if any of them asks for it.
    """
    seeds = tuple(preset.seeds if seeds is None else seeds)
    planned: dict[str, PlannedRun] = {}
    for seed, sparsity, grid in product(seeds, preset.sparsities, preset.grids):
        for criterion, lam, stages, schedule, update in product(
            grid.criteria, grid.lams, grid.stages, grid.schedules, grid.updates
        ):
            config = RunConfig(
                dataset=preset.dataset,
                model=preset.model,
                sparsity=sparsity,
                criterion=criterion,
                lam=lam if criterion in LOSS_MODELS else None,
                stages=stages,
                schedule=schedule,
                seed=seed,
                examples=preset.examples,
                curvature=preset.curvature,
                loss_examples=preset.loss_examples,
                train=preset.train,
                finetune=preset.finetune,
                update=update.kind,
                update_lam=update.lam,
                auto_lam=update.auto_lam,
                min_density=grid.min_density,
                diagnostics=grid.diagnostics,
            )
            key = config.key()
            track = grid.track_stages or (key in planned and planned[key].track_stages)
            planned[key] = PlannedRun(config, track)
    return list(planned.values())


@lru_cache(maxsize=4)
def _split(dataset: str, root: str | None, seed: int) -> Split:
    # Cached per process: every run of a seed uses the same split.
    return load_dataset(dataset, root, seed)


@lru_cache(maxsize=2)
def _text_split(model: str) -> TextSplit:
    # The corpus is read once per process; its blocks depend on the model's context length.
    return load_lm_split(model)


@lru_cache(maxsize=8)
def _dense_state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _execute(
    run: PlannedRun, out_dir: str, root: str | None, device: str, threads: int | None
) -> dict[str, Any]:
    """Run one planned run (in this process or a worker); returns its record."""
    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)
    config = run.config
    path = checkpoint_path(out_dir, config.dataset, config.model, config.seed, config.train)
    if config.dataset == TEXT_DATASET:
        return lm_prune_run(
            config,
            _text_split(config.model),
            _dense_state(str(path)),
            device=device,
            track_stages=run.track_stages,
        )
    split = _split(config.dataset, root, config.seed)
    return prune_run(
        config, split, _dense_state(str(path)), device=device, track_stages=run.track_stages
    )


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_sweep(
    preset: Preset,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
    data_root: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    jobs: int | None = None,
    max_runs: int | None = None,
    progress: bool = True,
) -> Path:
    """Run the runs of ``preset`` not yet in ``<out_dir>/results.jsonl``; return that path.

    Everything is checked before any work starts and before any result is touched: the
    arguments, the device, the output folder, the data files of the seeds to run, and that an
    existing results file belongs to this preset. Only then are the old results of
    ``overwrite`` set aside (renamed ``results.jsonl.bak-<time>``, never deleted). The results
    file has one writer at a time (:func:`~lossprune.experiments.locking.writer_lock`).

    Args:
        preset: what to run.
        out_dir: receives ``results.jsonl`` and the trained dense networks (``models/``).
        seeds: override the preset's seeds.
        device: where to train and prune (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        data_root: folder of the dataset files for presets that read local files.
        resume: skip the configurations already recorded.
        overwrite: set the existing results and figures aside first (the cached dense networks
            are kept).
        jobs: worker processes (default: the preset's on CPU, 1 on a GPU).
        max_runs: stop after this many new runs (a resumable partial sweep).
        progress: show a tqdm bar over runs.

    Raises:
        UsageError: bad ``seeds``, ``jobs``, ``max_runs`` or ``device``, both ``resume`` and
            ``overwrite``, or no ``data_root`` for a preset that reads local files.
        SweepExistsError: results exist and neither ``resume`` nor ``overwrite`` is set.
        MixedResultsError: ``resume`` on results of another preset or configuration.
        FileNotFoundError: the dataset's files are not in ``data_root`` (the message names them).
        OutputFolderError: ``out_dir`` cannot be written.
        ResultsBusyError: another process is writing the same results file.
    """
    _check_sweep_arguments(preset, seeds, data_root, resume, overwrite, jobs, max_runs)
    check_device(device)
    out = check_output_folder(out_dir)
    results = ResultsFile(out / RESULTS_NAME)
    with writer_lock(results.path):
        records = [] if overwrite else results.records()
        check_same_sweep(records, preset, results.path)
        if records and not resume:
            raise SweepExistsError(
                f"{results.path} already holds {len(records)} runs: pass --resume to run only "
                "the missing ones, or --overwrite to set them aside and start again"
            )
        done = {RunConfig.from_dict(record["config"]).key() for record in records}
        pending = [run for run in plan(preset, seeds) if run.config.key() not in done]
        if max_runs is not None:
            pending = pending[:max_runs]
        root = None if data_root is None else str(data_root)
        run_seeds = sorted({r.config.seed for r in pending})
        for seed in run_seeds:
            _check_data(preset, root, seed)  # missing or corrupt data fails here
        if overwrite:
            set_aside(results.path)
            set_aside(out / FIGURES_NAME)  # drawn from the results just set aside
        if jobs is None:
            jobs = preset.jobs if torch.device(device).type == "cpu" else 1
        with _threads(preset.threads):
            _train_dense(preset, run_seeds, out, root, device, progress)
            bar = tqdm(total=len(pending), desc=preset.name, unit="run", disable=not progress)
            with bar:
                for record in _records(pending, str(out), root, device, preset.threads, jobs):
                    results.append({**record, "preset": preset.name})
                    bar.set_postfix_str(RunConfig.from_dict(record["config"]).label())
                    bar.update()
    return results.path


def _check_sweep_arguments(
    preset: Preset,
    seeds: Sequence[int] | None,
    data_root: str | Path | None,
    resume: bool,
    overwrite: bool,
    jobs: int | None,
    max_runs: int | None,
) -> None:
    if resume and overwrite:
        raise UsageError("resume and overwrite exclude each other")
    for seed in seeds or ():
        check_int("seeds", seed, 0, SEED_LIMIT)
    if jobs is not None:
        check_int("jobs", jobs, 1)
    if max_runs is not None:
        check_int("max_runs", max_runs, 1)
    if preset.needs_root and data_root is None:
        raise UsageError(
            f"preset {preset.name!r} reads {preset.dataset} from local files: "
            "pass --data-root DIR (nothing is downloaded)"
        )


def check_same_sweep(records: Sequence[dict[str, Any]], preset: Preset, path: Path) -> None:
    """Refuse to resume ``preset`` on records written by another preset or configuration.

    Records carry the name of the preset that wrote them; records without one (written by
    ``lossprune prune`` or before the name was recorded) must at least share the preset's
    dataset, model, sparsities, scoring examples and training setups.

    Raises:
        MixedResultsError: naming the preset or the setting that differs.
    """
    expected = {
        "dataset": preset.dataset,
        "model": preset.model,
        "examples": preset.examples,
        "loss_examples": preset.loss_examples,
        "train": preset.train,
        "finetune": preset.finetune,
    }
    for record in records:
        name = record.get("preset")
        if name is not None and name != preset.name:
            raise MixedResultsError(
                f"{path} holds runs of preset {name!r}, not {preset.name!r}{_ADVICE}"
            )
        config = RunConfig.from_dict(record["config"])
        for field, value in expected.items():
            if getattr(config, field) != value:
                raise MixedResultsError(
                    f"{path} holds runs with {field}={getattr(config, field)!r}, but preset "
                    f"{preset.name!r} has {field}={value!r}{_ADVICE}"
                )
        if config.sparsity not in preset.sparsities:
            raise MixedResultsError(
                f"{path} holds runs with sparsity={config.sparsity!r}, but preset "
                f"{preset.name!r} has sparsities {preset.sparsities}{_ADVICE}"
            )


_ADVICE = ": pass another --out, or --overwrite to set those results aside"


def _train_dense(
    preset: Preset, seeds: Sequence[int], out: Path, root: str | None, device: str, progress: bool
) -> None:
    """Train (or find cached) the dense network of every seed before any run needs it.

    With ``preset.dense_from``, a network already trained by that preset's sweep in a sibling
    folder (same dataset, model, seed and training setup, so the same file name) is copied.
    """
    for seed in seeds:
        if preset.dense_from is not None:
            _copy_dense(preset, seed, out, out.parent / preset.dense_from)
        if preset.dataset == TEXT_DATASET:
            load_or_train_lm(
                out,
                preset.model,
                seed,
                preset.train,
                _text_split(preset.model),
                device=device,
                progress=progress,
            )
            continue
        load_or_train(
            out,
            preset.dataset,
            preset.model,
            seed,
            preset.train,
            _split(preset.dataset, root, seed),
            device=device,
            progress=progress,
        )


def _check_data(preset: Preset, root: str | None, seed: int) -> None:
    """Read the preset's data once, so that missing or corrupt files fail before any run."""
    if preset.dataset == TEXT_DATASET:
        _text_split(preset.model)
    else:
        _split(preset.dataset, root, seed)


def _copy_dense(preset: Preset, seed: int, out: Path, source_dir: Path) -> None:
    target = checkpoint_path(out, preset.dataset, preset.model, seed, preset.train)
    source = checkpoint_path(source_dir, preset.dataset, preset.model, seed, preset.train)
    pairs = [(source, target), (source.with_suffix(".json"), target.with_suffix(".json"))]
    if target.exists() or not all(src.exists() for src, _ in pairs):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in pairs:
        shutil.copyfile(src, dst)


def _records(
    pending: list[PlannedRun],
    out: str,
    root: str | None,
    device: str,
    threads: int | None,
    jobs: int,
) -> Iterator[dict[str, Any]]:
    """Records of ``pending`` as they finish, in this process or in ``jobs`` workers."""
    if jobs <= 1 or len(pending) <= 1:
        for run in pending:
            yield _execute(run, out, root, device, threads)
        return
    # "spawn": forking a process that has already run torch's thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    # Workers die with this process, also when it is killed without running any cleanup.
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(_execute, run, out, root, device, threads) for run in pending]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
