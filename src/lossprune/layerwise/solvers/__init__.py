"""Solvers of a linear map's local least-squares problem (see the modules' docstrings)."""

from .admm import ADMM
from .obs import OBS
from .patterns import Pattern
from .problem import Damping, LayerProblem, LayerSolution
from .refit import refit
from .stages import Stages
from .thresholding import IterativeThresholding

__all__ = [
    "ADMM",
    "OBS",
    "Damping",
    "IterativeThresholding",
    "LayerProblem",
    "LayerSolution",
    "Pattern",
    "Stages",
    "refit",
]
