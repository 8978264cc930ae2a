r"""Per-row selection: every output row of every weight matrix loses the same number of weights.

This is the comparison group of Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach
for Large Language Models", Sec. 3: "we compare and remove weights on a per-output basis"): the
weights feeding one output unit compete only with each other, so no unit and no layer can be
emptied, whatever the scale of its activations. Each matrix is viewed as (outputs, inputs) with
its input axes flattened in order (:attr:`ParameterLayout.input_dims`, as for
:class:`~lossprune.NM`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import ParameterLayout, from_matrix_view, input_size, matrix_view
from .masks import ceil_times

__all__ = ["PerRow"]


@dataclass(frozen=True)
class PerRow:
    r"""The same number of pruned weights in every output row of every weight matrix.

    After a stage at target sparsity :math:`p`, every row of a matrix with :math:`n` inputs
    holds exactly :math:`\operatorname{round}(n \, p)` pruned weights (Python's ``round``, the
    project's rule for every count: :func:`lossprune.selection.select_masks`). Within a row the
    lowest scores go first, weights pruned in earlier stages counting first (masks only grow),
    ties to the lower input index. This is Wanda's comparison group; its authors prune
    :math:`\lfloor n p \rfloor` per row, the same count unless the fractional part of
    :math:`n p` is one half or more (never at 50% with an even :math:`n`).

    ``min_density``: every row keeps at least :math:`\lceil d\, n \rceil` of its weights, so a
    final target above :math:`1 - d` (after rounding) is refused before anything runs.

    Works for every weight matrix of a linear map (``nn.Linear``, Hugging Face ``Conv1D``,
    convolutions: rows are output channels, inputs ``in·kh·kw``); other tensors are refused.

    Example:
        >>> import torch
        >>> from lossprune import LinearSchedule, Magnitude, PerRow, Pruner
        >>> model = torch.nn.Linear(4, 3)
        >>> pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1), scope=PerRow())
        >>> _ = pruner.run()
        >>> pruner.masks["weight"].sum(1)  # every row keeps 2 of 4
        tensor([2, 2, 2])
    """

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """Every tensor is a weight matrix whose rows can reach the final target."""
        for name, layout in layouts.items():
            inputs = input_size(name, layout, self)
            pruned = round(inputs * targets[-1])
            allowed = inputs - ceil_times(min_density, inputs)
            if pruned > allowed:
                raise ValueError(
                    f"PerRow: the final sparsity {targets[-1]!r} prunes {pruned} of the {inputs} "
                    f"inputs of every row of {name!r}, but min_density={min_density!r} allows "
                    f"at most {allowed}"
                )

    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        sparsity: float,
        min_density: float,
        layouts: Mapping[str, ParameterLayout],
    ) -> dict[str, Tensor]:
        """Prune the ``round(n * sparsity)`` lowest scores of every row (earlier-pruned first).

        Raises:
            ValueError: a row already has more pruned weights than the target allows, or a kept
                entry has a non-finite score.
        """
        new_masks = {}
        for name, mask in masks.items():
            layout = layouts[name]
            kept = matrix_view(mask, layout)
            inputs = kept.shape[1]
            pruned = round(inputs * float(sparsity))
            if bool((inputs - kept.sum(1) > pruned).any()):
                raise ValueError(
                    f"PerRow: a row of {name!r} already has more than {pruned} pruned weights, "
                    f"more than the target {sparsity!r} allows (masks never shrink)"
                )
            score = matrix_view(scores[name], layout)
            if not bool(score[kept].isfinite().all()):
                raise ValueError(f"scores[{name!r}] has non-finite values on kept entries")
            # Already-pruned entries rank below every finite score, so they count first; a
            # stable sort prunes the lower input index first among equal scores.
            key = score.masked_fill(~kept, -math.inf)
            lowest = key.sort(dim=1, stable=True).indices[:, :pruned]
            new = torch.ones_like(kept).scatter_(1, lowest, False)
            new_masks[name] = from_matrix_view(new, layout)
        return new_masks
