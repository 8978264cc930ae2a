r"""What happens to a layer's weights once a mask is chosen, and solvers that choose it.

``update=`` of :class:`~lossprune.LayerwisePruner` is one of

* ``None`` — the pruned weights are set to zero, the kept ones stay as they are (Wanda,
  magnitude pruning; the paper's :math:`\Delta\theta_q = -\theta_q`);
* :class:`Refit` — the kept weights are then refitted EXACTLY to the layer's reconstruction
  loss (:func:`lossprune.layerwise.solvers.refit`), after every stage of a multi-stage schedule:
  the step-size-constrained update of the paper, exact because the local loss is quadratic;
* a solver that chooses the mask together with the weights (``solve(problem, pattern,
  sparsity)``: :class:`~lossprune.layerwise.solvers.OBS`, SparseGPT's family;
  :class:`~lossprune.layerwise.solvers.ADMM`, ALPS's; iterative thresholding; π stages with
  refits); the criterion is then not used (pass ``criterion=None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .solvers import Damping, LayerProblem, LayerSolution, refit
from .solvers.patterns import Pattern
from .solvers.problem import solution

__all__ = ["MaskSolver", "Refit", "apply_update", "check_update"]


@runtime_checkable
class MaskSolver(Protocol):
    """A solver that chooses a layer's mask and weights together."""

    def solve(self, problem: LayerProblem, pattern: Pattern, sparsity: float) -> LayerSolution:
        """The pruned layer at ``sparsity`` under ``pattern`` (a subset of ``problem.kept``)."""
        ...


@dataclass(frozen=True)
class Refit:
    r"""Refit the kept weights exactly after each stage (:func:`~lossprune.layerwise.refit`).

    Attributes:
        damping: :math:`\delta` of :math:`G + \delta I`, pulling toward the reference weights
            (:class:`~lossprune.layerwise.solvers.Damping`: 1% of the mean diagonal of
            :math:`G` by default, as SparseGPT and ALPS; ``lam`` is the paper's λ).

    Raises:
        TypeError: a damping that is not a :class:`~lossprune.layerwise.solvers.Damping`.
    """

    damping: Damping = Damping()

    def __post_init__(self) -> None:
        if not isinstance(self.damping, Damping):
            raise TypeError(f"Refit: damping must be a Damping, got {type(self.damping).__name__}")


def check_update(update: object) -> None:
    """Refuse an ``update=`` of another kind (module docstring).

    Raises:
        TypeError: not ``None``, a :class:`Refit` or a solver with ``solve``.
    """
    if update is None or isinstance(update, (Refit, MaskSolver)):
        return
    raise TypeError(
        "update must be None (zero the pruned weights), Refit(...) or a solver with "
        f"solve(problem, pattern, sparsity) (OBS, ADMM, ...), got {type(update).__name__}"
    )


def apply_update(update: Any, problem: LayerProblem, mask: Tensor, weight: Tensor) -> LayerSolution:
    """The layer after one stage chose ``mask``; ``weight`` is the stage's starting point."""
    if isinstance(update, Refit):
        return refit(problem, mask, update.damping, initial=weight)
    return solution(problem, weight, mask)  # zeroed outside the mask
