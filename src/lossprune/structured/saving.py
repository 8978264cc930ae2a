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

It builds the DENSE model from the saved config (``from_config``: random weights, never
downloaded), replays the recorded removals in order (:func:`~.find.find_groups` finds the same
group sets, since the skeleton has the same modules), and loads the saved weights, which must
then match every shape exactly. ``from_pretrained`` on such a folder fails loudly with a shape
mismatch (it never loads silently wrong).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .find import find_groups
from .removal import RECORD_KEY, remove

__all__ = ["load_removed"]


def load_removed(auto_class: Any, path: str | Path, **config_kwargs: Any) -> nn.Module:
    """Reload a model saved after ``remove(..., hf_config="record")`` (module docstring).

    Args:
        auto_class: a Hugging Face class with ``from_config`` (``AutoModelForCausalLM``,
            ``LlamaForCausalLM``...).
        path: the folder ``save_pretrained`` wrote.
        config_kwargs: passed to ``AutoConfig.from_pretrained``.

    Returns:
        The smaller model, in eval mode, in the dtype of the saved weights.

    Raises:
        ValueError: the folder's config records no removal, or the saved weights do not match
            the replayed model (a missing or unexpected tensor, or a different shape).
    """
    import safetensors.torch
    import transformers

    folder = Path(path)
    config = transformers.AutoConfig.from_pretrained(folder, **config_kwargs)
    steps = getattr(config, RECORD_KEY, None)
    if not steps:
        raise ValueError(
            f"load_removed: {folder} records no removal ({RECORD_KEY} is missing from its "
            "config); load it with from_pretrained"
        )
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(file))
    setattr(config, RECORD_KEY, None)
    model = auto_class.from_config(config)
    for step in steps:
        groups = find_groups(model, step["kinds"])
        model = remove(model, groups, step["removed"], inplace=True, hf_config="record")
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:
        model = model.to(floating[0])
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    tied = _tied_names(model, set(state))
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise ValueError(
            f"load_removed: the weights in {folder} do not match the replayed removal "
            f"(shapes differ: {wrong[:3]}, missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def _tied_names(model: nn.Module, loaded: set[str]) -> set[str]:
    """Names of parameters that share their tensor with a loaded one (tied weights)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {
        name
        for names in by_tensor.values()
        if len(names) > 1 and any(n in loaded for n in names)
        for name in names
    }
