"""The :class:`Criterion` protocol and its composition by ``+`` and scalar ``*``.

A criterion maps the prunable parameters and the statistics it asked for to per-weight scores,
LOWER = PRUNED FIRST (layer 3 of DESIGN.md). It never computes statistics itself: it declares them
in :meth:`Criterion.requests`, so that a sum of criteria computes the union of their statistics in
ONE shared pass over the data.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .._checks import check_lam, is_real
from ..curvature import Statistic, Statistics

__all__ = ["Criterion", "ScoringContext", "SumCriterion", "ScaledCriterion", "check_lam"]


@dataclass(frozen=True)
class ScoringContext:
    """Everything a criterion may read, computed once per stage.

    Attributes:
        model: the network (read only).
        params: prunable parameters by qualified name, detached, at the current weights.
        statistics: the data statistics requested by the criterion (``None`` when it asked for
            none, e.g. :class:`~lossprune.Magnitude`).
        data: the scoring data (only data-free criteria read it, for the input shape).
    """

    model: nn.Module
    params: Mapping[str, Tensor]
    statistics: Statistics | None
    data: Any = None


class Criterion(ABC):
    """Base class: per-weight scores, lower = pruned first.

    Subclasses implement :meth:`requests` and :meth:`score`. Criteria compose::

        criterion = QuadraticModel(lam=1e-3) + 0.5 * Magnitude()

    and the composite's statistics are computed in one pass.
    """

    def requests(self) -> frozenset[Statistic]:
        """The data statistics this criterion reads (empty: none, no pass over the data)."""
        return frozenset()

    @abstractmethod
    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        """Scores shaped like each parameter in ``context.params``; lower = pruned first."""

    def config(self) -> dict[str, Any]:
        """A plain, JSON-friendly description (checkpoints, reports, experiment records)."""
        return {"type": type(self).__name__, **self._options()}

    def _options(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Criterion) and other.config() == self.config()

    def __hash__(self) -> int:
        return hash(repr(self.config()))

    def __add__(self, other: object) -> Criterion:
        if not isinstance(other, Criterion):
            return NotImplemented
        return SumCriterion(_terms(self) + _terms(other))

    def __radd__(self, other: object) -> Criterion:
        # sum([a, b]) starts from 0.
        if isinstance(other, numbers.Number) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, factor: object) -> Criterion:
        if not is_real(factor):
            return NotImplemented
        if not math.isfinite(float(factor)):  # type: ignore[arg-type]
            raise ValueError(f"a criterion can only be scaled by a finite number, got {factor}")
        return ScaledCriterion(float(factor), self)  # type: ignore[arg-type]

    __rmul__ = __mul__


def _terms(criterion: Criterion) -> tuple[Criterion, ...]:
    return criterion.terms if isinstance(criterion, SumCriterion) else (criterion,)


class SumCriterion(Criterion):
    """``a + b + ...``: scores add up; statistics are the union of the terms' requests."""

    def __init__(self, terms: tuple[Criterion, ...]) -> None:
        self.terms = tuple(terms)

    def requests(self) -> frozenset[Statistic]:
        return frozenset().union(*(term.requests() for term in self.terms))

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        total: dict[str, Tensor] | None = None
        for term in self.terms:
            scores = term.score(context)
            total = scores if total is None else {k: total[k] + scores[k] for k in total}
        assert total is not None
        return total

    def config(self) -> dict[str, Any]:
        return {"type": "Sum", "terms": [term.config() for term in self.terms]}

    def __repr__(self) -> str:
        return " + ".join(repr(term) for term in self.terms)


class ScaledCriterion(Criterion):
    """``factor * criterion``."""

    def __init__(self, factor: float, criterion: Criterion) -> None:
        self.factor = factor
        self.criterion = criterion

    def requests(self) -> frozenset[Statistic]:
        return self.criterion.requests()

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        return {k: self.factor * v for k, v in self.criterion.score(context).items()}

    def config(self) -> dict[str, Any]:
        return {"type": "Scaled", "factor": self.factor, "criterion": self.criterion.config()}

    def __repr__(self) -> str:
        return f"{self.factor!r} * {self.criterion!r}"
