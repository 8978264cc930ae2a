"""The :class:`Criterion` protocol and its composition by ``+`` and scalar ``*``.

A criterion maps the prunable parameters and the statistics it asked for to per-weight scores,
LOWER = PRUNED FIRST (layer 3 of docs/architecture.md). It never computes statistics itself: it
declares them in :meth:`Criterion.requests`, so that a sum of criteria computes the union of
their statistics in ONE shared pass over the data.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common.checks import is_real
from ..curvature import LossFn, Statistic, Statistics

__all__ = ["Criterion", "GroupSum", "ScoringContext", "SumCriterion", "ScaledCriterion"]

#: ``group_sum(name, t)``: ``t`` (shaped like parameter ``name``) summed over each group of
#: weights that is removed together, every entry holding its group's sum.
GroupSum = Callable[[str, Tensor], Tensor]


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

    Subclasses implement :meth:`requests` and :meth:`score`. The built-in criteria are frozen
    dataclasses: their repr, equality, hash and :meth:`config` are derived from their fields.
    Criteria compose::

        criterion = QuadraticModel(lam=1e-3) + 0.5 * Magnitude()

    and the composite's statistics are computed in one pass.
    """

    def requests(self) -> frozenset[Statistic]:
        """The data statistics this criterion reads (empty: none, no pass over the data)."""
        return frozenset()

    @abstractmethod
    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        """Scores shaped like each parameter in ``context.params``; lower = pruned first."""

    def group_score(self, context: ScoringContext, group_sum: GroupSum) -> dict[str, Tensor]:
        r"""The score of removing each group of weights TOGETHER, given to every weight of it.

        Used by structures that prune whole groups (:class:`~lossprune.selection.Blocks`). The
        default is the sum of the per-weight scores, :math:`s_G = \sum_{q \in G} s_q`, which is
        the criterion's own prediction for the group when that prediction is additive over
        weights: :class:`~lossprune.Magnitude` (:math:`\tfrac12\sum\theta^2`),
        :class:`~lossprune.OBD` (a diagonal model has no cross terms), :class:`~lossprune.GraSP`
        (:math:`\sum \theta \odot Hg` is linear in the step), :class:`~lossprune.SynFlow` and
        :class:`~lossprune.Wanda` (first-order contributions). Criteria with an absolute value
        of a signed prediction override it: the absolute value is of the whole group's
        predicted change (:class:`~lossprune.LinearModel`, :class:`~lossprune.QuadraticModel`).
        """
        return {k: group_sum(k, v) for k, v in self.score(context).items()}

    def default_scope(self) -> str:
        """The comparison group a pruner uses when given no ``scope`` (a ``scope=`` shorthand).

        ``"global"``, the paper's single ranking over all weights, unless the criterion's authors
        define it with another: :class:`~lossprune.Wanda` compares within each output row
        (``"per_row"``). A composite keeps its terms' group when they all agree.
        """
        return "global"

    def scoring_loss(self, loss_fn: LossFn) -> LossFn:
        """The loss whose statistics :meth:`requests` describes (default: the pruner's own).

        :class:`~lossprune.GraSP` overrides it with the loss of tempered logits.
        """
        return loss_fn

    def config(self) -> dict[str, Any]:
        """A plain, JSON-friendly description (checkpoints, reports, experiment records).

        The class name and every dataclass field (a ``torch.dtype`` as its name).
        """
        options: dict[str, Any] = {}
        if is_dataclass(self):
            options = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        return {"type": type(self).__name__, **options}

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


class _LossProbe:
    """A stand-in loss: terms that wrap it alike (equal wrappers) score the same loss."""

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a field value."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Criterion):
        return value.config()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _terms(criterion: Criterion) -> tuple[Criterion, ...]:
    return criterion.terms if isinstance(criterion, SumCriterion) else (criterion,)


@dataclass(frozen=True)
class SumCriterion(Criterion):
    """``a + b + ...``: scores add up; statistics are the union of the terms' requests."""

    terms: tuple[Criterion, ...]

    def __post_init__(self) -> None:
        _probe = _LossProbe()
        losses = {term.scoring_loss(_probe) for term in self.terms if term.requests()}
        if len(losses) > 1:
            raise ValueError(
                f"{' + '.join(map(repr, self.terms))} combines criteria that score different "
                "losses (e.g. GraSP at a temperature T != 1): they cannot share one statistics pass"
            )

    def scoring_loss(self, loss_fn: LossFn) -> LossFn:
        for term in self.terms:
            if term.requests():
                return term.scoring_loss(loss_fn)
        return loss_fn

    def requests(self) -> frozenset[Statistic]:
        return frozenset().union(*(term.requests() for term in self.terms))

    def default_scope(self) -> str:
        scopes = {term.default_scope() for term in self.terms}
        return scopes.pop() if len(scopes) == 1 else "global"

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        total: dict[str, Tensor] | None = None
        for term in self.terms:
            scores = term.score(context)
            total = scores if total is None else {k: total[k] + scores[k] for k in total}
        assert total is not None
        return total

    def group_score(self, context: ScoringContext, group_sum: GroupSum) -> dict[str, Tensor]:
        total: dict[str, Tensor] | None = None
        for term in self.terms:
            scores = term.group_score(context, group_sum)
            total = scores if total is None else {k: total[k] + scores[k] for k in total}
        assert total is not None
        return total

    def __repr__(self) -> str:
        return " + ".join(repr(term) for term in self.terms)


@dataclass(frozen=True)
class ScaledCriterion(Criterion):
    """``factor * criterion``."""

    factor: float
    criterion: Criterion

    def requests(self) -> frozenset[Statistic]:
        return self.criterion.requests()

    def scoring_loss(self, loss_fn: LossFn) -> LossFn:
        return self.criterion.scoring_loss(loss_fn)

    def default_scope(self) -> str:
        return self.criterion.default_scope()

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        return {k: self.factor * v for k, v in self.criterion.score(context).items()}

    def group_score(self, context: ScoringContext, group_sum: GroupSum) -> dict[str, Tensor]:
        scores = self.criterion.group_score(context, group_sum)
        return {k: self.factor * v for k, v in scores.items()}

    def __repr__(self) -> str:
        return f"{self.factor!r} * {self.criterion!r}"
