"""Layer-wise pruning: each linear map's reconstruction loss (layer 5' of docs/architecture.md).

Modules, one job each:

- :mod:`~lossprune.layerwise.blocks` — the blocks a model is pruned by, in forward order;
- :mod:`~lossprune.layerwise.calibration` — sequential calibration: each block's inputs from the
  already-pruned blocks before it, and the check that the blocks form a chain;
- :mod:`~lossprune.layerwise.offload` — only the current block on the compute device (plain
  models block by block; accelerate's CPU and disk offload);
- :mod:`~lossprune.layerwise.local` — the paper's criteria on a map's local loss;
- :mod:`~lossprune.layerwise.updates` — zeroing, the exact refit, or a mask-choosing solver;
- :mod:`~lossprune.layerwise.allocation` — each matrix's share of a global sparsity;
- :mod:`~lossprune.layerwise.pruner` — :class:`LayerwisePruner`, which puts them together;
- :mod:`~lossprune.layerwise.reports` — per matrix, per block, in total;
- :mod:`~lossprune.layerwise.solvers` — the weight-update solvers: the exact least-squares refit
  of the kept weights and the solvers that choose the mask with it.
"""

from .allocation import ErrorAllocation, NetworkAllocation
from .blocks import BlockStack, find_blocks
from .pruner import LayerwisePruner
from .reports import BlockReport, LayerwiseReport, MatrixReport
from .solvers import (
    ADMM,
    OBS,
    Damping,
    IterativeThresholding,
    LayerProblem,
    LayerSolution,
    Pattern,
    Stages,
    refit,
)
from .updates import MaskSolver, Refit

__all__ = [
    "ADMM",
    "OBS",
    "BlockReport",
    "BlockStack",
    "Damping",
    "ErrorAllocation",
    "IterativeThresholding",
    "LayerProblem",
    "LayerSolution",
    "LayerwisePruner",
    "LayerwiseReport",
    "MaskSolver",
    "MatrixReport",
    "NetworkAllocation",
    "Pattern",
    "Refit",
    "Stages",
    "find_blocks",
    "refit",
]
