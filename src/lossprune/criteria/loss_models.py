r"""Loss-model criteria with the step-size constraint (Laurent et al. 2020, Sec. 3).

Removing weight :math:`q` is the step :math:`\Delta\theta = -\theta_q e_q`. Each criterion predicts
the loss change of that single step with a local model of the loss and adds the penalty
:math:`\tfrac12\lambda\Delta\theta_q^2 = \tfrac12\lambda\theta_q^2`, which keeps the steps where
the model can be trusted (λ ≥ 0). With :math:`g` the gradient and :math:`D` a diagonal curvature
estimate, means over the scoring examples:

============== ===========================================================================
LinearModel    :math:`|g_q\theta_q| + \tfrac12\lambda\theta_q^2`
QuadraticModel :math:`|-g_q\theta_q + \tfrac12 D_q\theta_q^2| + \tfrac12\lambda\theta_q^2`
OBD            :math:`\tfrac12 D_q\theta_q^2 + \tfrac12\lambda\theta_q^2` (LeCun et al. 1990)
============== ===========================================================================
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from torch import Tensor

from .._common.checks import check_lam, check_positive_int
from ..curvature import Statistic
from .base import Criterion, GroupSum, ScoringContext

__all__ = ["LinearModel", "QuadraticModel", "OBD", "CURVATURES"]

#: Diagonal curvature estimates a quadratic model can use.
CURVATURES = ("auto", "fisher", "fisher_mc", "hessian_diag")


def _curvature_statistic(curvature: object, mc_samples: object, probes: object) -> Statistic:
    mc_samples = check_positive_int("mc_samples", mc_samples)
    probes = check_positive_int("probes", probes)
    if not isinstance(curvature, str):
        raise TypeError(f"curvature must be a str, got {type(curvature).__name__}")
    if curvature == "auto":
        return Statistic("fisher_auto", mc_samples)
    if curvature == "fisher":
        return Statistic("fisher")
    if curvature == "fisher_mc":
        return Statistic("fisher_mc", mc_samples)
    if curvature == "hessian_diag":
        return Statistic("hutchinson", probes)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")


@dataclass(frozen=True)
class _DiagonalCurvatureModel(Criterion):
    """Shared options of the criteria that read a diagonal curvature estimate ``D``."""

    lam: float = 0.0
    curvature: str = "auto"
    _: KW_ONLY
    mc_samples: int = 1
    probes: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", check_lam(self.lam))
        _curvature_statistic(self.curvature, self.mc_samples, self.probes)

    @property
    def _curvature(self) -> Statistic:
        return _curvature_statistic(self.curvature, self.mc_samples, self.probes)

    def _diagonal(self, context: ScoringContext) -> dict[str, Tensor]:
        assert context.statistics is not None
        return context.statistics[self._curvature]


@dataclass(frozen=True)
class LinearModel(Criterion):
    r"""First-order loss model (LM): :math:`s_q = |g_q\theta_q| + \tfrac12\lambda\theta_q^2`.

    Args:
        lam: strength λ ≥ 0 of the step-size constraint.
    """

    lam: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", check_lam(self.lam))

    def requests(self) -> frozenset[Statistic]:
        return frozenset({Statistic("grad")})

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        assert context.statistics is not None
        grad = context.statistics.grad
        return {
            k: (grad[k].to(p.dtype) * p).abs() + 0.5 * self.lam * p.square()
            for k, p in context.params.items()
        }

    def group_score(self, context: ScoringContext, group_sum: GroupSum) -> dict[str, Tensor]:
        r""":math:`s_G = |\sum_{q \in G} g_q\theta_q| + \tfrac12\lambda\sum_{q \in G}\theta_q^2`.

        The linear model's prediction for the step :math:`-\theta_G`, in absolute value.
        """
        assert context.statistics is not None
        grad = context.statistics.grad
        return {
            k: group_sum(k, grad[k].to(p.dtype) * p).abs()
            + 0.5 * self.lam * group_sum(k, p.square())
            for k, p in context.params.items()
        }


@dataclass(frozen=True)
class QuadraticModel(_DiagonalCurvatureModel):
    r"""Second-order loss model (QM) with diagonal curvature.

    .. math:: s_q = \left|-g_q\theta_q + \tfrac12 D_q\theta_q^2\right| + \tfrac12\lambda\theta_q^2

    Args:
        lam: strength λ ≥ 0 of the step-size constraint.
        curvature: ``"auto"`` (default: the exact Fisher where it costs at most 100 gradients
            per pass, i.e. up to 100 outputs per example, as the paper's classifiers; else
            ``"fisher_mc"``, announced once; the choice is in each
            :attr:`~lossprune.StageReport.curvature`), ``"fisher"`` (exact Fisher/GGN
            diagonal, the paper's), ``"fisher_mc"`` (Monte-Carlo with ``mc_samples`` labels
            per unit: per example, per token for a language model) or ``"hessian_diag"``
            (Hutchinson with ``probes`` Rademacher probes per batch).
        mc_samples: labels sampled per unit for ``"fisher_mc"`` (and ``"auto"`` when it
            samples): 1, one label per token (the paper used 10 on ImageNet).
        probes: probes per batch for ``"hessian_diag"``.
    """

    def requests(self) -> frozenset[Statistic]:
        return frozenset({Statistic("grad"), self._curvature})

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        assert context.statistics is not None
        grad = context.statistics.grad
        diag = self._diagonal(context)
        return {
            k: (-grad[k].to(p.dtype) * p + 0.5 * diag[k].to(p.dtype) * p.square()).abs()
            + 0.5 * self.lam * p.square()
            for k, p in context.params.items()
        }

    def group_score(self, context: ScoringContext, group_sum: GroupSum) -> dict[str, Tensor]:
        r"""The prediction for removing group :math:`G` together (:math:`\Delta\theta = -\theta_G`).

        .. math:: s_G = \Bigl|\sum_{q \in G}\bigl(-g_q\theta_q + \tfrac12 D_q\theta_q^2\bigr)
           \Bigr| + \tfrac12\lambda\sum_{q \in G}\theta_q^2,

        the sum INSIDE the absolute value (the diagonal model's prediction for the whole step),
        not the sum of the per-weight scores.
        """
        assert context.statistics is not None
        grad = context.statistics.grad
        diag = self._diagonal(context)
        return {
            k: group_sum(k, -grad[k].to(p.dtype) * p + 0.5 * diag[k].to(p.dtype) * p.square()).abs()
            + 0.5 * self.lam * group_sum(k, p.square())
            for k, p in context.params.items()
        }


@dataclass(frozen=True)
class OBD(_DiagonalCurvatureModel):
    r"""Optimal Brain Damage (LeCun et al. 1990) with the step-size constraint.

    .. math:: s_q = \tfrac12 D_q\theta_q^2 + \tfrac12\lambda\theta_q^2

    OBD assumes a minimum (no gradient term). Arguments as :class:`QuadraticModel`.
    """

    def requests(self) -> frozenset[Statistic]:
        return frozenset({self._curvature})

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        diag = self._diagonal(context)
        return {
            k: 0.5 * (diag[k].to(p.dtype) + self.lam) * p.square()
            for k, p in context.params.items()
        }
