"""SynFlow, a data-free foresight-pruning baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from .._data import first_inputs
from .base import Criterion, ScoringContext

__all__ = ["SynFlow"]


class SynFlow(Criterion):
    r"""Iterative Synaptic Flow (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020).

    With every parameter replaced by its absolute value, an all-ones input gives the synaptic
    flow :math:`R = \mathbb 1^\top f(\mathbb 1; |\theta|)` (for a bias-free linear chain,
    :math:`R = \mathbb 1^\top \prod_l |W_l| \mathbb 1`). The score is

    .. math:: s = |\theta| \odot \partial R / \partial |\theta| \;\ge 0.

    As in the authors' reference code, floating-point buffers (batch-norm running statistics) are
    replaced by their absolute values too, the model must be in eval mode, and the computation is
    done in float64 because :math:`R` is a product over all layers. No data is read except, when
    ``input_shape`` is not given, the shape of the first batch of inputs. The paper prunes with
    about 100 exponential stages.

    Args:
        input_shape: shape of one input example, e.g. ``(3, 32, 32)``; default: from the data.
        dtype: computation dtype (default float64).
    """

    def __init__(
        self, input_shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float64
    ) -> None:
        if input_shape is not None:
            input_shape = tuple(int(d) for d in input_shape)
            if not input_shape or min(input_shape) < 1:
                raise ValueError(f"input_shape must hold positive sizes, got {input_shape}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.input_shape = input_shape
        self.dtype = dtype

    def _options(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape}

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
            flow = functional_call(model, {**fixed, **leaves}, (ones,)).sum()
            grads = torch.autograd.grad(flow, list(leaves.values()), allow_unused=True)
        return {
            k: (leaf.detach() * (g if g is not None else torch.zeros_like(leaf))).to(
                context.params[k].dtype
            )
            for (k, leaf), g in zip(leaves.items(), grads)
        }
