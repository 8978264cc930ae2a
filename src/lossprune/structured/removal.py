r"""Physical removal: the smaller model, with shapes, counts and the Hugging Face config updated.

:func:`remove` keeps, along each axis a group set cuts, the entries of the groups that stay
(:func:`~.groups.kept_positions`), replaces each affected parameter and buffer by the smaller
tensor, and brings every count in line with the new shapes: ``in_features``/``out_features``,
``in_channels``/``out_channels`` (and ``groups`` of a depthwise convolution), ``num_features``
of a batch norm, ``nf`` of Hugging Face's ``Conv1D``, the head and expert counts a module's
``forward`` reads (:class:`~.groups.AttributeUpdate`), and the model's config.

Without a refit the smaller model computes exactly what the masked dense model computes
(:func:`~.groups.masked_state`; tested in float64 to 1e-10).

Hugging Face config (``hf_config=``):

* ``"update"`` (default): the config fields that count the units (``intermediate_size``,
  ``num_attention_heads``/``num_key_value_heads``/``head_dim``, ``n_inner``, ``ffn_dim``, the
  expert count) are set to the new sizes, so ``save_pretrained`` + ``from_pretrained`` reload the
  model with no custom code. That needs the same number of units left in every layer, and a
  config that can express it (GPT-2, OPT and BERT derive ``head_dim`` from
  ``hidden_size / num_attention_heads``, so they cannot express fewer heads; Llama's config
  refuses a ``hidden_size`` that is not a multiple of ``num_attention_heads``). Otherwise
  ``ValueError`` before anything changes, naming the other route.
* ``"record"``: the config keeps its sizes and records the removal
  (``config.lossprune_removed``: the kinds and removed group indices, in order); reload with
  :func:`~lossprune.structured.load_removed`, which builds the dense skeleton from the config,
  replays the removals and loads the weights. This is the route for non-uniform removal.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .._common.linear_maps import is_hf_conv1d
from ._transformer_groups import transformer_groups
from .groups import GroupSet, check_removed, kept_positions

__all__ = ["remove", "parameter_count", "RECORD_KEY"]

#: The config attribute where ``hf_config="record"`` keeps the removals, in order.
RECORD_KEY = "lossprune_removed"

_HF_CONFIG_MODES = ("update", "record")


class _Plan(NamedTuple):
    tensors: dict[str, Tensor]  # name -> smaller tensor
    attributes: dict[tuple[str, str], int]  # (module, attribute) -> new value
    config: dict[str, Any]  # field -> new value (or the record)


def remove(
    model: nn.Module,
    groups: Sequence[GroupSet],
    removed: Mapping[str, Iterable[int]],
    *,
    inplace: bool = False,
    hf_config: str = "update",
) -> nn.Module:
    """Remove groups physically: a smaller dense model.

    Args:
        model: the model the ``groups`` were found in (:func:`~lossprune.structured.find_groups`).
        groups: its group sets.
        removed: group-set name to the indices of the groups to remove (a name left out
            removes nothing there).
        inplace: modify ``model`` itself; by default a deep copy is modified and returned.
        hf_config: ``"update"`` or ``"record"`` (module docstring); ignored for a model
            without a Hugging Face config.

    Returns:
        The smaller model (``model`` itself when ``inplace``). Its changed parameters are new
        :class:`~torch.nn.Parameter` objects: create optimizers after removing.

    Raises:
        ValueError: an unknown group set or index, a set emptied, an ``hf_config`` the config
            cannot honour, or fewer experts left than the router picks per token.
        TypeError: a removed index that is not an int; a cut tensor that is shared (tied)
            with another name.

    Nothing is modified when an error is raised.
    """
    if hf_config not in _HF_CONFIG_MODES:
        raise ValueError(f"hf_config must be one of {_HF_CONFIG_MODES}, got {hf_config!r}")
    checked = {k: v for k, v in check_removed(groups, removed).items() if v}
    plan = _plan(model, groups, checked, hf_config)
    target = model if inplace else copy.deepcopy(model)
    _apply(target, plan)
    return target


def _plan(
    model: nn.Module,
    groups: Sequence[GroupSet],
    removed: dict[str, tuple[int, ...]],
    hf_config: str,
) -> _Plan:
    """Every new tensor, count and config field, computed before anything changes."""
    _check_untied(model, groups, removed)
    tensors: dict[str, Tensor] = dict(model.named_buffers())
    tensors.update(model.named_parameters())
    new: dict[str, Tensor] = {}
    for (name, axis), kept in kept_positions(model, groups, removed).items():
        source = new.get(name, tensors[name].detach())
        new[name] = source.index_select(axis, kept.to(source.device))
    attributes: dict[tuple[str, str], int] = {}
    for group_set in groups:
        kept_count = group_set.size - len(removed.get(group_set.name, ()))
        for update in group_set.attributes:
            attributes[(update.module, update.attribute)] = update.per_group * kept_count
        if group_set.kind == "experts":
            _check_top_k(model, group_set, kept_count)
    config = _config_plan(model, groups, removed, hf_config)
    if config and RECORD_KEY not in config:
        _check_rebuilt_shapes(model, config, new)
    return _Plan(new, attributes, config)


def _check_rebuilt_shapes(model: nn.Module, fields: dict[str, Any], new: dict[str, Tensor]) -> None:
    """The model class built from the updated config has the removed model's shapes.

    That is what ``from_pretrained`` builds before it loads the saved weights. A module that
    derives a size from other fields than the ones updated (StableLM's head size is
    ``hidden_size / num_attention_heads`` whatever ``head_dim`` says) would otherwise save a
    folder that does not reload. Built on the meta device: no memory, no initialisation cost.

    Raises:
        ValueError: naming the first tensor of another shape, and the recorded route.
    """
    trial = copy.deepcopy(model.config)
    for key, value in fields.items():
        setattr(trial, key, value)
    try:
        with torch.device("meta"):
            rebuilt = type(model)(trial)
    except TypeError:  # a class not built from its config alone: nothing to compare with
        return
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    for name, tensor in new.items():
        if name in shapes and shapes[name] != tensor.shape:
            raise ValueError(
                f"remove: {type(model).__name__} built from the updated config {fields} has "
                f"{name!r} of shape {tuple(shapes[name])}, not the removed "
                f"{tuple(tensor.shape)} (it derives that size from other fields), so the saved "
                "model would not reload; pass hf_config='record' and reload with "
                "lossprune.structured.load_removed"
            )


def _check_untied(
    model: nn.Module, groups: Sequence[GroupSet], removed: dict[str, tuple[int, ...]]
) -> None:
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    for group_set in groups:
        if group_set.name not in removed:
            continue
        for piece in group_set.slices:
            if piece.tensor in params and len(names_of[id(params[piece.tensor])]) > 1:
                raise TypeError(
                    f"remove: {piece.tensor!r} is tied to {names_of[id(params[piece.tensor])]}; "
                    "cutting it would cut the others too. Untie the weights first"
                )


def _check_top_k(model: nn.Module, group_set: GroupSet, kept: int) -> None:
    router = model.get_submodule(f"{group_set.name}.gate")
    top_k = getattr(router, "top_k", None)
    if isinstance(top_k, int) and kept < top_k:
        raise ValueError(
            f"remove: {group_set.name!r} would keep {kept} experts but its router picks "
            f"{top_k} per token; keep at least {top_k}"
        )


def _config_plan(
    model: nn.Module,
    groups: Sequence[GroupSet],
    removed: dict[str, tuple[int, ...]],
    hf_config: str,
) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not removed:
        return {}
    if hf_config == "record":
        step = {
            "kinds": sorted({g.kind for g in groups}),
            "removed": {k: list(v) for k, v in removed.items()},
        }
        return {RECORD_KEY: [*(getattr(config, RECORD_KEY, None) or []), step]}
    if getattr(config, RECORD_KEY, None):
        raise ValueError(
            "remove: this model's config already records a removal (hf_config='record'); "
            "record the later ones too (hf_config='record')"
        )
    given = {g.name: g for g in groups}
    kinds = {g.kind for g in groups if g.name in removed}
    # Every group set of the kinds removed, so that layers not passed in count as kept whole.
    every = [
        given.get(g.name, g) for kind in sorted(kinds) for g in transformer_groups(model, kind)
    ]
    fields: dict[str, set[int]] = {}
    for group_set in every:
        kept = group_set.size - len(removed.get(group_set.name, ()))
        if group_set.kind not in kinds:
            continue
        if not group_set.config:
            if group_set.name in removed:
                raise ValueError(
                    f"remove: the Hugging Face config cannot express removing {group_set.kind} "
                    f"of {group_set.name!r} ({group_set.note}); pass hf_config='record' and "
                    "reload with lossprune.structured.load_removed"
                )
            continue
        for update in group_set.config:
            value = update.value if update.per_group == 0 else update.per_group * kept
            assert value is not None
            fields.setdefault(update.key, set()).add(value)
    uneven = {k: sorted(v) for k, v in fields.items() if len(v) > 1}
    if uneven:
        raise ValueError(
            f"remove: a Hugging Face config holds one size for every layer, but this removal "
            f"leaves {uneven}; remove the same number in every layer, or pass "
            "hf_config='record' and reload with lossprune.structured.load_removed"
        )
    new = {k: v.pop() for k, v in fields.items()}
    _check_config(config, new)
    return new


def _check_config(config: Any, fields: dict[str, Any]) -> None:
    """The config with ``fields`` passes its own validation (on a copy)."""
    trial = copy.deepcopy(config)
    for key, value in fields.items():
        setattr(trial, key, value)
    validate = getattr(trial, "validate", None)
    try:
        if callable(validate):
            validate()
    except Exception as error:  # transformers raises its own validation error types
        raise ValueError(
            f"remove: the Hugging Face config refuses {fields} ({error}); choose a count it "
            "accepts (e.g. heads that divide hidden_size), or pass hf_config='record' and "
            "reload with lossprune.structured.load_removed"
        ) from error


def _apply(model: nn.Module, plan: _Plan) -> None:
    touched = set()
    for name, value in plan.tensors.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attribute in module._parameters:
            old = module._parameters[attribute]
            assert old is not None
            module._parameters[attribute] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            module._buffers[attribute] = value
        touched.add(module_name)
    for module_name in touched:
        _sync_sizes(model.get_submodule(module_name))
    for (module_name, attribute), count in plan.attributes.items():
        setattr(model.get_submodule(module_name), attribute, count)
    config = getattr(model, "config", None)
    for key, value in plan.config.items():
        setattr(config, key, value)


def _sync_sizes(module: nn.Module) -> None:
    """The size attributes of standard modules, from their (new) parameter shapes."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _ConvNd) and not module.transposed:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        reference = weight if isinstance(weight, Tensor) else module.running_mean
        assert reference is not None
        module.num_features = reference.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
    elif is_hf_conv1d(module) and isinstance(weight, Tensor):
        setattr(module, "nf", weight.shape[1])  # noqa: B010 (Conv1D is not typed here)


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())
