"""GraSP, a foresight-pruning baseline, at the temperature its authors use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._common.checks import is_real
from ..curvature import LossFn, Statistic
from .base import Criterion, ScoringContext

__all__ = ["GraSP", "TemperedLoss"]


@dataclass(frozen=True)
class TemperedLoss:
    r"""``loss_fn(outputs / T, targets)``: the loss of logits divided by a temperature ``T``.

    Its ``reduction`` is the wrapped loss's, so the mean-reduction check still applies.
    """

    loss_fn: LossFn
    temperature: float

    @property
    def reduction(self) -> Any:
        """The wrapped loss's reduction (``"mean"`` when it declares none)."""
        return getattr(self.loss_fn, "reduction", "mean")

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        if not isinstance(outputs, Tensor):
            raise TypeError(
                "GraSP(temperature=T) divides the model's logits by T, so the model must return "
                f"one tensor, got {type(outputs).__name__}; use GraSP(temperature=1.0) for a loss "
                "that unpacks the outputs itself"
            )
        return self.loss_fn(outputs / self.temperature, targets)


@dataclass(frozen=True)
class GraSP(Criterion):
    r"""Gradient Signal Preservation (Wang, Zhang & Grosse, ICLR 2020).

    GraSP removes the weights with the largest :math:`S = -\theta \odot H_T g_T`, those whose
    removal reduces the gradient norm least. In lossprune's convention (lower = pruned first)
    the score is therefore

    .. math:: s = \theta \odot H_T g_T,

    with :math:`g_T` and :math:`H_T` the gradient and Hessian of the mean loss of the logits
    divided by the temperature :math:`T`, :math:`L_T(\theta) = \ell(f(x;\theta)/T, y)`, over all
    the scoring data; :math:`H_T g_T` is one Hessian-vector product (a second pass over the
    data). Both reference implementations use :math:`T = 200` (the authors' code,
    ``GraSP(..., T=200)``, and Synaptic-Flow, ``temp = 200``): the large temperature flattens
    the softmax so that every class contributes to :math:`g_T`. At :math:`T = 1` a trained
    network's gradient is dominated by few classes, and GraSP can cut whole classes off the
    input. Since it scores another loss than the pruner's, a ``GraSP`` with :math:`T \ne 1`
    cannot be added to a criterion that reads statistics of the plain loss.

    Args:
        temperature: :math:`T > 0` (default 200, as the authors; 1 for the plain loss).
    """

    temperature: float = 200.0

    def __post_init__(self) -> None:
        if not is_real(self.temperature):
            raise TypeError(
                f"temperature must be a real number, got {type(self.temperature).__name__}"
            )
        temperature = float(self.temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        object.__setattr__(self, "temperature", temperature)

    def requests(self) -> frozenset[Statistic]:
        return frozenset({Statistic("hessian_grad")})

    def scoring_loss(self, loss_fn: LossFn) -> LossFn:
        r"""The tempered loss :math:`\ell(f/T, y)` (the plain one at :math:`T = 1`)."""
        return loss_fn if self.temperature == 1.0 else TemperedLoss(loss_fn, self.temperature)

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        assert context.statistics is not None
        hg = context.statistics[Statistic("hessian_grad")]
        return {k: p * hg[k].to(p.dtype) for k, p in context.params.items()}
