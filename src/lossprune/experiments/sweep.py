"""Sweeps: expand a preset into runs, run the missing ones, append each record as it finishes.

Resuming is keyed on the canonical configuration (:meth:`RunConfig.key`), so running the same
sweep again, or a larger grid over a partly finished one, only runs what is not yet recorded.
Runs may be spread over worker processes (``jobs``); every run is fully determined by its
configuration, so the records do not depend on ``jobs``, only their order in the file does.
"""

from __future__ import annotations

import multiprocessing
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
from .data import Split, load_dataset
from .presets import LOSS_MODELS, Preset
from .records import ResultsFile, RunConfig
from .run import prune_run

__all__ = ["PlannedRun", "SweepExistsError", "plan", "run_sweep", "RESULTS_NAME"]

RESULTS_NAME = "results.jsonl"


class SweepExistsError(FileExistsError):
    """The output folder already holds results and neither resume nor overwrite was asked for."""


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
    split = _split(config.dataset, root, config.seed)
    path = checkpoint_path(out_dir, config.dataset, config.model, config.seed, config.train)
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

    Args:
        preset: what to run.
        out_dir: receives ``results.jsonl`` and the trained dense networks (``models/``).
        seeds: override the preset's seeds.
        device: where to train and prune (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        data_root: folder of the dataset files for presets that read local files.
        resume: skip the configurations already recorded.
        overwrite: delete existing results first (the cached dense networks are kept).
        jobs: worker processes (default: the preset's on CPU, 1 on a GPU).
        max_runs: stop after this many new runs (a resumable partial sweep).
        progress: show a tqdm bar over runs.

    Raises:
        SweepExistsError: results exist and neither ``resume`` nor ``overwrite`` is set.
        ValueError: the preset reads local files and ``data_root`` is missing.
        FileNotFoundError: the dataset's files are not in ``data_root`` (the message names them).
    """
    if preset.needs_root and data_root is None:
        raise ValueError(
            f"preset {preset.name!r} reads {preset.dataset} from local files: "
            "pass --data-root DIR (nothing is downloaded)"
        )
    out = Path(out_dir)
    results = ResultsFile(out / RESULTS_NAME)
    done = results.keys()
    if done and overwrite:
        results.path.unlink()
        done = set()
    elif done and not resume:
        raise SweepExistsError(
            f"{results.path} already holds {len(done)} runs: pass --resume to run only the "
            "missing ones, or --overwrite to start again"
        )
    pending = [run for run in plan(preset, seeds) if run.config.key() not in done]
    if max_runs is not None:
        pending = pending[:max_runs]
    root = None if data_root is None else str(data_root)
    if jobs is None:
        jobs = preset.jobs if torch.device(device).type == "cpu" else 1
    with _threads(preset.threads):
        _train_dense(preset, sorted({r.config.seed for r in pending}), out, root, device, progress)
        bar = tqdm(total=len(pending), desc=preset.name, unit="run", disable=not progress)
        with bar:
            for record in _records(pending, str(out), root, device, preset.threads, jobs):
                results.append(record)
                bar.set_postfix_str(RunConfig.from_dict(record["config"]).label())
                bar.update()
    return results.path


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
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(_execute, run, out, root, device, threads) for run in pending]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
