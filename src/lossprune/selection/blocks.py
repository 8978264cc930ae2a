r"""Block sparsity: whole tiles of each weight matrix, scored and pruned together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from .._common.checks import is_int
from .layout import (
    ParameterLayout,
    from_matrix_view,
    from_per_matrix,
    input_size,
    matrix_shape,
    matrix_view,
    per_matrix,
    per_matrix_layouts,
)
from .masks import select_masks
from .structures import as_selection

__all__ = ["Blocks"]


@dataclass(frozen=True)
class Blocks:
    r"""Whole :math:`h \times w` tiles of each weight matrix, pruned together.

    Each pruned parameter is viewed as its (outputs, inputs) matrix (input axes flattened as for
    :class:`NM`) and cut into tiles of ``h`` rows and ``w`` columns. A tile is scored as ONE
    step: the criterion's prediction for removing all of its weights together
    (:meth:`lossprune.Criterion.group_score`); for the quadratic model

    .. math:: s_G = \Bigl|\sum_{q \in G}\bigl(-g_q\theta_q + \tfrac12 D_q\theta_q^2\bigr)
       \Bigr| + \tfrac12\lambda\sum_{q \in G}\theta_q^2,

    the sum inside the absolute value, not the sum of the weights' scores. The tiles are then
    ranked like single weights: with ``scope="global"`` exactly
    :math:`\operatorname{round}(T p)` of all :math:`T` tiles are pruned after a stage, with
    ``scope="layerwise"`` :math:`\operatorname{round}(T_l p)` of each tensor's :math:`T_l`
    (:func:`lossprune.selection.select_masks` on the tiles: ties to the earlier tile, masks only
    grow, ``min_density`` counted in tiles). A tile with any pruned weight counts as pruned.
    Each expert's matrix of a fused mixture-of-experts parameter is tiled on its own (``h``
    divides each expert's outputs, so no tile spans two experts) and, with
    ``scope="layerwise"``, selected on its own.

    Args:
        h: rows (outputs) per tile.
        w: columns (inputs) per tile.
        scope: ``"global"`` or ``"layerwise"``.

    Raises:
        TypeError: ``h`` or ``w`` is not an int.
        ValueError: ``h`` or ``w`` below 1, or an unknown ``scope``.
    """

    h: int
    w: int
    scope: str = "global"

    def __post_init__(self) -> None:
        for name in ("h", "w"):
            value = getattr(self, name)
            if not is_int(value):
                raise TypeError(f"Blocks: {name} must be an int, got {value!r}")
            if int(value) < 1:
                raise ValueError(f"Blocks: {name} must be >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.scope not in ("global", "layerwise"):
            raise ValueError(f"Blocks: scope must be 'global' or 'layerwise', got {self.scope!r}")

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """Every tensor is a weight matrix that the tiles divide; the target is reachable."""
        tiles = {}
        for name, layout in per_matrix_layouts(layouts).items():
            inputs = input_size(name, layout, self)
            outputs = matrix_shape(layout)[0]
            if outputs % self.h or inputs % self.w:
                raise ValueError(
                    f"{self!r}: the {outputs} x {inputs} matrix of {name!r} (shape "
                    f"{layout.shape}) does not divide into {self.h} x {self.w} tiles"
                )
            tiles[name] = ParameterLayout((outputs // self.h, inputs // self.w), "tiles", None)
        as_selection(self.scope).check_schedule(tiles, targets, min_density)

    def group_sum(self, layout: ParameterLayout, tensor: Tensor) -> Tensor:
        """``tensor`` summed over each tile, every entry holding its tile's sum."""
        sums = self._tiles(tensor, layout).sum((1, 3), keepdim=True)
        return self._untiled(sums.expand(-1, self.h, -1, self.w), layout)

    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        sparsity: float,
        min_density: float,
        layouts: Mapping[str, ParameterLayout],
    ) -> dict[str, Tensor]:
        """:func:`~lossprune.selection.select_masks` over the tiles.

        ``scores`` must give every weight its tile's score (as :meth:`Criterion.group_score`
        with :meth:`group_sum` does); per-weight scores are refused, not silently reduced.
        """
        whole = {k: layouts[k] for k in masks}
        scores, masks = per_matrix(scores, whole), per_matrix(masks, whole)
        layouts = per_matrix_layouts(whole)
        tile_scores = {}
        for name, score in scores.items():
            tiles = self._tiles(score, layouts[name])
            first = tiles[:, :1, :, :1]
            if not bool(((tiles == first) | (tiles.isnan() & first.isnan())).all()):
                raise ValueError(
                    f"{self!r}: scores[{name!r}] differ within a tile; a tile's score is the "
                    "criterion's group_score (pass scores from Criterion.group_score)"
                )
            tile_scores[name] = first[:, 0, :, 0]
        tile_kept = {k: self._tiles(m, layouts[k]).all(3).all(1) for k, m in masks.items()}
        chosen = select_masks(
            tile_scores, tile_kept, sparsity=sparsity, scope=self.scope, min_density=min_density
        )
        pieces = {
            k: self._untiled(
                kept[:, None, :, None].expand(-1, self.h, -1, self.w), layouts[k]
            ).contiguous()
            for k, kept in chosen.items()
        }
        return from_per_matrix(pieces, whole)

    def _tiles(self, tensor: Tensor, layout: ParameterLayout) -> Tensor:
        """The (outputs / h, h, inputs / w, w) tiles of the matrix view."""
        matrix = matrix_view(tensor, layout)
        rows, columns = matrix.shape
        return matrix.reshape(rows // self.h, self.h, columns // self.w, self.w)

    def _untiled(self, tiles: Tensor, layout: ParameterLayout) -> Tensor:
        rows, columns = tiles.shape[0] * tiles.shape[1], tiles.shape[2] * tiles.shape[3]
        return from_matrix_view(tiles.reshape(rows, columns), layout)
