r"""Each layer's share of a global sparsity: from the network's loss model or measured layer errors.

With ``selection="global"`` a :class:`~lossprune.LayerwisePruner` prunes a fraction :math:`P`
of ALL the weights it prunes, but each matrix to its own target :math:`p_l`, with
:math:`\sum_l n_l p_l = P \sum_l n_l` (:math:`n_l` weights in matrix :math:`l`). The targets come
from one of two models of what pruning a layer costs:

* :class:`NetworkAllocation` — the paper's: one global ranking of a network-scale criterion
  (Laurent et al. 2020; by default OBD with the Monte-Carlo Fisher diagonal of the model's own
  loss) over all the matrices, as the network-scale :class:`~lossprune.Pruner` with
  ``scope="global"`` does; :math:`p_l` is the fraction of matrix :math:`l` that ranking prunes.
  It needs the model's loss (labels) and one gradient pass over the whole model: not bounded by
  one block's memory.
* :class:`ErrorAllocation` — measured: a dense pass over the blocks (one block at a time, like
  the pruning pass) records, for every matrix, its relative layer error
  :math:`c_l(p) = E_l(p) / \operatorname{tr}(W_0 G W_0^\top)` when the criterion's mask at
  sparsity :math:`p` is pruned (no update), on a grid of sparsities; the targets then minimise
  :math:`\sum_l c_l(p_l)` under the budget by equal marginal costs (:func:`allocate`): weights
  are taken, a grid step at a time, from the matrix where they cost the least error per weight.

Both keep every matrix at least ``min_density`` of its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._common.checks import check_fraction, check_positive_int
from ..criteria import OBD
from ..criteria.base import Criterion
from ..selection import select_masks

__all__ = [
    "DEFAULT_ALLOCATION",
    "ErrorAllocation",
    "NetworkAllocation",
    "allocate",
    "masked_error_curve",
    "network_targets",
    "reachable",
]


@dataclass(frozen=True)
class NetworkAllocation:
    """Targets from a global ranking of a network-scale criterion (module docstring).

    Attributes:
        criterion: the network-scale criterion (default: OBD on the Monte-Carlo Fisher
            diagonal, 1 label per token).
        min_density: every matrix keeps at least this fraction.
        loss_fn: the model's loss, as for :func:`lossprune.scores` (``None``: a Hugging Face
            model's own; calibration batches without ``labels`` are given their inputs).

    Raises:
        TypeError: a criterion that is not a :class:`~lossprune.Criterion`.
        ValueError: ``min_density`` outside ``[0, 1)``.
    """

    criterion: Criterion = field(default_factory=lambda: OBD(curvature="fisher_mc", mc_samples=1))
    min_density: float = 0.05
    loss_fn: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.criterion, Criterion):
            raise TypeError(
                f"NetworkAllocation: criterion must be a Criterion, got {self.criterion!r}"
            )
        check_fraction("NetworkAllocation: min_density", self.min_density)


@dataclass(frozen=True)
class ErrorAllocation:
    """Targets from measured layer-error curves (module docstring).

    Attributes:
        steps: grid points of sparsity per matrix (``0, 1/steps, ...``).
        min_density: every matrix keeps at least this fraction.

    Raises:
        TypeError: a non-int number of steps.
        ValueError: fewer than 2 steps, ``min_density`` outside ``[0, 1)``.
    """

    steps: int = 20
    min_density: float = 0.05

    def __post_init__(self) -> None:
        check_positive_int("ErrorAllocation: steps", self.steps)
        if self.steps < 2:
            raise ValueError(f"ErrorAllocation: steps must be >= 2, got {self.steps}")
        check_fraction("ErrorAllocation: min_density", self.min_density)

    def grid(self) -> list[float]:
        """The sparsities at which the errors are measured (below ``1 - min_density``)."""
        top = 1.0 - self.min_density
        return [top * k / self.steps for k in range(self.steps + 1)]


#: The allocation ``selection="global"`` uses unless told otherwise (the winner of
#: benchmarks/layerwise.py at 70% on the tiny Llama and OPT).
DEFAULT_ALLOCATION: ErrorAllocation | NetworkAllocation = ErrorAllocation()


def masked_error_curve(
    reference: Tensor, gram: Tensor, masks: Sequence[Tensor]
) -> list[tuple[float, float]]:
    r"""``(sparsity, relative error)`` of :math:`W_0` with each of ``masks`` applied, no update.

    The error is :math:`\operatorname{tr}(\Delta G \Delta^\top) /
    \operatorname{tr}(W_0 G W_0^\top)` with :math:`\Delta = W_0 \odot (1 - M)`; the sparsity
    is the mask's own (what the pattern reaches, e.g. whole entries per row).
    """
    scale = float(((reference @ gram) * reference).sum())
    curve = []
    for mask in masks:
        difference = reference.masked_fill(mask, 0)
        error = float(((difference @ gram) * difference).sum())
        curve.append((1.0 - float(mask.float().mean()), error / scale if scale > 0 else 0.0))
    return curve


def allocate(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    sizes: Mapping[str, int],
    sparsity: float,
) -> dict[str, float]:
    r"""Per-matrix targets with :math:`\sum_l n_l p_l = P \sum_l n_l`, by equal marginal costs.

    ``curves`` gives each matrix's ``(sparsity, cost)`` points, increasing in sparsity from 0.
    Each matrix starts at sparsity 0; repeatedly, the matrix whose next point adds the least
    cost per pruned weight (:math:`\Delta c_l / (n_l \Delta p)`, on the lower convex hull of
    its curve, so that a step worth taking is never hidden behind a costlier one) moves on,
    until the budget is met; the last step is taken only in part, so the total is exact up to
    what that one matrix's pattern can reach.

    Raises:
        ValueError: a budget the curves cannot reach (above their last points).
    """
    hulls = {name: _lower_hull(curve) for name, curve in curves.items()}
    position = dict.fromkeys(curves, 0)
    targets = {name: hull[0][0] for name, hull in hulls.items()}
    total = sum(sizes.values())
    budget = sparsity * total
    pruned = sum(sizes[name] * target for name, target in targets.items())
    while pruned < budget - 1e-9 * total:
        best, best_rate = None, math.inf
        for name, hull in hulls.items():
            k = position[name]
            if k + 1 < len(hull):
                (p0, c0), (p1, c1) = hull[k], hull[k + 1]
                rate = (c1 - c0) / (sizes[name] * (p1 - p0))
                if rate < best_rate:
                    best, best_rate = name, rate
        if best is None:
            raise ValueError(
                f"the global sparsity {sparsity!r} is above what min_density allows every matrix"
            )
        k = position[best]
        (p0, _), (p1, _) = hulls[best][k], hulls[best][k + 1]
        step = sizes[best] * (p1 - p0)
        if pruned + step >= budget:
            targets[best] = p0 + (budget - pruned) / sizes[best]
            break
        pruned += step
        targets[best] = p1
        position[best] = k + 1
    return targets


def _lower_hull(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of the points (Andrew's monotone chain), repeated sparsities merged."""
    hull: list[tuple[float, float]] = []
    for point in sorted(set(curve)):
        if hull and point[0] == hull[-1][0]:
            continue  # the same sparsity twice: the lower cost came first
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    return hull


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def reachable(
    targets: Mapping[str, float],
    sizes: Mapping[str, int],
    realised: Callable[[str, float], float],
    ceiling: float = 1.0,
) -> dict[str, float]:
    r"""Targets each matrix's pattern can reach, their total as close as it can to the budget.

    ``realised(name, p)`` is the sparsity the matrix's pattern reaches when asked for ``p``
    (whole entries per row for :class:`~lossprune.PerRow`). Matrices are rounded in order,
    each asked for its target plus the weights the ones before it fell short of (error
    diffusion), so the total misses :math:`\sum_l n_l p_l` by less than one matrix's step. No
    matrix is asked for more than ``ceiling`` (``1 - min_density``).
    """
    out = {}
    carry = 0.0  # weights owed to the budget by the matrices rounded so far
    for name, target in targets.items():
        wanted = min(max(target + carry / sizes[name], 0.0), ceiling)
        out[name] = realised(name, wanted)
        carry += sizes[name] * (target - out[name])
    return out


def network_targets(
    scores: Mapping[str, Tensor], sparsity: float, min_density: float
) -> dict[str, float]:
    """Per-matrix sparsities of one global ranking of ``scores`` (lower = pruned first)."""
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    chosen = select_masks(
        dict(scores), masks, sparsity=sparsity, scope="global", min_density=min_density
    )
    return {k: 1.0 - float(m.float().mean()) for k, m in chosen.items()}
