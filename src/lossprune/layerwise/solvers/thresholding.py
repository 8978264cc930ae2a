r"""Iterative hard thresholding with exact refits (hard thresholding pursuit).

Foucart, "Hard Thresholding Pursuit: An Algorithm for Compressive Sensing" (SIAM J. Numer.
Anal. 2011), on the layer's damped least squares. From the exact refit :math:`\hat W` of a mask
(gradient zero on the kept entries), one step along the Jacobi-scaled negative gradient,

.. math:: Z = \hat W - \eta\, (\hat W - W_0) H \operatorname{diag}(H)^{-1},

gives each pruned entry :math:`z_j = -\eta\, g_j / H_{jj}` and leaves the kept ones. The pattern
then keeps the highest :math:`z_j^2 H_{jj}`: with :math:`\eta = 1` a pruned entry comes back
when the loss it would recover alone, :math:`g_j^2 / H_{jj}`, exceeds OBD's cost
:math:`w_k^2 H_{kk}` of a kept one. The new mask is refitted exactly (warm-started from
:math:`Z`). The iterations stop when the mask repeats, when the damped objective stops
decreasing (the best mask so far is returned), or at ``max_iter``. The first mask is OBD's on
:math:`W_0`, refitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..._common.checks import check_positive_int
from ._hessian import DampedHessian
from ._scores import removal_cost
from ._solver import MaskSolver
from .patterns import Pattern
from .problem import (
    DEFAULT_DAMPING,
    Damping,
    LayerProblem,
    check_damping,
    check_positive,
    damped_objective,
)
from .refit import default_rtol, refit_weight

__all__ = ["IterativeThresholding"]


@dataclass(frozen=True)
class IterativeThresholding(MaskSolver):
    r"""Hard thresholding pursuit on the damped local loss (module docstring).

    Attributes:
        max_iter: most thresholding steps after the first mask.
        step: :math:`\eta`, the step along the Jacobi-scaled negative gradient.
        damping: :math:`\delta` of :math:`H = G + \delta I` (:class:`Damping`).

    Raises:
        TypeError: non-number options or a damping that is not a :class:`Damping`.
        ValueError: a non-positive option.
    """

    max_iter: int = 20
    step: float = 1.0
    damping: Damping = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        value = check_positive_int("IterativeThresholding: max_iter", self.max_iter)
        object.__setattr__(self, "max_iter", value)
        object.__setattr__(self, "step", check_positive("IterativeThresholding: step", self.step))
        check_damping("IterativeThresholding", self.damping)

    def _solve(
        self, problem: LayerProblem, pattern: Pattern, sparsity: float, hessian: DampedHessian
    ) -> tuple[Tensor, Tensor]:
        reference, kept = problem.reference, problem.kept
        rtol = default_rtol(reference.dtype)
        diagonal = hessian.matrix.diagonal()
        mask = pattern(removal_cost("obd", reference, hessian), kept, sparsity)
        weight = refit_weight(
            hessian, reference, mask, initial=reference.masked_fill(~mask, 0.0), rtol=rtol
        )
        best = float(damped_objective(problem, weight, hessian.delta).sum())
        for _ in range(self.max_iter):
            gradient = (weight - reference) @ hessian.matrix
            trial = (weight - self.step * gradient / diagonal).masked_fill(~kept, 0.0)
            new = pattern(trial.square() * diagonal, kept, sparsity)
            if torch.equal(new, mask):
                break
            candidate = refit_weight(hessian, reference, new, initial=trial, rtol=rtol)
            objective = float(damped_objective(problem, candidate, hessian.delta).sum())
            if objective >= best:
                break
            weight, mask, best = candidate, new, objective
        return weight, mask
