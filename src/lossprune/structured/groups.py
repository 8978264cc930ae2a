r"""Groups of weights that are removed together, and what removing them changes.

A *group set* is one place of a model where whole units can be removed: the intermediate
neurons of one MLP, the attention heads (or, under grouped-query attention, the key/value
groups) of one attention module, the output channels of one convolution together with
everything coupled to them, the experts of one mixture-of-experts block. Group :math:`g` of a
set owns, in every tensor it touches, the entries ``positions[g]`` along one axis
(:class:`Slice`): the rows that compute the unit (``gate_proj``/``up_proj`` rows, a head's
``q``/``k``/``v`` rows, a channel's filter, its batch-norm entries, an expert's matrices and
router row) and the columns that read it (``down_proj`` columns, a head's ``o_proj`` columns,
the next convolution's input channel).

Removing a set of groups is then the same operation everywhere: keep, along each sliced axis of
each tensor, the entries of the other groups (:func:`kept_positions`). Setting the removed
entries to zero instead gives the *masked dense model* (:func:`masked_state`), whose outputs
the smaller model reproduces exactly (tested in float64): a removed unit's output is zero
because its rows are, and nothing reads it because its columns are.

Indices always refer to the tensors as they were when the groups were found: a model is
re-described (:func:`lossprune.structured.find_groups`) after each removal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._common.checks import is_int

__all__ = [
    "AttributeUpdate",
    "ConfigUpdate",
    "Consumer",
    "GroupSet",
    "Slice",
    "kept_positions",
    "masked_state",
    "parameters_removed",
]

#: The kinds of group sets, in the order :func:`~lossprune.structured.find_groups` lists them.
KINDS = ("heads", "neurons", "channels", "experts")


class Slice(NamedTuple):
    """The entries of one tensor that each group of a set owns.

    Attributes:
        tensor: qualified name of a parameter or buffer (``"model.layers.0.mlp.up_proj.weight"``).
        axis: the axis the groups cut.
        positions: ``(groups, width)`` long tensor: group ``g`` owns positions
            ``positions[g]`` of ``axis`` (disjoint across groups).
    """

    tensor: str
    axis: int
    positions: Tensor


class Consumer(NamedTuple):
    """A linear map that READS the units of a set: removing a group removes its input columns.

    The refit (:mod:`lossprune.structured.refit`) solves for these maps' kept columns.

    Attributes:
        module: qualified name of the ``nn.Linear``, convolution or Hugging Face ``Conv1D``.
        columns: ``(groups, width)`` long tensor, the columns of the map's (outputs, inputs)
            matrix view (inputs flattened as ``in·kh·kw`` for a convolution) that group ``g``
            feeds.
    """

    module: str
    columns: Tensor


class AttributeUpdate(NamedTuple):
    """A module attribute that counts units: after removal it is ``per_group × kept groups``.

    E.g. ``num_heads`` of an OPT attention (1 per head), ``split_size`` of a GPT-2 attention
    (``head_dim`` per head), ``num_experts`` of an experts module.
    """

    module: str
    attribute: str
    per_group: int


class ConfigUpdate(NamedTuple):
    """A Hugging Face config field that counts units, e.g. ``intermediate_size``.

    After a removal that keeps ``k`` groups in EVERY set that names the field, the field is
    ``per_group × k`` (a field that is not a count, e.g. ``head_dim``, has ``per_group = 0``
    and keeps ``value``).
    """

    key: str
    per_group: int
    value: int | None = None


@dataclass(frozen=True, eq=False)
class GroupSet:
    """One place of a model where whole units can be removed (module docstring).

    Attributes:
        name: where the units live, e.g. ``"model.layers.0.mlp"`` or ``"layer1.0.conv1"``.
        kind: ``"heads"`` (a key/value group under grouped-query attention), ``"neurons"``,
            ``"channels"`` or ``"experts"``.
        size: number of groups.
        slices: every tensor entry a group owns.
        consumers: the linear maps that read the units (the refit's targets).
        attributes: module attributes that count the units.
        config: Hugging Face config fields that count the units (empty: the config cannot
            express a removal of these groups).
        note: why the config cannot express it, when ``config`` is empty on a Hugging Face
            model (shown in the error a uniform removal raises).
        heads_per_group: query heads per group (``kind="heads"``: more than 1 under
            grouped-query attention).
    """

    name: str
    kind: str
    size: int
    slices: tuple[Slice, ...]
    consumers: tuple[Consumer, ...] = ()
    attributes: tuple[AttributeUpdate, ...] = ()
    config: tuple[ConfigUpdate, ...] = ()
    note: str = ""
    heads_per_group: int = 1

    def parameters_per_group(self, model: nn.Module) -> int:
        """Parameters (not buffers) one group owns: what removing it saves."""
        params = dict(model.named_parameters(remove_duplicate=False))
        total = 0
        for piece in self.slices:
            if piece.tensor in params:
                shape = params[piece.tensor].shape
                total += (
                    params[piece.tensor].numel() // shape[piece.axis]
                ) * piece.positions.shape[1]
        return total

    def __repr__(self) -> str:
        return f"GroupSet({self.name!r}, kind={self.kind!r}, size={self.size})"


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = dict(model.named_buffers(remove_duplicate=False))
    tensors.update(model.named_parameters(remove_duplicate=False))
    return tensors


def removed_positions(
    groups: Sequence[GroupSet], removed: Mapping[str, Sequence[int]]
) -> dict[tuple[str, int], Tensor]:
    """Per ``(tensor, axis)``: the positions the removed groups own (sorted, unique)."""
    positions: dict[tuple[str, int], list[Tensor]] = {}
    for group_set in groups:
        chosen = torch.as_tensor(list(removed.get(group_set.name, ())), dtype=torch.long)
        if not len(chosen):
            continue
        for piece in group_set.slices:
            positions.setdefault((piece.tensor, piece.axis), []).append(
                piece.positions[chosen].reshape(-1)
            )
    return {key: torch.cat(parts).unique() for key, parts in positions.items()}


def kept_positions(
    model: nn.Module, groups: Sequence[GroupSet], removed: Mapping[str, Sequence[int]]
) -> dict[tuple[str, int], Tensor]:
    """Per ``(tensor, axis)`` that a removal cuts: the positions that stay, in order."""
    tensors = _tensors(model)
    kept = {}
    for (name, axis), gone in removed_positions(groups, removed).items():
        keep = torch.ones(tensors[name].shape[axis], dtype=torch.bool)
        keep[gone] = False
        kept[(name, axis)] = keep.nonzero().squeeze(1)
    return kept


def parameters_removed(
    model: nn.Module, groups: Sequence[GroupSet], removed: Mapping[str, Sequence[int]]
) -> int:
    """How many parameters a removal saves, exactly.

    A weight cut along two axes by two sets (a convolution's input and output channels) counts
    each entry once.
    """
    params = dict(model.named_parameters())
    sizes: dict[str, list[int]] = {}
    for (name, axis), kept in kept_positions(model, groups, removed).items():
        if name in params:
            sizes.setdefault(name, list(params[name].shape))[axis] = len(kept)
    return sum(params[name].numel() - math.prod(shape) for name, shape in sizes.items())


def masked_state(
    model: nn.Module, groups: Sequence[GroupSet], removed: Mapping[str, Sequence[int]]
) -> dict[str, Tensor]:
    """The tensors of the masked dense model: every entry a removed group owns set to zero.

    Returns new tensors for the affected names only (the model is not modified).
    """
    tensors = _tensors(model)
    out: dict[str, Tensor] = {}
    for (name, axis), gone in removed_positions(groups, removed).items():
        value = out.get(name, tensors[name].detach().clone())
        value.index_fill_(axis, gone.to(value.device), 0)
        out[name] = value
    return out


def check_removed(
    groups: Sequence[GroupSet], removed: Mapping[str, Iterable[int]]
) -> dict[str, tuple[int, ...]]:
    """``removed`` as sorted tuples of valid, distinct group indices, each set keeping a group.

    Raises:
        ValueError: a name that is no group set, an index out of range or repeated, or every
            group of a set removed.
        TypeError: an index that is not an int.
    """
    by_name = {g.name: g for g in groups}
    checked = {}
    for name, indices in removed.items():
        if name not in by_name:
            raise ValueError(
                f"removed names {name!r}, which is not a group set here (known: "
                f"{sorted(by_name)[:5]}{'...' if len(by_name) > 5 else ''})"
            )
        values = list(indices)
        if not all(is_int(i) for i in values):
            raise TypeError(f"removed[{name!r}] must hold ints (group indices), got {values!r}")
        size = by_name[name].size
        if any(not 0 <= i < size for i in values) or len(set(values)) != len(values):
            raise ValueError(
                f"removed[{name!r}] must hold distinct group indices in [0, {size}), got {values!r}"
            )
        if len(values) == size:
            raise ValueError(
                f"removed[{name!r}] removes all {size} groups of {name!r}; at least one must stay "
                "(a layer with no unit left is not a layer)"
            )
        checked[name] = tuple(sorted(int(i) for i in values))
    return checked
