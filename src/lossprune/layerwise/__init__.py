"""Layer-wise pruning: each linear map's reconstruction loss (layer 5' of docs/architecture.md).

- :mod:`~lossprune.layerwise.solvers` — the weight-update solvers: the exact least-squares refit
  of the kept weights and the solvers that choose the mask with it.
"""

from .solvers import Damping, LayerProblem, LayerSolution, refit

__all__ = ["Damping", "LayerProblem", "LayerSolution", "refit"]
