"""Finding the group sets of a model: heads, neurons and experts by layout, channels by tracing."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from ._transformer_groups import transformer_groups
from .groups import KINDS, GroupSet
from .tracing import trace_channels

__all__ = ["find_groups"]


def find_groups(
    model: nn.Module,
    kinds: str | Iterable[str],
    *,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
) -> list[GroupSet]:
    """The group sets of ``model`` of the given kinds, in module order within each kind.

    * ``"heads"`` — attention heads (a key/value group with its query heads under grouped-query
      attention) of Llama-like (``q/k/v/o_proj``; Qwen2/3, Mistral, Mixtral...), OPT, GPT-2 and
      BERT attention modules;
    * ``"neurons"`` — MLP intermediate neurons (``gate/up/down_proj``; GPT-2's ``c_fc/c_proj``;
      OPT's ``fc1/fc2``; BERT's ``intermediate/output``);
    * ``"experts"`` — whole experts of a mixture-of-experts block (``gate`` router +
      ``experts`` with one slice per expert), with their router rows;
    * ``"channels"`` — output channels of convolutions and linear maps with everything coupled
      to them, found by tracing (:func:`~lossprune.structured.tracing.trace_channels`; needs
      ``example_inputs``).

    Args:
        model: the network (not modified).
        kinds: one kind or several.
        example_inputs: inputs of one forward pass (``"channels"`` only).

    Raises:
        ValueError: an unknown kind, ``"channels"`` without ``example_inputs``, or a kind
            asked for of which the model has no removable group set.
        TypeError: a layout whose shapes contradict it, or a model that cannot be traced.
    """
    wanted = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in wanted if k not in KINDS]
    if unknown or not wanted:
        raise ValueError(f"find_groups: kinds must be among {KINDS}, got {kinds!r}")
    found: list[GroupSet] = []
    for kind in KINDS:
        if kind not in wanted:
            continue
        if kind == "channels":
            if example_inputs is None:
                raise ValueError(
                    "find_groups: channels are found by tracing; pass example_inputs= (one batch)"
                )
            trace = trace_channels(model, example_inputs)
            these = trace.groups
            why = "; ".join(f"{k}: {v}" for k, v in list(trace.blocked.items())[:3])
        else:
            these = list(transformer_groups(model, kind))
            why = "no module has a supported layout (see lossprune.structured.find_groups)"
            if kind == "heads" and _uses_alibi(model):
                why = (
                    "its attention adds ALiBi biases, whose slopes the model computes from its "
                    "head count: the kept heads would get other slopes"
                )
        if not these:
            raise ValueError(f"find_groups: {type(model).__name__} has no removable {kind} ({why})")
        found += these
    return found


def _uses_alibi(model: nn.Module) -> bool:
    """Whether a Hugging Face model biases its attention by ALiBi.

    BLOOM always does; MPT and Falcon when their config says so.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "bloom":
        return True
    attention = getattr(config, "attn_config", None)  # MPT's
    return bool(getattr(config, "alibi", False) or getattr(attention, "alibi", False))
