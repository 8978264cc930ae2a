"""Layer-wise solvers against each other on real layers, and their cost at 7B widths.

Usage::

    # (W0, G = X X^T / n) of every linear map of every decoder block of a saved Hugging Face
    # causal LM, on its calibration token ids (inputs of the DENSE model; scratch files)
    python benchmarks/layerwise_solvers.py dump MODEL_DIR CALIB.pt --out layers/llama.pt
    # every solver on every matrix at 50%, 70% and 2:4 (one thread)
    OMP_NUM_THREADS=1 python benchmarks/layerwise_solvers.py quality layers/*.pt \\
        --out benchmarks/results-layerwise-solvers.json
    # seconds per 4096 x 4096, 11008 x 4096 and 4096 x 11008 layer, 1 and 2 threads
    python benchmarks/layerwise_solvers.py scaling --merge benchmarks/results-layerwise-solvers.json

Everything goes through the public API (:mod:`lossprune.layerwise`): a solver is given a
:class:`~lossprune.layerwise.LayerProblem` with every entry kept and a
:class:`~lossprune.layerwise.Pattern` (``Layerwise()`` at 50% and 70%, ``NM(2, 4)``). Per
matrix it records the relative layer error ``||W0 X - Ŵ X||² / ||W0 X||²`` (undamped, float64
from the float32 solve), the wall time of ``solve`` and its peak memory (the process's resident
high-water mark, reset by ``/proc/self/clear_refs`` before each solve, minus the resident size
before it), and how many products with the Hessian and projections onto the pattern it made
(the units the scaling section prices).

``quality`` measures each method in ``METHODS``; :func:`run_quality` also takes callables that
prune a float32 ``(W0, G)`` (the authors' SparseGPT and ALPS, run from their repositories by a
driver outside this project), measured in the same loop. ``sparsegpt`` is
``OBS(refit=False)``: SparseGPT's update, which equals the authors' code to float tolerance on
N:M and differs by one entry per 128-column block at 50% (their threshold keeps ties).
Summaries: per model and setting, the geometric mean over matrices of each method's error as a
multiple of a baseline's, the worst matrix's, and the summed time as a multiple of the
baseline's (ratios within one run).

``scaling`` times the pieces at 7B widths (random Gram matrices with a decaying spectrum: the
cost does not depend on the values): the damped Hessian's Cholesky factor and inverse, ADMM's
eigendecomposition, one product with the Hessian, one projection (Layerwise, 2:4) and OBS's
full sweep at 2:4 (SparseGPT's cost: at 50% the exact per-block counts add a selection over
the columns swept so far per block), with 1 and 2 threads; with the products per solve
measured on the real layers it projects a solver's seconds per matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lossprune import NM
from lossprune.layerwise import (
    ADMM,
    OBS,
    IterativeThresholding,
    LayerProblem,
    Pattern,
    Stages,
)
from lossprune.selection import Layerwise

SETTINGS: dict[str, tuple[float, Any]] = {
    "50%": (0.5, Layerwise()),
    "70%": (0.7, Layerwise()),
    "2:4": (0.5, NM(2, 4)),
}
METHODS: dict[str, Any] = {
    "sparsegpt": OBS(refit=False),
    "obs+refit": OBS(),
    "admm": ADMM(),
    "admm-alps-schedule": ADMM(rho=0.1, growth=(1.3, 1.2, 1.1)),
    "iht": IterativeThresholding(),
    "stages16-obs": Stages(16, "obs"),
    "stages16-obd": Stages(16, "obd"),
    "stages64-obs": Stages(64, "obs"),
}
#: Methods whose cost grows with π: run on matrices up to this many inputs only.
SLOW_METHODS = {"stages64-obs": 128}
SIZES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in) of a 7B Llama's maps
SEVEN_B = {(4096, 4096): 4 * 32, (11008, 4096): 2 * 32, (4096, 11008): 32}  # matrices per model


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def dump_layers(model_dir: Path, calibration: Path, out: Path, batch: int = 16) -> None:
    """Save {name: {"weight", "gram", "tokens"}} for each linear map inside the decoder blocks."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = torch.load(calibration)["input_ids"]
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    weights: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        is_conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        if not (isinstance(module, nn.Linear) or is_conv1d) or name.endswith("lm_head"):
            continue
        weight = module.weight.detach()
        weights[name] = (weight.T if is_conv1d else weight).double().clone()

        def hook(_: nn.Module, inputs: tuple[Tensor, ...], __: Tensor, name: str = name) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            model(input_ids=ids[start : start + batch])
    for handle in handles:
        handle.remove()
    layers = {
        name: {"weight": weights[name], "gram": sums[name] / counts[name], "tokens": counts[name]}
        for name in weights
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(layers, out)
    print(f"{len(layers)} matrices -> {out}")


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


class _CountProducts(TorchFunctionMode):
    """Counts matrix products whose right operand is a square ``inputs x inputs`` matrix."""

    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.inputs = inputs
        self.products = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.matmul, Tensor.matmul, Tensor.__matmul__) and len(args) == 2:
            right = args[1]
            if isinstance(right, Tensor) and right.shape == (self.inputs, self.inputs):
                self.products += 1
        return func(*args, **(kwargs or {}))


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def _peak_memory() -> Iterator[dict[str, float]]:
    """The resident high-water mark above the current resident size, in MiB."""
    result: dict[str, float] = {}
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident size
    except OSError:
        result["peak_mib"] = math.nan
    before = _resident_kib("VmRSS")
    yield result
    result.setdefault("peak_mib", (_resident_kib("VmHWM") - before) / 1024)


def relative_error(reference: Tensor, gram: Tensor, weight: Tensor) -> float:
    """||W0 X - Ŵ X||² / ||W0 X||² from G, in float64."""
    reference, gram = reference.double(), gram.double()
    difference = reference - weight.double()
    return float(((difference @ gram) * difference).sum() / ((reference @ gram) * reference).sum())


Pruner = Callable[[Tensor, Tensor, float, Any], Tensor]


def _our_method(solver: Any) -> Pruner:
    def prune(reference: Tensor, gram: Tensor, sparsity: float, selection: Any) -> Tensor:
        kept = torch.ones_like(reference, dtype=torch.bool)
        problem = LayerProblem(reference, gram, kept)
        return solver.solve(problem, Pattern(selection), sparsity).weight

    return prune


def measure(
    prune: Pruner, reference: Tensor, gram: Tensor, setting: str, count: bool
) -> dict[str, float]:
    """Error, seconds and peak memory of one solve; with ``count``, a second, untimed solve
    counts its Hessian products and projections (counting slows every torch call)."""
    sparsity, selection = SETTINGS[setting]
    with _peak_memory() as memory:
        start = time.perf_counter()
        weight = prune(reference, gram, sparsity, selection)
        seconds = time.perf_counter() - start
    record = {
        "error": relative_error(reference, gram, weight),
        "seconds": seconds,
        "peak_mib": memory["peak_mib"],
    }
    if count:
        counter = _CountProducts(gram.shape[0])
        with counter, _count_projections() as calls:
            prune(reference, gram, sparsity, selection)
        record.update(hessian_products=counter.products, projections=calls["count"])
    return record


@contextlib.contextmanager
def _count_projections() -> Iterator[dict[str, int]]:
    calls = {"count": 0}
    original = Pattern.__call__

    def counted(self: Pattern, *args: Any, **kwargs: Any) -> Tensor:
        calls["count"] += 1
        return original(self, *args, **kwargs)

    Pattern.__call__ = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Pattern.__call__ = original  # type: ignore[method-assign]


def run_quality(
    layer_files: list[Path],
    methods: dict[str, Any] | None = None,
    settings: tuple[str, ...] = tuple(SETTINGS),
    extra: dict[str, Pruner] | None = None,
) -> list[dict[str, Any]]:
    """One record per (model, matrix, setting): every method's measurements."""
    pruners = {name: _our_method(solver) for name, solver in (methods or METHODS).items()}
    pruners.update(extra or {})
    records = []
    for path in layer_files:
        for matrix, layer in torch.load(path).items():
            reference, gram = layer["weight"].float(), layer["gram"].float()
            for setting in settings:
                record: dict[str, Any] = {
                    "model": path.stem,
                    "matrix": matrix,
                    "shape": list(reference.shape),
                    "setting": setting,
                    "methods": {},
                }
                for name, prune in pruners.items():
                    if reference.shape[1] > SLOW_METHODS.get(name, math.inf):
                        continue
                    ours = name not in (extra or {})
                    record["methods"][name] = measure(prune, reference, gram, setting, ours)
                records.append(record)
                errors = {k: f"{v['error']:.3e}" for k, v in record["methods"].items()}
                print(path.stem, matrix, setting, errors, flush=True)
    return records


def summarise(records: list[dict[str, Any]], baselines: tuple[str, ...]) -> dict[str, Any]:
    """Per model and setting: geometric-mean error, worst matrix and time, as baseline multiples."""
    summary: dict[str, Any] = {}
    for model in sorted({r["model"] for r in records}):
        for setting in SETTINGS:
            rows = [r for r in records if r["model"] == model and r["setting"] == setting]
            if not rows:
                continue
            names = sorted(set.intersection(*(set(r["methods"]) for r in rows)))
            entry: dict[str, Any] = {"matrices": len(rows)}
            for baseline in baselines:
                if baseline not in names:
                    continue
                base_time = sum(r["methods"][baseline]["seconds"] for r in rows)
                for name in names:
                    ratios = [
                        r["methods"][name]["error"] / r["methods"][baseline]["error"] for r in rows
                    ]
                    seconds = sum(r["methods"][name]["seconds"] for r in rows)
                    entry.setdefault(name, {})[f"vs {baseline}"] = {
                        "error_geometric_mean": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                        "error_worst_matrix": max(ratios),
                        "time": seconds / base_time,
                    }
            for name in names:
                entry.setdefault(name, {})["seconds"] = sum(
                    r["methods"][name]["seconds"] for r in rows
                )
                entry[name]["peak_mib_max"] = max(r["methods"][name]["peak_mib"] for r in rows)
            summary.setdefault(model, {})[setting] = entry
    return summary


# --------------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------------


def _best_of(function: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def _pieces(reference: Tensor, gram: Tensor) -> dict[str, Callable[[], Any]]:
    """What a solve is made of, at one size (the solvers' own operations, timed alone)."""
    kept = torch.ones_like(reference, dtype=torch.bool)
    problem = LayerProblem(reference, gram, kept)
    hessian = gram + 0.01 * gram.diagonal().mean() * torch.eye(gram.shape[0])
    scores = reference.square()
    return {
        "cholesky_and_inverse": lambda: torch.cholesky_inverse(torch.linalg.cholesky(hessian)),
        "eigendecomposition": lambda: torch.linalg.eigh(hessian),
        "hessian_product": lambda: reference @ hessian,
        "projection_layerwise": lambda: Pattern()(scores, kept, 0.5),
        "projection_2:4": lambda: Pattern(NM(2, 4))(scores, kept, 0.5),
        "obs_sweep_2:4": lambda: OBS(refit=False).solve(problem, Pattern(NM(2, 4)), 0.5),
    }


_FACTORISATIONS = ("cholesky_and_inverse", "eigendecomposition")


def run_scaling(threads: tuple[int, ...], repeat: int) -> dict[str, Any]:
    """Seconds of each piece at 7B widths, per thread count (best of ``repeat``)."""
    results: dict[str, Any] = {}
    for outputs, inputs in SIZES:
        generator = torch.Generator().manual_seed(0)
        factors = torch.randn(inputs, inputs, generator=generator) / math.sqrt(inputs)
        gram = (factors * torch.logspace(0, -3, inputs).sqrt()) @ factors.T  # decaying spectrum
        reference = torch.randn(outputs, inputs, generator=generator)
        pieces = _pieces(reference, gram)
        for count in threads:
            torch.set_num_threads(count)
            timed: dict[str, float] = {}
            for name, piece in pieces.items():
                # The factorisations depend on the inputs only: timed once per width.
                earlier = next(
                    (r[f"{count} threads"][name] for size, r in results.items()
                     if name in _FACTORISATIONS and size.endswith(f"x{inputs}")
                     and f"{count} threads" in r),
                    None,
                )  # fmt: skip
                if earlier is not None:
                    timed[name] = earlier
                    continue
                with _peak_memory() as memory:
                    timed[name] = _best_of(piece, repeat)
                timed[f"{name} peak MiB"] = memory["peak_mib"]
            results.setdefault(f"{outputs}x{inputs}", {})[f"{count} threads"] = timed
            print(outputs, inputs, count, {k: round(v, 3) for k, v in timed.items()}, flush=True)
    return results


def project_seven_b(scaling: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per matrix and per 7B model from the pieces and the counts on real layers.

    A solve costs its one-off factorisation (ADMM: Cholesky and eigendecomposition; the others:
    Cholesky), plus its measured number of Hessian products and projections (the median over
    the real matrices of a setting, which does not depend on the width for these solvers, an
    assumption this projection states rather than proves), plus, for OBS, the sweep.
    """
    projected: dict[str, Any] = {}
    for setting in SETTINGS:
        for name in ("sparsegpt", "obs+refit", "admm", "stages16-obs"):
            rows = [r["methods"][name] for r in records if r["setting"] == setting]
            rows = [row for row in rows if row]
            if not rows:
                continue
            products = sorted(row["hessian_products"] for row in rows)[len(rows) // 2]
            projections = sorted(row["projections"] for row in rows)[len(rows) // 2]
            for size, by_threads in scaling.items():
                for threads, piece in by_threads.items():
                    project = "projection_2:4" if setting == "2:4" else "projection_layerwise"
                    seconds = piece["cholesky_and_inverse"] + products * piece["hessian_product"]
                    if name == "admm":
                        seconds += piece["eigendecomposition"] + projections * piece[project]
                    if name in ("sparsegpt", "obs+refit"):
                        seconds += piece["obs_sweep_2:4"] - piece["cholesky_and_inverse"]
                    entry = projected.setdefault(setting, {}).setdefault(name, {})
                    entry.setdefault(threads, {})[size] = seconds
    for methods in projected.values():
        for by_threads in methods.values():
            for sizes in by_threads.values():
                sizes["7B model (hours)"] = (
                    sum(sizes[f"{o}x{i}"] * n for (o, i), n in SEVEN_B.items()) / 3600
                )
    return projected


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits, recursively (the JSON stays small and readable)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def write_json(path: Path, result: dict[str, Any]) -> None:
    """``result`` rounded; the per-matrix records one line each."""
    rounded = _rounded(result)
    records = rounded.pop("matrices", [])
    head = json.dumps(rounded, indent=1)[:-2]  # without the closing brace
    lines = ",\n  ".join(json.dumps(record, separators=(",", ":")) for record in records)
    path.write_text(f'{head},\n "matrices": [\n  {lines}\n ]\n}}\n')


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dump = commands.add_parser("dump")
    dump.add_argument("model_dir", type=Path)
    dump.add_argument("calibration", type=Path)
    dump.add_argument("--out", type=Path, required=True)
    quality = commands.add_parser("quality")
    quality.add_argument("layers", type=Path, nargs="+")
    quality.add_argument("--out", type=Path, required=True)
    scaling = commands.add_parser("scaling")
    scaling.add_argument("--merge", type=Path, required=True, help="a quality JSON to extend")
    scaling.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    scaling.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "dump":
        dump_layers(args.model_dir, args.calibration, args.out)
    elif args.command == "quality":
        records = run_quality(args.layers)
        result = {
            "machine": _machine(),
            "summary": summarise(records, ("sparsegpt",)),
            "matrices": records,
        }
        write_json(args.out, result)
    else:
        result = json.loads(args.merge.read_text())
        result["scaling"] = run_scaling(tuple(args.threads), args.repeat)
        result["scaling_projection"] = project_seven_b(result["scaling"], result["matrices"])
        write_json(args.merge, result)


if __name__ == "__main__":
    main()
