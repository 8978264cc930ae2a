r"""Squared norms of the inputs of each weight matrix: the activation statistic of Wanda.

A linear map :math:`y = W x` (a convolution: :math:`y = W \operatorname{unfold}(x)`) multiplies
input feature :math:`j` by column :math:`j` of :math:`W`. Stacking every input vector the map
sees in the data (every example, and every position of a sequence or every patch of an image)
as the rows of :math:`X`, the statistic of feature :math:`j` is

.. math:: \|X_j\|_2^2 = \sum_{n} \sum_{t} x_{ntj}^2,

the diagonal of :math:`X^\top X`. Wanda (Sun et al. 2024, "A Simple and Effective Pruning
Approach for Large Language Models", Eq. 1) scores :math:`|W_{ij}| \, \|X_j\|_2`; layer-wise
reconstruction (SparseGPT, Frantar and Alistarh 2023) needs the same second moments.

:func:`input_sq_norms` computes them for one batch with forward pre-hooks during ONE forward
pass (no gradient). The result for a parameter is shaped to broadcast against it: ``(1, in)``
for ``nn.Linear``, ``(in, 1)`` for Hugging Face's ``Conv1D`` (stored ``(in, out)``), and
``(1, in, *kernel)`` for a convolution (``(out, in/groups, *kernel)`` with groups, where each
output channel sees only its group's inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._common.functional import FunctionalModel
from .._common.linear_maps import is_hf_conv1d
from .expert_inputs import is_expert_matrix, register_expert_hooks

__all__ = ["input_sq_norms"]


def _linear(module: nn.Module, x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).square().sum(0).unsqueeze(0)  # (1, in)


def _hf_conv1d(module: nn.Module, x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).square().sum(0).unsqueeze(1)  # (in, 1)


def _conv(module: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    if isinstance(module, nn.Conv1d):  # as a 2-d convolution of height 1
        x = x.unsqueeze(-2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride  # type: ignore[assignment]
    if x.dim() == 3:  # an unbatched input
        x = x.unsqueeze(0)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    per_feature = patches.square().sum((0, 2))  # (in · prod(kernel),)
    weight = module.weight
    groups = module.groups
    # Output channels of group g see only the inputs of group g.
    per_group = per_feature.reshape(groups, 1, *weight.shape[1:])
    if groups == 1:
        return per_group[0]
    return per_group.expand(groups, weight.shape[0] // groups, *weight.shape[1:]).reshape(
        weight.shape
    )


def _rule(module: nn.Module, attribute: str) -> Callable[[nn.Module, Tensor], Tensor] | str:
    """The rule for a parameter, or why it has none."""
    if attribute != "weight":
        return "it is not the weight matrix of a linear map"
    if isinstance(module, nn.Linear):
        return _linear
    if is_hf_conv1d(module):
        return _hf_conv1d
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return "string padding and non-zero padding modes are not supported"
        return _conv
    return (
        "only nn.Linear, nn.Conv1d, nn.Conv2d and Hugging Face's Conv1D are supported "
        "(not transposed or 3-d convolutions, nor nn.MultiheadAttention's input projections)"
    )


def input_sq_norms(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    r""":math:`\|X_j\|_2^2` over the examples and positions of ONE batch, for each of ``params``.

    Args:
        model: the module (never modified; hooks are removed afterwards).
        params: weight matrices by qualified name, at which the model is evaluated.
        inputs: the batch's inputs.
        dtype: the dtype to square and sum in.

    Returns:
        Name to a tensor shaped to broadcast against the parameter (module docstring).

    Raises:
        TypeError: a parameter that is not the weight of a supported linear map, or whose
            module is not called through its ``forward`` (e.g. the ``out_proj`` of
            :class:`~torch.nn.MultiheadAttention`, which it applies functionally).
    """
    # Fused MoE experts: one matrix per expert, each fed by its routed tokens (.expert_inputs).
    experts = [name for name in params if is_expert_matrix(model, name)]
    rules = {}
    for name in params:
        if name in experts:
            continue
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        rule = _rule(module, attribute)
        if isinstance(rule, str):
            raise TypeError(
                f"input_sq_norms: no input statistic for {name!r} ({type(module).__name__}): {rule}"
            )
        rules[name] = (module, rule)
    sums: dict[str, Tensor] = {}
    handles = register_expert_hooks(model, experts, sums, dtype)
    for name, (module, rule) in rules.items():

        def hook(
            module: nn.Module,
            args: tuple[Tensor, ...],
            name: str = name,
            rule: Callable[[nn.Module, Tensor], Tensor] = rule,
        ) -> None:
            value = rule(module, args[0].detach().to(dtype))
            sums[name] = value if name not in sums else sums[name] + value

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            FunctionalModel(model, params)(params, inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in params if name not in sums]
    if missing:
        raise TypeError(
            f"input_sq_norms: the modules of {missing} were not called through their forward "
            "(e.g. nn.MultiheadAttention applies out_proj functionally), so their inputs are "
            "unknown"
        )
    return sums
