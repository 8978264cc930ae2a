r"""Group OBS: the groups whose removal costs the layer least with the rest refitted, greedily.

The layer-scale loss model of a group set is its consumers' reconstruction error (the local loss
of :mod:`lossprune.layerwise.solvers.problem`, damped, :math:`H = G + \delta I`). Removing the
columns :math:`Q` of a group from a consumer with current weights :math:`W`, and moving the
rest to their best values, raises the damped error by (Optimal Brain Surgeon for a block of
weights, Hassibi & Stork 1993; per group as in ZipLM, Kurtic et al. 2023, and OSSCAR, Meng et
al. 2024)

.. math:: \Delta E_Q = \operatorname{tr}\bigl(W_{:,Q}\, [(H^{-1})_{QQ}]^{-1} W_{:,Q}^\top\bigr),
   \qquad
   W \leftarrow W - W_{:,Q}\, [(H^{-1})_{QQ}]^{-1} (H^{-1})_{Q,:},

and the inverse of :math:`H` restricted to the columns left is the downdate
:math:`H^{-1} \leftarrow H^{-1} - (H^{-1})_{:,Q} [(H^{-1})_{QQ}]^{-1} (H^{-1})_{Q,:}`. The greedy
removes the cheapest group, updates, and repeats; after the last step :math:`W` is EXACTLY the
refit of the kept columns (:func:`~.refit.column_refit`, tested), so the choice and the refit are
one computation. With several consumers (a residual stream read by several convolutions) the
cost of a group is the sum of its consumers' RELATIVE costs
:math:`\Delta E_Q / \operatorname{tr}(W_0 G W_0^\top)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..layerwise.solvers import Damping, LayerSolution
from ..layerwise.solvers._hessian import damped_hessian
from ..layerwise.solvers.problem import solution
from .refit import STRUCTURED_DAMPING, ConsumerProblem, removed_columns

__all__ = ["GroupOBS", "GroupOBSResult"]


class GroupOBSResult(NamedTuple):
    """What the greedy found.

    Attributes:
        removed: the group indices removed, in the order they were chosen.
        costs: the summed relative damped cost of each step.
        solutions: per consumer, the refitted weights (removed columns zero) and their error.
    """

    removed: list[int]
    costs: list[float]
    solutions: list[LayerSolution]


@dataclass(frozen=True)
class GroupOBS:
    r"""Choose groups by their cost to the consumers' reconstruction error, rest refitted.

    The layer-scale choice of :class:`~lossprune.structured.StructuredPruner` (module
    docstring): greedy, one group at a time, with the exact downdates of :math:`H^{-1}`.

    Args:
        damping: :math:`\delta` of :math:`H = G + \delta I`
            (:class:`~lossprune.layerwise.solvers.Damping`; default
            :data:`~lossprune.structured.refit.STRUCTURED_DAMPING`). It is also the damping of
            the refit that the greedy ends at.
    """

    damping: Damping = STRUCTURED_DAMPING

    def __post_init__(self) -> None:
        if not isinstance(self.damping, Damping):
            raise TypeError(
                f"GroupOBS: damping must be a Damping, got {type(self.damping).__name__}"
            )

    def select(
        self, problems: Sequence[ConsumerProblem], removed: Sequence[int], count: int
    ) -> GroupOBSResult:
        """Remove ``count`` more groups, given the groups ``removed`` already.

        Args:
            problems: the set's consumers at their current weights (columns of groups removed
                earlier are zero).
            removed: groups removed before (their columns are eliminated first, at no cost).
            count: how many more to remove.
        """
        size = problems[0].columns.shape[0]
        alive = torch.ones(size, dtype=torch.bool)
        states = []
        for consumer in problems:
            hessian = damped_hessian(consumer.problem.gram, self.damping)
            reference = consumer.problem.reference
            scale = float(((reference @ consumer.problem.gram) * reference).sum())
            states.append(_State(reference.clone(), hessian.inverse.clone(), max(scale, 1e-300)))
        for group in removed:
            alive[group] = False
            for state, consumer in zip(states, problems, strict=True):
                state.eliminate(consumer.columns[group])
        chosen, costs = [], []
        for _ in range(count):
            candidates = alive.nonzero().squeeze(1)
            total = torch.zeros(len(candidates), dtype=torch.float64)
            for state, consumer in zip(states, problems, strict=True):
                total += state.costs(consumer.columns[candidates]).cpu().double() / state.scale
            best = int(candidates[int(torch.argmin(total))])  # ties: the lowest index
            chosen.append(best)
            costs.append(float(total.min()))
            alive[best] = False
            for state, consumer in zip(states, problems, strict=True):
                state.eliminate(consumer.columns[best])
        solutions = []
        for state, consumer in zip(states, problems, strict=True):
            gone = removed_columns(consumer, torch.tensor([*removed, *chosen], dtype=torch.long))
            mask = (~gone).unsqueeze(0).expand_as(state.weight).clone()
            solutions.append(solution(consumer.problem, state.weight, mask))
        return GroupOBSResult(chosen, costs, solutions)


@dataclass
class _State:
    """One consumer during the greedy: current weights, :math:`H^{-1}` of the columns left."""

    weight: Tensor
    inverse: Tensor
    scale: float

    def costs(self, columns: Tensor) -> Tensor:
        r""":math:`\Delta E_Q` of each group whose columns are a row of ``columns`` (groups, w)."""
        columns = columns.to(self.weight.device)
        blocks = self.inverse[columns.unsqueeze(2), columns.unsqueeze(1)]  # (groups, w, w)
        parts = self.weight[:, columns]  # (out, groups, w)
        outer = torch.einsum("ogw,ogv->gwv", parts, parts)
        return (outer * torch.linalg.inv(blocks)).sum((1, 2))

    def eliminate(self, columns: Tensor) -> None:
        """Remove ``columns``: OBS update of the weights, downdate of the inverse."""
        columns = columns.to(self.weight.device)
        block = self.inverse[columns][:, columns]
        solve = torch.linalg.solve(block, self.inverse[columns])  # [(H^-1)_QQ]^-1 (H^-1)_Q,:
        self.weight -= self.weight[:, columns] @ solve
        self.weight[:, columns] = 0
        self.inverse -= self.inverse[:, columns] @ solve
