"""Two gloo processes on CPU, each with its own shard, select the masks of the union (the
network-scale Pruner, and layer-wise pruning: its Gram matrices are all-reduced)."""

import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lossprune import ExponentialSchedule, Pruner, QuadraticModel

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def make_data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(30, 6, dtype=torch.float64, generator=generator)
    return inputs, torch.randint(0, 3, (30,), generator=generator)


def prune(model, data):
    pruner = Pruner(
        model,
        QuadraticModel(lam=1e-3),
        ExponentialSchedule(0.8, 3),
        loss_fn=nn.CrossEntropyLoss(),
        data=data,
    )
    reports = pruner.run()
    return pruner.masks, reports


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        inputs, targets = make_data()
        # Unequal shards: example weighting must make them add up to the union.
        shard = slice(0, 12) if rank == 0 else slice(12, 30)
        model = nn.parallel.DistributedDataParallel(make_model())
        masks, reports = prune(model, (inputs[shard], targets[shard]))
        torch.save(
            {"masks": masks, "loss": [r.loss_before for r in reports]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_select_identical_masks_equal_to_single_process(tmp_path: pathlib.Path):
    world = 2
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    single_masks, single_reports = prune(make_model(), make_data())
    for result in results:
        assert result["masks"].keys() == single_masks.keys()
        for name, mask in single_masks.items():
            assert torch.equal(result["masks"][name], mask)
        assert result["loss"] == pytest.approx([r.loss_before for r in single_reports])


def layerwise_data():
    from tests.layerwise.models import batches

    return batches(((12, 9, 12), (5, 12), (12, 7), (3,)), seed=2, ignore_first=1)


def layerwise_prune(data):
    from lossprune import Wanda
    from lossprune.layerwise import LayerwisePruner, Refit
    from tests.layerwise.models import tiny

    model = tiny("llama")
    pruner = LayerwisePruner(model, Wanda(), 0.5, data=data, update=Refit())
    pruner.run()
    return pruner.masks, model.state_dict()


def layerwise_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = layerwise_data()
        # Unequal shards (three batches and one): sums and counts must add up to the union.
        masks, state = layerwise_prune(data[:3] if rank == 0 else data[3:])
        torch.save({"masks": masks, "state": state}, os.path.join(out_dir, f"layerwise{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing transformers: about 50 s on the shared machine
def test_layerwise_ranks_prune_identically_to_a_single_process_on_the_union(tmp_path):
    world = 2
    mp.spawn(layerwise_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"layerwise{r}.pt", weights_only=True) for r in range(world)]
    single_masks, single_state = layerwise_prune(layerwise_data())
    for result in results:
        for name, mask in single_masks.items():
            assert torch.equal(result["masks"][name], mask), name
        for name, value in single_state.items():
            # The Gram matrices are sums in another order: the refit agrees to CG's tolerance.
            torch.testing.assert_close(result["state"][name], value, rtol=0, atol=1e-6)
    for name, value in results[0]["state"].items():  # every rank holds the same weights
        assert torch.equal(results[1]["state"][name], value), name
