"""Sweeps: records, resume without duplicates, cached dense networks, worker processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lossprune.experiments.checks import UsageError
from lossprune.experiments.locking import ResultsBusyError, writer_lock
from lossprune.experiments.presets import Grid, Preset, TrainSetup, get_preset
from lossprune.experiments.records import ResultsFile, RunConfig
from lossprune.experiments.sweep import (
    MixedResultsError,
    SweepExistsError,
    plan,
    run_sweep,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def _keys(path: Path) -> list[str]:
    return [RunConfig.from_dict(r["config"]).key() for r in ResultsFile(path)]


def test_smoke_records_hold_every_measurement(smoke_records: list[dict]) -> None:
    assert smoke_records and all(r["status"] == "ok" for r in smoke_records)
    for record in smoke_records:
        config = record["config"]
        # ΔL is the training-loss difference measured in eval mode, all stages together.
        expected = record["pruned"]["train_loss"] - record["dense"]["train_loss"]
        assert math.isclose(record["delta_loss"], expected)
        assert len(record["stages"]["step_norm_sq"]) == config["stages"]
        assert record["stages"]["sparsity"][-1] == pytest.approx(config["sparsity"], abs=1e-4)
        assert record["finetuned_sparsity"] >= config["sparsity"] - 1e-4  # mask held
        assert set(record["layer_density"]) == {
            "layers.0.weight",
            "layers.2.weight",
            "layers.4.weight",
        }
        for phase in ("dense", "pruned", "finetuned"):
            assert set(record[phase]) >= {"train_loss", "train_error", "val_loss", "val_error"}
        history = record["finetune_history"]
        assert [e["epoch"] for e in history] == list(range(config["finetune"]["epochs"] + 1))
        assert record["seconds"]["total"] > 0


def test_stage_tracking_only_where_asked(smoke_records: list[dict]) -> None:
    tracked = [r for r in smoke_records if "loss_curve" in r]
    assert {r["config"]["schedule"] for r in tracked} == {"exponential", "linear"}
    assert all(r["config"]["criterion"] == "QM" for r in tracked)
    assert all(r["loss_curve"][-1]["sparsity"] == pytest.approx(0.95, abs=1e-4) for r in tracked)


def test_dense_network_is_trained_once_per_seed(smoke_dir: Path) -> None:
    assert len(list((smoke_dir / "models").glob("*.pt"))) == 1
    assert len(list((smoke_dir / "models").glob("*.json"))) == 1


# The truncated line is counted in a SkippedLinesWarning (tests/experiments/test_records.py).
@pytest.mark.filterwarnings("ignore::lossprune.experiments.records.SkippedLinesWarning")
def test_interrupted_sweep_resumes_without_duplicates(tmp_path: Path, tiny_preset: Preset) -> None:
    expected = {run.config.key() for run in plan(tiny_preset)}
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=2, progress=False)
    assert len(_keys(tmp_path / "results.jsonl")) == 2
    with open(tmp_path / "results.jsonl", "a") as file:
        file.write('{"config": {"trunc')  # killed while writing the third record
    with pytest.raises(SweepExistsError, match="--resume"):
        run_sweep(tiny_preset, tmp_path, device="cpu", progress=False)
    run_sweep(tiny_preset, tmp_path, device="cpu", resume=True, progress=False)
    keys = _keys(tmp_path / "results.jsonl")
    assert len(keys) == len(set(keys)) and set(keys) == expected
    run_sweep(tiny_preset, tmp_path, device="cpu", resume=True, progress=False)
    assert len(_keys(tmp_path / "results.jsonl")) == len(expected)


def test_overwrite_starts_again(tmp_path: Path, tiny_preset: Preset) -> None:
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=1, progress=False)
    run_sweep(tiny_preset, tmp_path, device="cpu", overwrite=True, max_runs=1, progress=False)
    assert len(_keys(tmp_path / "results.jsonl")) == 1


def test_worker_processes_give_the_same_records(tmp_path: Path, tiny_preset: Preset) -> None:
    tiny_preset = replace(tiny_preset, grids=(Grid(("LM",), (0.0,), (1, 2)),))

    def measured(path: Path) -> dict[str, tuple]:
        return {
            RunConfig.from_dict(r["config"]).key(): (r["delta_loss"], r["finetuned"])
            for r in ResultsFile(path)
        }

    run_sweep(tiny_preset, tmp_path / "one", device="cpu", jobs=1, progress=False)
    run_sweep(tiny_preset, tmp_path / "two", device="cpu", jobs=2, progress=False)
    one, two = (measured(tmp_path / name / "results.jsonl") for name in ("one", "two"))
    assert one == two and len(one) == 2


def test_file_presets_need_their_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data-root"):
        run_sweep(get_preset("mnist-paper"), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        run_sweep(get_preset("mnist-paper"), tmp_path, data_root=tmp_path, progress=False)


def _digits_as_file_preset(preset: Preset) -> Preset:
    # Same runs, but the data now comes from --data-root (which can be wrong).
    return replace(preset, dataset="mnist", needs_root=True)


def test_overwrite_checks_everything_before_setting_results_aside(
    tmp_path: Path, tiny_preset: Preset
) -> None:
    results = tmp_path / "results.jsonl"
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=1, progress=False)
    (tmp_path / "figures").mkdir()
    before = results.read_bytes()
    with pytest.raises(UsageError, match="device must be"):
        run_sweep(tiny_preset, tmp_path, device="foo", overwrite=True, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            run_sweep(tiny_preset, tmp_path, device="cuda", overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        run_sweep(
            _digits_as_file_preset(tiny_preset),
            tmp_path,
            data_root=tmp_path / "typo",
            overwrite=True,
            progress=False,
        )
    with pytest.raises(UsageError, match="max_runs must be an integer >= 1, got -1"):
        run_sweep(tiny_preset, tmp_path, overwrite=True, max_runs=-1, progress=False)
    assert results.read_bytes() == before and (tmp_path / "figures").is_dir()
    assert not list(tmp_path.glob("*.bak-*"))


def test_overwrite_sets_old_results_and_figures_aside(tmp_path: Path, tiny_preset: Preset) -> None:
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=2, progress=False)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "findings.md").write_text("stale")
    old = (tmp_path / "results.jsonl").read_bytes()
    run_sweep(tiny_preset, tmp_path, device="cpu", overwrite=True, max_runs=1, progress=False)
    (backup,) = tmp_path.glob("results.jsonl.bak-*")
    (figures_backup,) = tmp_path.glob("figures.bak-*")
    assert backup.read_bytes() == old and len(_keys(backup)) == 2
    assert (figures_backup / "findings.md").read_text() == "stale"
    assert not (tmp_path / "figures").exists()
    assert len(_keys(tmp_path / "results.jsonl")) == 1


def test_a_second_writer_is_refused(tmp_path: Path, tiny_preset: Preset) -> None:
    results = tmp_path / "results.jsonl"
    with writer_lock(results):
        with pytest.raises(
            ResultsBusyError, match=f"another lossprune process \\(pid {os.getpid()}"
        ):
            run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=1, progress=False)
        assert not results.exists()
    # Released on exit: the same sweep may now run.
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=1, progress=False)
    assert len(_keys(results)) == 1


def test_resume_refuses_results_of_another_preset_or_setting(
    tmp_path: Path, tiny_preset: Preset
) -> None:
    results = tmp_path / "results.jsonl"
    run_sweep(tiny_preset, tmp_path, device="cpu", max_runs=1, progress=False)
    before = results.read_bytes()
    other = replace(tiny_preset, name="other")
    for resume in (True, False):  # without --resume the error must not suggest it
        with pytest.raises(MixedResultsError, match="runs of preset 'tiny', not 'other'"):
            run_sweep(other, tmp_path, device="cpu", resume=resume, progress=False)
    # Records without a preset name (lossprune prune, older sweeps) are compared by setting.
    (record,) = ResultsFile(results).records()
    del record["preset"]
    results.write_text(json.dumps(record) + "\n")
    longer = replace(other, train=TrainSetup(epochs=2))
    with pytest.raises(MixedResultsError, match="train=TrainSetup\\(epochs=1.*has train="):
        run_sweep(longer, tmp_path, device="cpu", resume=True, progress=False)
    sparser = replace(other, sparsities=(0.9,))
    with pytest.raises(MixedResultsError, match="sparsity=0.95.*sparsities \\(0.9,\\)"):
        run_sweep(sparser, tmp_path, device="cpu", resume=True, progress=False)
    run_sweep(other, tmp_path, device="cpu", resume=True, max_runs=1, progress=False)
    assert len(_keys(results)) == 2 and results.read_bytes().startswith(before[:20])


def _children(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of the live (not zombie) child processes of ``pid`` (Linux)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            children[int(entry.name)] = command
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (now init) has not reaped it


_SWEEP_SCRIPT = """
import sys
from dataclasses import replace
from lossprune.experiments.presets import Grid, TrainSetup, get_preset
from lossprune.experiments.sweep import run_sweep

preset = replace(
    get_preset("digits-smoke"),
    name="tiny",
    grids=(Grid(("LM",), (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0), (1, 2, 3)),),
    train=TrainSetup(epochs=1),
    finetune=TrainSetup(epochs=1),
)
run_sweep(preset, sys.argv[1], device="cpu", jobs=2, progress=False)
"""


def _wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    """The ``pids`` still alive after waiting up to ``seconds`` for them to exit."""
    deadline = time.monotonic() + seconds
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


_ORPHAN_SCRIPT = """
import importlib.util, os, sys, time, types
spec = importlib.util.spec_from_file_location("workers", sys.argv[1])
workers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workers)  # by path: no torch import, so the test stays fast
if sys.argv[2] == "watchdog":
    workers.sys = types.SimpleNamespace(platform="elsewhere")  # as on a system without prctl
parent = os.getpid()
if os.fork() == 0:
    workers.die_with_parent(parent)
    print(os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("mechanism", ["prctl", "watchdog"])
def test_a_worker_dies_with_its_killed_parent(mechanism: str) -> None:
    script = [sys.executable, "-c", _ORPHAN_SCRIPT, str(SRC / "lossprune/experiments/workers.py")]
    parent = subprocess.Popen([*script, mechanism], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())  # printed once die_with_parent has returned
        assert _alive(worker)
        parent.kill()
        parent.wait(timeout=10)
        assert _wait_until_gone([worker], seconds=5) == []
    finally:
        parent.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


_SWEEP_SCRIPT = """
import sys
from dataclasses import replace
from lossprune.experiments.presets import Grid, TrainSetup, get_preset
from lossprune.experiments.sweep import run_sweep

preset = replace(
    get_preset("digits-smoke"),
    name="tiny",
    grids=(Grid(("LM",), (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0), (1, 2, 3)),),
    train=TrainSetup(epochs=1),
    finetune=TrainSetup(epochs=1),
)
run_sweep(preset, sys.argv[1], device="cpu", jobs=2, progress=False)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_sweep_ends_its_workers(tmp_path: Path, kill: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sweep = subprocess.Popen(
        [sys.executable, "-c", _SWEEP_SCRIPT, str(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    results = tmp_path / "results.jsonl"
    try:
        # Kill once the workers are busy: the first record has come back from one of them.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sweep.poll() is None:
            workers = [p for p, cmd in _children(sweep.pid).items() if "spawn_main" in cmd]
            if len(workers) == 2 and results.exists() and results.stat().st_size:
                break
            time.sleep(0.05)
        assert len(workers) == 2 and sweep.poll() is None, "the sweep never got busy"
        sweep.send_signal(kill)
        sweep.wait(timeout=10)
        assert _wait_until_gone(workers, seconds=10) == [], "workers outlived the sweep"
    finally:
        sweep.kill()
        for pid in workers:  # only if the test failed: do not leave them running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
