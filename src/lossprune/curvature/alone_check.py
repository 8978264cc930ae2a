r"""The check that keeps the batched keyword-input path exact: an example alone gives its rows.

A Hugging Face model does not trace, so nothing proves that its examples do not affect each
other. On every batch, the LAST example is run alone (no graph) and must give the same outputs,
and the same inputs at every covered module, as its rows of the batch, to rounding
(:func:`alone_matches`). That catches what couples examples (batch statistics,
capacity-limited expert routing that drops a batch's last tokens, a sequence-first layout) and a
module whose rows are not the examples' after all. A batch shape that failed is remembered per
model (:data:`COUPLED`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._common.batches import ModelInputs
from .._common.functional import FunctionalModel
from .module_grads import CallInputs

__all__ = ["COUPLED", "alone_matches", "coupled", "signature"]


# model -> signatures of keyword batches on which an example alone did not match its rows: the
# next batches of that shape take the generic path without a wasted batched forward pass.
COUPLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# How far an example alone may be from its rows of the batch: rounding of kernels that block a
# batch differently, relative to the largest entry. Coupling changes entries at order one.
_ALONE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
_LOW_PRECISION_TOLERANCE = 2e-2


def signature(inputs: ModelInputs) -> tuple:
    """The shapes and dtypes of a keyword batch (what a coupling check depends on)."""
    leaves = tree_flatten((inputs.args, inputs.kwargs))[0]
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, Tensor) else repr(t) for t in leaves)


def coupled(model: nn.Module, inputs: ModelInputs) -> bool:
    """Whether a batch of these shapes already failed the check for ``model``."""
    return signature(inputs) in COUPLED.get(model, ())


def alone_matches(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: ModelInputs,
    examples: int,
    outputs: Tensor,
    layer_inputs: dict[str, tuple[nn.Module, tuple[Tensor, ...], int, tuple]],
) -> set[str] | None:
    """Whether the last example run alone gives its rows of the batch (:mod:`.contractions`).

    Compared: the model outputs and the tensor inputs of every covered module (the last
    example's rows: ``len // examples`` of them), within rounding (:data:`_ALONE_TOLERANCE`
    relative to the largest entry; integer inputs such as expert indices exactly), and its
    other inputs (:class:`~.module_grads.CallInputs`) exactly.

    Returns ``None`` when the examples are coupled (the outputs, or a module's input of the
    same shape, differ; a module called another number of times), else the modules whose
    inputs are not the examples' after all: their last example's slice has another shape than
    the input of the example run alone (a ``(T, T)`` table of relative positions has ``T``
    rows whatever the batch, divisible by the number of examples by chance), or their other
    inputs differ (a batch size passed as a number). Those are left out; the others keep the
    batched path.
    """
    last = examples - 1
    seen: dict[str, list[CallInputs | None]] = {name: [] for name in layer_inputs}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen[name].append(CallInputs.of(args, kwargs))

        return hook

    handles = [
        m.register_forward_hook(recorder(n), with_kwargs=True)
        for n, (m, *_) in layer_inputs.items()
    ]
    try:
        with torch.no_grad():
            alone = FunctionalModel(model, params)(
                params, inputs.example_rows(last, examples, examples)
            )
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(alone, Tensor) or not _close(outputs[last:], alone):
        return None
    misread: set[str] = set()
    for name, (_, args, count, constants) in layer_inputs.items():
        if len(seen[name]) != 1:
            return None
        recorded = seen[name][0]
        if recorded is None or recorded.constants != constants:
            # Other constants (a batch size passed as a number): called on one example's rows
            # with the batch's constants, the module would not compute that example's outputs.
            misread.add(name)
            continue
        rows = [a[len(a) - len(a) // count :] for a in args]
        if any(r.shape != b.shape for r, b in zip(rows, recorded.tensors, strict=True)):
            misread.add(name)
        elif not all(_close(r, b.detach()) for r, b in zip(rows, recorded.tensors, strict=True)):
            return None
    return misread


def _close(batched: Tensor, alone: Any) -> bool:
    if not isinstance(alone, Tensor):
        return False
    if batched.shape != alone.shape or batched.dtype != alone.dtype:
        return False
    if alone.numel() == 0:
        return True
    if not alone.is_floating_point():
        return bool(torch.equal(batched, alone))
    tolerance = _ALONE_TOLERANCE.get(alone.dtype, _LOW_PRECISION_TOLERANCE)
    scale = float(alone.abs().max())
    if not math.isfinite(scale):
        return False
    return bool(torch.allclose(batched, alone, rtol=tolerance, atol=tolerance * scale))
