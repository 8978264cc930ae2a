"""What a pruning step did to the loss, predicted and measured (for the StageReport)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._data import iter_batches
from ._distributed import all_reduce_floats
from ._functional import FunctionalModel
from .curvature import LossFn, hvp

__all__ = ["predicted_loss_change", "mean_loss"]


def predicted_loss_change(
    model: nn.Module,
    params: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn,
    *,
    chunk_size: int | None = None,
) -> tuple[float, float]:
    r"""Mean loss at θ and the quadratic model's prediction of the change for the step Δθ.

    .. math:: \Delta L \approx g^\top\Delta\theta + \tfrac12 \Delta\theta^\top H \Delta\theta

    with :math:`g` and :math:`H` the gradient and Hessian of the mean loss at θ, from ONE fused
    gradient + Hessian-vector-product pass per batch.

    Returns:
        ``(loss, predicted_change)``, example-weighted over ``data`` (and over all ranks of an
        initialised process group).
    """
    device = next(iter(params.values())).device
    vectors = {k: d.unsqueeze(0) for k, d in delta.items()}
    loss_sum = linear = quadratic = 0.0
    examples = 0
    for batch in iter_batches(data, device):
        n = len(batch[0])
        loss, grad, products = hvp(model, params, batch, loss_fn, vectors, chunk_size=chunk_size)
        loss_sum += n * float(loss)
        linear += n * sum(float((grad[k] * delta[k]).sum()) for k in delta)
        quadratic += n * sum(float((products[k][0] * delta[k]).sum()) for k in delta)
        examples += n
    loss_sum, linear, quadratic, examples = all_reduce_floats(
        [loss_sum, linear, quadratic, examples], device
    )
    return loss_sum / examples, (linear + 0.5 * quadratic) / examples


@torch.no_grad()
def mean_loss(model: nn.Module, params: Mapping[str, Tensor], data: Any, loss_fn: LossFn) -> float:
    """Example-weighted mean loss over ``data`` with the prunable weights set to ``params``."""
    device = next(iter(params.values())).device
    fmodel = FunctionalModel(model, params)
    total = 0.0
    examples = 0
    for inputs, targets in iter_batches(data, device):
        total += len(inputs) * float(loss_fn(fmodel(params, inputs), targets))
        examples += len(inputs)
    total, examples = all_reduce_floats([total, examples], device)
    return total / examples
