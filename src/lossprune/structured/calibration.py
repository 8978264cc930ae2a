r"""The consumers' input statistics, set after set, on the model as the earlier sets left it.

Each set's refit needs the Gram matrix of its consumers' inputs computed from the ALREADY
pruned and refitted model (SparseGPT's sequential calibration). Two ways, chosen by
:func:`visits`:

* **block by block** (a model whose blocks :func:`lossprune.layerwise.blocks.find_blocks` finds
  — the decoder layers of a Hugging Face model, a ``Sequential`` stack — and whose every set reads
  its units inside one block): the calibration batches are captured once at the first block
  (:func:`lossprune.layerwise.calibration.capture`), then each block in turn is moved to the
  compute device (:func:`lossprune.layerwise.offload.on_device`), its sets are visited (their
  statistics from running that block alone on its current inputs), and its output becomes the
  next block's input. Only one block and one block's activations are on the device at a time.
* **whole model** (anything else: a residual stream of a CNN is read in every block): the whole
  model runs once per set, up to nothing less.

Statistics count the same tokens either way (:func:`lossprune._common.batches.counted_positions`);
the tests check that both give the same refits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from .._common.batches import ModelInputs, counted_positions, is_batch, model_loss
from .._common.data import iter_batches
from ..curvature.inputs import InputMoments, InputStatistics
from ..layerwise.blocks import BlockStack, find_blocks
from ..layerwise.calibration import BlockInputs, capture
from ..layerwise.offload import on_device
from .groups import GroupSet

__all__ = ["consumer_moments", "block_stack", "visits"]

Moments = Callable[[], dict[str, InputMoments]]


def consumer_moments(
    model: nn.Module, group_set: GroupSet, data: Any, loss_fn: Any, dtype: torch.dtype
) -> dict[str, InputMoments]:
    """Gram matrices and means of the consumers' inputs, running the whole model on ``data``."""
    names = [f"{c.module}.weight" for c in group_set.consumers]
    statistics = InputStatistics(model, names, gram=True, dtype=dtype)
    device = next(model.parameters()).device
    own = loss_fn if loss_fn is not None else model_loss(model)
    for batch in iter_batches(data, device, own):
        inputs = batch.inputs
        counted = None
        if isinstance(inputs, ModelInputs):
            counted = counted_positions(inputs.kwargs, inputs.labels)
        with statistics.recording(counted):
            if isinstance(inputs, ModelInputs):
                model(*inputs.args, **inputs.kwargs)
            else:
                model(inputs)
    return statistics.means()


def _block_index(stack: BlockStack, group_set: GroupSet) -> int | None:
    """The block holding every consumer (and slice) of the set, or ``None``."""
    modules = [c.module for c in group_set.consumers] or [group_set.name]
    modules += [s.tensor for s in group_set.slices]
    for index, name in enumerate(stack.names):
        if all(m.startswith(f"{name}.") or m == name for m in modules):
            return index
    return None


def block_stack(model: nn.Module, groups: Sequence[GroupSet]) -> BlockStack | None:
    """The model's blocks when every set lies inside one of them, else ``None``."""
    try:
        stack = find_blocks(model)
    except ValueError:
        return None
    if any(_block_index(stack, g) is None for g in groups):
        return None
    return stack


def _forward_options(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for a model whose forward takes it (no key/value cache is built)."""
    return (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )


def _block_moments(
    block: nn.Module,
    prefix: str,
    group_set: GroupSet,
    batches: Sequence[BlockInputs],
    index: int,
    dtype: torch.dtype,
) -> dict[str, InputMoments]:
    local = {
        f"{c.module}.weight": f"{c.module}.weight"[len(prefix) + 1 :] for c in group_set.consumers
    }
    statistics = InputStatistics(block, list(local.values()), gram=True, dtype=dtype)
    with torch.no_grad():
        for inputs in batches:
            with statistics.recording(inputs.counted):
                inputs.run(block, index)
    moments = statistics.means()
    return {name: moments[short] for name, short in local.items()}


def visits(
    model: nn.Module,
    groups: Sequence[GroupSet],
    stack: BlockStack | None,
    data: Any,
    loss_fn: Any,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> Iterator[tuple[GroupSet, Moments]]:
    """The sets in order, each with a function computing its consumers' moments NOW.

    The caller changes the model between visits (mask, refit); the moments of a set are those of
    the model at its visit. In block mode the set's block is on ``device`` during its visit.
    """
    if stack is None:
        for group_set in groups:
            yield group_set, partial(consumer_moments, model, group_set, data, loss_fn, dtype)
        return
    batches_raw = [data] if isinstance(data, Mapping) or is_batch(data) else list(data)
    first = next(model.parameters())
    compute = device if device is not None else first.device
    batches, _ = capture(model, stack, batches_raw, compute, _forward_options(model))
    by_block: dict[int, list[GroupSet]] = {}
    for group_set in groups:
        index = _block_index(stack, group_set)
        assert index is not None
        by_block.setdefault(index, []).append(group_set)
    for index, block in enumerate(stack.modules):
        prefix = stack.names[index]
        with on_device(block, compute):
            for group_set in by_block.get(index, []):
                moments = partial(_block_moments, block, prefix, group_set, batches, index, dtype)
                yield group_set, moments
            if index + 1 < len(stack.modules):
                with torch.no_grad():
                    for inputs in batches:
                        inputs.hidden = inputs.run(block, index)
