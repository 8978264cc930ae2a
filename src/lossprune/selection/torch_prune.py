"""Masks to and from the ``weight_orig`` / ``weight_mask`` form of :mod:`torch.nn.utils.prune`."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from .masks import describe_value

__all__ = ["to_torch_prune", "from_torch_prune"]


def to_torch_prune(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Attach ``masks`` to ``model`` in :mod:`torch.nn.utils.prune` form.

    For each name ``"a.b.weight"``, :func:`torch.nn.utils.prune.custom_from_mask` is applied to
    module ``a.b``: the parameter becomes ``weight_orig``, the mask the buffer ``weight_mask``, and
    ``weight`` is recomputed as their product before every forward pass. This changes the
    model's ``state_dict`` keys; :func:`from_torch_prune` goes back.

    A tied weight is masked in EVERY module that holds it (``torch.nn.utils.prune`` works per
    module: masking only the one the name points to would let the others use the unmasked
    weight); they share one ``weight_orig`` and each gets its own copy of the mask.

    Args:
        model: The network.
        masks: Qualified parameter name to ``bool`` mask (``True`` = kept).

    Raises:
        TypeError: A mask is not a bool tensor.
        ValueError: A name does not lead to a parameter of ``model`` or the shapes differ.
    """
    targets = []
    for name, mask in masks.items():
        module, attribute, param = _owner(model, name)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor, got {describe_value(mask)}")
        if mask.shape != param.shape:
            raise ValueError(
                f"masks[{name!r}] has shape {tuple(mask.shape)} but the parameter has shape "
                f"{tuple(param.shape)}"
            )
        targets += [(m, a, mask.to(param.device)) for m, a in _holders(model, param)]
    for module, attribute, mask in targets:
        prune.custom_from_mask(module, attribute, mask)


def from_torch_prune(model: nn.Module, *, remove: bool = False) -> dict[str, Tensor]:
    """Read the masks of a model pruned with :mod:`torch.nn.utils.prune`.

    Args:
        model: A network whose modules carry ``torch.nn.utils.prune`` pre-hooks
            (``weight_orig`` / ``weight_mask``).
        remove: Also make the pruning permanent with :func:`torch.nn.utils.prune.remove`: plain
            parameters come back, with the pruned entries already zero.

    Returns:
        Qualified name of each pruned parameter (``"a.b.weight"``) to its ``bool`` mask
        (``True`` = kept), in ``model.named_modules()`` order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    masks = {}
    pruned = []
    first_name: dict[int, str] = {}  # a tied weight masked in several modules is reported once
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                attribute = hook._tensor_name
                pruned.append((module, attribute))
                name = f"{module_name}.{attribute}" if module_name else attribute
                # `!= 0` makes a new tensor, so the mask outlives the buffer prune.remove deletes.
                mask = getattr(module, attribute + "_mask") != 0
                original = id(module._parameters[attribute + "_orig"])
                if original not in first_name:
                    first_name[original] = name
                    masks[name] = mask
                elif not torch.equal(masks[first_name[original]], mask):
                    raise ValueError(
                        f"{name!r} and {first_name[original]!r} are one tied weight with two "
                        "different torch.nn.utils.prune masks: no single mask describes it"
                    )
    if remove:
        for module, attribute in pruned:
            prune.remove(module, attribute)
    return masks


def _holders(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every ``(module, attribute)`` that holds ``param`` itself (all aliases of a tied weight)."""
    return [
        (module, attribute)
        for module in {id(m): m for m in model.modules()}.values()
        for attribute, p in module._parameters.items()
        if p is param
    ]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Parameter]:
    """The module holding parameter ``name``, its attribute name there, and the parameter."""
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    param = None if module is None else module._parameters.get(attribute)
    if module is None or not isinstance(param, nn.Parameter):
        raise ValueError(f"{name!r} is not a parameter of the model")
    return module, attribute, param
