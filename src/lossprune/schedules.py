"""Multi-stage pruning schedules (layer 1 of docs/architecture.md).

A schedule reaches a target sparsity ``p`` (fraction of prunable weights that are zero) in
``stages`` steps ``p_1 <= p_2 <= ... <= p_stages = p``. Laurent et al. (2020, arXiv:2006.12279,
Sec. 4) re-fit the loss model before every stage, so that each stage only takes a step the local
model can be trusted with.

Any object with ``sparsity(stage)``, ``__len__`` and ``__iter__`` works where a :class:`Schedule`
is expected (:class:`typing.Protocol`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._common.checks import check_fraction, check_positive_int, is_int

__all__ = ["Schedule", "LinearSchedule", "ExponentialSchedule"]


@runtime_checkable
class Schedule(Protocol):
    """What the :class:`~lossprune.Pruner` needs from a schedule."""

    def sparsity(self, stage: int) -> float:
        """Target sparsity after ``stage`` (1-based, ``1 <= stage <= len(self)``)."""
        ...

    def __len__(self) -> int:
        """Number of stages."""
        ...

    def __iter__(self) -> Iterator[float]:
        """The per-stage targets, in order."""
        ...


@dataclass(frozen=True, init=False, repr=False)
class _StagedSchedule:
    """Shared validation, iteration and serialisation; subclasses define ``_fraction``.

    A frozen dataclass of its two fields, ``target`` (the final sparsity, passed as
    ``sparsity=``) and ``stages``: equality, hash and :meth:`config` derive from them.
    """

    target: float
    stages: int

    def __init__(self, sparsity: float, stages: int) -> None:
        object.__setattr__(self, "target", check_fraction("sparsity", sparsity))
        object.__setattr__(self, "stages", check_positive_int("stages", stages))

    def _fraction(self, stage: int) -> float:
        raise NotImplementedError

    def sparsity(self, stage: int) -> float:
        """Target sparsity after ``stage`` (1-based); the last stage returns the target exactly."""
        if not is_int(stage):
            raise TypeError(f"stage must be an int, got {type(stage).__name__}")
        if not 1 <= stage <= self.stages:
            raise ValueError(f"stage must be in 1..{self.stages}, got {stage}")
        if stage == self.stages:
            return self.target  # exact, no floating-point drift at the end of the schedule
        return self._fraction(int(stage))

    def __len__(self) -> int:
        return self.stages

    def __iter__(self) -> Iterator[float]:
        return (self.sparsity(s) for s in range(1, self.stages + 1))

    def config(self) -> dict[str, Any]:
        """A plain dict that identifies the schedule (for checkpoints and reports)."""
        return {"type": type(self).__name__, "sparsity": self.target, "stages": self.stages}

    def __repr__(self) -> str:
        # The constructor's spelling (sparsity=, not the field name target=), so it round-trips.
        return f"{type(self).__name__}(sparsity={self.target!r}, stages={self.stages})"


@dataclass(frozen=True, init=False, repr=False)
class LinearSchedule(_StagedSchedule):
    r"""Each stage removes the same number of weights.

    .. math:: p_s = p \cdot s / \pi

    Args:
        sparsity: final target ``p`` with ``0 <= p < 1``.
        stages: number of stages ``π >= 1``.

    Example:
        >>> list(LinearSchedule(0.9, 3))
        [0.3, 0.6, 0.9]
    """

    def _fraction(self, stage: int) -> float:
        return self.target * stage / self.stages


@dataclass(frozen=True, init=False, repr=False)
class ExponentialSchedule(_StagedSchedule):
    r"""Each stage removes the same fraction of the weights that are left.

    .. math:: p_s = 1 - (1 - p)^{s / \pi}

    (Laurent et al. 2020, Sec. 4.2: less ``‖Δθ‖²`` per stage than the linear schedule.)

    Args:
        sparsity: final target ``p`` with ``0 <= p < 1``.
        stages: number of stages ``π >= 1``.

    Example:
        >>> [round(p, 4) for p in ExponentialSchedule(0.99, 2)]
        [0.9, 0.99]
    """

    def _fraction(self, stage: int) -> float:
        return 1.0 - (1.0 - self.target) ** (stage / self.stages)
