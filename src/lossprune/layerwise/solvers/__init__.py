r"""Solvers of one linear map's local least-squares problem.

Changes to the interface of the layer-wise design page (docs of issue 24), and why:

- damping pulls toward the reference: every solver minimises
  :math:`\operatorname{tr}((W_0 - \hat W)(G + \delta I)(W_0 - \hat W)^\top)`, so the refit is
  :math:`\hat w_S = w_{0,S} + (G_{SS} + \delta I)^{-1} G_{SP} w_{0,P}` rather than the ridge
  :math:`(G_{SS} + \delta I)^{-1}(G w_0)_S` (SparseGPT's and ALPS's objective; directions the
  data never excites keep their weights; :mod:`~lossprune.layerwise.solvers.problem`);
- :class:`LayerSolution` reports both ``error`` (:math:`E`, undamped) and ``relative_error``;
- the pattern is a :class:`Pattern` (a :class:`~lossprune.selection.Selection` on one matrix:
  ``Pattern(selection)(scores, kept, sparsity) -> mask``); solvers take a :class:`Pattern` or
  the selection itself;
- a mask-choosing solver is a frozen dataclass of options with one method,
  ``solve(problem, pattern, sparsity) -> LayerSolution``.

Everything is a pure function of tensors (no model, no hooks), in the Gram matrix's dtype
(float32 or float64), on its device, deterministic. The modules:

- :mod:`~lossprune.layerwise.solvers.problem` — :class:`LayerProblem`, :class:`LayerSolution`,
  :class:`Damping` (the one damping rule; λ of the paper as a choice);
- :mod:`~lossprune.layerwise.solvers.refit` — :func:`refit`, the exact least-squares refit of
  the kept weights (batched preconditioned conjugate gradients; Cholesky per row as the twin);
- :mod:`~lossprune.layerwise.solvers.patterns` — :class:`Pattern`;
- :mod:`~lossprune.layerwise.solvers.obs` — :class:`OBS`, SparseGPT's lazy column sweep;
- :mod:`~lossprune.layerwise.solvers.admm` — :class:`ADMM`, ALPS's joint support search (the
  recommended solver: the lowest layer error measured, below ALPS's);
- :mod:`~lossprune.layerwise.solvers.thresholding` — :class:`IterativeThresholding`;
- :mod:`~lossprune.layerwise.solvers.stages` — :class:`Stages`, π stages with exact refits.

Every mask-choosing solver ends with the exact refit of its mask (except ``OBS(refit=False)``,
SparseGPT's own answer), so its damped objective is never above that refit's, nor above keeping
the reference weights on its mask.
"""

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
