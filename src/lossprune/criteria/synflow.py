"""SynFlow, a data-free foresight-pruning baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from .._checks import is_int
from .._data import first_inputs
from .base import Criterion, ScoringContext

__all__ = ["SynFlow"]


@dataclass(frozen=True)
class SynFlow(Criterion):
    r"""Iterative Synaptic Flow (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020).

    With every parameter replaced by its absolute value, an all-ones input gives the synaptic
    flow :math:`R = \mathbb 1^\top f(\mathbb 1; |\theta|)` (for a bias-free linear chain,
    :math:`R = \mathbb 1^\top \prod_l |W_l| \mathbb 1`). The score is

    .. math:: s = |\theta| \odot \partial R / \partial |\theta| \;\ge 0.

    As in the authors' reference code, floating-point buffers (batch-norm running statistics) are
    replaced by their absolute values too, the model must be in eval mode, and the computation is
    done in float64 because :math:`R` is a product over all layers. The scores stay in that
    dtype: cast back to float32 they overflow for deep networks (a ResNet-50 at initialisation).
    A model with several outputs (a tuple, a dict) has :math:`R` summed over all their
    floating-point entries. No data is read except, when ``input_shape`` is not given, the
    shape of the first batch of inputs. The paper prunes with about 100 exponential stages.

    Args:
        input_shape: shape of one input example, e.g. ``(3, 32, 32)``: a sequence of positive
            ints; default: from the data.
        dtype: computation dtype (default float64).
    """

    input_shape: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", _check_input_shape(self.input_shape))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {self.dtype!r}")

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        model = context.model
        if self.input_shape is not None:
            shape = self.input_shape
        elif context.data is not None:
            shape = tuple(first_inputs(context.data).shape[1:])
        else:
            raise ValueError("SynFlow needs input_shape=... or data to read the input shape from")
        device = next(iter(context.params.values())).device
        fixed: dict[str, Tensor] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor = tensor.detach()
            fixed[name] = tensor.to(self.dtype).abs() if tensor.is_floating_point() else tensor
        leaves = {
            k: p.detach().to(self.dtype).abs().requires_grad_(True)
            for k, p in context.params.items()
        }
        ones = torch.ones((1, *shape), dtype=self.dtype, device=device)
        with torch.enable_grad():
            outputs = functional_call(model, {**fixed, **leaves}, (ones,))
            flow = _total(outputs)
            grads = torch.autograd.grad(flow, list(leaves.values()), allow_unused=True)
        return {
            k: leaf.detach() * (g if g is not None else torch.zeros_like(leaf))
            for (k, leaf), g in zip(leaves.items(), grads, strict=True)
        }


def _check_input_shape(shape: object) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (not a string, not floats)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"input_shape must be a sequence of ints, e.g. (3, 32, 32), got {shape!r}")
    if not shape or not all(is_int(d) for d in shape):
        raise TypeError(f"input_shape must be a non-empty sequence of ints, got {shape!r}")
    if min(int(d) for d in shape) < 1:
        raise ValueError(f"input_shape must hold positive sizes, got {tuple(shape)}")
    return tuple(int(d) for d in shape)


def _total(outputs: Any) -> Tensor:
    """:math:`R`: the sum of every floating-point tensor in the model's outputs."""
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise TypeError(
            "SynFlow needs floating-point outputs to sum, the model returned "
            f"{type(outputs).__name__}"
        )
    return torch.stack([t.sum() for t in leaves]).sum()
