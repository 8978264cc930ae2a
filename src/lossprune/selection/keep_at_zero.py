"""Keeping pruned weights exactly zero while an optimizer trains the model.

The one implementation used by :meth:`lossprune.Pruner.attach` and by the reproduction's
fine-tuning loop. Pruned entries are overwritten with :meth:`torch.Tensor.masked_fill`, never
multiplied by the mask: a non-finite gradient entry times 0 is NaN, and one NaN gradient of a
pruned weight would spread to every weight through ``clip_grad_norm_``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .mask_files import resolve_masks
from .masks import apply_masks, check_masks_fit

__all__ = ["MaskHandle", "keep_pruned_at_zero", "unwrap_optimizer"]

Masks = Mapping[str, Tensor]


class MaskHandle:
    """Returned by :func:`keep_pruned_at_zero`; ``remove()`` detaches its hooks."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Detach the hooks that keep pruned weights at zero; calling it again does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The innermost :class:`torch.optim.Optimizer` of a wrapper such as Accelerate's.

    ``accelerate.optimizer.AcceleratedOptimizer`` (and similar wrappers) keep the real optimizer
    in ``.optimizer`` and call its ``step``; hooks registered on the wrapper itself would never
    run.

    Raises:
        TypeError: neither an optimizer nor a wrapper of one.
    """
    inner = optimizer
    for _ in range(16):  # wrappers of wrappers, but never an endless chain
        wrapped = getattr(inner, "optimizer", None)
        if not isinstance(wrapped, torch.optim.Optimizer):
            break
        inner = wrapped
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer or a wrapper holding one in .optimizer, "
            f"got {type(optimizer).__name__}"
        )
    return inner


def keep_pruned_at_zero(
    optimizer: object,
    params: Mapping[str, Tensor] | nn.Module,
    masks: Masks | Callable[[], Masks] | str | os.PathLike,
) -> MaskHandle:
    """Keep the pruned entries of ``params`` exactly zero while ``optimizer`` trains them.

    The weights are zeroed now; the gradients of pruned entries are zeroed as they are computed
    (so momentum buffers never pick them up) and the weights are re-zeroed after every
    ``optimizer.step()`` (so weight decay, Adam's moments or earlier momentum cannot move them).

    Without a pruner, e.g. in a process that reloaded a pruned model::

        model = AutoModelForCausalLM.from_pretrained("pruned/")
        keep_pruned_at_zero(optimizer, model, "pruned/")  # its lossprune_masks.safetensors

    Args:
        optimizer: a :class:`torch.optim.Optimizer` or a wrapper of one (see
            :func:`unwrap_optimizer`).
        params: parameters by qualified name, or the model (then the masks name its
            parameters; a tied weight by any of its names).
        masks: ``bool`` masks by name (``True`` = kept), a mask file or the directory holding
            one (:func:`~lossprune.selection.save_masks`), or a function returning the current
            masks, read at every hook call (so that later pruning stages are covered too).

    Returns:
        A handle whose ``remove()`` detaches the hooks. If registering fails, the hooks
        registered so far are removed before the error propagates.

    Raises:
        TypeError: for a wrong optimizer or mask type; ValueError: for a mask that names no
            parameter or has another shape (both before any hook or weight changes).
    """
    inner = unwrap_optimizer(optimizer)
    if isinstance(params, nn.Module):
        if callable(masks):
            raise TypeError("with a model as params, masks must be a dict or a mask file")
        masks = resolve_masks(params, masks)
        named = dict(params.named_parameters())
        params = {k: named[k] for k in masks}
    elif isinstance(masks, str | os.PathLike):
        raise TypeError("a mask file needs the model: keep_pruned_at_zero(optimizer, model, path)")
    if callable(masks):
        current = masks
        check_masks_fit(params, current())
    else:
        check_masks_fit(params, masks)
        fixed = {k: m.to(params[k].device) for k, m in masks.items()}  # moved once, not per step
        current = lambda: fixed  # noqa: E731
    handles: list[Any] = []
    try:
        for name, param in params.items():
            if param.requires_grad:
                handles.append(param.register_hook(_gradient_masker(current, name)))
        handles.append(inner.register_step_post_hook(lambda *_: apply_masks(params, current())))
    except BaseException:
        MaskHandle(handles).remove()
        raise
    apply_masks(params, current())
    return MaskHandle(handles)


def _gradient_masker(masks: Callable[[], Masks], name: str) -> Callable[[Tensor], Tensor]:
    def mask_gradient(grad: Tensor) -> Tensor:
        mask = masks().get(name)
        if mask is None:
            return grad
        return grad.masked_fill(~mask.to(grad.device), 0)

    return mask_gradient
