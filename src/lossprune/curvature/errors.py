"""The error every statistic raises on NaN or infinite numbers, and its check."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "check_finite"]


class NonFiniteError(FloatingPointError, ValueError):
    """A loss, gradient or score is NaN or infinite; nothing was modified."""


def check_finite(name: str, value: Tensor | Mapping[str, Tensor]) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` when any entry is NaN or infinite."""
    tensors = value.values() if isinstance(value, Mapping) else [value]
    for t in tensors:
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"the {name} is not finite (NaN or inf); nothing was modified")
