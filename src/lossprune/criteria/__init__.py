"""Pruning criteria (layer 3 of DESIGN.md): per-weight scores, lower = pruned first."""

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
