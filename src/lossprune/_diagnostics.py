"""What a pruning step did to the loss, predicted and measured (for the StageReport)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._data import iter_batches
from ._distributed import all_reduce_floats, all_reduce_sum
from ._functional import FunctionalModel
from .curvature import LossFn, hvp

__all__ = ["curvature_product", "predicted_loss_change", "mean_loss"]

Params = dict[str, Tensor]


def curvature_product(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn,
    vector: Mapping[str, Tensor],
    *,
    curvature: str = "hessian",
    chunk_size: int | None = None,
) -> tuple[float, Params, Params]:
    """Mean loss, gradient and curvature-vector product ``C v`` over ``data``, example-weighted.

    One fused gradient + product pass per batch (:func:`lossprune.curvature.hvp`), all-reduced
    over the ranks of an initialised process group.
    """
    device = next(iter(params.values())).device
    grad_sum = {k: torch.zeros_like(p) for k, p in params.items()}
    product_sum = {k: torch.zeros_like(p) for k, p in params.items()}
    loss_sum = 0.0
    examples = 0
    stacked = {k: v.unsqueeze(0) for k, v in vector.items()}
    for batch in iter_batches(data, device):
        n = len(batch[0])
        loss, grad, products = hvp(
            model, params, batch, loss_fn, stacked, curvature=curvature, chunk_size=chunk_size
        )
        loss_sum += n * float(loss)
        for k in params:
            grad_sum[k].add_(grad[k], alpha=n)
            product_sum[k].add_(products[k][0], alpha=n)
        examples += n
    all_reduce_sum(grad_sum, product_sum)
    loss_sum, examples = all_reduce_floats([loss_sum, examples], device)
    return (
        loss_sum / examples,
        {k: v / examples for k, v in grad_sum.items()},
        {k: v / examples for k, v in product_sum.items()},
    )


def predicted_loss_change(
    model: nn.Module,
    params: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn,
    *,
    curvature: str = "hessian",
    chunk_size: int | None = None,
) -> tuple[float, float]:
    r"""Mean loss at θ and the quadratic model's prediction of the change for the step Δθ.

    .. math:: \Delta L \approx g^\top\Delta\theta + \tfrac12 \Delta\theta^\top C \Delta\theta

    with :math:`g` the gradient of the mean loss at θ and :math:`C` its Hessian (or, with
    ``curvature="ggn"``, its Gauss-Newton matrix), from ONE fused gradient +
    curvature-vector-product pass per batch.

    Returns:
        ``(loss, predicted_change)``, example-weighted over ``data`` (and over all ranks of an
        initialised process group).
    """
    loss, grad, product = curvature_product(
        model, params, data, loss_fn, delta, curvature=curvature, chunk_size=chunk_size
    )
    change = sum(
        float((grad[k].double() * delta[k]).sum() + 0.5 * (product[k].double() * delta[k]).sum())
        for k in delta
    )
    return loss, change


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
