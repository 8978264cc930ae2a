"""Structured removal without fine-tuning: quality, layer error, size and measured speed.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/structured.py \\
        --tiny-root /work/scratch/tiny --digits-cache /work/scratch/tiny/digits \\
        --refs /work/scratch/structured_refs/results-structured-refs.json \\
        --out benchmarks/results-structured.json

Models (trained, nothing downloaded): the tiny byte-level language models of
:mod:`lossprune.experiments.tiny_models` that the reference runs use — ``llama-gqa-192`` (Llama,
4 x 192, 8 query / 4 KV heads, MLP 512), ``opt-3x64`` (3 x 64, 4 heads, ffn 128), ``gpt2-small``
(4 x 128, 4 heads, MLP 512) — loaded from ``--tiny-root`` (trained and cached there when
missing), with their ``calib.pt`` (128 x 128 train tokens) and ``heldout.pt`` (64 x 128
validation tokens); and the residual CNN with batch norm on scikit-learn's digits
(:mod:`lossprune.experiments.digits_resnet`, 98.9 % test accuracy).

Targets: 25 % and 50 % of the MLP neurons of every block; one KV group in four (Llama) or one
head in four (OPT, GPT-2) per block; 30 % and 50 % of the channels of every channel set (CNN).
Methods (all through :class:`lossprune.structured.StructuredPruner`, calibration = all of
``calib.pt`` / the CNN's 1,347 training images):

- ``magnitude``: the group's magnitude, no refit;
- ``magnitude+refit``: the same choice, consumers refitted by least squares;
- ``group-obs``: :class:`~lossprune.structured.GroupOBS` (choice and refit in one greedy);
- ``measured`` (heads / KV groups only): :class:`~lossprune.structured.MeasuredLoss`.

Measured for each: held-out perplexity (exp of the mean next-token cross-entropy) or test
accuracy, the consumers' mean relative error on the calibration data, parameters, and the
forward time of the removed model against the dense one and against a model built from scratch
with the same shapes (what Torch-Pruning's removal produces: plain ``nn.Linear``/``nn.Conv2d``
of the new sizes), interleaved in one process (``--rounds`` rounds, medians; 8 x 128 tokens,
the 450 test images). The reference rows (Torch-Pruning 1.6.1 magnitude and Taylor, magnitude +
exact refit, the OSSCAR authors' code on OPT) are copied from the reference helper's JSON, which
used the same models, data and metrics.

Parts (``--parts``): ``lm``, ``cnn``, ``stages`` (the paper's finding at group level: the loss
change after removing 30 % / 50 % of the CNN's channels by OBD and the quadratic model in 1, 4
and 8 stages, no refit) and ``speed`` (a Llama with hidden size 1024, random weights, 2 layers,
16/8 heads, MLP 2816, with 50 % of its MLP neurons or one KV group in four removed, 8 x 128
tokens, CPU: the measured time ratio against the ratio of floating-point operations counted by
:class:`torch.utils.flop_counter.FlopCounterMode`). ``--table`` prints the markdown tables of an
existing ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lossprune import OBD, LinearSchedule, Magnitude, QuadraticModel
from lossprune.experiments.digits_resnet import DigitsResNet, accuracy, load_trained
from lossprune.experiments.tiny_models import load_data, load_or_train
from lossprune.structured import GroupOBS, MeasuredLoss, StructuredPruner
from lossprune.structured.removal import RECORD_KEY

LM_PRESETS = {"llama": "llama-gqa-192", "opt": "opt-3x64", "gpt2": "gpt2-small"}
LM_TARGETS = {"mlp25": ("neurons", 0.25), "mlp50": ("neurons", 0.5), "heads": ("heads", 0.25)}
CNN_TARGETS = {"channels30": 0.3, "channels50": 0.5}


def load_lm(root: Path, preset: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A cached tiny model (:mod:`lossprune.experiments.tiny_models`) and its token sets."""
    tiny = load_or_train(preset, root=root)
    data = load_data(tiny.path)
    return tiny.model.eval(), data["calib"]["input_ids"], data["heldout"]["input_ids"]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids), batch):
        part = ids[start : start + batch]
        logits = model(input_ids=part).logits[:, :-1].double()
        total += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += part[:, 1:].numel()
    return math.exp(total / count)


def same_shapes(model: nn.Module) -> nn.Module:
    """A model built from scratch with ``model``'s shapes (random weights), for timing.

    A Hugging Face model whose config expresses the removal is rebuilt from that config; one
    recorded for ``load_removed`` (heads of GPT-2 and OPT) keeps its modules (Torch-Pruning
    also edits the modules in place); the CNN is rebuilt with its new widths.
    """
    if isinstance(model, DigitsResNet):
        widths = tuple(block.conv2.out_channels for block in model.blocks)
        inner = tuple(block.conv1.out_channels for block in model.blocks)
        if widths == inner and model.stem[0].out_channels == widths[0]:
            return DigitsResNet(widths).eval()
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, RECORD_KEY, None):
        return type(model)(copy.deepcopy(config)).eval()
    return copy.deepcopy(model)


@torch.no_grad()
def time_models(models: dict[str, nn.Module], inputs: Any, rounds: int) -> dict[str, float]:
    """Median forward CPU time of each model (one thread), interleaved round by round.

    CPU time of the process, not wall time: on a shared machine another process's load
    stretches the wall time of whichever model happens to run then.
    """
    times: dict[str, list[float]] = {k: [] for k in models}

    def run(model: nn.Module) -> None:
        if isinstance(inputs, dict):
            model(**inputs)
        else:
            model(inputs)

    for model in models.values():
        run(model)  # warm-up
    for _ in range(rounds):
        for name, model in models.items():
            start = time.process_time()
            run(model)
            times[name].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def measured(
    model: nn.Module, report: Any, seconds: float, inputs: Any, rounds: int, quality: dict
) -> dict[str, Any]:
    """One row: quality, layer error, size, and speed against dense and same-shape models."""
    times = time_models(
        {"dense": model, "removed": report.model, "same_shapes": same_shapes(report.model)},
        inputs,
        rounds,
    )
    return {
        **quality,
        "mean_layer_rel_err": mean_error(report),
        "params": report.parameters_after,
        "param_ratio": report.parameters_before / report.parameters_after,
        "speedup": times["dense"] / times["removed"],
        "speed_vs_same_shapes": times["same_shapes"] / times["removed"],
        "prune_seconds": seconds,
    }


def mean_error(report: Any) -> float | None:
    errors = [e for s in report.sets for e in s.errors.values()]
    return sum(errors) / len(errors) if errors else None


def lm_methods(kind: str) -> dict[str, dict[str, Any]]:
    methods = {
        "magnitude": {"choice": Magnitude(), "refit": False},
        "magnitude+refit": {"choice": Magnitude(), "refit": True},
        "group-obs": {"choice": GroupOBS(), "refit": True},
    }
    if kind == "heads":
        methods["measured"] = {"choice": MeasuredLoss(), "refit": True}
    return methods


def language_models(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for family, preset in LM_PRESETS.items():
        model, calib, heldout = load_lm(Path(args.tiny_root), preset)
        data = [
            {"input_ids": calib[s : s + 16], "labels": calib[s : s + 16]}
            for s in range(0, len(calib), 16)
        ]
        timing_input = {"input_ids": heldout[:8], "use_cache": False}
        dense_ppl = perplexity(model, heldout)
        runs = []
        for target, (kind, amount) in LM_TARGETS.items():
            for method, options in lm_methods(kind).items():
                start = time.perf_counter()
                hf_config = "record" if family in ("opt", "gpt2") and kind == "heads" else "update"
                report = StructuredPruner(
                    model, kind, amount, data=data, hf_config=hf_config, **options
                ).run()
                seconds = time.perf_counter() - start
                quality = {"method": method, "target": target}
                quality["ppl"] = perplexity(report.model, heldout)
                row = measured(model, report, seconds, timing_input, args.rounds, quality)
                runs.append(row)
                print(
                    family,
                    target,
                    method,
                    {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()},
                    flush=True,
                )
        results[family] = {
            "preset": preset,
            "dense": {"ppl": dense_ppl, "params": sum(p.numel() for p in model.parameters())},
            "runs": runs,
        }
    return results


def cnn(args: argparse.Namespace) -> dict[str, Any]:
    model, data, record = load_trained(args.digits_cache)
    calibration = [
        (data.x_train[s : s + 128], data.y_train[s : s + 128])
        for s in range(0, len(data.y_train), 128)
    ]
    loss = nn.CrossEntropyLoss()
    methods = {
        "magnitude": {"choice": Magnitude(), "refit": False},
        "magnitude+refit": {"choice": Magnitude(), "refit": True},
        "group-obs": {"choice": GroupOBS(), "refit": True},
    }
    runs = []
    for target, amount in CNN_TARGETS.items():
        for method, options in methods.items():
            start = time.perf_counter()
            report = StructuredPruner(
                model, "channels", amount, data=calibration, loss_fn=loss, **options
            ).run()
            seconds = time.perf_counter() - start
            quality = {"method": method, "target": target}
            quality["acc"] = accuracy(report.model, data.x_test, data.y_test)
            row = measured(model, report, seconds, data.x_test, args.rounds, quality)
            runs.append(row)
            print(
                "cnn",
                target,
                method,
                {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()},
                flush=True,
            )
    dense = {
        "acc": accuracy(model, data.x_test, data.y_test),
        "params": sum(p.numel() for p in model.parameters()),
    }
    return {"dense": dense, "runs": runs}


def stages(args: argparse.Namespace) -> dict[str, Any]:
    """The paper's finding at group level: more stages, lower loss change (no refit)."""
    model, data, _ = load_trained(args.digits_cache)
    calibration = [
        (data.x_train[s : s + 128], data.y_train[s : s + 128])
        for s in range(0, len(data.y_train), 128)
    ]
    loss = nn.CrossEntropyLoss()

    @torch.no_grad()
    def train_loss(network: nn.Module) -> float:
        return float(loss(network(data.x_train), data.y_train))

    before = train_loss(model)
    rows = []
    for amount in (0.3, 0.5):
        for name, criterion in (("OBD", OBD()), ("QuadraticModel", QuadraticModel())):
            for count in (1, 4, 8):
                schedule = LinearSchedule(amount, count)
                report = StructuredPruner(
                    model,
                    "channels",
                    schedule,
                    choice=criterion,
                    refit=False,
                    data=calibration,
                    loss_fn=loss,
                ).run()
                row = {
                    "criterion": name,
                    "amount": amount,
                    "stages": count,
                    "delta_loss": train_loss(report.model) - before,
                    "acc": accuracy(report.model, data.x_test, data.y_test),
                }
                rows.append(row)
                print("stages", row, flush=True)
    return {"train_loss": before, "runs": rows}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (8, 128))
    data = [{"input_ids": ids, "labels": ids}]
    rows = []
    for kind, amount, label in (("neurons", 0.5, "mlp50"), ("heads", 0.25, "kv1of4")):
        # 12 of 16 heads do not divide hidden size 1024: Llama's config refuses, so record.
        report = StructuredPruner(
            model, kind, amount, choice=Magnitude(), refit=False, data=data, hf_config="record"
        ).run()
        inputs = {"input_ids": ids, "use_cache": False}
        flops = {}
        for name, network in (("dense", model), ("removed", report.model)):
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                network(**inputs)
            flops[name] = counter.get_total_flops()
        times = time_models({"dense": model, "removed": report.model}, inputs, args.rounds)
        flop_ratio = flops["dense"] / flops["removed"]
        time_ratio = times["dense"] / times["removed"]
        row = {
            "target": label,
            "flop_ratio": flop_ratio,
            "time_ratio": time_ratio,
            "share_of_flop_reduction": (1 - 1 / time_ratio) / (1 - 1 / flop_ratio),
            "params_dense": report.parameters_before,
            "params_removed": report.parameters_after,
            "seconds_dense": times["dense"],
            "seconds_removed": times["removed"],
        }
        rows.append(row)
        print("speed", row, flush=True)
    return {
        "config": {"hidden": 1024, "intermediate": 2816, "layers": 2, "heads": 16, "kv_heads": 8},
        "tokens": [8, 128],
        "runs": rows,
    }


def references(path: str | None) -> dict[str, Any]:
    """The reference helper's rows (Torch-Pruning, magnitude+refit, OSSCAR), same models."""
    if path is None:
        return {}
    found = json.loads(Path(path).read_text())
    keep = (
        "method",
        "target",
        "ppl",
        "acc",
        "acc_after_bn_recalibration",
        "params",
        "param_ratio",
        "mean_layer_rel_err",
    )
    out = {}
    for part in ("llama", "opt", "gpt2", "cnn"):
        if part in found:
            out[part] = {
                "dense": found[part].get("dense"),
                "runs": [{k: r[k] for k in keep if k in r} for r in found[part]["runs"]],
            }
    return out


REFERENCE_TARGETS = {"heads": ("kv1of4", "head1of4")}


def table(result: dict[str, Any]) -> str:
    """Markdown tables: ours beside the references, per model and target."""
    lines = []
    for family in ("llama", "opt", "gpt2", "cnn"):
        ours = result["cnn"] if family == "cnn" else result.get("language_models", {}).get(family)
        refs = result.get("references", {}).get(family, {"runs": []})
        if ours is None:
            continue
        metric = "acc" if family == "cnn" else "ppl"
        dense = ours["dense"][metric]
        lines += [
            f"**{family}** (dense {metric} {dense:.4f}, {ours['dense']['params']:,} parameters)",
            "",
            f"| target | method | {metric} | layer error | parameters | speed-up | vs same shape |",
            "|---|---|---|---|---|---|---|",
        ]
        for target in dict.fromkeys(r["target"] for r in ours["runs"]):
            names = REFERENCE_TARGETS.get(target, (target,))
            for row in [r for r in refs["runs"] if r["target"] in names]:
                error = row.get("mean_layer_rel_err")
                lines.append(
                    f"| {row['target']} | {row['method']} (reference) | {row[metric]:.4f} | "
                    f"{'' if error is None else f'{error:.5f}'} | {row['params']:,} | | |"
                )
            for row in [r for r in ours["runs"] if r["target"] == target]:
                error = row["mean_layer_rel_err"]
                lines.append(
                    f"| {names[-1] if family == 'opt' or family == 'gpt2' else names[0]} | "
                    f"lossprune {row['method']} | **{row[metric]:.4f}** | "
                    f"{'' if error is None else f'{error:.5f}'} | {row['params']:,} | "
                    f"{row['speedup']:.2f}x | {row['speed_vs_same_shapes']:.2f}x |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-root", default="/work/scratch/tiny")
    parser.add_argument("--digits-cache", default="/work/scratch/tiny/digits")
    parser.add_argument("--refs", default=None, help="the reference helper's JSON")
    parser.add_argument("--parts", nargs="+", default=["lm", "cnn", "stages", "speed"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", action="store_true", help="print the tables of --out")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "references": references(args.refs),
    }
    path = Path(args.out)
    if path.exists():  # parts run separately merge into one file
        result = json.loads(path.read_text()) | result
    if "lm" in args.parts:
        result["language_models"] = language_models(args)
    if "cnn" in args.parts:
        result["cnn"] = cnn(args)
    if "stages" in args.parts:
        result["stages"] = stages(args)
    if "speed" in args.parts:
        result["speed"] = speed(args)
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
