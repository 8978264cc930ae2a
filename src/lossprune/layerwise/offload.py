"""Only the current block on the compute device: a plain model block by block, or accelerate.

Two ways to hold a model larger than the device:

* a plain model (on the CPU, say) and ``device="cuda"``: each block is moved to the device while
  it is calibrated and pruned (:meth:`torch.nn.Module.to`), then moved back;
* a model dispatched by `accelerate <https://huggingface.co/docs/accelerate>`_
  (``from_pretrained(..., device_map=...)``, :func:`accelerate.dispatch_model`,
  :func:`accelerate.cpu_offload`, :func:`accelerate.disk_offload`): its hooks already bring
  each module's weights to its execution device for the forward pass and drop them afterwards.
  Offloaded weights live in the hook's ``weights_map`` (CPU tensors, or memory-mapped ``.dat``
  files in the offload folder); :func:`read_weight` reads them from there (what the hook would
  load), and :func:`write_weight` writes a pruned weight
  back where accelerate will read it next (in place for CPU tensors; the ``.dat`` file, rewritten
  with :func:`accelerate.utils.offload_weight`, for disk offload), so the weights never all sit
  in memory at once.

accelerate is imported only for a model that carries its hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "check_writable",
    "execution_device",
    "is_dispatched",
    "is_offloaded",
    "on_device",
    "read_weight",
    "write_weight",
]


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks of ``module`` (a ``SequentialHook`` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def is_dispatched(module: nn.Module) -> bool:
    """Whether accelerate's hooks place ``module`` or any of its submodules."""
    return any(_hooks(m) for m in module.modules())


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate holds ``module``'s own weights off the device (in its weights map)."""
    return _offload_hook(module) is not None


def _offload_hook(module: nn.Module) -> Any:
    """The hook holding ``module``'s own weights off the device, or ``None``."""
    for hook in _hooks(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return hook
    return None


def execution_device(module: nn.Module) -> torch.device | None:
    """Where accelerate runs ``module`` (its first hook's execution device), else ``None``."""
    for submodule in module.modules():
        for hook in _hooks(submodule):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return None


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """``block`` runs on ``device`` inside: moved there and back, unless accelerate places it."""
    if is_dispatched(block):
        yield
        return
    first = next(block.parameters(), None)
    home = first.device if first is not None else device
    if home == device:
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def read_weight(module: nn.Module, attribute: str) -> Tensor:
    """The current value of ``module.<attribute>`` (from accelerate's offload when offloaded).

    Raises:
        TypeError: a weight on the meta device that no accelerate hook holds.
    """
    param = module._parameters[attribute]
    assert param is not None
    if param.device.type != "meta":
        return param.detach()
    hook = _offload_hook(module)
    if hook is None:
        raise TypeError(
            f"the weight {attribute!r} of a {type(module).__name__} is on the meta device and no "
            "accelerate hook holds its value: load the model's weights first"
        )
    return hook.weights_map[attribute].detach()


def write_weight(module: nn.Module, attribute: str, value: Tensor) -> None:
    """Set ``module.<attribute>`` to ``value`` wherever the weight lives (module docstring).

    Raises:
        TypeError: an offloaded weight whose store lossprune cannot write
            (:func:`check_writable`), before anything is written.
    """
    param = module._parameters[attribute]
    assert param is not None
    hook = _offload_hook(module)
    with torch.no_grad():
        if hook is not None:
            _writer(hook.weights_map, attribute)(value)
        if param.device.type != "meta":
            param.copy_(value.to(param.device, param.dtype))


def check_writable(module: nn.Module, attribute: str) -> None:
    """Raise now the ``TypeError`` :func:`write_weight` would raise, writing nothing."""
    hook = _offload_hook(module)
    if hook is not None:
        _writer(hook.weights_map, attribute)


def _writer(weights_map: Mapping[str, Tensor], key: str) -> Callable[[Tensor], None]:
    """How to write the value accelerate reads for ``key`` (raises if it cannot be written)."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    while isinstance(weights_map, PrefixedDataset):  # a module's view of the model's map
        key = f"{weights_map.prefix}{key}"
        weights_map = weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict:
            return _in_place(weights_map.state_dict[key])
        info = weights_map.index.get(key)
        folder = weights_map.save_folder
        if info is None or folder is None:
            raise TypeError(
                f"the offloaded weight {key!r} is read from a checkpoint file, which lossprune "
                "does not overwrite; dispatch the model with an offload folder "
                "(offload_folder=...) so that pruned weights can be written there"
            )
        index = weights_map.index

        def to_disk(value: Tensor) -> None:
            dtype = getattr(torch, info.get("dtype", str(value.dtype).removeprefix("torch.")))
            # A fresh .dat file in the offload folder; the index entry then points to it.
            offload_weight(value.detach().to("cpu", dtype), key, folder, index=index)

        return to_disk
    if isinstance(weights_map, MutableMapping) and isinstance(weights_map.get(key), Tensor):
        return _in_place(weights_map[key])
    raise TypeError(
        f"cannot write the offloaded weight {key!r}: accelerate holds it in a "
        f"{type(weights_map).__name__}, which lossprune does not know how to update"
    )


def _in_place(stored: Tensor) -> Callable[[Tensor], None]:
    def write(value: Tensor) -> None:
        stored.copy_(value.to(stored.device, stored.dtype))

    return write
