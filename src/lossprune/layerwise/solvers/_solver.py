"""What every mask-choosing solver shares: its ``solve``."""

from __future__ import annotations

from torch import Tensor

from ._hessian import DampedHessian, damped_hessian
from .patterns import Pattern, check_solve
from .problem import Damping, LayerProblem, LayerSolution, solution

__all__ = ["MaskSolver"]


class MaskSolver:
    """The ``solve`` of every mask-choosing solver.

    It checks its arguments before any work, factors the damped Hessian once, lets the solver
    choose the mask and the weights (``_solve``) and answers a
    :class:`~lossprune.layerwise.LayerSolution`.
    """

    damping: Damping

    def solve(self, problem: LayerProblem, pattern: Pattern, sparsity: float) -> LayerSolution:
        """Prune ``problem`` to ``sparsity`` under ``pattern`` (a :class:`Pattern` or a selection).

        Raises:
            TypeError: a bad problem or pattern, a non-real sparsity.
            ValueError: the problem's (see :func:`~lossprune.layerwise.refit`), a sparsity
                outside ``[0, 1)`` or one the pattern cannot reach.
        """
        problem, pattern, sparsity = check_solve(problem, pattern, sparsity)
        hessian = damped_hessian(problem.gram, self.damping)
        weight, mask = self._solve(problem, pattern, sparsity, hessian)
        return solution(problem, weight, mask)

    def _solve(
        self, problem: LayerProblem, pattern: Pattern, sparsity: float, hessian: DampedHessian
    ) -> tuple[Tensor, Tensor]:
        """The weights and the mask, from checked arguments."""
        raise NotImplementedError
