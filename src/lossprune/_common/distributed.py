"""Summing accumulators over the ranks of an initialised :mod:`torch.distributed` group.

Statistics are example-weighted sums divided by the total example count; summing both over ranks
gives every rank the statistics of the union of the shards, hence identical scores and masks.
Without a process group every function here is a no-op.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "all_reduce_sum", "all_reduce_floats"]


def is_distributed() -> bool:
    """Whether a process group is initialised (statistics must then be all-reduced)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(*tensors: Tensor | Mapping[str, Tensor]) -> None:
    """Sum tensors (or dicts of tensors) over ranks, in place."""
    if not is_distributed():
        return
    for item in tensors:
        for tensor in item.values() if isinstance(item, Mapping) else (item,):
            dist.all_reduce(tensor)


def all_reduce_floats(values: list[float], device: torch.device) -> list[float]:
    """Sum Python numbers over ranks (in float64, on ``device`` so NCCL can carry them)."""
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
