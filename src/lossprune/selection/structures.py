r"""Which entries a stage prunes: selection objects with one protocol.

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

``Pruner(scope="global")``, ``scope="layerwise"`` and ``scope="per_row"`` are shorthands for
:class:`Global`, :class:`Layerwise` and :class:`~lossprune.PerRow`
(:mod:`lossprune.selection.per_row`, Wanda's comparison group); :class:`~lossprune.NM`
(:mod:`lossprune.selection.nm`) is N:M sparsity along each weight matrix's input dimension,
:class:`~lossprune.Blocks` (:mod:`lossprune.selection.blocks`) prunes whole tiles. A selection
that removes groups of weights together also defines ``group_sum(layout, tensor)`` (a tensor
summed over each group, broadcast back); the Pruner then scores with
:meth:`lossprune.Criterion.group_score`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from torch import Tensor

from .._common.checks import check_fraction
from .layout import ParameterLayout, from_per_matrix, numel, per_matrix, per_matrix_layouts
from .masks import ceil_times, select_masks
from .per_row import PerRow

__all__ = ["Global", "Layerwise", "Selection", "Targets", "as_selection"]


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
    the stage, each weight matrix keeping at least ``min_density`` of its entries (each
    expert's matrix of a fused mixture-of-experts parameter counts as one matrix). See
    :func:`lossprune.selection.select_masks`.
    """

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """The final target must leave every matrix ``min_density`` of its entries in total."""
        sizes = [numel(layout.shape) for layout in per_matrix_layouts(layouts).values()]
        k = round(sum(sizes) * targets[-1])
        cap = sum(n - ceil_times(min_density, n) for n in sizes)
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
        """:func:`~lossprune.selection.select_masks` with ``scope="global"``."""
        return _per_matrix_select(scores, masks, layouts, "global", sparsity, min_density)


@dataclass(frozen=True)
class Layerwise:
    r"""Each weight matrix separately.

    Matrix :math:`l` with :math:`n_l` entries has exactly
    :math:`\operatorname{round}(n_l \cdot p)` entries pruned after the stage. Every expert's
    matrix of a fused mixture-of-experts parameter (``experts.down_proj[e]``) is a matrix of
    its own, as it would be stored as separate ``nn.Linear`` experts.
    """

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """The final target must leave each matrix ``min_density`` of its entries."""
        for name, layout in per_matrix_layouts(layouts).items():
            n = numel(layout.shape)
            what = f"tensor {name!r} ({n} entries)"
            cap = n - ceil_times(min_density, n)
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
        """:func:`~lossprune.selection.select_masks` with ``scope="layerwise"``."""
        return _per_matrix_select(scores, masks, layouts, "layerwise", sparsity, min_density)


@dataclass(frozen=True)
class Targets:
    r"""Per-layer or per-group target sparsities, by name pattern, with any structure inside.

    ``Targets({r".*attn.*": 0.3, r".*mlp.*": 0.6})`` splits the pruned parameters into groups:
    each parameter belongs to the FIRST pattern that matches its whole qualified name
    (:func:`re.fullmatch`, in the mapping's order); the unmatched ones form one more group that
    follows the schedule itself. Each group is selected separately by ``structure``
    (``"layerwise"``: every tensor on its own; ``"global"``: one ranking within the group;
    :class:`NM`, :class:`Blocks`: that structure within the group). A tied parameter matches
    when any of its names does.

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

    def groups(
        self, names: Sequence[str], layouts: Mapping[str, ParameterLayout] | None = None
    ) -> dict[str | None, list[str]]:
        """Parameter names by the first pattern that matches them (``None``: unmatched).

        A tied parameter matches when any of its names does (its ``aliases`` in ``layouts``).

        Raises:
            ValueError: a pattern that matches no parameter (a typo would otherwise silently
                leave those layers at the schedule's target).
        """
        groups: dict[str | None, list[str]] = {pattern: [] for pattern in self.sparsity}
        groups[None] = []
        for name in names:
            layout = None if layouts is None else layouts.get(name)
            spellings = [name, *(() if layout is None else layout.aliases)]
            pattern = next(
                (p for p in self.sparsity if any(re.fullmatch(p, n) for n in spellings)), None
            )
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
        for pattern, names in self.groups(list(layouts), layouts).items():
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
        for pattern, names in self.groups(list(masks), layouts).items():
            chosen = self.structure.select(  # type: ignore[attr-defined]
                {k: scores[k] for k in names},
                {k: masks[k] for k in names},
                sparsity=self._group_target(pattern, sparsity, last),
                min_density=min_density,
                layouts={k: layouts[k] for k in names},
            )
            new_masks.update(chosen)
        return {k: new_masks[k] for k in masks}


_SHORTHANDS: dict[str, Selection] = {
    "global": Global(),
    "layerwise": Layerwise(),
    "per_row": PerRow(),
}


def as_selection(scope: object) -> Selection:
    """A selection object from ``scope`` (a shorthand or a :class:`Selection`).

    ``"global"``, ``"layerwise"``, ``"per_row"``, a mapping of name patterns to sparsities
    (:class:`Targets` with layerwise selection) or a :class:`Selection` itself.

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
            "scope must be 'global', 'layerwise', 'per_row' or a Selection (an object with "
            f"check_schedule and select), got {type(scope).__name__}"
        )
    return scope


def _per_matrix_select(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    layouts: Mapping[str, ParameterLayout],
    scope: str,
    sparsity: float,
    min_density: float,
) -> dict[str, Tensor]:
    """:func:`select_masks` with every expert's matrix as a tensor of its own.

    The pieces come in the order of the flattened tensors, so a global ranking and its ties are
    the same as on the whole tensors; only per-matrix rules (layerwise targets, min_density)
    see the experts apart. Parameters the layouts do not describe are selected as they are.
    """
    layouts = {k: layouts.get(k, ParameterLayout((), "", None)) for k in masks}  # as they are
    chosen = select_masks(
        per_matrix(scores, layouts),
        per_matrix(masks, layouts),
        sparsity=sparsity,
        scope=scope,
        min_density=min_density,
    )
    return from_per_matrix(chosen, layouts)


def _check_reachable(k: int, cap: int, what: str, sparsity: float, min_density: float) -> None:
    if k > cap:
        raise ValueError(
            f"the schedule's final sparsity {sparsity!r} asks for {k} pruned of {what} but "
            f"min_density={min_density!r} allows at most {cap}"
        )
