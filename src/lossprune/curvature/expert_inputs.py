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

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._common.linear_maps import is_hf_experts, weight_matrices

__all__ = ["is_expert_matrix", "register_expert_hooks"]


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
                for attribute, value in _statistics(module, args, kwargs, attributes, dtype):
                    key = prefix + attribute
                    sums[key] = value if key not in sums else sums[key] + value

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _statistics(
    module: nn.Module, args: tuple, kwargs: dict, attributes: list[str], dtype: torch.dtype
) -> Iterable[tuple[str, Tensor]]:
    """(attribute, statistic) of each requested matrix for one call of the experts module."""
    hidden, index = _routing(module, args, kwargs)
    first_name = "gate_up_proj" if module.has_gate else "up_proj"
    first: Tensor = getattr(module, first_name)
    experts = first.shape[0]
    # routed[t, e]: token t is sent to expert e (indices >= experts are expert-parallel padding).
    routed = torch.zeros(hidden.shape[0], experts + 1, dtype=torch.bool, device=hidden.device)
    routed.scatter_(1, index.clamp(max=experts), True)
    routed = routed[:, :experts]
    squares = hidden.to(dtype).square()
    shape = (experts, -1, 1) if module.is_transposed else (experts, 1, -1)
    for attribute in attributes:
        if attribute == first_name:
            per_expert = routed.to(dtype).T @ squares  # (experts, in): Σ over each T_e
            yield attribute, per_expert.reshape(shape)
        else:  # down_proj: its inputs are the gated hidden units h_t
            yield attribute, _hidden_statistic(module, hidden, routed, first, dtype).reshape(shape)


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
