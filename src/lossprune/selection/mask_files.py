r"""Masks that live with the model: read from its zeros, saved beside its weights, loaded back.

A pruned model carries its masks twice: in its zeros (what ``save_pretrained`` and
``torch.save(model.state_dict())`` keep) and in the pruner's ``bool`` masks. The zeros are what a
fresh :class:`~lossprune.Pruner` adopts (:func:`masks_from_zeros`); a mask file keeps the masks
themselves, so that a process that only has the saved model can fine-tune it with every pruned
weight held at zero (:func:`~lossprune.selection.keep_pruned_at_zero`,
:class:`lossprune.integrations.hf.PruningCallback`) and no new weight counted as pruned.

The file is `safetensors <https://huggingface.co/docs/safetensors>`_: one ``bool`` tensor per
pruned parameter (``True`` = kept), keyed by its qualified name, written beside the files of
``save_pretrained`` as ``lossprune_masks.safetensors``, with string metadata (``format``,
``version``, ``pruned``, ``total``). compressed-tensors' sparsity configuration was considered:
it records a model's global sparsity, structure and target/ignored layers, not which weights are
pruned, and its bitmask format stores the zeros inside compressed weights that only
compressed-tensors reads back; a plain safetensors file of masks is read by any tool. In a
``torch.save`` checkpoint, masks are a plain ``dict`` of ``bool`` tensors
(``torch.load(..., weights_only=True)`` reads them) and every function here takes one too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .masks import count_pruned, describe_value
from .prunable import prunable_parameters

__all__ = ["MASKS_FILE", "masks_from_zeros", "save_masks", "load_masks", "resolve_masks"]

#: The mask file's name inside a ``save_pretrained`` directory.
MASKS_FILE = "lossprune_masks.safetensors"
_FORMAT = "lossprune.masks"
_VERSION = "1"

PathLike = str | os.PathLike


def masks_from_zeros(
    model: nn.Module, include: Any = None, exclude: Any = None
) -> dict[str, Tensor]:
    """The prunable weights' nonzero pattern: ``True`` where a weight is not exactly zero.

    These are the masks a :class:`~lossprune.Pruner` starts from (its ``adopt_zeros=True``):
    the zeros a model already has count as pruned.

    Args:
        model: the network.
        include: as for :func:`~lossprune.selection.prunable_parameters`.
        exclude: as for :func:`~lossprune.selection.prunable_parameters`.

    Returns:
        Qualified name to ``bool`` mask, on each parameter's device.

    Example:
        >>> layer = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        >>> masks_from_zeros(layer)["weight"]
        tensor([[False,  True],
                [ True, False]])
    """
    return {k: p.detach() != 0 for k, p in prunable_parameters(model, include, exclude).items()}


def save_masks(masks: Mapping[str, Tensor], path: PathLike) -> Path:
    """Write ``masks`` to a safetensors file; returns the file's path.

    Args:
        masks: qualified name to ``bool`` mask (``True`` = kept), e.g. ``pruner.masks``.
        path: a directory (created if missing), typically the one ``save_pretrained`` wrote:
            the file is ``<path>/lossprune_masks.safetensors``; or a file name ending in
            ``.safetensors``.

    Raises:
        TypeError: ``masks`` is not a dict of ``bool`` tensors.
        ValueError: ``masks`` is empty.
    """
    _check_masks(masks, "masks")
    from safetensors.torch import save_file

    target = _mask_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: m.detach().to("cpu").contiguous() for k, m in masks.items()}
    metadata = {
        "format": _FORMAT,
        "version": _VERSION,
        "convention": "True = kept, False = pruned",
        "pruned": str(count_pruned(tensors)),
        "total": str(sum(m.numel() for m in tensors.values())),
    }
    save_file(tensors, str(target), metadata=metadata)
    return target


def load_masks(path: PathLike, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Read masks written by :func:`save_masks`; with ``model``, checked against it.

    Args:
        path: the mask file, or the directory holding ``lossprune_masks.safetensors``.
        model: if given, every mask must name a parameter of it (a tied weight by any of its
            names) with the same shape; the masks are then keyed by the names
            ``named_parameters()`` gives and moved to the parameters' devices.

    Returns:
        Qualified name to ``bool`` mask.

    Raises:
        FileNotFoundError: no mask file at ``path``.
        ValueError: a file that :func:`save_masks` did not write, or masks that do not fit
            ``model``.
    """
    from safetensors import safe_open

    source = _mask_file(path)
    if not source.is_file():
        raise FileNotFoundError(
            f"no mask file at {str(source)!r}: save one with lossprune.selection.save_masks "
            "(or pruner.save_masks) beside save_pretrained"
        )
    with safe_open(str(source), framework="pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{str(source)!r} is not a lossprune mask file (its metadata has format "
                f"{metadata.get('format')!r}, not {_FORMAT!r})"
            )
        masks = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    _check_masks(masks, str(source))
    return masks if model is None else resolve_masks(model, masks)


def resolve_masks(model: nn.Module, masks: Mapping[str, Tensor] | PathLike) -> dict[str, Tensor]:
    """``masks`` (a dict or a mask file) keyed by ``model``'s parameter names, on their devices.

    Raises:
        TypeError: ``masks`` is neither a dict of ``bool`` tensors nor a path.
        ValueError: a mask names no parameter of ``model``, or has another shape.
    """
    if isinstance(masks, str | os.PathLike):
        return load_masks(masks, model)
    _check_masks(masks, "masks")
    canonical: dict[int, str] = {}
    by_name: dict[str, nn.Parameter] = {}
    for alias, shared in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(shared), alias)
        by_name[alias] = shared
    resolved = {}
    for name, mask in masks.items():
        param = by_name.get(name)
        if param is None:
            raise ValueError(f"the mask {name!r} names no parameter of the model")
        if mask.shape != param.shape:
            raise ValueError(
                f"the mask {name!r} has shape {tuple(mask.shape)}, the parameter "
                f"{tuple(param.shape)}"
            )
        resolved[canonical[id(param)]] = mask.to(param.device)
    return resolved


def _mask_file(path: PathLike) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / MASKS_FILE


def _check_masks(masks: object, what: str) -> None:
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what} must be a dict of bool tensors, got {type(masks).__name__}")
    if not masks:
        raise ValueError(f"{what} holds no mask")
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{what}[{name!r}] must be a bool tensor, got {describe_value(mask)}")
