r"""Sequential calibration: each block's inputs, computed by the already-pruned blocks before it.

SparseGPT (Frantar and Alistarh 2023, Sec. 3.3), Wanda and ALPS calibrate a model one block at a
time: the inputs of block :math:`i` are the outputs of blocks :math:`0, \dots, i-1` AFTER they
were pruned, so that each block compensates what the blocks before it lost, and only one block
needs to be on the device. This module holds that data flow.

:func:`capture` runs the model's own forward once per batch, with forward pre-hooks on every
block that record what each block is called with: the hidden states of the FIRST block (the
output of the embeddings, whatever the model computes before its blocks) and, for every block,
its other positional and keyword arguments (attention masks, rotary position embeddings
``position_embeddings``, position ids...), which the model computes once and passes to its
blocks unchanged (kept once when several blocks receive the same objects; models that give
blocks different masks, e.g. sliding-window layers, get each block its own). The forward stops
when the last block is called (it, the final norm and the output head never run). Caches are
switched off (``use_cache=False``) for a model whose forward takes ``use_cache``.

:meth:`BlockInputs.run` then calls one block on one batch's current hidden states; the
pruner replaces the hidden states by the block's outputs once the block is pruned.

The chain is checked, not assumed: :func:`capture` also keeps a slice of every block's dense
input for the first batch, and :class:`ChainCheck` verifies, block by block while the block is
still dense, that the block's output on the first batch is the next block's recorded input
(something that runs between two blocks, or a block called twice, is refused).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._common.batches import LABELS, counted_positions, is_batch
from .blocks import BlockStack

__all__ = ["BlockInputs", "ChainCheck", "capture", "model_inputs"]

#: How many positions of the first example the chain check compares, per block.
_CHECKED_POSITIONS = 16


class _Stop(Exception):
    """Raised after the last block: the rest of the forward pass is not needed."""


@dataclass
class BlockInputs:
    """What the blocks are called with, for ONE batch.

    Attributes:
        hidden: the current block's hidden-state input (the previous block's output).
        calls: per block, the index into :attr:`contexts` of its other arguments.
        contexts: distinct ``(positional arguments after the hidden states, keyword
            arguments)``, shared by the blocks that received the same objects.
        keyword: the name of the hidden states when they were passed by keyword, else ``None``.
        counted: the positions that count in the statistics (``None``: all).
    """

    hidden: Tensor
    calls: list[int]
    contexts: list[tuple[tuple[Any, ...], dict[str, Any]]]
    keyword: str | None
    counted: Tensor | None

    def run(self, block: nn.Module, index: int, hidden: Tensor | None = None) -> Tensor:
        """Block ``index`` on :attr:`hidden` (or ``hidden``): its output hidden states."""
        args, kwargs = self.contexts[self.calls[index]]
        x = self.hidden if hidden is None else hidden
        if self.keyword is None:
            output = block(x, *args, **kwargs)
        else:
            output = block(*args, **{**kwargs, self.keyword: x})
        return _hidden_output(output)


def _hidden_output(output: Any) -> Tensor:
    """A block's hidden states: the output itself, or the first entry of a tuple."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"a block returned a {type(output).__name__}: layer-wise pruning needs blocks that "
            "return their hidden states (a tensor, or a tuple whose first entry is one)"
        )
    return output


def model_inputs(raw: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
    """``(args, kwargs, labels)`` to call the model with one batch of calibration data.

    A mapping gives keyword inputs (``labels`` is kept out of the call: it only says which
    positions count); ``(inputs, targets)`` and ``((a, b, ...), targets)`` give positional
    inputs; a tensor alone is the input.

    Raises:
        TypeError: a batch of another form.
    """
    if isinstance(raw, Mapping):
        kwargs = {str(k): v for k, v in raw.items() if k != LABELS}
        labels = raw.get(LABELS)
        return (), kwargs, labels if isinstance(labels, Tensor) else None
    if isinstance(raw, Tensor):
        return (raw,), {}, None
    if is_batch(raw):
        inputs = raw[0]
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}, None
    raise TypeError(
        "each calibration batch must be a mapping of model inputs (input_ids, attention_mask, "
        "labels optional), an (inputs, targets) pair, ((input, ...), targets) or a tensor; got "
        f"{type(raw).__name__}"
    )


def _hidden_keyword(block: nn.Module) -> str:
    """The name of a block's first argument (its hidden states when passed by keyword)."""
    parameters = list(inspect.signature(type(block).forward).parameters)
    return parameters[1] if len(parameters) > 1 else "hidden_states"


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _same(a: tuple[tuple[Any, ...], dict[str, Any]], b: tuple[tuple[Any, ...], dict]) -> bool:
    """The same objects (not equal values: the model passed them on unchanged)."""
    if len(a[0]) != len(b[0]) or a[1].keys() != b[1].keys():
        return False
    return all(x is y for x, y in zip(a[0], b[0])) and all(a[1][k] is b[1][k] for k in a[1])


def capture(
    model: nn.Module,
    stack: BlockStack,
    data: Iterable[Any],
    device: torch.device,
    forward_options: Mapping[str, Any],
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda batches: batches,
) -> tuple[list[BlockInputs], list[Tensor]]:
    """Every batch's first-block inputs and per-block contexts (module docstring).

    Args:
        model: the model (its blocks dense).
        stack: its blocks.
        data: the calibration batches.
        device: where the captured tensors are kept (the compute device).
        forward_options: extra keyword arguments of the model call (``use_cache=False``).
        progress: wraps the batches (a progress bar).

    Returns:
        ``(inputs per batch, slices of the dense input of every block for the first batch)``.

    Raises:
        ValueError: a block the forward never calls, or calls more than once, or no batch.
    """
    index = {id(block): i for i, block in enumerate(stack.modules)}
    # Per block, what it was called with BESIDES its hidden states (kept only for the first
    # block, and as a small slice on the first batch): the intermediate hidden states are freed
    # as the model's own forward goes on, so memory does not grow with depth.
    records: dict[int, list[_Context]] = {}
    first_hidden: list[Tensor] = []
    dense_slices: list[Tensor] = []
    keywords = [_hidden_keyword(block) for block in stack.modules]

    def record(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        i = index[id(block)]
        keyword = None if args else keywords[i]
        if keyword is not None and keyword not in kwargs:
            raise TypeError(
                f"layer-wise pruning: block {stack.names[i]!r} was called without positional "
                f"arguments and without {keyword!r}; it cannot tell its hidden states apart"
            )
        hidden = args[0] if keyword is None else kwargs[keyword]
        others = {k: v for k, v in kwargs.items() if k != keyword}
        records.setdefault(i, []).append(_Context(args[1:], others, keyword))
        if i == 0:
            first_hidden.append(hidden)
        if not batches:
            dense_slices.append(_head(hidden).detach().clone())
        if i == len(stack.modules) - 1:
            raise _Stop  # the last block's inputs are known: nothing after them is needed

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in stack.modules]
    batches: list[BlockInputs] = []
    try:
        for raw in progress(data):
            args, kwargs, labels = model_inputs(raw)
            records.clear()
            first_hidden.clear()
            try:
                with torch.no_grad():
                    model(*args, **kwargs, **forward_options)
            except _Stop:
                pass
            inputs = _batch_inputs(stack, records, first_hidden, kwargs, labels, device)
            batches.append(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not batches:
        raise ValueError("layer-wise pruning: data holds no calibration batch")
    return batches, dense_slices


class _Context(NamedTuple):
    """A block's call without its hidden states.

    ``keyword``: the name the hidden states came by (``None``: the first positional argument).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    keyword: str | None


def _batch_inputs(
    stack: BlockStack,
    records: Mapping[int, list[_Context]],
    first_hidden: list[Tensor],
    kwargs: Mapping[str, Any],
    labels: Tensor | None,
    device: torch.device,
) -> BlockInputs:
    calls: list[int] = []
    contexts: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    originals: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    for i, name in enumerate(stack.names):
        seen = records.get(i, [])
        if len(seen) != 1:
            raise ValueError(
                f"layer-wise pruning: the model's forward called block {name!r} {len(seen)} "
                "times; each block must run exactly once per forward pass (a chain of blocks)"
            )
        context = (seen[0].args, seen[0].kwargs)
        found = next((j for j, other in enumerate(originals) if _same(other, context)), None)
        if found is None:
            originals.append(context)
            contexts.append(_to(context, device))
            found = len(contexts) - 1
        calls.append(found)
    counted = counted_positions(kwargs, labels)
    return BlockInputs(
        hidden=first_hidden[0].detach().to(device),
        calls=calls,
        contexts=contexts,
        keyword=records[0][0].keyword,
        counted=None if counted is None else counted.to(device),
    )


def _head(hidden: Tensor) -> Tensor:
    """The first positions of the first example: what the chain check compares."""
    return hidden[:1, :_CHECKED_POSITIONS] if hidden.dim() > 2 else hidden[:1]


@dataclass
class ChainCheck:
    """Checks, block after block, that the blocks form a chain (module docstring).

    Attributes:
        first: the first batch's inputs.
        dense_slices: the recorded dense input slice of every block (first batch).
        hidden: the dense chain's current hidden states on the first batch.
    """

    first: BlockInputs
    dense_slices: list[Tensor]
    hidden: Tensor | None = field(default=None)

    def check(self, block: nn.Module, index: int, names: tuple[str, ...]) -> None:
        """Run the DENSE block ``index`` on the dense chain; compare with block ``index + 1``.

        Raises:
            ValueError: the output differs from the next block's recorded input.
        """
        # Called before block ``index`` is pruned and before the first batch's hidden states
        # are replaced by its outputs, so block 0 starts from the recorded dense input.
        hidden = self.first.hidden if self.hidden is None else self.hidden
        with torch.no_grad():
            output = self.first.run(block, index, hidden)
        self.hidden = output
        if index + 1 >= len(self.dense_slices):
            return
        expected = self.dense_slices[index + 1].to(output.device, output.dtype)
        got = _head(output)
        difference = _relative_difference(got, expected)
        tolerance = 1e-3 if output.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if not difference <= tolerance:
            raise ValueError(
                f"layer-wise pruning: the output of block {names[index]!r} is not the input of "
                f"block {names[index + 1]!r} (relative difference {difference:.3g}): something "
                "runs between them, so they do not form a chain; name the blocks with blocks="
            )


def _relative_difference(got: Tensor, expected: Tensor) -> float:
    """``‖got − expected‖ / ‖expected‖`` over finite entries; inf where shapes or NaN/inf differ.

    Non-finite entries must be the same (a model's own overflow is reported elsewhere, by the
    statistics of the block that reads it).
    """
    if got.shape != expected.shape:
        return float("inf")
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(test(got), test(expected)):
            return float("inf")
    finite = torch.isfinite(expected)
    got, expected = got[finite].double(), expected[finite].double()
    return float((got - expected).norm()) / (float(expected.norm()) or 1.0)
