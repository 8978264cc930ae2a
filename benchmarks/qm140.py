"""Issue 4, target 6: a whole QM run (exact Fisher, π = 140, 1000 scoring examples) on the
MNIST-sized MLP 784-300-100-10 (266,200 weights), timed end to end on this machine.

    python benchmarks/qm140.py [--diagnostics]
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
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 10)
    ).eval()
    data = (torch.randn(1000, 784), torch.randint(0, 10, (1000,)))
    pruner = Pruner(
        model,
        QuadraticModel(lam=1e-3),
        ExponentialSchedule(0.98847, 140),
        loss_fn=nn.CrossEntropyLoss(),
        data=data,
        diagnostics=args.diagnostics,
    )
    start = time.perf_counter()
    pruner.run()
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "stages": 140,
                "sparsity": pruner.sparsity(),
                "weights": sum(p.numel() for p in pruner.params.values()),
                "diagnostics": args.diagnostics,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
