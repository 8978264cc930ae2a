r"""Pruning criteria (layer 3 of docs/architecture.md): per-weight scores, lower = pruned first.

A :class:`Criterion` declares the statistics it needs (:class:`~lossprune.curvature.Statistic`)
and maps (parameters, statistics) to scores; ``a + b`` and ``0.5 * a`` share one statistics
pass. Laurent et al. (2020, arXiv:2006.12279, Sec. 3) with the step-size constraint
:math:`\tfrac12\lambda\theta_q^2`:

- :mod:`~lossprune.criteria.magnitude` — :class:`Magnitude`;
- :mod:`~lossprune.criteria.loss_models` — :class:`LinearModel`, :class:`QuadraticModel`,
  :class:`OBD`;
- :mod:`~lossprune.criteria.grasp` — :class:`GraSP` (Wang et al. 2020);
- :mod:`~lossprune.criteria.synflow` — :class:`SynFlow` (Tanaka et al. 2020);
- :mod:`~lossprune.criteria.wanda` — :class:`Wanda` (Sun et al. 2024);
- :mod:`~lossprune.criteria.base` — the protocol, composition, group scores.

It imports :mod:`lossprune.curvature` and :mod:`lossprune._common`; it does not know which
weights are selected, nor which loss the statistics describe.
"""

from .base import Criterion, ScaledCriterion, ScoringContext, SumCriterion
from .grasp import GraSP
from .loss_models import CURVATURES, OBD, LinearModel, QuadraticModel
from .magnitude import Magnitude
from .synflow import SynFlow
from .wanda import Wanda

__all__ = [
    "CURVATURES",
    "Criterion",
    "GraSP",
    "LinearModel",
    "Magnitude",
    "OBD",
    "QuadraticModel",
    "ScaledCriterion",
    "ScoringContext",
    "SumCriterion",
    "SynFlow",
    "Wanda",
]
