r"""Wanda, the activation-aware baseline (Sun, Liu, Bair & Kolter, ICLR 2024).

"A Simple and Effective Pruning Approach for Large Language Models" scores weight :math:`W_{ij}`
of a linear map by its magnitude times the norm of the input feature it multiplies,

.. math:: s_{ij} = |W_{ij}| \, \|X_j\|_2,

with :math:`X` every input vector the map sees in the scoring data (all examples and counted
positions; :mod:`lossprune.curvature.inputs`), compared within each output row. It needs no
gradient: it is the magnitude of each weight's contribution to the outputs, and the standard
cheap reference for 2:4 sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..curvature import Statistic
from .base import Criterion, ScoringContext

__all__ = ["Wanda"]


@dataclass(frozen=True)
class Wanda(Criterion):
    r"""Wanda: :math:`s_{ij} = |W_{ij}| \, \|X_j\|_2` (Sun et al. 2024, Eq. 1), per output row.

    As its authors define it:

    * **per output row** by default: a :class:`~lossprune.Pruner` given no ``scope`` compares
      the weights of each row (row :math:`i` of the ``(out, in)`` matrix) only with each other
      (:class:`~lossprune.PerRow`, :meth:`default_scope`); :class:`~lossprune.NM` groups lie
      within a row too. ``scope="layerwise"`` compares the whole matrix and ``"global"`` all
      matrices together, where the scale of each layer's activations decides how much it loses
      (the paper's ablation finds per-row comparison better for language models);
    * over the **counted tokens**: padding (``attention_mask == 0``) and positions whose label
      is ``-100`` are left out (:func:`lossprune._common.batches.counted_positions`), so a padded
      batch scores like its unpadded sequences; a weight shared by several modules sees the
      inputs of every one of them.

    :math:`\|X_j\|_2^2 / n` is the ``"input_sq_norms"`` statistic, the MEAN over the :math:`n`
    counted rows like every other statistic (:mod:`lossprune.curvature.inputs`), so the scores
    are the authors' divided by :math:`\sqrt n`: the same ranking within every row, and
    duplicating the data changes nothing, not even ``Wanda() + 0.5 * QuadraticModel()``, which
    reads the data once. Like every criterion with statistics it needs ``data`` and ``loss_fn``
    (the loss says which examples count). Supported: the weights of ``nn.Linear``,
    ``nn.Conv1d``, ``nn.Conv2d`` (flattened in·kh·kw patches), Hugging Face's ``Conv1D`` and
    its fused MoE experts (each expert's matrix from the tokens routed to it, a mean per
    expert: :mod:`lossprune.curvature.expert_inputs`); other parameters are refused with a
    ``TypeError``.

    Example:
        >>> import torch
        >>> from lossprune import Wanda, scores
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        >>> batch = (torch.tensor([[3.0, 0.0], [4.0, 1.0]]), torch.zeros(2, 1))
        >>> scores(model, Wanda(), batch, loss_fn=torch.nn.MSELoss())["weight"] ** 2  # mean x²
        tensor([[12.5000,  0.5000]])
    """

    def requests(self) -> frozenset[Statistic]:
        return frozenset({Statistic("input_sq_norms")})

    def default_scope(self) -> str:
        return "per_row"

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        assert context.statistics is not None
        norms = context.statistics[Statistic("input_sq_norms")]
        return {
            k: p.abs() * norms[k].to(p.dtype).sqrt().expand_as(p) for k, p in context.params.items()
        }
