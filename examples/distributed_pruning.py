"""Prune one model from several processes, each scoring on its own shard of the data.

Run on CPU with two processes:

    torchrun --nproc_per_node=2 examples/distributed_pruning.py

Every rank computes the statistics of its shard; lossprune all-reduces them (example-weighted), so
all ranks select the identical mask, the one a single process would select on all the data.
"""

import torch
import torch.distributed as dist
from torch import nn

from lossprune import ExponentialSchedule, Pruner, QuadraticModel


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    model = nn.parallel.DistributedDataParallel(model)

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(1000, 20, generator=generator)
    targets = torch.randint(0, 5, (1000,), generator=generator)
    shard = slice(rank, None, world)  # each rank sees a different part of the data

    pruner = Pruner(
        model,
        QuadraticModel(lam=1e-3),
        ExponentialSchedule(sparsity=0.9, stages=5),
        loss_fn=nn.CrossEntropyLoss(),
        data=(inputs[shard], targets[shard]),
    )
    for report in pruner.run():
        if rank == 0:
            print(report)

    # Check: every rank holds the same mask.
    flat = torch.cat([m.flatten() for m in pruner.masks.values()]).to(torch.uint8)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(g, flat) for g in gathered)
        print(f"{world} ranks, identical masks: {same}, sparsity {pruner.sparsity():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
