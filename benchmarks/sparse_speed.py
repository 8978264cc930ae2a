"""Measured speed of sparse linear layers: dense against CSR/BSR (CPU) and 2:4 (CUDA).

Usage::

    python benchmarks/sparse_speed.py --out benchmarks/results-sparse-cpu.json
    python benchmarks/sparse_speed.py --device cuda --out benchmarks/results-sparse-cuda.json

CPU: one ``nn.Linear(4096, 4096)`` at batch 128, float32, pruned to each sparsity of the curve
(50 ... 99 %) in two patterns, then measured with :func:`lossprune.sparse.speed_report`, which
checks each sparse form against dense before timing them in interleaved rounds:

- ``unstructured``: the lowest-magnitude weights (``lossprune.selection.select_masks`` on |W|),
  exported as CSR;
- ``blocks``: whole 32 x 32 tiles with the lowest Frobenius norms, exported as CSR and as BSR
  with the same 32 x 32 blocks.

CUDA: ``nn.Linear(10240, 3072)`` in float16 on a 3072 x 10240 input (the shape of PyTorch's
semi-structured sparsity tutorial), pruned 2:4 along the input dimension by magnitude
(``lossprune.sparse.nm_mask``), dense against ``to_sparse_semi_structured``.

``--smoke``: a 256 x 256 layer (CPU) or a 512 x 256 one (CUDA) and two repeats, to check that
it runs.

``ratio`` is the median dense time over the median sparse time (> 1: sparse is faster);
``ratio_of_minima`` uses the fastest call of each, which is what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from lossprune.selection import select_masks
from lossprune.sparse import nm_mask, speed_report

CPU_SPARSITIES = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
TILE = 32


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest |W|: exactly round(sparsity * numel) entries pruned."""
    full = torch.ones_like(weight, dtype=torch.bool)
    return select_masks({"w": weight.abs()}, {"w": full}, sparsity=sparsity)["w"]


def tile_mask(weight: torch.Tensor, sparsity: float, tile: int) -> torch.Tensor:
    """Prune whole tile x tile blocks, lowest Frobenius norm first."""
    rows, cols = weight.shape[0] // tile, weight.shape[1] // tile
    norms = weight.reshape(rows, tile, cols, tile).pow(2).sum(dim=(1, 3))
    keep = magnitude_mask(norms, sparsity)
    return keep.repeat_interleave(tile, 0).repeat_interleave(tile, 1)


def pruned_copy(layer: nn.Linear, mask: torch.Tensor) -> nn.Linear:
    pruned = nn.Linear(layer.in_features, layer.out_features).to(layer.weight)
    with torch.no_grad():
        pruned.weight.copy_(layer.weight * mask)
        pruned.bias.copy_(layer.bias)
    return pruned.eval()


def rows_of(report, sparsity: float, pattern: str) -> list[dict]:
    (layer,) = report.layers
    rows = []
    for form in layer.forms:
        if form.skipped is not None:
            raise RuntimeError(f"{form.layout} was not measured: {form.skipped}")
        rows.append(
            {
                "sparsity": sparsity,
                "measured_sparsity": round(layer.sparsity, 6),
                "pattern": pattern,
                "layout": form.layout,
                "dense_ms": 1e3 * layer.dense_seconds,
                "sparse_ms": 1e3 * form.seconds,
                "dense_min_ms": 1e3 * layer.dense_min_seconds,
                "sparse_min_ms": 1e3 * form.min_seconds,
                "ratio": form.speedup,
                "ratio_of_minima": form.speedup_of_minima,
                "max_abs_error": form.max_abs_error,
                "agrees": form.agrees,
            }
        )
    return rows


def cpu_curve(repeats: int, sparsities: tuple[float, ...], width: int = 4096) -> dict:
    torch.manual_seed(0)
    layer = nn.Linear(width, width).eval()
    x = torch.randn(128, width)
    rows = []
    for sparsity in sparsities:
        unstructured = pruned_copy(layer, magnitude_mask(layer.weight.detach(), sparsity))
        rows += rows_of(speed_report(unstructured, x, repeats=repeats), sparsity, "unstructured")
        blocks = pruned_copy(layer, tile_mask(layer.weight.detach(), sparsity, TILE))
        report = speed_report(
            blocks, x, layouts=("csr", "bsr"), blocksize=(TILE, TILE), repeats=repeats
        )
        rows += rows_of(report, sparsity, f"blocks {TILE}x{TILE}")
        print_row(sparsity, rows)
    return {"shape": [width, width], "batch": 128, "dtype": "float32", "rows": rows}


def cuda_two_four(repeats: int, shape: tuple[int, int] = (3072, 10240)) -> dict:
    torch.manual_seed(0)
    out_features, in_features = shape
    layer = nn.Linear(in_features, out_features).half().cuda().eval()
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight.abs(), 2, 4, dim=1))
    x = torch.randn(out_features, in_features, dtype=torch.float16, device="cuda")
    report = speed_report(layer, x, layouts=("semi_structured",), repeats=repeats)
    print(report)
    rows = rows_of(report, 0.5, "2:4")
    return {
        "shape": [out_features, in_features],
        "batch": out_features,
        "dtype": "float16",
        "gpu": torch.cuda.get_device_name(),
        "rows": rows,
    }


def print_row(sparsity: float, rows: list[dict]) -> None:
    cells = [
        f"{row['pattern']} {row['layout']}: {row['ratio']:.2f} (min {row['ratio_of_minima']:.2f})"
        for row in rows
        if row["sparsity"] == sparsity
    ]
    print(f"sparsity {sparsity:.2f}  " + "  |  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsities", type=float, nargs="+", default=CPU_SPARSITIES)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.device == "cuda":
        result = cuda_two_four(*((2, (256, 512)) if args.smoke else (args.repeats,)))
    elif args.smoke:
        result = cpu_curve(2, (0.5, 0.95), width=256)
    else:
        result = cpu_curve(args.repeats, tuple(args.sparsities))
    if not all(row["agrees"] for row in result["rows"]):
        raise SystemExit("a sparse form disagrees with dense: no timing is meaningful")
    result.update(
        device=args.device,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        repeats=args.repeats,
        wall_seconds=round(time.perf_counter() - start, 1),
    )
    with open(args.out, "w") as file:
        json.dump(result, file, indent=1)
    print(f"wrote {args.out} ({result['wall_seconds']} s)")


if __name__ == "__main__":
    main()
