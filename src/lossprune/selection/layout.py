"""How a prunable parameter's entries are laid out: the (outputs, inputs) view of a weight matrix.

Structures that group weights along a linear map's input dimension (N:M, blocks) view each
parameter as the matrix of its map, input axes flattened in order: dim 1 of ``nn.Linear``, dim 0
of Hugging Face's ``Conv1D``, in·kh·kw of a convolution. A fused mixture-of-experts parameter
``(experts, out, in)`` holds one matrix per expert: its matrix view stacks the experts' rows
(``experts·out × in``), so a group along the inputs never mixes two experts, and
:func:`per_matrix` splits it into one entry per expert (``"…down_proj[3]"``) for the selections
that treat every matrix as a layer of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._common.linear_maps import weight_matrices

__all__ = ["ParameterLayout", "parameter_layouts"]


class ParameterLayout(NamedTuple):
    """How a prunable parameter's entries are laid out.

    Attributes:
        shape: the parameter's shape.
        module_type: the class name of the module that owns it (``"Linear"``, ``"Conv2d"``...).
        input_dims: the axes that together form the input dimension of the linear map (dim 1
            of ``nn.Linear``, dim 0 of Hugging Face's ``Conv1D``, dims 1, 2, ... of a
            convolution: in·kh·kw, dims 0, 2, ... of a transposed one; see
            :func:`lossprune._common.linear_maps.weight_matrices`), or ``None`` when it is not the
            weight matrix of a known linear map.
        expert_dim: the axis that indexes the experts of a fused mixture-of-experts parameter
            (each slice is one expert's matrix; ``0`` for transformers' ``(experts, out, in)``),
            ``None`` for a single matrix.
        aliases: the other qualified names of a tied parameter.
    """

    shape: tuple[int, ...]
    module_type: str
    input_dims: tuple[int, ...] | None
    expert_dim: int | None = None
    aliases: tuple[str, ...] = ()


def parameter_layouts(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, ParameterLayout]:
    """The :class:`ParameterLayout` of each of ``params`` (qualified names of ``model``)."""
    names: dict[int, list[str]] = {}
    for alias, shared in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(shared), []).append(alias)
    layouts = {}
    for name, param in params.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        matrix = weight_matrices(module).get(attribute)
        aliases = tuple(alias for alias in names.get(id(param), ()) if alias != name)
        layouts[name] = ParameterLayout(
            tuple(param.shape),
            type(module).__name__,
            None if matrix is None else matrix.input_axes,
            None if matrix is None else matrix.expert_axis,
            aliases,
        )
    return layouts


def per_matrix_layouts(layouts: Mapping[str, ParameterLayout]) -> dict[str, ParameterLayout]:
    """Each expert of a fused experts parameter as a layout of its own (``"name[e]"``).

    Single matrices (and every other tensor) keep their name and layout.
    """
    split = {}
    for name, layout in layouts.items():
        axis = layout.expert_dim
        if axis is None:
            split[name] = layout
            continue
        shape = layout.shape[:axis] + layout.shape[axis + 1 :]
        assert layout.input_dims is not None and axis not in layout.input_dims
        inputs = tuple(d - (d > axis) for d in layout.input_dims)
        one = ParameterLayout(shape, layout.module_type, inputs, None, ())
        for expert in range(layout.shape[axis]):
            split[f"{name}[{expert}]"] = one
    return split


def per_matrix(tensors: Mapping[str, Tensor], layouts: Mapping[str, ParameterLayout]) -> dict:
    """``tensors`` with every fused experts entry split into its experts' matrices (views).

    Keys as :func:`per_matrix_layouts`; the order is the order of the flattened tensors (the
    expert axis leads), so concatenating the pieces gives the same sequence of entries.
    """
    split: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        layout = layouts.get(name)
        axis = None if layout is None else layout.expert_dim
        if axis is None or not isinstance(tensor, Tensor):  # validated by the caller
            split[name] = tensor
        else:
            for expert, piece in enumerate(tensor.unbind(axis)):
                split[f"{name}[{expert}]"] = piece
    return split


def from_per_matrix(
    pieces: Mapping[str, Tensor], layouts: Mapping[str, ParameterLayout]
) -> dict[str, Tensor]:
    """Undo :func:`per_matrix`: the experts' matrices stacked back into each parameter."""
    joined = {}
    for name, layout in layouts.items():
        axis = layout.expert_dim
        if axis is None or name in pieces:
            joined[name] = pieces[name]
        else:
            experts = [pieces[f"{name}[{e}]"] for e in range(layout.shape[axis])]
            joined[name] = torch.stack(experts, axis)
    return joined


def input_size(name: str, layout: ParameterLayout, structure: object) -> int:
    """The flattened input dimension of a weight matrix; ``ValueError`` for other tensors."""
    if layout.input_dims is None:
        raise ValueError(
            f"{structure!r} groups weights along the input dimension of a linear map, but "
            f"{name!r} (of a {layout.module_type}) is not the weight matrix of one"
        )
    return numel(tuple(layout.shape[d] for d in layout.input_dims))


def _matrix_order(layout: ParameterLayout) -> list[int]:
    """The axes of the parameter in (outputs..., inputs...) order."""
    assert layout.input_dims is not None
    inputs = list(layout.input_dims)
    return [d for d in range(len(layout.shape)) if d not in inputs] + inputs


def matrix_shape(layout: ParameterLayout) -> tuple[int, int]:
    """``(outputs, inputs)`` of the matrix view, each axis group flattened (zero sizes too)."""
    assert layout.input_dims is not None
    outputs = tuple(d for d in range(len(layout.shape)) if d not in layout.input_dims)
    return (
        numel(tuple(layout.shape[d] for d in outputs)),
        numel(tuple(layout.shape[d] for d in layout.input_dims)),
    )


def matrix_view(tensor: Tensor, layout: ParameterLayout) -> Tensor:
    """``tensor`` as the (outputs, inputs) matrix of its linear map, input axes flattened."""
    # Both sizes explicit: a zero-size layer has no "-1" to infer.
    return tensor.permute(_matrix_order(layout)).reshape(matrix_shape(layout))


def from_matrix_view(matrix: Tensor, layout: ParameterLayout) -> Tensor:
    """Undo :func:`matrix_view`."""
    order = _matrix_order(layout)
    permuted = matrix.reshape([layout.shape[d] for d in order])
    return permuted.permute([order.index(d) for d in range(len(order))]).contiguous()


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
