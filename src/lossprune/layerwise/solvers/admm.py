r"""ADMM on the layer's least squares, the support chosen jointly, then the exact refit.

ALPS's family: Meng, Behdin, Wang & Mazumder, "ALPS: Improved Optimization for Highly Sparse
One-Shot Pruning for Large Language Models" (NeurIPS 2024). The pattern-constrained problem

.. math:: \min_{B}\ \operatorname{tr}\bigl((B - W_0) H (B - W_0)^\top\bigr)
   \quad\text{s.t. } B \text{ meets the pattern},\qquad H = G + \delta I,

is split as :math:`B = D` with :math:`D` carrying the pattern, in the Jacobi-scaled variables
:math:`\tilde B = B S`, :math:`S = \operatorname{diag}(H)^{1/2}` (so :math:`\tilde H =
S^{-1} H S^{-1}` has a unit diagonal and the penalty :math:`\rho` does not depend on the inputs'
scale). With the scaled dual :math:`V`, one iteration is

.. math::
   \tilde B &\leftarrow (\tilde W_0 \tilde H - V + \rho D)(\tilde H + \rho I)^{-1}, \\
   D &\leftarrow \Pi(\tilde B + V/\rho), \\
   V &\leftarrow V + \rho(\tilde B - D),

:math:`\Pi` the pattern's projection (:class:`~lossprune.layerwise.solvers.Pattern` on the
scores :math:`(\tilde B + V/\rho)^2`: the Euclidean projection for magnitude-type patterns).
One eigendecomposition :math:`\tilde H = Q \Lambda Q^\top` serves every :math:`\rho`:
:math:`(\tilde H + \rho I)^{-1} = Q (\Lambda + \rho I)^{-1} Q^\top`, formed again when
:math:`\rho` changes.

:math:`\rho` schedule (after ALPS's): every ``check_every`` iterations the support of :math:`D`
is compared with the last check's; :math:`\rho` grows by ``growth[0]`` when more than 10% of
the kept entries changed, by ``growth[1]`` above 0.5%, by ``growth[2]`` otherwise, so the
support settles as
:math:`\tilde B` is pulled onto :math:`D`. The iterations stop when, after ``min_iter``, fewer
than ``tol`` of the kept entries changed between two checks (or at ``max_iter``). The support
of the last :math:`D` is then refitted exactly (:func:`~lossprune.layerwise.refit`,
warm-started from :math:`D`), so the answer is never above the exact refit of its own mask.

Defaults. ALPS starts at :math:`\rho = 0.1` and grows by (1.3, 1.2, 1.1). Starting lower lets
the support move longer before :math:`\rho` freezes it: measured on every linear map of tiny
trained Llama and OPT models (benchmarks/README.md, "Layer-wise solvers"), :math:`\rho = 0.01`
lowers the layer error to 0.82-0.86 of ALPS's (geometric mean), and growing faster, by
(1.5, 1.3, 1.2), keeps 0.84-0.90 of it in about 30% less time; these are the defaults.
With ALPS's own values this solver matches ALPS's layer error within 0.5%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..._common.checks import check_positive_int
from ._hessian import DampedHessian
from ._solver import MaskSolver
from .patterns import Pattern
from .problem import (
    DEFAULT_DAMPING,
    Damping,
    LayerProblem,
    check_damping,
    check_positive,
)
from .refit import default_rtol, refit_weight

__all__ = ["ADMM"]


@dataclass(frozen=True)
class ADMM(MaskSolver):
    r"""ADMM with a joint support choice, then an exact refit (module docstring).

    Attributes:
        rho: the initial penalty :math:`\rho` (the scaled Hessian has a unit diagonal).
        max_iter: most iterations.
        min_iter: iterations before the support may be declared settled.
        check_every: iterations between two support comparisons (and :math:`\rho` updates).
        tol: fraction of the kept entries whose change between two checks counts as settled.
        growth: the factors :math:`\rho` grows by when more than 10%, more than 0.5%, or less
            of the kept entries changed since the last check.
        damping: :math:`\delta` of :math:`H = G + \delta I` (:class:`Damping`).

    Raises:
        TypeError: non-number options or a damping that is not a :class:`Damping`.
        ValueError: a non-positive option.
    """

    rho: float = 0.01
    max_iter: int = 300
    min_iter: int = 30
    check_every: int = 3
    tol: float = 3e-4
    growth: tuple[float, float, float] = (1.5, 1.3, 1.2)
    damping: Damping = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_positive("ADMM: rho", self.rho))
        object.__setattr__(self, "tol", check_positive("ADMM: tol", self.tol))
        for name in ("max_iter", "min_iter", "check_every"):
            value = check_positive_int(f"ADMM: {name}", getattr(self, name))
            object.__setattr__(self, name, value)
        check_damping("ADMM", self.damping)
        growth = tuple(check_positive("ADMM: growth", factor) for factor in self.growth)
        if len(growth) != 3 or min(growth) < 1:
            raise ValueError(f"ADMM: growth must be three factors >= 1, got {self.growth!r}")
        object.__setattr__(self, "growth", growth)

    def _solve(
        self, problem: LayerProblem, pattern: Pattern, sparsity: float, hessian: DampedHessian
    ) -> tuple[Tensor, Tensor]:
        mask, split = self._support(problem, pattern, sparsity, hessian.matrix)
        weight = refit_weight(
            hessian, problem.reference, mask, initial=split, rtol=default_rtol(split.dtype)
        )
        return weight, mask

    def _support(
        self, problem: LayerProblem, pattern: Pattern, sparsity: float, matrix: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The support ADMM settles on, and :math:`D` in the original variables."""
        scale = matrix.diagonal().sqrt()
        scaled = matrix / scale[:, None] / scale[None, :]
        values, vectors = torch.linalg.eigh(scaled)
        reference = problem.reference * scale
        target = reference @ scaled
        mask = pattern(reference.square(), problem.kept, sparsity)
        split = reference.masked_fill(~mask, 0.0)
        dual = torch.zeros_like(reference)
        rho = self.rho
        inverse = (vectors / (values + rho)) @ vectors.T
        checked = mask
        kept_entries = max(int(mask.sum()), 1)
        for iteration in range(1, self.max_iter + 1):
            weight = (target - dual + rho * split) @ inverse
            shifted = weight + dual / rho
            mask = pattern(shifted.square(), problem.kept, sparsity)
            split = shifted.masked_fill(~mask, 0.0)
            dual += rho * (weight - split)
            if iteration % self.check_every:
                continue
            changed = int((mask ^ checked).sum()) / kept_entries
            checked = mask
            if iteration >= self.min_iter and changed < self.tol:
                break
            rho *= self.growth[0 if changed > 0.1 else 1 if changed > 0.005 else 2]
            inverse = (vectors / (values + rho)) @ vectors.T
        return mask, split / scale
