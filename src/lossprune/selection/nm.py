r"""N:M masks: at most ``n`` kept entries in each group of ``m`` consecutive ones along a dimension.

2:4 along the input dimension is the pattern that sparse tensor cores execute (NVIDIA Ampere
and newer; Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378). Within
each group the ``m - n`` lowest scores are pruned, ties going to the lower index first (the rule
:func:`lossprune.selection.select_masks` uses), which is what SparseGPT's ``topk``/``scatter`` step
does (Frantar and Alistarh 2023) made deterministic.

These functions need no :class:`~lossprune.Pruner`; they work on any score tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._common.checks import check_positive_int, is_int
from .layout import ParameterLayout, from_matrix_view, input_size, matrix_view

__all__ = ["NM", "nm_mask", "is_nm"]


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
    if m <= _PAIRWISE_MAX_M and grouped.numel() >= _PAIRWISE_MIN_ENTRIES:
        keep = _stable_ranks(grouped) >= m - n
    else:
        # A stable ascending sort puts the lower index first among ties: those are pruned first.
        pruned = grouped.sort(dim=-1, stable=True).indices[..., : m - n]
        keep = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, pruned, False)
    return _ungrouped(keep, scores.shape, dim)


#: Up to this group size, and from this many entries, the ranks come from comparing the entries
#: of a group pairwise (m² - m comparisons of whole columns, no sort): 2-7x faster than sorting a
#: short last dimension; below ~2000 groups of 4 the sort's fewer calls win (measured, 1 thread).
_PAIRWISE_MAX_M = 8
_PAIRWISE_MIN_ENTRIES = 8192


def _stable_ranks(grouped: Tensor) -> Tensor:
    """Each entry's position in a STABLE ascending sort of its group (the last dimension).

    Entry ``j`` is preceded by every ``k`` with a lower score, and by every ``k < j`` with an
    equal one (the lower index first among ties).
    """
    size = grouped.shape[-1]
    columns = grouped.reshape(-1, size).T.contiguous()  # (m, groups): each entry's column
    ranks = torch.zeros(columns.shape, dtype=torch.uint8, device=grouped.device)
    for j in range(size):
        for k in range(size):
            if k < j:
                ranks[j] += columns[k] <= columns[j]
            elif k > j:
                ranks[j] += columns[k] < columns[j]
    return ranks.T.reshape(grouped.shape)


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
    moved = grouped.reshape(*grouped.shape[:-2], grouped.shape[-2] * grouped.shape[-1])
    return moved.movedim(-1, dim).reshape(shape)


@dataclass(frozen=True)
class NM:
    r"""N:M sparsity: at most ``n`` kept weights in every group of ``m`` along the INPUT dimension.

    Each pruned matrix is viewed as (outputs, inputs) with its input axes flattened in order
    (:attr:`ParameterLayout.input_dims`: dim 1 of ``nn.Linear``, dim 0 of Hugging Face's
    ``Conv1D``, in·kh·kw of a convolution), and the inputs are split into groups of ``m``
    consecutive entries. After a stage at target sparsity :math:`p_s` every group holds exactly

    .. math:: c_s = \operatorname{round}(m \, p_s)

    pruned weights, so a schedule reaches 2:4 in two stages as 1:4, then 2:4. Within a group the
    lowest scores go first, entries pruned in earlier stages counting first (masks only grow);
    ties go to the lower input index (:func:`lossprune.sparse.nm_mask`). The final target must
    be exactly :math:`1 - n/m`.

    ``min_density``: every tensor keeps exactly :math:`n/m` of its entries at the end (more
    before), so any ``min_density <= n/m`` is met automatically; a larger one cannot be, and is
    refused.

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group size.

    Raises:
        TypeError: ``n`` or ``m`` is not an int.
        ValueError: not ``1 <= n < m``.

    Example:
        >>> import torch
        >>> from lossprune import Magnitude, LinearSchedule, NM, Pruner
        >>> model = torch.nn.Linear(8, 2)
        >>> pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 2), scope=NM(2, 4))
        >>> _ = pruner.run()
        >>> pruner.masks["weight"].reshape(2, 2, 4).sum(-1)  # every group keeps 2 of 4
        tensor([[2, 2],
                [2, 2]])
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        for name in ("n", "m"):
            if not is_int(getattr(self, name)):
                raise TypeError(f"NM: {name} must be an int, got {getattr(self, name)!r}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "m", int(self.m))
        if not 1 <= self.n < self.m:
            raise ValueError(f"NM(n, m) needs 1 <= n < m, got NM({self.n}, {self.m})")

    def check_schedule(
        self,
        layouts: Mapping[str, ParameterLayout],
        targets: Sequence[float],
        min_density: float,
    ) -> None:
        """The final target is ``1 - n/m``; ``m`` divides every weight matrix's input dimension."""
        final = 1.0 - self.n / self.m
        if not math.isclose(targets[-1], final, rel_tol=0.0, abs_tol=1e-9):
            raise ValueError(
                f"{self!r} prunes {self.m - self.n} of every {self.m} weights: the schedule's "
                f"final sparsity must be 1 - n/m = {final!r}, got {targets[-1]!r}"
            )
        if min_density > self.n / self.m:
            raise ValueError(
                f"{self!r} keeps exactly n/m = {self.n / self.m!r} of every tensor, less than "
                f"min_density={min_density!r}"
            )
        for name, layout in layouts.items():
            inputs = input_size(name, layout, self)
            if inputs % self.m:
                raise ValueError(
                    f"{self!r}: m = {self.m} must divide the input dimension of {name!r} "
                    f"({inputs} inputs, shape {layout.shape}, input dims {layout.input_dims})"
                )

    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        sparsity: float,
        min_density: float,
        layouts: Mapping[str, ParameterLayout],
    ) -> dict[str, Tensor]:
        """Prune the ``round(m * sparsity)`` lowest of every group (earlier-pruned ones first)."""
        pruned_per_group = round(self.m * sparsity)
        new_masks = {}
        for name, mask in masks.items():
            layout = layouts[name]
            kept = matrix_view(mask, layout)
            already = self.m - kept.reshape(kept.shape[0], kept.shape[1] // self.m, self.m).sum(-1)
            if bool((already > pruned_per_group).any()):
                raise ValueError(
                    f"{self!r}: {name!r} already has more than {pruned_per_group} pruned weights "
                    f"in a group of {self.m}, more than the target {sparsity!r} allows"
                )
            score = matrix_view(scores[name], layout)
            if not bool((score.isfinite() | ~kept).all()):  # no copy of the kept scores
                raise ValueError(f"scores[{name!r}] has non-finite values on kept entries")
            # Already-pruned entries rank below every finite score, so they count first.
            key = score.masked_fill(~kept, -math.inf)
            new = kept
            if pruned_per_group:
                new = nm_mask(key, self.m - pruned_per_group, self.m, dim=1)
            new_masks[name] = from_matrix_view(new, layout)
        return new_masks
