r"""Reloading a model whose removal its Hugging Face config cannot express.

Uniform removal (the same count left in every layer, a config that can express it) needs
nothing here: :func:`~.removal.remove` updates the config, and ``save_pretrained`` +
``from_pretrained`` reload the smaller model with no custom code.

Any other removal — a different number of heads or neurons per layer, fewer heads in GPT-2, OPT
or BERT (whose configs derive ``head_dim`` from ``hidden_size / num_attention_heads``) — is made
with ``remove(..., hf_config="record")``: the config keeps the dense sizes and records each
removal under ``lossprune_removed`` (the kinds found and the removed group indices). The model
saves as usual (``save_pretrained``); :func:`load_removed` reloads it::

    small = remove(model, groups, removed, hf_config="record")
    small.save_pretrained(path)
    again = load_removed(transformers.AutoModelForCausalLM, path)

It loads with the model class's own ``from_pretrained``, whose skeleton (the DENSE model of
the saved config, built on the meta device) first replays the recorded removals in order
(:func:`~.find.find_groups` finds the same group sets, since the skeleton has the same
modules); the saved weights must then match every shape exactly, and none may be missing or
left over. Going through ``from_pretrained`` keeps transformers' own checkpoint conversions:
``save_pretrained`` writes some models in their legacy layout (GPT-NeoX's head as
``embed_out``, Mixtral's fused experts as one tensor per expert), which ``from_pretrained``
converts back. ``from_pretrained`` alone on such a folder fails loudly with a shape mismatch
(it never loads silently wrong).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .find import find_groups
from .removal import RECORD_KEY, remove

__all__ = ["load_removed"]


def load_removed(auto_class: Any, path: str | Path, **kwargs: Any) -> nn.Module:
    """Reload a model saved after ``remove(..., hf_config="record")`` (module docstring).

    Args:
        auto_class: a Hugging Face class with ``from_config`` (``AutoModelForCausalLM``,
            ``LlamaForCausalLM``...).
        path: the folder ``save_pretrained`` wrote.
        kwargs: passed to ``from_pretrained`` (``attn_implementation``,
            ``experts_implementation``, ``dtype``...).

    Returns:
        The smaller model, in eval mode, in the dtype of the saved weights (unless ``dtype``
        says otherwise).

    Raises:
        ValueError: the folder's config records no removal, or the saved weights do not match
            the replayed model (a missing or unexpected tensor, or a different shape).
    """
    import transformers

    folder = Path(path)
    config = transformers.AutoConfig.from_pretrained(folder)
    steps: list[dict[str, Any]] = getattr(config, RECORD_KEY, None) or []
    if not steps:
        raise ValueError(
            f"load_removed: {folder} records no removal ({RECORD_KEY} is missing from its "
            "config); load it with from_pretrained"
        )
    setattr(config, RECORD_KEY, None)
    native = _model_class(auto_class, config)

    class Replayed(native):  # type: ignore[misc, valid-type]
        """The native class, whose skeleton replays the removals before the weights load."""

        def __init__(self, *args: Any, **init_kwargs: Any) -> None:
            super().__init__(*args, **init_kwargs)
            # The skeleton is built on the meta device; the group indices are not tensors of
            # the model and stay on the CPU.
            with torch.device("cpu"):
                for step in steps:
                    groups = find_groups(self, step["kinds"])
                    remove(self, groups, step["removed"], inplace=True, hf_config="record")

    # Named as the native class and from its module: transformers applies a class's checkpoint
    # conversions only to classes of its own (others are "custom code").
    for attribute in ("__name__", "__qualname__", "__module__"):
        setattr(Replayed, attribute, getattr(native, attribute))
    # Mismatched shapes are reported in ``info`` (and refused below) instead of raised inside
    # transformers with a message that only points at its log.
    model, info = Replayed.from_pretrained(
        folder,
        config=config,
        **{"dtype": "auto", **kwargs},
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    model.__class__ = native  # only __init__ differs: the model is the native class's again
    wrong = [str(entry[0]) for entry in info.get("mismatched_keys", ())]
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    if wrong or missing or unexpected:
        raise ValueError(
            f"load_removed: the weights in {folder} do not match the replayed removal "
            f"(shapes differ: {wrong[:3]}, missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    return model.eval()


def _model_class(auto_class: Any, config: Any) -> type:
    """The class ``auto_class`` builds for ``config`` (itself, for a model class)."""
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is None:
        return cast(type, auto_class)
    return cast(type, mapping[type(config)])
