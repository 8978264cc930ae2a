"""How a prunable parameter's entries are laid out: the (outputs, inputs) view of a weight matrix.

Structures that group weights along a linear map's input dimension (N:M, blocks) view each
parameter as the matrix of its map, input axes flattened in order: dim 1 of ``nn.Linear``, dim 0
of Hugging Face's ``Conv1D``, in·kh·kw of a convolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

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
