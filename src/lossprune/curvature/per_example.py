r"""Per-example squared pull-backs one example at a time, fused with the loss and its gradient.

The Fisher/GGN diagonals (:mod:`.diagonals`) are sums :math:`\sum_n \sum_r (J_n^\top c_{nr})^2`
over the examples :math:`n` of a batch and the output columns :math:`c_{nr}` of each. An example
is a batch of one: that is what ``vmap`` over the examples computes for a model called on one
tensor, and what this module computes, one forward pass per example, for a model that cannot be
vmapped over its examples — keyword inputs (a Hugging Face model builds its attention mask with
Python control flow on tensor values, which ``vmap`` refuses), nested tuples, or an exact diagonal
whose dense columns would not fit in memory. For keyword inputs it is the slow twin of the
batched layer contractions (:mod:`.contractions`) and computes the parameters they do not cover.

Each example's forward pass keeps its autograd graph, and everything that example contributes
comes from that one graph:

* its output-space pieces at its own outputs (:func:`~.outputs.output_curvature` on the batch of
  one), rescaled to the batch's mean. With :math:`Z_n` the units of example :math:`n` (its
  non-ignored tokens, or class weights, :func:`~.outputs.loss_normaliser`) and :math:`Z = \sum_n
  Z_n`, the batch loss is :math:`L = \sum_n (Z_n/Z) L_n`, so :math:`\partial L/\partial f_n =
  (Z_n/Z)\,\partial L_n/\partial f_n` and :math:`M_n = (Z_n/Z) M_n^{(1)}`: the square-root or
  sampled columns of the batch of one are scaled by :math:`\sqrt{Z_n/Z}`;
* the loss :math:`\sum_n (Z_n/Z) L_n` and the gradient :math:`\sum_n J_n^\top \partial
  L/\partial f_n` (one more backward pass through the same graph), so a statistics pass needs no
  separate gradient pass;
* the columns, pulled back ``width`` at a time (one batched backward pass per block), squared
  and summed.

Memory: one example's graph plus ``width`` parameter-sized pull-backs (:func:`copies_at_once`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .._common.batches import ModelInputs
from .._common.functional import FunctionalModel
from .outputs import (
    LossFn,
    flatten_example,
    loss_and_output_grad,
    loss_normaliser,
    output_curvature,
)

__all__ = ["ExamplePass", "copies_at_once", "column_chunks", "fit_at_once", "per_example_pass"]

Params = dict[str, Tensor]

#: Per-example, per-column or per-vector numbers that may exist at once by default.
DEFAULT_ELEMENTS = 1 << 24


def copies_at_once(params: Mapping[str, Tensor], chunk_size: int | None) -> int:
    """How many parameter-sized per-example or per-column tensors may exist at once.

    ``chunk_size`` when given (the one memory option of every statistic, see
    :func:`~.statistics.compute_statistics`), else as many as fit in ``2**24`` numbers (at
    least one).
    """
    if chunk_size is not None:
        return chunk_size
    return fit_at_once(sum(p.numel() for p in params.values()))


def fit_at_once(each: int, elements: int | None = None) -> int:
    """How many tensors of ``each`` numbers fit in ``elements``, at least one.

    ``None``: :data:`DEFAULT_ELEMENTS`. The block size of every chunked per-example loop.
    """
    return max(1, (elements or DEFAULT_ELEMENTS) // max(1, each))


def column_chunks(columns: Tensor, width: int) -> Iterator[Tensor]:
    """``(O, R)`` columns ``width`` at a time."""
    for start in range(0, columns.shape[1], width):
        yield columns[:, start : start + width]


class ExamplePass(NamedTuple):
    r"""The batch loss, its gradient and :math:`\sum_n\sum_r (J_n^\top c_{nr})^2`."""

    loss: Tensor
    grad: Params
    squares: Params


def per_example_pass(
    fmodel: FunctionalModel,
    params: Params,
    fixed: Params,
    inputs: ModelInputs | Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    samples: int,
    generator: torch.Generator | None,
    width: int,
    columns: Tensor | None = None,
) -> ExamplePass:
    """Loss, gradient and squared pull-backs of the exact (``samples == 0``) or sampled columns.

    Args:
        fmodel: the model as a function of its parameters.
        params: the differentiated tensors.
        fixed: tensors of ``fmodel``'s explicit parameters held constant (layers a fast path
            already covered).
        inputs: the batch's inputs (examples in dim 0 of every tensor).
        targets: the batch's targets.
        loss_fn: the batch loss, a mean over its units.
        samples: ``0`` for the exact square-root columns, else labels (or probes) per unit.
        generator: the random source of the sampled columns, drawn example after example.
        width: columns pulled back at once (:func:`copies_at_once`).
        columns: sampled columns of the whole batch ``(N, O, R)``, already drawn (the batch
            mean's scaling included): example ``n`` pulls back ``columns[n]`` instead of
            drawing its own, so that parameters split between two paths see the same labels.
    """
    total = float(loss_normaliser(loss_fn, targets))
    loss = torch.zeros((), dtype=next(iter(params.values())).dtype, device=targets.device)
    grad = {k: torch.zeros_like(p) for k, p in params.items()}
    squares = {k: torch.zeros_like(p) for k, p in params.items()}
    names = list(params)
    for n in range(len(targets)):
        example_targets = targets[n : n + 1]
        units = float(loss_normaliser(loss_fn, example_targets))
        if units == 0.0:  # every unit ignored: the example adds nothing to any mean
            continue
        share = units / total
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            outputs = fmodel({**fixed, **leaves}, _example(inputs, n))
            flat = flatten_example(outputs)
        detached = tree_map(Tensor.detach, outputs)
        example_loss, output_grad = loss_and_output_grad(loss_fn, detached, example_targets)
        loss = loss + share * example_loss.detach()
        space = output_curvature(loss_fn, detached, example_targets)
        gradient_column = share * flatten_example(output_grad).unsqueeze(1)
        for k, g in zip(names, _pull_back(flat, leaves, gradient_column), strict=True):
            if g is not None:
                grad[k] += g[0]
        scale = share**0.5
        blocks: Iterable[Tensor]
        if samples == 0:
            blocks = (scale * block for block in space.column_blocks(0, width))
        elif columns is not None:  # already scaled to the batch's mean
            blocks = column_chunks(columns[n], width)
        else:
            drawn = space.sample_columns(samples, generator)[0]
            blocks = (scale * block for block in column_chunks(drawn, width))
        for block in blocks:
            pulled = _pull_back(flat, leaves, block)
            for k, g in zip(names, pulled, strict=True):
                if g is not None:
                    squares[k] += (g * g).sum(0)
    return ExamplePass(loss, grad, squares)


def _example(inputs: ModelInputs | Tensor, n: int) -> ModelInputs | Tensor:
    """Example ``n`` as a batch of one."""
    return inputs[n : n + 1] if isinstance(inputs, Tensor) else inputs.rows(n, n + 1)


def _pull_back(flat: Tensor, leaves: Mapping[str, Tensor], block: Tensor) -> list[Tensor | None]:
    r""":math:`J^\top c` for the columns ``c`` of ``block`` ``(O, w)``: ``(w, *param)`` each.

    One backward pass for one column; a batched one (``is_grads_batched``) for several, or
    column by column for an operation without a batching rule. The graph is kept for the next
    block. ``None``: a parameter the outputs do not depend on.
    """
    tensors = list(leaves.values())
    if not flat.requires_grad:  # none of ``leaves`` reaches the outputs (an unused module)
        return [None] * len(tensors)
    if block.shape[1] == 1:
        grads = torch.autograd.grad(
            flat, tensors, block[:, 0], retain_graph=True, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        return list(
            torch.autograd.grad(
                flat, tensors, block.T, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        )
    except RuntimeError:
        columns = [_pull_back(flat, leaves, block[:, r : r + 1]) for r in range(block.shape[1])]
        return [
            None if parts[0] is None else torch.cat(parts) for parts in zip(*columns, strict=True)
        ]
