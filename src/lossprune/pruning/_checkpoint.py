"""Validating a :meth:`lossprune.Pruner.state_dict` completely before anything is restored."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._common.checks import is_int, is_real
from .updates import Compensation, CompensationState

__all__ = ["Checkpoint", "configuration_text", "pruner_state", "read_pruner_state"]

_KEYS = ("stage", "masks", "generator", "targets", "criterion", "scope", "min_density", "update")


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def configuration_text(obj: object) -> str:
    """How a criterion or selection is recorded in a state: its ``repr``, without addresses.

    The default ``repr`` of a user's own class holds a memory address, different in every
    process and for every instance: it is dropped, so such an object is recorded by its class
    (its attributes may be counters that change as it runs; a user who wants its settings
    compared gives the class a ``repr``, or makes it a dataclass).
    """
    return _ADDRESS.sub("", repr(obj))


class Checkpoint(NamedTuple):
    """A validated pruner state, ready to be installed."""

    stage: int
    masks: dict[str, Tensor]
    generator_state: Tensor
    update_state: CompensationState | None


def pruner_state(
    *,
    stage: int,
    masks: Mapping[str, Tensor],
    generator: torch.Generator,
    targets: tuple[float, ...],
    criterion: str,
    scope: str,
    min_density: float,
    update: Compensation | None,
    update_state: CompensationState | None,
) -> dict[str, Any]:
    """Plain tensors, numbers and strings, so that ``torch.load(weights_only=True)`` reads it."""
    return {
        "stage": stage,
        "masks": {k: m.detach().cpu().clone() for k, m in masks.items()},
        "generator": generator.get_state(),
        "targets": list(targets),
        "criterion": criterion,
        "scope": scope,
        "min_density": min_density,
        "update": None
        if update is None or update_state is None
        else {"config": repr(update), **update_state.state_dict()},
    }


def read_pruner_state(
    state: object,
    *,
    params: Mapping[str, Tensor],
    targets: tuple[float, ...],
    criterion: str,
    scope: str,
    min_density: float,
    update: Compensation | None,
) -> Checkpoint:
    """Check ``state`` against the pruner's configuration and parameters; change nothing.

    Raises:
        TypeError: ``state`` or one of its entries has the wrong type.
        ValueError: a missing key, or a state saved with another schedule, criterion, scope,
            min_density, update rule or set of parameters, or values out of range.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise ValueError(f"state lacks {missing}")
    saved_targets = state["targets"]
    if not isinstance(saved_targets, (list, tuple)) or not all(map(is_real, saved_targets)):
        raise TypeError("state targets must be a list of numbers")
    if [float(t) for t in saved_targets] != list(targets):
        raise ValueError("state was saved with a different schedule")
    for key, expected in (("criterion", criterion), ("scope", scope)):
        if state[key] != expected:
            raise ValueError(f"state was saved with {key} {state[key]!r}, not {expected!r}")
    if not is_real(state["min_density"]) or float(state["min_density"]) != min_density:
        raise ValueError(
            f"state was saved with min_density {state['min_density']!r}, not {min_density!r}"
        )
    stage = state["stage"]
    if not is_int(stage):
        raise TypeError(f"state stage must be an int, got {type(stage).__name__}")
    if not 0 <= stage <= len(targets):
        raise ValueError(f"state stage {stage!r} is out of range 0..{len(targets)}")
    masks = _read_masks(state["masks"], params)
    generator_state = _read_generator_state(state["generator"])
    update_state = _read_update(state["update"], update, params)
    return Checkpoint(int(stage), masks, generator_state, update_state)


def _read_masks(masks: object, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"state masks must be a dict, got {type(masks).__name__}")
    if set(masks) != set(params):
        raise ValueError(f"state has masks for {sorted(masks)}, the pruner prunes {sorted(params)}")
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"state mask {name!r} must be a bool tensor")
        if mask.shape != params[name].shape:
            raise ValueError(
                f"state mask {name!r} has shape {tuple(mask.shape)}, the parameter "
                f"{tuple(params[name].shape)}"
            )
    return {k: masks[k].to(params[k].device).clone() for k in params}


def _read_generator_state(saved: object) -> Tensor:
    if not isinstance(saved, Tensor) or saved.dtype != torch.uint8:
        raise TypeError("state generator must be a torch.ByteTensor from Generator.get_state()")
    try:
        torch.Generator().set_state(saved)  # a scratch generator: torch validates the bytes
    except RuntimeError as error:
        raise ValueError(f"state generator is not a valid generator state: {error}") from None
    return saved.clone()


def _read_update(
    saved: object, update: Compensation | None, params: Mapping[str, Tensor]
) -> CompensationState | None:
    if update is None:
        if saved is not None:
            raise ValueError("state was saved with a Compensation update, the pruner has none")
        return None
    if not isinstance(saved, Mapping):
        raise ValueError(f"state was saved without the update {update!r}")
    if saved.get("config") != repr(update):
        raise ValueError(f"state was saved with update {saved.get('config')}, not {update!r}")
    return CompensationState.from_state_dict(
        {k: v for k, v in saved.items() if k != "config"}, params
    )
