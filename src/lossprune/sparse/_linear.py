r"""Linear maps with a sparse weight, and the rule for which modules may become one.

A linear layer computes :math:`y = x W^\top + b` with :math:`W` of shape ``(out, in)``. Its
sparse twin stores :math:`W` as a ``torch.sparse_csr`` or ``torch.sparse_bsr`` tensor and
computes the transposed product

.. math:: y^\top = b \mathbf{1}^\top + W x^\top

with one ``torch.addmm`` (sparse times dense is the product the CPU (MKL) and CUDA (cuSPARSE)
kernels implement; dense times sparse is several times slower on CPU). Only the stored entries
of :math:`W` take part, so the result equals the dense one up to the order of summation.

These modules qualify, matched by exact type so that subclasses with other behaviour (such
as :class:`~torch.nn.MultiheadAttention`'s ``out_proj``, whose weight the attention reads
directly) stay dense:

- :class:`torch.nn.Linear` (weight ``out × in``);
- Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2), which computes
  ``addmm(b, x, W)`` with its weight stored ``in × out``: its :math:`W^\top` is the same map;
- subclasses of :class:`torch.nn.Linear` defined by ``transformers`` (Falcon's
  ``FalconLinear``, which writes ``x @ W.T + b`` itself) whose plain dense floating-point weight
  and forward pass give ``F.linear(x, W, b)`` on a random input.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._common.checks import check_positive_int

__all__ = [
    "SparseLinear",
    "LinearWeights",
    "linear_weights",
    "is_linear",
    "check_convertible",
    "check_dense_weight",
    "check_sparse_support",
    "check_blocksize",
    "check_model",
    "error_bound",
    "TOLERANCE",
]

# Dtypes for which the sparse-times-dense kernels of torch 2.13 give the dense layer's numbers, by
# device type and layout. MKL on CPU has no float16/bfloat16 kernel ("addmm_out_sparse_csr_impl_mkl"
# not implemented for 'Half'). On CUDA, cuSPARSE's bsrmm has float32/float64 kernels only, and
# torch calls SpMM for CSR with the data type as compute type: float16/bfloat16 would accumulate
# in half precision, less accurately than the dense layer (cuBLAS accumulates in float32), so
# they are refused. This project has not run the CUDA rows on a GPU yet.
SPARSE_DTYPES = {
    ("cpu", "csr"): (torch.float32, torch.float64),
    ("cpu", "bsr"): (torch.float32, torch.float64),
    ("cuda", "csr"): (torch.float32, torch.float64),
    ("cuda", "bsr"): (torch.float32, torch.float64),
}
_HF_CONV1D_MODULE = "transformers.pytorch_utils"

# τ of :func:`error_bound` by dtype: a few hundred units in the last place.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


class LinearWeights(NamedTuple):
    """A linear layer's map in :class:`torch.nn.Linear` orientation."""

    weight: Tensor
    """``(out, in)``: a transposed view for ``Conv1D``."""
    bias: Tensor | None


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer that may become sparse (module docstring)."""
    if type(module) is nn.Linear:
        return True
    kind = type(module)
    # Matched by name and home module: lossprune does not depend on transformers, and importing
    # it only to test a type would cost seconds.
    if kind.__name__ == "Conv1D" and kind.__module__ == _HF_CONV1D_MODULE:
        return True
    return (
        isinstance(module, nn.Linear)
        and kind.__module__.startswith("transformers.")
        and _computes_linear(module)
    )


def _computes_linear(module: nn.Linear) -> bool:
    """Whether a subclass's forward pass gives ``F.linear(x, W, b)`` on one random input.

    Only for a plain dense floating-point weight (a quantized subclass is no sparse candidate);
    agreement within the rounding bound of :func:`error_bound`, the one
    :func:`~lossprune.sparse.speed_report` judges sparse forms by.
    """
    weight = module.weight
    if type(weight) not in (Tensor, nn.Parameter) or weight.layout != torch.strided:
        return False
    if not weight.is_floating_point() or weight.is_meta or weight.dim() != 2:
        return False
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(
        (3, weight.shape[1]), generator=generator, dtype=weight.dtype, device=weight.device
    )
    try:
        with torch.no_grad():
            out = module(x)
            expected = torch.nn.functional.linear(x, weight, module.bias)
    except (RuntimeError, TypeError, ValueError):
        return False
    if not isinstance(out, Tensor) or out.shape != expected.shape:
        return False
    if weight.dtype not in TOLERANCE:
        return False
    bound = error_bound(LinearWeights(weight.detach(), _bias(module)), x)
    return bool(((out.double() - expected.double()).abs() <= bound).all())


def _bias(module: nn.Module) -> Tensor | None:
    bias = module._parameters.get("bias")
    return None if bias is None else bias.detach()


def error_bound(weights: LinearWeights, x: Tensor) -> Tensor:
    r""":math:`\tau (\sum_k |x_{ik}| |W_{jk}| + |b_j|)` in float64, shaped like the output.

    The rounding a dot product may carry (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., §3.1), :math:`\tau` from :data:`TOLERANCE`: two computations of the
    same linear map that differ by more compute another map.
    """
    tau = TOLERANCE[weights.weight.dtype]
    magnitude = x.double().abs() @ weights.weight.double().abs().t()
    if weights.bias is not None:
        magnitude = magnitude + weights.bias.double().abs()
    return tau * magnitude


def linear_weights(module: nn.Module) -> LinearWeights:
    """The weight (``out × in``) and bias of a module for which :func:`is_linear` holds."""
    weight: Tensor = module.get_parameter("weight")
    if not isinstance(module, nn.Linear):  # Conv1D stores (in, out)
        weight = weight.t()
    return LinearWeights(weight.detach(), _bias(module))


def check_convertible(name: str, module: nn.Module) -> None:
    """Refuse a linear layer whose replacement could change what the model computes.

    Hooks belong to the module object (and may read or rewrite its weight, as
    :mod:`torch.nn.utils.prune` does): a new module would silently drop them. (A parametrized
    Linear is of another class, ``ParametrizedLinear``, and never qualifies.)
    """
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )
    if any(hooks):
        raise ValueError(
            f"layer {name!r} has hooks, which a converted module would not keep; remove them "
            "first (for torch.nn.utils.prune: lossprune.selection.from_torch_prune(model, "
            "remove=True))"
        )
    check_dense_weight(name, module)


def check_dense_weight(name: str, module: nn.Module) -> None:
    """Refuse a weight that is not a plain dense matrix (already sparse, or a tensor subclass).

    Sparsity, conversion and the dense reference of :func:`speed_report` all read the weight as
    an ordinary strided tensor; a subclass (a semi-structured weight, ...) would answer otherwise.
    """
    weight = module.weight
    if type(weight) not in (Tensor, nn.Parameter) or weight.layout != torch.strided:
        raise ValueError(
            f"layer {name!r} has no plain dense weight (got {type(weight).__name__} of layout "
            f"{getattr(weight, 'layout', None)}): convert or measure the dense model"
        )


def check_sparse_support(
    name: str, weight: Tensor, layout: str, blocksize: tuple[int, int] | None
) -> None:
    """Refuse a weight the CSR/BSR kernels of its device cannot multiply exactly."""
    supported = SPARSE_DTYPES.get((weight.device.type, layout))
    if supported is None:
        raise ValueError(
            f"layer {name!r}: {layout} weights are supported on cpu and cuda, not on "
            f"{weight.device.type}"
        )
    if weight.dtype not in supported:
        raise TypeError(
            f"layer {name!r}: {layout} on {weight.device.type} supports dtypes "
            f"{[str(d) for d in supported]}, got {weight.dtype}"
        )
    if blocksize is not None and (weight.shape[0] % blocksize[0] or weight.shape[1] % blocksize[1]):
        raise ValueError(
            f"layer {name!r}: blocksize {blocksize} must divide the weight's (out, in) = "
            f"{tuple(weight.shape)}"
        )


def check_model(model: object) -> None:
    """Refuse anything but a module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_blocksize(layout: str, blocksize: object) -> tuple[int, int] | None:
    """``None`` for CSR; two positive ints for BSR."""
    if layout == "csr":
        if blocksize is not None:
            raise ValueError("blocksize applies only to layout='bsr'")
        return None
    if not isinstance(blocksize, tuple) or len(blocksize) != 2:
        raise TypeError(
            f"layout='bsr' needs blocksize=(rows, columns), got {type(blocksize).__name__}"
        )
    rows, columns = (check_positive_int("blocksize", size) for size in blocksize)
    if rows != columns:
        # MKL (CPU) and cuSPARSE (CUDA) multiply BSR matrices with square blocks only.
        raise ValueError(f"blocksize must be square (the BSR kernels need it), got {blocksize}")
    if rows == 1:
        # cuSPARSE's bsrmm needs blocks larger than 1 x 1, and such blocks are CSR anyway.
        raise ValueError("blocksize (1, 1) is CSR: use layout='csr'")
    return rows, columns


class SparseLinear(nn.Module):
    r"""A linear map :math:`y = x W^\top + b` whose weight is a sparse CSR or BSR tensor.

    Built by :func:`lossprune.sparse.to_sparse`. Weight and bias are buffers (inference only:
    they do not train, and :meth:`torch.nn.Module.parameters` does not list them);
    ``state_dict()`` keeps the names ``weight`` (always ``out × in``, also for a converted
    ``Conv1D``) and ``bias``. Inputs of any shape ``(*, in)`` give outputs ``(*, out)``,
    contiguous like those of :class:`torch.nn.Linear`. ``load_state_dict`` copies a sparse
    weight entry for entry, so it accepts only a weight with the same pattern (torch's rule).

    Args:
        weight: A 2-d ``torch.sparse_csr`` or ``torch.sparse_bsr`` tensor, ``out × in``.
        bias: ``None`` or a dense tensor of ``out`` entries.
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.layout not in (torch.sparse_csr, torch.sparse_bsr) or weight.dim() != 2:
            raise ValueError(
                f"weight must be a 2-d sparse CSR or BSR tensor, got a {weight.dim()}-d tensor "
                f"of layout {weight.layout}"
            )
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(
        cls, weights: LinearWeights, layout: str, blocksize: tuple[int, int] | None = None
    ) -> SparseLinear:
        """The sparse twin of a dense ``(out × in)`` weight and bias.

        CSR stores the non-zero entries; BSR stores every ``blocksize`` tile holding one.
        """
        dense = weights.weight.contiguous()
        with warnings.catch_warnings():
            # torch warns once per process that sparse CSR is "in beta"; that is not news to
            # a user who asked for it.
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            if layout == "csr":
                sparse = dense.to_sparse_csr()
            else:
                assert blocksize is not None  # checked by the caller for the BSR layout
                sparse = dense.to_sparse_bsr(blocksize)
        return cls(sparse, weights.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` for ``x`` of shape ``(*, in)``."""
        rows = x.reshape(-1, self.in_features)
        if self.bias is None:
            out_t = torch.mm(self.weight, rows.t())
        else:
            out_t = torch.addmm(self.bias.unsqueeze(1), self.weight, rows.t())
        return out_t.t().contiguous().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Sizes, layout and the fraction of stored weight entries."""
        stored = self.weight.values().numel()
        density = stored / max(1, self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.weight.layout}, stored={density:.3f}"
        )

    def __deepcopy__(self, memo: dict) -> SparseLinear:
        # torch cannot deep-copy a sparse compressed tensor (it has no storage to copy), but it
        # can clone one: hand deepcopy the clone, then copy everything else the usual way.
        memo[id(self.weight)] = self.weight.clone()
        duplicate = type(self).__new__(type(self))
        memo[id(self)] = duplicate
        duplicate.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return duplicate
