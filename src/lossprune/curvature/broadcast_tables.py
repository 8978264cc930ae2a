r"""Position tables broadcast over the batch, expanded to its examples for one batched pass.

GPT-2 and BERT call their position table on a ``(1, T)`` tensor and add its one ``(1, T, D)``
row to every example's hidden states; the backward pass then gives the table only the sum of
the examples' cotangents. :func:`expand_broadcast_output` replaces that row by its view
expanded to the batch's examples (the same numbers), so that each example's cotangent reaches
the table; :func:`only_rowwise_consumers` keeps the expansion only when the autograd graph
shows that every use of it combines it elementwise with the examples' own rows.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from .module_grads import consumers

__all__ = ["UNEXPANDABLE", "expand_broadcast_output", "only_rowwise_consumers"]


def expand_broadcast_output(
    args: tuple, kwargs: dict, output: Any, examples: int
) -> tuple[tuple[Tensor], Tensor] | None:
    r"""A call on a ``(1, ...)`` tensor broadcast over ``examples``, expanded to them, or ``None``.

    A position table called on ``(1, T)`` positions returns one ``(1, T, D)`` row that the model
    adds to every example's ``(N, T, D)`` hidden states. The backward pass then gives the table
    only the SUM over examples of their cotangents, from which no per-example gradient can be
    formed. Expanded (a view, no copy) to ``(N, T, D)``, the sum :math:`x + E` is the same
    number for number, and the cotangent of row :math:`n` is example :math:`n`'s, so the
    table's per-example gradients come from :mod:`.module_grads` like any other module's. The
    input is expanded likewise (every example looked up the same positions). Kept only when the
    expanded output's every use adds it row by row (:func:`only_rowwise_consumers`).
    """
    if kwargs or len(args) != 1:
        return None
    a = args[0]
    if not (isinstance(a, Tensor) and isinstance(output, Tensor) and output.requires_grad):
        return None
    if a.dim() == 0 or output.dim() == 0 or len(a) != 1 or len(output) != 1:
        return None
    return (a.expand(examples, *a.shape[1:]),), output.expand(examples, *output.shape[1:])


# Elementwise operations: with an operand of the output's full shape, row n of their result
# depends on row n of that operand only (broadcasting never mixes the rows of a full operand).
_ROWWISE_NODES = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})


def only_rowwise_consumers(outputs: Tensor, expanded: dict[str, list[Tensor]]) -> bool:
    """Whether every graph use of every expanded output combines it with the examples' rows.

    Each use must be an elementwise operation (:data:`_ROWWISE_NODES`) whose result and every
    other operand have the expanded shape and come from the graph (GPT-2's and BERT's
    ``inputs_embeds + position_embeds``): example n's result then reads row n of the expanded
    output and its own row of the rest, as the broadcast did, so the expanded rows' cotangents
    are the examples' own, and the rows after it differ by example (what the check of
    :func:`~.alone_check.alone_matches` relies on). Anything else (a reduction over the batch,
    a reshape, a copy, a sum of two broadcast rows) refuses the expansion.
    """
    targets = {t.grad_fn: tuple(t.shape) for ts in expanded.values() for t in ts}
    if any(node is None for node in targets):
        return False
    found = consumers(outputs.grad_fn, {(node, 0) for node in targets})
    for node, shape in targets.items():
        users = found.get((node, 0), [])
        if not users:
            return False
        for user in users:
            if user.name() not in _ROWWISE_NODES or _forward_shape(user, 0) != shape:
                return False
            for child, index in user.next_functions:
                if child is node:
                    continue
                if child is None or child in targets or _forward_shape(child, index) != shape:
                    return False
    return True


def _forward_shape(node: Any, index: int) -> tuple[int, ...] | None:
    """The shape of forward output ``index`` of graph node ``node`` (a leaf's own shape)."""
    variable = getattr(node, "variable", None)
    if variable is not None:
        return tuple(variable.shape)
    metadata = getattr(node, "_input_metadata", None)  # private; absent: the shape is unknown
    if not metadata or index >= len(metadata):
        return None
    return tuple(metadata[index].shape)


# model -> names of broadcast tables whose expanded output was refused: later batches run
# them unexpanded (their parameters go one example at a time).
UNEXPANDABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
