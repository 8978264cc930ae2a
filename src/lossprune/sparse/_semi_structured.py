r"""2:4 semi-structured linear layers: what ``to_sparse_semi_structured`` needs, and the layer.

In every group of 4 consecutive weights along the input dimension at most 2 are non-zero; the
sparse tensor cores of NVIDIA Ampere and newer multiply such a weight at up to twice the dense
rate, storing the 2 values and a 2-bit index each (Mishra et al., "Accelerating Sparse Deep
Neural Networks", arXiv:2104.08378). torch exposes it as
:func:`torch.sparse.to_sparse_semi_structured` (cuSPARSELt, or CUTLASS kernels).

The compression keeps the non-zeros of each group without checking how many there are, so a
group with 3 or 4 would silently lose values: every weight is checked first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init
from torch.sparse import (
    SparseSemiStructuredTensor,
    SparseSemiStructuredTensorCUSPARSELT,
    SparseSemiStructuredTensorCUTLASS,
    to_sparse_semi_structured,
)

from ..selection import is_nm
from ._linear import LinearWeights

__all__ = ["SEMI_STRUCTURED_DTYPES", "check_semi_structured_support", "semi_structured_linear"]

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def check_semi_structured_support(name: str, weight: Tensor) -> None:
    """Refuse a weight ``to_sparse_semi_structured`` would refuse or compress wrongly."""
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        raise TypeError(
            f"layer {name!r}: 2:4 semi-structured weights must be float16 or bfloat16, got "
            f"{weight.dtype}"
        )
    out_features, in_features = weight.shape
    if in_features % 4:
        raise ValueError(
            f"layer {name!r}: 2:4 groups run along the input dimension, whose size "
            f"{in_features} is not divisible by 4"
        )
    min_rows, min_cols = _semi_structured_min_shape(weight.dtype)
    if out_features % min_rows or in_features % min_cols:
        raise ValueError(
            f"layer {name!r}: the 2:4 kernels need (out, in) to be multiples of "
            f"({min_rows}, {min_cols}) for {weight.dtype}, got {tuple(weight.shape)}"
        )
    # More than two non-zeros in a group would be dropped by the compression without an error.
    if not is_nm(weight != 0, 2, 4, dim=1):
        row, group = _first_dense_group(weight)
        raise ValueError(
            f"layer {name!r}: the weight is not 2:4 along the input dimension (row {row}, "
            f"columns {4 * group}-{4 * group + 3} hold more than 2 non-zeros); prune it with "
            "an N:M mask first (lossprune.sparse.nm_mask), or leave it out with layers=[...]"
        )
    if weight.device.type != "cuda" or torch.cuda.get_device_capability(weight.device) < (8, 0):
        raise ValueError(
            f"layer {name!r}: 2:4 semi-structured kernels need a CUDA device of compute "
            f"capability >= 8.0 (Ampere or newer), but the weight is on {weight.device}"
        )


def semi_structured_linear(weights: LinearWeights) -> nn.Linear:
    """An :class:`~torch.nn.Linear` with a frozen 2:4 semi-structured copy of ``weights``."""
    out_features, in_features = weights.weight.shape
    linear = skip_init(
        nn.Linear,
        in_features,
        out_features,
        bias=weights.bias is not None,
        device=weights.weight.device,
        dtype=weights.weight.dtype,
    )
    sparse = to_sparse_semi_structured(weights.weight.contiguous())
    linear.weight = nn.Parameter(sparse, requires_grad=False)
    if weights.bias is not None:
        linear.bias = nn.Parameter(weights.bias.clone(), requires_grad=False)
    return linear


def _semi_structured_min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """The weight shape granularity of the backend ``to_sparse_semi_structured`` will use.

    torch checks it only on CUDA; reading the same table here refuses a shape on any device.
    """
    backend = (
        SparseSemiStructuredTensorCUTLASS
        if SparseSemiStructuredTensor._FORCE_CUTLASS
        else SparseSemiStructuredTensorCUSPARSELT
    )
    config = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return config.sparse_min_rows, config.sparse_min_cols


def _first_dense_group(weight: Tensor) -> tuple[int, int]:
    """(row, group) of the first group of 4 input weights holding more than 2 non-zeros."""
    counts = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    row, group = (counts > 2).nonzero()[0].tolist()
    return row, group
