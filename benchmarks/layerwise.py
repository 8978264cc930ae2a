"""Layer-wise pruning on tiny trained Llama and OPT, beside the authors' SparseGPT, Wanda and ALPS.

    OMP_NUM_THREADS=1 python benchmarks/layerwise.py --root /work/scratch/tiny \\
        --refs /work/scratch/layerwise_refs [--rerun-refs] [--out benchmarks/results-layerwise.json]
    python benchmarks/layerwise.py --table                 # the markdown table of the saved JSON

Models and data: :mod:`lossprune.experiments.tiny_models` (``llama-4x64``, ``opt-3x64``; 128
calibration sequences of 128 bytes, 64 held-out sequences). Every run prunes a fresh copy of
the dense model in its OWN single-threaded process (a clean peak-memory reading), through the
public API (``LayerwisePruner``), and records, with the definitions of the reference runs
(``--refs``: the folder of ``results-refs.json`` and the authors' Wanda masks):

* ``layer_error``: per matrix, ||W X - Ŵ X||² / ||W X||² on its calibration inputs (the blocks
  before it pruned, its own dense): ``MatrixReport.relative_error``; ``geo``: the geometric mean;
  ``worst_vs_sparsegpt``: the largest ratio of a matrix's error to SparseGPT's on that matrix;
* ``ppl``: held-out perplexity of the pruned model;
* ``cpu_s`` / ``wall_s``: the pruning call (calibration forwards included), one thread;
* ``peak_rss_mb`` and ``rss_growth_mb``: the process's peak resident memory during the call
  (VmHWM reset just before it) and its growth over the memory before it.

``--rerun-refs`` reruns the authors' SparseGPT and ALPS (the reference folder's ``run_refs.py``
under its own Python, ``$PY_REF``) right after our runs of each model and setting, so that times
are compared within one session; otherwise the reference times are those of the reference file.
llm-compressor 0.14's ``SparseGPTModifier`` and ``WandaPruningModifier`` (``llmc-sparsegpt``,
``llmc-wanda``; its own environment, transformers 5.17) are copied from the reference file.
The Wanda check compares our ``Wanda()`` masks (per row by default, sequential calibration) with
the authors' at 50%, 2:4 and 4:8, on plain and right-padded calibration data (padding left out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results-layerwise.json"
MODELS = ("llama-4x64", "opt-3x64")
SETTINGS = ("50%", "70%", "2:4")
#: Reference rows: the authors' code (SparseGPT and ALPS rerun with ``--rerun-refs``) and
#: llm-compressor's modifiers (copied from the reference file).
REFERENCES = ("sparsegpt", "wanda", "alps", "llmc-sparsegpt", "llmc-wanda")
METHODS = ("wanda", "wanda-refit", "obs", "stages-16", "iht", "admm")
# Against admm (uniform sparsity): the error allocation at 50% and 70% (the default there), the
# network-level one at 70%.
ALLOCATIONS = {"50%": ("admm-global-error",), "70%": ("admm-global-error", "admm-global-network")}
MASK_SETTINGS = ("50%", "2:4", "4:8")
BATCH = 16  # calibration sequences per batch


def method(name: str, setting: str) -> dict[str, Any]:
    """The LayerwisePruner arguments of a method at a setting."""
    from lossprune import NM, Wanda
    from lossprune.layerwise import (
        ADMM,
        OBS,
        ErrorAllocation,
        IterativeThresholding,
        NetworkAllocation,
        Refit,
        Stages,
    )

    options: dict[str, Any] = {
        "wanda": {"criterion": Wanda()},
        "wanda-refit": {"criterion": Wanda(), "update": Refit()},
        "obs": {"criterion": None, "update": OBS(), "selection": "layerwise"},
        "stages-16": {"criterion": None, "update": Stages(16), "selection": "layerwise"},
        "iht": {"criterion": None, "update": IterativeThresholding(), "selection": "layerwise"},
        "admm": {"criterion": None, "update": ADMM(), "selection": "layerwise"},
        "admm-global-error": {
            "criterion": None, "update": ADMM(), "selection": "global",
            "allocation": ErrorAllocation(),
        },
        "admm-global-network": {
            "criterion": None, "update": ADMM(), "selection": "global",
            "allocation": NetworkAllocation(),
        },
    }[name]  # fmt: skip
    n, m = {"2:4": (2, 4), "4:8": (4, 8)}.get(setting, (0, 0))
    if m:
        return {**options, "selection": NM(n, m)}
    return {**options, "sparsity": float(setting.rstrip("%")) / 100}


def calibration(data: dict[str, Any], kind: str) -> list[dict[str, torch.Tensor]]:
    source = data["calib"] if kind == "plain" else data["calib_padded"]
    keys = [k for k in ("input_ids", "attention_mask", "labels") if k in source]
    count = len(source["input_ids"])
    return [{k: source[k][i : i + BATCH] for k in keys} for i in range(0, count, BATCH)]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, model_name: str, setting: str, calib: str, root: str, result: str) -> None:
    """One run in this process: prune, measure, write JSON to ``result``."""
    from lossprune import LayerwisePruner
    from lossprune.experiments import tiny_models

    torch.set_num_threads(1)
    tiny = tiny_models.load_cached(model_name, root)
    data = tiny_models.load_data(tiny.path)
    batches = calibration(data, calib)
    mask_check = name == "wanda-masks"
    options = method("wanda" if mask_check else name, setting)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _rss_mb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    pruner = LayerwisePruner(tiny.model, data=batches, **options)
    report = pruner.run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _rss_mb("VmHWM")
    out: dict[str, Any] = {
        "method": name, "model": model_name, "setting": setting, "calib": calib,
        "cpu_s": cpu, "wall_s": wall, "peak_rss_mb": peak, "rss_before_mb": before,
        "rss_growth_mb": peak - before, "sparsity": report.sparsity,
        "geo": report.geometric_mean_error,
        "layer_error": {m.name.removesuffix(".weight"): m.relative_error for m in report.matrices},
    }  # fmt: skip
    if mask_check:
        out["masks"] = {k: v for k, v in pruner.masks.items()}
    else:
        out["ppl"] = tiny_models.perplexity(tiny.model, data["heldout"])
        out["dense_ppl"] = tiny.log["heldout_ppl"]
    if mask_check:
        torch.save(out, result)
    else:
        Path(result).write_text(json.dumps(out))


def run_worker(args: list[str], timeout: float = 1800) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result"
        command = [sys.executable, __file__, "--worker", *args, "--result", str(result)]
        done = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return None
        if args[0] == "wanda-masks":
            return torch.load(result, weights_only=False)
        return json.loads(result.read_text())


def rerun_reference(refs: Path, name: str, model: str, setting: str) -> dict[str, Any] | None:
    """The authors' method, run now by the reference folder's driver (same session)."""
    python = os.environ.get("PY_REF", "/work/scratch/venv-ref/bin/python")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ref.json"
        command = [python, str(refs / "run_refs.py"), "--worker", name, model, setting, "plain",
                   "--out", str(out)]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, cwd=refs, env=environment)
        if done.returncode != 0 or not out.exists():
            print(done.stderr[-3000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())


def compare(ours: dict[str, Any], references: dict[str, Any], model: str, setting: str) -> None:
    """Ratios to SparseGPT and ALPS on the same model and setting, in place."""
    sparsegpt = references.get(f"sparsegpt|{model}|{setting}|plain")
    alps = references.get(f"alps|{model}|{setting}|plain")
    if sparsegpt:
        ours["geo_vs_sparsegpt"] = ours["geo"] / sparsegpt["geo_error_seq"]
        ours["worst_vs_sparsegpt"] = max(
            ours["layer_error"][k] / v for k, v in sparsegpt["layer_error_seq"].items()
        )
    if alps:
        ours["geo_vs_alps"] = ours["geo"] / alps["geo_error_seq"]
        ours["ppl_minus_alps"] = ours["ppl"] - alps["ppl"]


def wanda_mask_check(root: str, refs: Path) -> list[dict[str, Any]]:
    rows = []
    for setting in MASK_SETTINGS:
        for calib in ("plain", "padded-excluded"):
            label = setting.replace("%", "pct").replace(":", "-")
            reference = refs / f"masks_wanda_llama-4x64_{label}_{calib}.pt"
            if not reference.exists():
                continue
            ours = run_worker(["wanda-masks", "llama-4x64", setting, calib, root])
            if ours is None:
                continue
            expected = torch.load(reference)
            mismatches = sum(int((ours["masks"][k] != v).sum()) for k, v in expected.items())
            total = sum(v.numel() for v in expected.values())
            data = "padded" if calib != "plain" else "plain"
            rows.append({"setting": setting, "calib": data, "mismatches": mismatches,
                         "weights": total})  # fmt: skip
            print(f"wanda masks {setting} {data}: {mismatches} of {total} differ", flush=True)
    return rows


def table(results: dict[str, Any]) -> str:
    """Markdown: per model, a row per method, per setting ``ppl · layer error / ALPS's``."""
    runs, references = results["runs"], results.get("references", {})
    lines = []
    for model in MODELS:
        settings = [s for s in SETTINGS if any(r["model"] == model and r["setting"] == s
                                               for r in runs.values())]  # fmt: skip
        if not settings:
            continue
        dense = next(r["dense_ppl"] for r in runs.values() if r["model"] == model)
        lines += [
            f"**{model}** (dense held-out perplexity {dense:.3f}): held-out perplexity · "
            "geometric-mean layer error / ALPS's · worst matrix / SparseGPT's · CPU seconds",
            "",
            "| method | " + " | ".join(settings) + " |",
            "|---|" + "---|" * len(settings),
        ]
        for reference in REFERENCES:
            cells = []
            for setting in settings:
                ref = references.get(f"{reference}|{model}|{setting}|plain")
                cells.append("" if ref is None else f"{ref['ppl']:.3f} · {ref['cpu_s']:.1f} s")
            if any(cells):
                who = "llm-compressor" if reference.startswith("llmc") else "authors"
                lines.append(f"| {reference} ({who}) | " + " | ".join(cells) + " |")
        names = dict.fromkeys(r["method"] for r in runs.values() if r["model"] == model)
        for name in names:
            cells = []
            for setting in settings:
                run = runs.get(f"{name}|{model}|{setting}")
                cells.append(
                    ""
                    if run is None
                    else f"{run['ppl']:.3f} · {run['geo_vs_alps']:.3f} · "
                    f"{run['worst_vs_sparsegpt']:.2f} · {run['cpu_s']:.1f} s"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    masks = results.get("wanda_masks", [])
    if masks:
        differ = ", ".join(f"{m['setting']} {m['calib']}: {m['mismatches']}" for m in masks)
        total = masks[0]["weights"]
        lines.append(f"Wanda masks differing from the authors' (of {total}): {differ}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--worker", nargs=5, metavar=("METHOD", "MODEL", "SETTING", "CALIB", "ROOT")
    )
    parser.add_argument("--result")
    parser.add_argument("--root", default=None, help="tiny models cache (default_root())")
    parser.add_argument("--refs", type=Path, default=None, help="the reference folder")
    parser.add_argument("--rerun-refs", action="store_true")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker[:4], args.worker[4], args.result)
        return
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    from lossprune.experiments import tiny_models

    root = str(args.root or tiny_models.default_root())
    for name in args.models:  # train (or find) the models once, before the timed runs
        tiny_models.load_or_train(name, root=root, progress=True)
    known = {}
    if args.refs is not None:
        known = json.loads((args.refs / "results-refs.json").read_text())["runs"]
    results: dict[str, Any] = {
        "environment": {"torch": torch.__version__, "threads": 1, "batch": BATCH,
                        "machine": os.uname().machine, "cpus": os.cpu_count()},
        "runs": {}, "references": {},
    }  # fmt: skip
    for model in args.models:
        for setting in args.settings:
            names = list(args.methods) + list(ALLOCATIONS.get(setting, ()))
            for name in names:
                run = run_worker([name, model, setting, "plain", root])
                if run is None:
                    continue
                compare(run, known, model, setting)
                results["runs"][f"{name}|{model}|{setting}"] = run
                print(
                    f"{model} {setting} {name:20s} geo {run['geo']:.5f} "
                    f"/alps {run.get('geo_vs_alps', math.nan):.3f} "
                    f"worst/sgpt {run.get('worst_vs_sparsegpt', math.nan):.3f} "
                    f"ppl {run['ppl']:.3f} cpu {run['cpu_s']:.1f}s "
                    f"rss+ {run['rss_growth_mb']:.0f} MB",
                    flush=True,
                )
            for reference in REFERENCES:
                key = f"{reference}|{model}|{setting}|plain"
                fresh = None
                if args.rerun_refs and args.refs is not None and reference in ("sparsegpt", "alps"):
                    fresh = rerun_reference(args.refs, reference, model, setting)
                entry = fresh or known.get(key)
                if entry:
                    entry = {k: v for k, v in entry.items() if not k.startswith("layer_error")}
                    results["references"][key] = {**entry, "rerun": fresh is not None}
    if args.refs is not None:
        results["wanda_masks"] = wanda_mask_check(root, args.refs)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
