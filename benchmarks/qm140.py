"""Issue 4, target 6: a whole QM run (exact Fisher, π = 140, 1000 scoring examples) on the
MNIST-sized MLP 784-300-100-10 (266,200 weights), timed end to end on this machine.

    python benchmarks/qm140.py [--diagnostics] [--device cuda] [--smoke]

``--smoke``: 14 stages of a 64-32-10 MLP on 100 examples (it runs; the time means nothing).
"""

import argparse
import json
import time

import torch
from torch import nn

from lossprune import ExponentialSchedule, Pruner, QuadraticModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diagnostics", action="store_true", help="per-stage loss diagnostics")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    widths, examples, stages = (
        ((64, 32, 10), 100, 14) if args.smoke else ((784, 300, 100), 1000, 140)
    )
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, (*widths[1:], 10), strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(device).eval()
    data = (
        torch.randn(examples, widths[0], device=device),
        torch.randint(0, 10, (examples,), device=device),
    )
    pruner = Pruner(
        model,
        QuadraticModel(lam=1e-3, curvature="fisher"),
        ExponentialSchedule(0.98847, stages),
        loss_fn=nn.CrossEntropyLoss(),
        data=data,
        diagnostics=args.diagnostics,
    )
    # torch.func imports its compiler stack on first use (seconds, once per process): not timed.
    torch.func.grad(lambda x: x.sum())(torch.zeros(1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pruner.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "stages": stages,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "sparsity": pruner.sparsity(),
                "weights": sum(p.numel() for p in pruner.params.values()),
                "diagnostics": args.diagnostics,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
