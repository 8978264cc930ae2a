"""Solvers of a linear map's local least-squares problem (see the modules' docstrings)."""

from .problem import Damping, LayerProblem, LayerSolution
from .refit import refit

__all__ = ["Damping", "LayerProblem", "LayerSolution", "refit"]
