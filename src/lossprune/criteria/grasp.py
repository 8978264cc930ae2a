"""GraSP, a foresight-pruning baseline."""

from __future__ import annotations

from torch import Tensor

from ..curvature import Statistic
from .base import Criterion, ScoringContext

__all__ = ["GraSP"]


class GraSP(Criterion):
    r"""Gradient Signal Preservation (Wang, Zhang & Grosse, ICLR 2020).

    GraSP removes the weights with the largest :math:`S = -\theta \odot Hg`, those whose removal
    reduces the gradient norm least. In lossprune's convention (lower = pruned first) the score
    is therefore

    .. math:: s = \theta \odot Hg,

    with :math:`H` the Hessian of the mean loss and :math:`g` its gradient over all the scoring
    data; :math:`Hg` is one Hessian-vector product (a second pass over the data).
    """

    def requests(self) -> frozenset[Statistic]:
        return frozenset({Statistic("hessian_grad")})

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        assert context.statistics is not None
        hg = context.statistics[Statistic("hessian_grad")]
        return {k: p * hg[k].to(p.dtype) for k, p in context.params.items()}
