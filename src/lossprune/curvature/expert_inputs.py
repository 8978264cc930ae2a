r"""Wanda's input statistic for the experts of a mixture of experts: the tokens routed to each.

Expert :math:`e` of a Hugging Face fused experts module (:func:`~lossprune._common.linear_maps.
is_hf_experts`) sees only the tokens :math:`T_e` the router sends to it (those whose
``top_k_index`` holds :math:`e`), and computes for each of them

.. math:: h_t = \operatorname{gate}(W^{\mathrm{gate\_up}}_e x_t + b_e), \qquad
          y_t = W^{\mathrm{down}}_e h_t + b'_e,

with the module's own ``_apply_gate`` (``act(gate) * up`` by default; ``act_fn`` for experts
without a gate, ``up_proj`` then in place of ``gate_up_proj``). Each expert's matrix is its own
linear map, so its statistic sums over its own inputs only:

.. math:: \|X_{e,j}\|_2^2 = \sum_{t \in T_e} x_{tj}^2 \ \text{(``gate_up_proj[e]``)}, \qquad
          \|H_{e,j}\|_2^2 = \sum_{t \in T_e} h_{tj}^2 \ \text{(``down_proj[e]``)}.

A token routed to :math:`k` experts counts once in each. The routing weights multiply
:math:`y_t` after ``down_proj`` and so do not enter either statistic. One forward pre-hook on the
experts module reads its inputs (``hidden_states, top_k_index, ...``: the calling convention of
transformers' experts kernels) and recomputes :math:`h_t` from the parameters the model is
evaluated at. The results broadcast against the parameter: ``(experts, 1, in)``, or
``(experts, in, 1)`` for a transposed class.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._common.linear_maps import is_hf_experts, weight_matrices

__all__ = ["ExpertInputs", "expert_input_sums", "is_expert_matrix", "register_expert_hooks"]


class ExpertInputs(NamedTuple):
    r"""What one call of an experts module adds to one of its matrices' statistic.

    Attributes:
        sq_sums: :math:`\sum_{t \in T_e} x_{tj}^2` for every expert, shaped to broadcast against
            the parameter (``(experts, 1, in)``; ``(experts, in, 1)`` for a transposed class).
        rows: :math:`|T_e|`, the number of (counted) tokens routed to each expert, ``(experts,)``:
            the divisor of a mean per expert.
    """

    sq_sums: Tensor
    rows: Tensor


def is_expert_matrix(model: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` is a fused experts matrix of ``model``."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    matrix = weight_matrices(module).get(attribute)
    return matrix is not None and matrix.expert_axis is not None


def register_expert_hooks(
    model: nn.Module, names: Iterable[str], sums: dict[str, Tensor], dtype: torch.dtype
) -> list[RemovableHandle]:
    """Hooks that add each expert matrix's statistic of one forward pass to ``sums[name]``.

    ``names`` are expert matrices (:func:`is_expert_matrix`); one hook per experts module.
    """
    by_module: dict[str, list[str]] = {}
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        by_module.setdefault(module_name, []).append(attribute)
    handles = []
    try:
        for module_name, attributes in by_module.items():
            module = model.get_submodule(module_name)
            assert is_hf_experts(module)
            prefix = f"{module_name}." if module_name else ""

            def hook(
                module: nn.Module,
                args: tuple,
                kwargs: dict,
                prefix: str = prefix,
                attributes: list[str] = attributes,
            ) -> None:
                found = expert_input_sums(module, args, kwargs, attributes, dtype)
                for attribute, value in found.items():
                    key = prefix + attribute
                    total = value.sq_sums
                    sums[key] = total if key not in sums else sums[key] + total

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def expert_input_sums(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    attributes: Iterable[str],
    dtype: torch.dtype,
    counted: Tensor | None = None,
) -> dict[str, ExpertInputs]:
    """Each requested matrix's :class:`ExpertInputs` for one call of the experts module.

    Args:
        module: a fused experts module (:func:`~lossprune._common.linear_maps.is_hf_experts`).
        args: the positional arguments of its call (as a forward pre-hook receives them).
        kwargs: its keyword arguments.
        attributes: ``"gate_up_proj"``/``"up_proj"`` and/or ``"down_proj"``.
        dtype: the dtype to square and sum in.
        counted: ``bool`` per token of the batch (e.g. not padding), any shape with one entry
            per row of ``hidden_states``; ``None``: every token counts.

    Raises:
        TypeError: a call that does not follow transformers' experts convention, or a
            ``counted`` that is not one entry per token.
    """
    hidden, index = _routing(module, args, kwargs)
    if counted is not None:
        if counted.numel() != hidden.shape[0]:
            raise TypeError(
                f"input_sq_norms: {counted.numel()} counted positions for the "
                f"{hidden.shape[0]} tokens of {type(module).__name__}"
            )
        keep = counted.reshape(-1).to(device=hidden.device, dtype=torch.bool)
        hidden, index = hidden[keep], index[keep]
    first_name = "gate_up_proj" if module.has_gate else "up_proj"
    first: Tensor = getattr(module, first_name)
    experts = first.shape[0]
    # routed[t, e]: token t is sent to expert e (indices >= experts are expert-parallel padding).
    routed = torch.zeros(hidden.shape[0], experts + 1, dtype=torch.bool, device=hidden.device)
    routed.scatter_(1, index.clamp(max=experts), True)
    routed = routed[:, :experts]
    rows = routed.sum(0)
    shape = (experts, -1, 1) if module.is_transposed else (experts, 1, -1)
    found = {}
    for attribute in attributes:
        if attribute == first_name:  # Σ over each T_e of x², one matrix product
            per_expert = routed.to(dtype).T @ hidden.to(dtype).square()
        else:  # down_proj: its inputs are the gated hidden units h_t
            per_expert = _hidden_statistic(module, hidden, routed, first, dtype)
        found[attribute] = ExpertInputs(per_expert.reshape(shape), rows)
    return found


def _hidden_statistic(
    module: nn.Module, hidden: Tensor, routed: Tensor, first: Tensor, dtype: torch.dtype
) -> Tensor:
    r""":math:`\sum_{t \in T_e} h_{tj}^2` for every expert, ``(experts, intermediate)``."""
    bias = getattr(module, f"{'gate_up_proj' if module.has_gate else 'up_proj'}_bias", None)
    rows = []
    for expert in range(first.shape[0]):
        tokens = hidden[routed[:, expert]]
        matrix = first[expert] if module.is_transposed else first[expert].T  # (in, out)
        projected = tokens @ matrix
        if module.has_bias and bias is not None:
            projected = projected + bias[expert]
        gate = module._apply_gate if module.has_gate else module.act_fn
        gated = gate(projected)  # type: ignore[operator]
        rows.append(gated.to(dtype).square().sum(0))
    return torch.stack(rows)


def _routing(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """The experts module's ``hidden_states`` (tokens, hidden) and ``top_k_index`` (tokens, k).

    Raises:
        TypeError: a call that does not follow transformers' experts convention.
    """
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    values = list(bound.arguments.values())
    hidden, index = (values + [None, None])[:2]
    if (
        not isinstance(hidden, Tensor)
        or not isinstance(index, Tensor)
        or index.is_floating_point()
        or index.numel() % max(1, hidden.numel() // hidden.shape[-1])
    ):
        raise TypeError(
            f"input_sq_norms: {type(module).__name__} was not called as (hidden_states, "
            "top_k_index, ...), so the tokens routed to each expert are unknown; use a "
            "criterion without input statistics (e.g. Magnitude) for its experts"
        )
    tokens = hidden.reshape(-1, hidden.shape[-1])
    return tokens, index.reshape(tokens.shape[0], -1).long()
