r"""N:M masks: at most ``n`` kept entries in each group of ``m`` consecutive ones along a dimension.

2:4 along the input dimension is the pattern that sparse tensor cores execute (NVIDIA Ampere
and newer; Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378). Within
each group the ``m - n`` lowest scores are pruned, ties going to the lower index first (the rule
:func:`lossprune.masks.select_masks` uses), which is what SparseGPT's ``topk``/``scatter`` step
does (Frantar and Alistarh 2023) made deterministic.

These functions need no :class:`~lossprune.Pruner`; they work on any score tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_positive_int, is_int

__all__ = ["nm_mask", "is_nm"]


def nm_mask(scores: Tensor, n: int, m: int, dim: int) -> Tensor:
    r"""The ``bool`` mask that keeps the ``n`` highest scores of every group of ``m`` along ``dim``.

    The entries :math:`j` of ``scores`` along ``dim`` are split into groups
    :math:`G_g = \{gm, \dots, gm + m - 1\}`; in each group the :math:`m - n` entries with the lowest
    scores are pruned (``False``), so every group keeps exactly :math:`n` (LOWER = PRUNED FIRST, as
    for every lossprune criterion). Ties are broken deterministically: among equal scores, the
    entry with the lower index along ``dim`` is pruned first.

    For an :class:`~torch.nn.Linear` weight (``out × in``) the input dimension is ``dim=1``; for
    Hugging Face's ``Conv1D`` (stored ``in × out``) it is ``dim=0``.

    Args:
        scores: A real (floating or integer) tensor; lower = pruned first. NaN is refused.
        n: Entries kept per group, ``1 <= n <= m``.
        m: Group size, ``>= 1``; must divide ``scores.shape[dim]``.
        dim: The dimension along which groups run (negative values count from the end).

    Returns:
        A ``bool`` tensor shaped like ``scores``, ``True`` = kept.

    Raises:
        TypeError: ``scores`` is not a real tensor, or ``n``/``m``/``dim`` are not ints.
        ValueError: ``n`` outside ``[1, m]``, ``dim`` out of range, ``m`` not dividing the
            dimension, or a NaN score.

    Example:
        >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 0.0]]), 2, 4, dim=1)
        tensor([[ True, False,  True, False, False, False,  True,  True]])
    """
    dim = _check_nm_args(scores, n, m, dim, "scores")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"scores must be a real tensor, got dtype {scores.dtype}")
    if scores.is_floating_point() and bool(scores.isnan().any()):
        raise ValueError("scores contains NaN: the N:M selection needs ordered scores")
    grouped = _grouped(scores, m, dim)
    # A stable ascending sort puts the lower index first among ties: those are pruned first.
    pruned = grouped.sort(dim=-1, stable=True).indices[..., : m - n]
    keep = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, pruned, False)
    return _ungrouped(keep, scores.shape, dim)


def is_nm(mask: Tensor, n: int, m: int, dim: int) -> bool:
    """Whether every group of ``m`` consecutive entries along ``dim`` keeps at most ``n`` entries.

    "At most": a group with fewer kept entries still fits an N:M kernel (2:4 hardware stores
    two values per group, zeros included). Pass ``weight != 0`` to test a weight's zeros.

    Args:
        mask: A ``bool`` tensor, ``True`` = kept.
        n: Most entries kept per group, ``1 <= n <= m``.
        m: Group size, ``>= 1``; must divide ``mask.shape[dim]``.
        dim: The dimension along which groups run.

    Raises:
        TypeError: ``mask`` is not a bool tensor, or ``n``/``m``/``dim`` are not ints.
        ValueError: ``n`` outside ``[1, m]``, ``dim`` out of range or ``m`` not dividing the
            dimension.

    Example:
        >>> is_nm(torch.tensor([[True, False, True, False, False, True, True, True]]), 2, 4, 1)
        False
    """
    dim = _check_nm_args(mask, n, m, dim, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    kept_per_group = _grouped(mask, m, dim).sum(dim=-1)
    return bool((kept_per_group <= n).all())


def _check_nm_args(tensor: object, n: object, m: object, dim: object, name: str) -> int:
    """Validate the N:M arguments; the normalised (non-negative) ``dim``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    m = check_positive_int("m", m)
    if not is_int(n):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    kept = int(n)  # type: ignore[call-overload]
    if not 1 <= kept <= m:
        raise ValueError(f"n must satisfy 1 <= n <= m = {m}, got n = {n}")
    if not is_int(dim):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    ndim = tensor.dim()
    axis = int(dim)  # type: ignore[call-overload]
    if not -ndim <= axis < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim}) for a {ndim}-d {name}, got {dim}")
    axis %= ndim
    if tensor.shape[axis] % m:
        raise ValueError(
            f"m = {m} must divide the size {tensor.shape[axis]} of dimension {axis} of {name} "
            f"(shape {tuple(tensor.shape)})"
        )
    return axis


def _grouped(tensor: Tensor, m: int, dim: int) -> Tensor:
    """``tensor`` with ``dim`` moved last and split into ``(size // m, m)`` groups."""
    moved = tensor.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def _ungrouped(grouped: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Undo :func:`_grouped`."""
    moved = grouped.reshape(*grouped.shape[:-2], -1)
    return moved.movedim(-1, dim).reshape(shape)
