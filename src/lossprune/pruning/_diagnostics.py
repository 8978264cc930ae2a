"""What a pruning step did to the loss, predicted and measured (for the StageReport)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._common.functional import FunctionalModel, at_least_float32, statistics_dtype
from ..curvature import LossFn, hvp
from ..curvature.quadratic_form import quadratic_form
from ..curvature.statistics import dataset_mean

__all__ = ["curvature_product", "predicted_loss_change", "mean_loss", "stepped"]

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
    """Mean loss, gradient and curvature-vector product ``C v`` over ``data``.

    One fused gradient + product pass per batch (:func:`lossprune.curvature.hvp`), averaged by
    the one dataset-mean loop (:func:`lossprune.curvature.statistics.dataset_mean`: weighted by
    the loss's units, accumulated in the statistics dtype, all-reduced over ranks).
    """
    device = next(iter(params.values())).device
    # Products in the model's dtype (the CG vectors may be float32), sums in the statistics dtype.
    stacked = {k: v.to(params[k].dtype).unsqueeze(0) for k, v in vector.items()}

    def batch_values(batch: tuple[Any, Tensor]) -> dict[Hashable, Any]:
        loss, grad, products = hvp(
            model, params, batch, loss_fn, stacked, curvature=curvature, chunk_size=chunk_size
        )
        return {"loss": loss, "grad": grad, "product": {k: v[0] for k, v in products.items()}}

    dtype = statistics_dtype(params)
    means: dict[Hashable, Any] = dataset_mean(
        data, loss_fn, batch_values, device=device, dtype=dtype
    ).means
    return float(means["loss"]), dict(means["grad"]), dict(means["product"])


def stepped(params: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> Params:
    """The weights after the step ``delta``, rounded to their dtype as the commit rounds them."""
    return {k: params[k] + delta[k].to(params[k].dtype) for k in params}


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
    ``curvature="ggn"``, its Gauss-Newton matrix): per batch the three numbers of
    :func:`lossprune.curvature.quadratic_form.quadratic_form` (Gauss-Newton: one forward-mode
    pass; Hessian: one fused gradient + Hessian-vector-product pass), averaged by the one
    dataset-mean loop (:func:`lossprune.curvature.statistics.dataset_mean`). ``chunk_size`` is
    accepted for symmetry with :func:`curvature_product`: one direction has nothing to chunk.

    Returns:
        ``(loss, predicted_change)``, example-weighted over ``data`` (and over all ranks of an
        initialised process group).
    """
    del chunk_size  # one direction
    device = next(iter(params.values())).device
    # The step as the commit applies it: rounded to the weights' dtype (stepped).
    vector = {k: v.to(params[k].dtype) for k, v in delta.items()}

    def batch_values(batch: tuple[Any, Tensor]) -> dict[Hashable, Any]:
        form = quadratic_form(model, params, batch, loss_fn, vector, curvature=curvature)
        return {"loss": form.loss, "slope": form.slope, "curvature": form.curvature}

    dtype = statistics_dtype(params)
    # The two inner products are float64 per batch; their mean stays float64.
    means: dict[Hashable, Any] = dataset_mean(
        data, loss_fn, batch_values, device=device, dtype=torch.float64
    ).means
    loss = float(means["loss"])
    if dtype != next(iter(params.values())).dtype:
        loss = mean_loss(model, params, data, loss_fn)  # half precision: the loss in float32
    return loss, float(means["slope"]) + 0.5 * float(means["curvature"])


@torch.no_grad()
def mean_loss(model: nn.Module, params: Mapping[str, Tensor], data: Any, loss_fn: LossFn) -> float:
    """Mean loss over ``data`` with the prunable weights set to ``params`` (one data loop).

    The loss of half-precision outputs is computed in float32 (the model runs in its dtype).
    """
    device = next(iter(params.values())).device
    fmodel = FunctionalModel(model, params)

    def batch_values(batch: tuple[Any, Tensor]) -> dict[Hashable, Any]:
        inputs, targets = batch
        return {"loss": loss_fn(at_least_float32(fmodel(params, inputs)), targets)}

    dtype = statistics_dtype(params)
    loss: Any = dataset_mean(data, loss_fn, batch_values, device=device, dtype=dtype).means["loss"]
    return float(loss)
