r"""π stages with exact refits: the paper's multi-stage pruning at the scale of one layer.

Laurent et al. (2020, arXiv:2006.12279) find that pruning in more stages, the loss model refitted
between them, loses less. On the local loss the model is exact and "refitting" is the exact
least-squares refit of the kept weights, so a stage is: score the kept weights on the CURRENT
(refitted) weights :math:`w`, let the pattern prune to the
stage's target, refit exactly (:func:`~lossprune.layerwise.refit`, warm-started from the
previous stage: few CG iterations when a stage removes few weights). The targets follow
:class:`~lossprune.ExponentialSchedule` (each stage removes the same fraction of what is left),
stages whose target is not above the problem's current sparsity skipped. One stage is the
one-shot prune-then-refit of the scores on :math:`W_0`.

Scores. At the exact refit of its kept set :math:`S` (gradient zero on :math:`S`), removing one
kept weight :math:`j` of a row and refitting the rest costs exactly OBS's
:math:`w_j^2 / [(H_{SS})^{-1}]_{jj}` (Hassibi & Stork 1993) and at most OBD's
:math:`w_j^2 H_{jj}` (LeCun et al. 1990, no refit). A row's own :math:`(H_{SS})^{-1}` would need
a factorisation per row and per stage, so the scores use the layer's one factorisation:

- ``"obs"``: :math:`w_j^2 / [H^{-1}]_{jj}`, the cost with every other input free (a lower bound
  on OBS's, as :math:`[(H_{SS})^{-1}]_{jj} \le [H^{-1}]_{jj}`);
- ``"obd"``: :math:`w_j^2 H_{jj}`, the upper bound (Wanda's score squared when
  :math:`\delta = 0`, Sun et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..._common.checks import check_positive_int
from ...schedules import ExponentialSchedule
from ._hessian import DampedHessian
from ._scores import check_score, removal_cost
from ._solver import MaskSolver
from .patterns import Pattern
from .problem import DEFAULT_DAMPING, Damping, LayerProblem, check_damping
from .refit import default_rtol, refit_weight

__all__ = ["Stages"]


@dataclass(frozen=True)
class Stages(MaskSolver):
    r"""π stages, each pruning the lowest scores on the current weights, then refitting exactly.

    Attributes:
        stages: π, the number of stages.
        score: ``"obs"`` or ``"obd"`` (module docstring).
        damping: :math:`\delta` of :math:`H = G + \delta I` (:class:`Damping`).

    Raises:
        TypeError: a non-int number of stages, a damping that is not a :class:`Damping`.
        ValueError: fewer than one stage, an unknown score.
    """

    stages: int = 16
    score: str = "obs"
    damping: Damping = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", check_positive_int("Stages: stages", self.stages))
        check_score("Stages", self.score)
        check_damping("Stages", self.damping)

    def _solve(
        self, problem: LayerProblem, pattern: Pattern, sparsity: float, hessian: DampedHessian
    ) -> tuple[Tensor, Tensor]:
        reference, mask = problem.reference, problem.kept
        rtol = default_rtol(reference.dtype)
        weight = refit_weight(hessian, reference, mask, rtol=rtol)
        current = 1.0 - float(mask.float().mean())
        for target in ExponentialSchedule(sparsity, self.stages):
            if target <= current and target != sparsity:
                continue
            scores = removal_cost(self.score, weight, hessian)
            mask = pattern(scores, mask, target)
            weight = refit_weight(hessian, reference, mask, initial=weight, rtol=rtol)
        return weight, mask
