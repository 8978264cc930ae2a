r"""What layer-wise pruning did: per weight matrix, per block, in total.

The layer error of a matrix is its RELATIVE reconstruction error on its calibration inputs
:math:`X` (the inputs it was pruned on: the outputs of the already-pruned blocks before it),

.. math:: \frac{\|W_0 X - \hat W X\|_F^2}{\|W_0 X\|_F^2}
   = \frac{E(\hat W)}{\operatorname{tr}(W_0 G W_0^\top)},

the number SparseGPT prints per layer and the benchmark compares with the references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["BlockReport", "LayerwiseReport", "MatrixReport"]


class MatrixReport(NamedTuple):
    r"""One weight matrix.

    Attributes:
        name: the parameter's qualified name.
        block: the name of the block it belongs to.
        shape: ``(outputs, inputs)`` of its linear map.
        target: its target sparsity.
        sparsity: the fraction of its weights pruned.
        error: :math:`E(\hat W)`, the mean squared reconstruction error per counted token.
        relative_error: :math:`E(\hat W) / \operatorname{tr}(W_0 G W_0^\top)` (module
            docstring; 0 for a map whose outputs are all zero).
        seconds: wall time of its scoring, selection and update (statistics not included).
    """

    name: str
    block: str
    shape: tuple[int, int]
    target: float
    sparsity: float
    error: float
    relative_error: float
    seconds: float


class BlockReport(NamedTuple):
    """One block.

    Attributes:
        name: the block's qualified module name.
        matrices: its weight matrices, in the order of ``named_parameters()``.
        seconds: wall time of the block: statistics, pruning, next inputs.
        tokens: the counted calibration tokens its statistics average over.
    """

    name: str
    matrices: tuple[MatrixReport, ...]
    seconds: float
    tokens: int


@dataclass(frozen=True)
class LayerwiseReport:
    """The whole run (:meth:`lossprune.LayerwisePruner.run`).

    Attributes:
        blocks: one :class:`BlockReport` per block, in order.
        seconds: wall time of the run, calibration capture included.
    """

    blocks: tuple[BlockReport, ...]
    seconds: float

    @property
    def matrices(self) -> tuple[MatrixReport, ...]:
        """Every matrix, block after block."""
        return tuple(m for block in self.blocks for m in block.matrices)

    @property
    def sparsity(self) -> float:
        """The fraction of the pruned matrices' weights that are pruned."""
        sizes = [m.shape[0] * m.shape[1] for m in self.matrices]
        pruned = sum(m.sparsity * n for m, n in zip(self.matrices, sizes))
        return pruned / sum(sizes) if sizes else 0.0

    @property
    def geometric_mean_error(self) -> float:
        """The geometric mean of the matrices' relative errors (0 if any is 0)."""
        errors = [m.relative_error for m in self.matrices]
        if not errors or min(errors) <= 0.0:
            return 0.0
        return math.exp(sum(math.log(e) for e in errors) / len(errors))

    @property
    def worst(self) -> MatrixReport:
        """The matrix with the largest relative error."""
        return max(self.matrices, key=lambda m: m.relative_error)

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers and strings (JSON)."""
        return {
            "seconds": self.seconds,
            "sparsity": self.sparsity,
            "geometric_mean_error": self.geometric_mean_error,
            "blocks": [
                {
                    "name": b.name,
                    "seconds": b.seconds,
                    "tokens": b.tokens,
                    "matrices": [{**m._asdict(), "shape": list(m.shape)} for m in b.matrices],
                }
                for b in self.blocks
            ],
        }

    def __str__(self) -> str:
        width = max((len(m.name) for m in self.matrices), default=4)
        lines = [
            f"layer-wise pruning: {len(self.blocks)} blocks, {len(self.matrices)} matrices, "
            f"sparsity {self.sparsity:.4f}, layer error geometric mean "
            f"{self.geometric_mean_error:.4g}, {self.seconds:.1f} s",
            f"  {'matrix':<{width}}  {'shape':>11}  sparsity  rel. error  seconds",
        ]
        for m in self.matrices:
            shape = f"{m.shape[0]}x{m.shape[1]}"
            lines.append(
                f"  {m.name:<{width}}  {shape:>11}  {m.sparsity:8.4f}  {m.relative_error:10.4g}"
                f"  {m.seconds:7.3f}"
            )
        return "\n".join(lines)
