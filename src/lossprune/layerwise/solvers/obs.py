r"""Optimal Brain Surgeon with lazy column blocks: SparseGPT's family.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023), on Hassibi & Stork's OBS (1993). The columns (inputs) of :math:`\hat W` are visited
in order; when column :math:`j` is reached, every row's entry is either kept as it stands or
zeroed, and the error it makes is spread over the columns not yet visited, the OBS update for
the inverse Hessian of those columns. With :math:`H^{-1} = U^\top U` (:math:`U` upper
triangular, the Cholesky factor of the damped inverse, :math:`H = G + \delta I`), the inverse
Hessian of columns :math:`j, j+1, \dots` after columns :math:`< j` are fixed has first row
:math:`U_{jj}\,U_{j,j:}`, so zeroing :math:`w_{j}` of a row updates

.. math:: w_{j:} \leftarrow w_{j:} - \frac{w_j}{U_{jj}}\, U_{j,j:},

the same :math:`U` for every row (why one factorisation serves the whole matrix). The update is
applied column by column inside a block of ``block_size`` columns and to the columns after the
block as one matrix product (the "lazy batch"). The score of an entry when its block (or its
N:M group) is reached is OBS's :math:`w_j^2 / U_{jj}^2` on the weights updated so far:

- N:M (:class:`~lossprune.NM`): the mask of each run of ``m`` columns is chosen when the sweep
  reaches it (SparseGPT's N:M rule), so ``block_size`` is rounded up to a multiple of ``m``;
- any other pattern: the mask of each block is chosen when the sweep reaches it, by the pattern
  on all columns so far with the earlier blocks' choices held (their kept entries scored
  :math:`+\text{max}`), so the whole matrix meets the pattern's exact count. With a problem
  whose ``kept`` already prunes some entries the mask is chosen once, before the sweep, from the
  reference weights (a held prefix could otherwise ask for fewer pruned entries than it has).

With ``refit=True`` (default) the kept weights are then refitted exactly
(:func:`~lossprune.layerwise.refit`, warm-started from the sweep): the sweep is then only the
mask choice. ``refit=False`` returns the sweep's weights (SparseGPT's answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..._common.checks import check_positive_int
from ._hessian import DampedHessian
from ._solver import MaskSolver
from .patterns import Pattern
from .problem import DEFAULT_DAMPING, Damping, LayerProblem, check_damping
from .refit import default_rtol, refit_weight

__all__ = ["OBS"]


@dataclass(frozen=True)
class OBS(MaskSolver):
    r"""SparseGPT's solver (module docstring), with an exact refit of its mask by default.

    Attributes:
        block_size: columns updated one by one before the rest is updated at once (SparseGPT's
            128); a speed choice only, except that it is also how often the mask is chosen.
        damping: :math:`\delta` of :math:`H = G + \delta I` (:class:`Damping`; SparseGPT's
            ``percdamp`` is ``Damping(relative=percdamp)``).
        refit: refit the kept weights exactly after the sweep.

    Raises:
        TypeError: a non-int block size, a damping that is not a :class:`Damping`.
        ValueError: a block size below 1.
    """

    block_size: int = 128
    damping: Damping = DEFAULT_DAMPING
    refit: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "block_size", check_positive_int("OBS: block_size", self.block_size)
        )
        check_damping("OBS", self.damping)

    def _solve(
        self, problem: LayerProblem, pattern: Pattern, sparsity: float, hessian: DampedHessian
    ) -> tuple[Tensor, Tensor]:
        upper = torch.linalg.cholesky(hessian.inverse, upper=True)
        weight, mask = _sweep(problem, pattern, sparsity, upper, self.block_size)
        if self.refit:
            weight = refit_weight(
                hessian,
                problem.reference,
                mask,
                initial=weight,
                rtol=default_rtol(problem.gram.dtype),
            )
        return weight, mask


def _sweep(
    problem: LayerProblem, pattern: Pattern, sparsity: float, upper: Tensor, block_size: int
) -> tuple[Tensor, Tensor]:
    """The column sweep: the updated weights and the chosen mask."""
    weight = problem.reference.clone()
    kept = problem.kept
    inputs = weight.shape[1]
    scale = upper.diagonal().square()
    group = pattern.local_columns
    if group is not None:
        block_size = -(-block_size // group) * group
        mask = kept.clone()
    elif bool(kept.all()):
        mask = kept.clone()
    else:  # cumulative masks: chosen once, up front (module docstring)
        mask = pattern(weight.square() / scale, kept, sparsity)
        group = 0
    held = torch.finfo(weight.dtype).max
    for start in range(0, inputs, block_size):
        stop = min(start + block_size, inputs)
        # The block's columns as contiguous rows: the sweep reads and updates one column at a time.
        columns = weight[:, start:stop].T.contiguous()
        if group is None:
            scores = torch.cat([torch.full_like(weight[:, :start], held), columns.T.square()], 1)
            scores[:, start:] /= scale[start:stop]
            mask[:, :stop] = pattern(scores, mask[:, :stop], sparsity)
        errors = torch.empty_like(columns)
        for offset in range(stop - start):
            column = start + offset
            if group and column % group == 0:
                run = slice(column, column + group)
                local = columns[offset : offset + group].T.square() / scale[run]
                mask[:, run] = pattern(local, mask[:, run], sparsity)
            error = columns[offset].masked_fill(mask[:, column], 0.0) / upper[column, column]
            columns[offset:] -= upper[column, column:stop, None] * error
            errors[offset] = error
        weight[:, start:stop] = columns.T
        weight[:, stop:] -= errors.T @ upper[start:stop, stop:]
    return weight.masked_fill_(~mask, 0.0), mask
