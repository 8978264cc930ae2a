r"""Which entries a stage prunes: selection objects with one protocol (layer 4 of DESIGN.md).

A *selection* turns scores (lower = pruned first) into the new cumulative masks of a stage.
Like a :mod:`torch.nn.utils.prune` method, each structure is a small class carrying its own
parameters; the :class:`~lossprune.Pruner` only calls the two methods of :class:`Selection`:

- :meth:`Selection.check_schedule` once, before anything runs, with every stage's target, so
  that a structure refuses a schedule it cannot follow before any weight changes;
- :meth:`Selection.select` once per stage, with the scores, the current masks, the stage's
  target sparsity, ``min_density`` and each parameter's :class:`ParameterLayout` (its module
  type and which axes form its input dimension, e.g. for N:M sparsity along the inputs).

A selection whose stage targets depend on the whole schedule also defines
``for_schedule(targets)``, returning the selection the Pruner then uses (:class:`Targets`).

``Pruner(scope="global")`` and ``scope="layerwise"`` are shorthands for :class:`Global` and
:class:`Layerwise`; :class:`NM` is N:M sparsity along each weight matrix's input dimension,
:class:`Blocks` prunes whole tiles. A selection that removes groups of weights together also
defines ``group_sum(layout, tensor)`` (a tensor summed over each group, broadcast back); the
Pruner then scores with :meth:`lossprune.Criterion.group_score`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

from ._checks import check_fraction, is_int
from ._linear_maps import weight_matrices
from ._nm import nm_mask
from .masks import _ceil_times, select_masks

__all__ = [
    "Blocks",
    "Global",
    "Layerwise",
    "NM",
    "ParameterLayout",
    "Selection",
    "Targets",
    "as_selection",
    "parameter_layouts",
]


class ParameterLayout(NamedTuple):
    """How a prunable parameter's entries are laid out.

    Attributes:
        shape: the parameter's shape.
        module_type: the class name of the module that owns it (``"Linear"``, ``"Conv2d"``...).
        input_dims: the axes that together form the input dimension of the linear map (dim 1
            of ``nn.Linear``, dim 0 of Hugging Face's ``Conv1D``, dims 1, 2, ... of a
            convolution: in·kh·kw, dims 0, 2, ... of a transposed one; see
            :func:`lossprune._linear_maps.weight_matrices`), or ``None`` when it is not the
            weight matrix of a known linear map.
    """

    shape: tuple[int, ...]
    module_type: str
    input_dims: tuple[int, ...] | None


def parameter_layouts(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, ParameterLayout]:
    """The :class:`ParameterLayout` of each of ``params`` (qualified names of ``model``)."""
    layouts = {}
    for name, param in params.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        matrix = weight_matrices(module).get(attribute)
        input_dims = None if matrix is None else matrix.input_axes
        layouts[name] = ParameterLayout(tuple(param.shape), type(module).__name__, input_dims)
    return layouts


@runtime_checkable
class Selection(Protocol):
    """What the :class:`~lossprune.Pruner` needs from a selection structure."""

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """Raise ``ValueError`` for a schedule this structure cannot follow (before any stage)."""
        ...

    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        sparsity: float,
        min_density: float,
        layouts: Mapping[str, ParameterLayout],
    ) -> dict[str, Tensor]:
        """New cumulative masks (a subset of ``masks``) at the stage's target ``sparsity``."""
        ...


@dataclass(frozen=True)
class Global:
    r"""One ranking over all prunable weights (the paper's).

    Exactly :math:`\operatorname{round}(P \cdot p)` of the :math:`P` weights are pruned after
    the stage, each tensor keeping at least ``min_density`` of its entries. See
    :func:`lossprune.masks.select_masks`.
    """

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """The final target must leave every tensor ``min_density`` of its entries in total."""
        sizes = [_numel(layout.shape) for layout in layouts.values()]
        k = round(sum(sizes) * targets[-1])
        cap = sum(n - _ceil_times(min_density, n) for n in sizes)
        _check_reachable(k, cap, f"{sum(sizes)} entries", targets[-1], min_density)

    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        sparsity: float,
        min_density: float,
        layouts: Mapping[str, ParameterLayout],
    ) -> dict[str, Tensor]:
        """:func:`~lossprune.masks.select_masks` with ``scope="global"``."""
        return select_masks(
            dict(scores), dict(masks), sparsity=sparsity, scope="global", min_density=min_density
        )


@dataclass(frozen=True)
class Layerwise:
    r"""Each tensor separately.

    Tensor :math:`l` with :math:`n_l` entries has exactly
    :math:`\operatorname{round}(n_l \cdot p)` entries pruned after the stage.
    """

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """The final target must leave each tensor ``min_density`` of its entries."""
        for name, layout in layouts.items():
            n = _numel(layout.shape)
            what = f"tensor {name!r} ({n} entries)"
            cap = n - _ceil_times(min_density, n)
            _check_reachable(round(n * targets[-1]), cap, what, targets[-1], min_density)

    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        sparsity: float,
        min_density: float,
        layouts: Mapping[str, ParameterLayout],
    ) -> dict[str, Tensor]:
        """:func:`~lossprune.masks.select_masks` with ``scope="layerwise"``."""
        return select_masks(
            dict(scores), dict(masks), sparsity=sparsity, scope="layerwise", min_density=min_density
        )


@dataclass(frozen=True)
class NM:
    r"""N:M sparsity: at most ``n`` kept weights in every group of ``m`` along the INPUT dimension.

    Each pruned matrix is viewed as (outputs, inputs) with its input axes flattened in order
    (:attr:`ParameterLayout.input_dims`: dim 1 of ``nn.Linear``, dim 0 of Hugging Face's
    ``Conv1D``, in·kh·kw of a convolution), and the inputs are split into groups of ``m``
    consecutive entries. After a stage at target sparsity :math:`p_s` every group holds exactly

    .. math:: c_s = \operatorname{round}(m \, p_s)

    pruned weights, so a schedule reaches 2:4 in two stages as 1:4, then 2:4. Within a group the
    lowest scores go first, entries pruned in earlier stages counting first (masks only grow);
    ties go to the lower input index (:func:`lossprune.sparse.nm_mask`). The final target must
    be exactly :math:`1 - n/m`.

    ``min_density``: every tensor keeps exactly :math:`n/m` of its entries at the end (more
    before), so any ``min_density <= n/m`` is met automatically; a larger one cannot be, and is
    refused.

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group size.

    Raises:
        TypeError: ``n`` or ``m`` is not an int.
        ValueError: not ``1 <= n < m``.

    Example:
        >>> import torch
        >>> from lossprune import Magnitude, LinearSchedule, NM, Pruner
        >>> model = torch.nn.Linear(8, 2)
        >>> pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 2), scope=NM(2, 4))
        >>> _ = pruner.run()
        >>> pruner.masks["weight"].reshape(2, 2, 4).sum(-1)  # every group keeps 2 of 4
        tensor([[2, 2],
                [2, 2]])
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        for name in ("n", "m"):
            if not is_int(getattr(self, name)):
                raise TypeError(f"NM: {name} must be an int, got {getattr(self, name)!r}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "m", int(self.m))
        if not 1 <= self.n < self.m:
            raise ValueError(f"NM(n, m) needs 1 <= n < m, got NM({self.n}, {self.m})")

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """The final target is ``1 - n/m``; ``m`` divides every weight matrix's input dimension."""
        final = 1.0 - self.n / self.m
        if not math.isclose(targets[-1], final, rel_tol=0.0, abs_tol=1e-9):
            raise ValueError(
                f"{self!r} prunes {self.m - self.n} of every {self.m} weights: the schedule's "
                f"final sparsity must be 1 - n/m = {final!r}, got {targets[-1]!r}"
            )
        if min_density > self.n / self.m:
            raise ValueError(
                f"{self!r} keeps exactly n/m = {self.n / self.m!r} of every tensor, less than "
                f"min_density={min_density!r}"
            )
        for name, layout in layouts.items():
            inputs = _input_size(name, layout, self)
            if inputs % self.m:
                raise ValueError(
                    f"{self!r}: m = {self.m} must divide the input dimension of {name!r} "
                    f"({inputs} inputs, shape {layout.shape}, input dims {layout.input_dims})"
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
        """Prune the ``round(m * sparsity)`` lowest of every group (earlier-pruned ones first)."""
        pruned_per_group = round(self.m * sparsity)
        new_masks = {}
        for name, mask in masks.items():
            layout = layouts[name]
            kept = _matrix_view(mask, layout)
            already = self.m - kept.reshape(kept.shape[0], -1, self.m).sum(-1)
            if bool((already > pruned_per_group).any()):
                raise ValueError(
                    f"{self!r}: {name!r} already has more than {pruned_per_group} pruned weights "
                    f"in a group of {self.m}, more than the target {sparsity!r} allows"
                )
            score = _matrix_view(scores[name], layout)
            if not bool(score[kept].isfinite().all()):
                raise ValueError(f"scores[{name!r}] has non-finite values on kept entries")
            # Already-pruned entries rank below every finite score, so they count first.
            key = score.masked_fill(~kept, -math.inf)
            new = kept
            if pruned_per_group:
                new = nm_mask(key, self.m - pruned_per_group, self.m, dim=1)
            new_masks[name] = _from_matrix_view(new, layout)
        return new_masks


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
    (:func:`lossprune.masks.select_masks` on the tiles: ties to the earlier tile, masks only
    grow, ``min_density`` counted in tiles). A tile with any pruned weight counts as pruned.

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
        for name, layout in layouts.items():
            inputs = _input_size(name, layout, self)
            outputs = _numel(layout.shape) // inputs
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
        """:func:`~lossprune.masks.select_masks` over the tiles.

        ``scores`` must give every weight its tile's score (as :meth:`Criterion.group_score`
        with :meth:`group_sum` does); per-weight scores are refused, not silently reduced.
        """
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
        return {
            k: self._untiled(
                kept[:, None, :, None].expand(-1, self.h, -1, self.w), layouts[k]
            ).contiguous()
            for k, kept in chosen.items()
        }

    def _tiles(self, tensor: Tensor, layout: ParameterLayout) -> Tensor:
        """The (outputs / h, h, inputs / w, w) tiles of the matrix view."""
        matrix = _matrix_view(tensor, layout)
        rows, columns = matrix.shape
        return matrix.reshape(rows // self.h, self.h, columns // self.w, self.w)

    def _untiled(self, tiles: Tensor, layout: ParameterLayout) -> Tensor:
        return _from_matrix_view(tiles.reshape(tiles.shape[0] * self.h, -1), layout)


@dataclass(frozen=True)
class Targets:
    r"""Per-layer or per-group target sparsities, by name pattern, with any structure inside.

    ``Targets({r".*attn.*": 0.3, r".*mlp.*": 0.6})`` splits the pruned parameters into groups:
    each parameter belongs to the FIRST pattern that matches its whole qualified name
    (:func:`re.fullmatch`, in the mapping's order); the unmatched ones form one more group that
    follows the schedule itself. Each group is selected separately by ``structure``
    (``"layerwise"``: every tensor on its own; ``"global"``: one ranking within the group;
    :class:`NM`, :class:`Blocks`: that structure within the group).

    The schedule gives the shape over stages: with :math:`p_s` its target after stage
    :math:`s` and :math:`P = p_S` its final one, a group with target :math:`t_g` is at

    .. math:: t_{g,s} = t_g \, p_s / P

    after stage :math:`s` (exactly :math:`t_g` after the last), so every group reaches its own
    target on the schedule's last stage, and the unmatched group (:math:`t_g = P`) follows the
    schedule unchanged. ``Pruner(..., scope={...})`` is a shorthand for ``Targets({...})``.

    Args:
        sparsity: pattern (a regular expression) to the group's final sparsity in ``[0, 1)``.
        structure: the selection inside each group: ``"layerwise"`` (default), ``"global"``
            or a :class:`Selection`.

    Raises:
        TypeError: a pattern that is not a string, a sparsity that is not a real number, or a
            structure that is not a selection.
        ValueError: an invalid regular expression or a sparsity outside ``[0, 1)``.
    """

    sparsity: Mapping[str, float]
    structure: object = "layerwise"
    final: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, Mapping):
            raise TypeError(
                f"Targets: sparsity must be a mapping pattern -> sparsity, got "
                f"{type(self.sparsity).__name__}"
            )
        checked = {}
        for pattern, value in self.sparsity.items():
            if not isinstance(pattern, str):
                raise TypeError(f"Targets: patterns must be strings, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"Targets: invalid pattern {pattern!r}: {error}") from None
            checked[pattern] = check_fraction(f"Targets: the sparsity of {pattern!r}", value)
        object.__setattr__(self, "sparsity", MappingProxyType(checked))
        object.__setattr__(self, "structure", as_selection(self.structure))

    def __hash__(self) -> int:
        return hash((tuple(self.sparsity.items()), self.structure, self.final))

    def __repr__(self) -> str:
        bound = "" if self.final is None else f", final={self.final!r}"
        return f"Targets({dict(self.sparsity)!r}, structure={self.structure!r}{bound})"

    @property
    def group_sum(self) -> Callable[[ParameterLayout, Tensor], Tensor] | None:
        """The structure's ``group_sum`` when it removes groups of weights together."""
        return getattr(self.structure, "group_sum", None)

    def groups(self, names: Sequence[str]) -> dict[str | None, list[str]]:
        """Parameter names by the first pattern that matches them (``None``: unmatched).

        Raises:
            ValueError: a pattern that matches no parameter (a typo would otherwise silently
                leave those layers at the schedule's target).
        """
        groups: dict[str | None, list[str]] = {pattern: [] for pattern in self.sparsity}
        groups[None] = []
        for name in names:
            pattern = next((p for p in self.sparsity if re.fullmatch(p, name)), None)
            groups[pattern].append(name)
        unused = [p for p in self.sparsity if not groups[p]]
        if unused:
            raise ValueError(
                f"Targets: the patterns {unused} match no pruned parameter (they are matched "
                f"against the whole name, e.g. {names[0]!r})"
            )
        return {k: v for k, v in groups.items() if v}

    def for_schedule(self, targets: Sequence[float]) -> Targets:
        """A copy bound to the schedule's final target :math:`P` (the Pruner calls this first)."""
        return replace(self, final=float(targets[-1]))

    def _group_target(self, pattern: str | None, target: float, last: bool) -> float:
        if pattern is None:
            return target
        goal = self.sparsity[pattern]
        if last or target == 0.0:
            return goal if last else 0.0
        assert self.final
        return goal * target / self.final

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """Each group's scaled schedule is checked by the structure."""
        if targets[-1] == 0.0 and any(self.sparsity.values()):
            raise ValueError(
                "Targets: the schedule's final sparsity is 0, so it has no shape to scale the "
                "groups' targets by"
            )
        last = len(targets) - 1
        bound = self.for_schedule(targets)
        for pattern, names in self.groups(list(layouts)).items():
            group = {name: layouts[name] for name in names}
            scaled = [bound._group_target(pattern, t, s == last) for s, t in enumerate(targets)]
            self.structure.check_schedule(group, scaled, min_density)  # type: ignore[attr-defined]

    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        sparsity: float,
        min_density: float,
        layouts: Mapping[str, ParameterLayout],
    ) -> dict[str, Tensor]:
        r"""Each group at :math:`t_g \, p / P` (``sparsity`` is :math:`p`), by the structure.

        Raises:
            ValueError: not bound to a schedule (:meth:`for_schedule`).
        """
        if self.final is None:
            raise ValueError(
                "Targets.select needs the schedule's final target: use Targets.for_schedule"
            )
        last = math.isclose(sparsity, self.final, rel_tol=0.0, abs_tol=1e-12)
        new_masks: dict[str, Tensor] = {}
        for pattern, names in self.groups(list(masks)).items():
            chosen = self.structure.select(  # type: ignore[attr-defined]
                {k: scores[k] for k in names},
                {k: masks[k] for k in names},
                sparsity=self._group_target(pattern, sparsity, last),
                min_density=min_density,
                layouts={k: layouts[k] for k in names},
            )
            new_masks.update(chosen)
        return {k: new_masks[k] for k in masks}


def _input_size(name: str, layout: ParameterLayout, structure: object) -> int:
    """The flattened input dimension of a weight matrix; ``ValueError`` for other tensors."""
    if layout.input_dims is None:
        raise ValueError(
            f"{structure!r} groups weights along the input dimension of a linear map, but "
            f"{name!r} (of a {layout.module_type}) is not the weight matrix of one"
        )
    return _numel(tuple(layout.shape[d] for d in layout.input_dims))


def _matrix_order(layout: ParameterLayout) -> list[int]:
    """The axes of the parameter in (outputs..., inputs...) order."""
    assert layout.input_dims is not None
    inputs = list(layout.input_dims)
    return [d for d in range(len(layout.shape)) if d not in inputs] + inputs


def _matrix_view(tensor: Tensor, layout: ParameterLayout) -> Tensor:
    """``tensor`` as the (outputs, inputs) matrix of its linear map, input axes flattened."""
    assert layout.input_dims is not None
    inputs = _numel(tuple(layout.shape[d] for d in layout.input_dims))
    return tensor.permute(_matrix_order(layout)).reshape(-1, inputs)


def _from_matrix_view(matrix: Tensor, layout: ParameterLayout) -> Tensor:
    """Undo :func:`_matrix_view`."""
    order = _matrix_order(layout)
    permuted = matrix.reshape([layout.shape[d] for d in order])
    return permuted.permute([order.index(d) for d in range(len(order))]).contiguous()


_SHORTHANDS: dict[str, Selection] = {"global": Global(), "layerwise": Layerwise()}


def as_selection(scope: object) -> Selection:
    """A selection object from ``scope`` (a shorthand or a :class:`Selection`).

    ``"global"``, ``"layerwise"``, a mapping of name patterns to sparsities (:class:`Targets`
    with layerwise selection) or a :class:`Selection` itself.

    Raises:
        ValueError: an unknown shorthand.
        TypeError: neither a string nor an object with ``check_schedule`` and ``select``.
    """
    if isinstance(scope, Mapping):
        return Targets(scope)
    if isinstance(scope, str):
        if scope not in _SHORTHANDS:
            raise ValueError(
                f"scope must be one of {tuple(_SHORTHANDS)} or a Selection, got {scope!r}"
            )
        return _SHORTHANDS[scope]
    if not isinstance(scope, Selection):
        raise TypeError(
            "scope must be 'global', 'layerwise' or a Selection (an object with check_schedule "
            f"and select), got {type(scope).__name__}"
        )
    return scope


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _check_reachable(k: int, cap: int, what: str, sparsity: float, min_density: float) -> None:
    if k > cap:
        raise ValueError(
            f"the schedule's final sparsity {sparsity!r} asks for {k} pruned of {what} but "
            f"min_density={min_density!r} allows at most {cap}"
        )
