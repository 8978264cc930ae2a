r"""Which entries a stage prunes: selection objects with one protocol (layer 4 of DESIGN.md).

A *selection* turns scores (lower = pruned first) into the new cumulative masks of a stage.
Like a :mod:`torch.nn.utils.prune` method, each structure is a small class carrying its own
parameters; the :class:`~lossprune.Pruner` only calls the two methods of :class:`Selection`:

- :meth:`Selection.check_schedule` once, before anything runs, with every stage's target, so
  that a structure refuses a schedule it cannot follow before any weight changes;
- :meth:`Selection.select` once per stage, with the scores, the current masks, the stage's
  target sparsity, ``min_density`` and each parameter's :class:`ParameterLayout` (its module
  type and which axes form its input dimension, e.g. for N:M sparsity along the inputs).

``Pruner(scope="global")`` and ``scope="layerwise"`` are shorthands for :class:`Global` and
:class:`Layerwise`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .masks import _ceil_times, select_masks

__all__ = [
    "Global",
    "Layerwise",
    "ParameterLayout",
    "Selection",
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
            convolution: in·kh·kw), or ``None`` when it is not a known linear map.
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
        layouts[name] = ParameterLayout(
            tuple(param.shape), type(module).__name__, _input_dims(module, attribute, param.dim())
        )
    return layouts


def _input_dims(module: nn.Module, attribute: str, ndim: int) -> tuple[int, ...] | None:
    if isinstance(module, _ConvTransposeNd) and attribute == "weight":
        return (0, *range(2, ndim))  # (in, out / groups, *kernel)
    if isinstance(module, _ConvNd) and attribute == "weight":
        return tuple(range(1, ndim))  # (out, in / groups, *kernel)
    if isinstance(module, nn.Linear) and attribute == "weight":
        return (1,)
    if isinstance(module, nn.MultiheadAttention) and attribute == "in_proj_weight":
        return (1,)
    if type(module).__name__ == "Conv1D" and attribute == "weight" and ndim == 2:
        return (0,)  # Hugging Face's Conv1D stores the transpose: (in, out)
    return None


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


_SHORTHANDS: dict[str, Selection] = {"global": Global(), "layerwise": Layerwise()}


def as_selection(scope: object) -> Selection:
    """A selection object from ``scope``: ``"global"``, ``"layerwise"`` or a :class:`Selection`.

    Raises:
        ValueError: an unknown shorthand.
        TypeError: neither a string nor an object with ``check_schedule`` and ``select``.
    """
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
