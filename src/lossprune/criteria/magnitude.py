"""Magnitude pruning (MP)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Criterion, ScoringContext

__all__ = ["Magnitude"]


@dataclass(frozen=True)
class Magnitude(Criterion):
    r"""Magnitude pruning: :math:`s_q = \tfrac12 \theta_q^2`.

    Ranks weights exactly like :math:`|\theta_q|` (Han et al. 2015). It is the step-size penalty
    :math:`\tfrac12\lambda\theta_q^2` alone, so adding λ never changes its ranking and one run
    serves every λ (Laurent et al. 2020, Sec. 3). Needs no data.

    Example:
        >>> import torch
        >>> from lossprune import Magnitude, scores
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> s = scores(model, Magnitude())
        >>> torch.equal(s["weight"], 0.5 * model.weight.detach() ** 2)
        True
    """

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        return {k: 0.5 * p.square() for k, p in context.params.items()}
