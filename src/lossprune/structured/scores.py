r"""Group scores at the network's scale: the paper's loss models applied to whole groups.

Removing group :math:`G` is the step :math:`\Delta\theta = -\theta_G` (every weight, bias and
normalisation entry of the group set to zero). A criterion's prediction for that step is its
:meth:`~lossprune.Criterion.group_score`: this module lays each group set out as ONE virtual
parameter, a ``(groups, members)`` matrix whose row :math:`g` holds every entry group :math:`g`
owns (gathered from all its slices), gathers every statistic the criterion asked for the same
way, and lets the criterion score it with ``group_sum`` = the row sum. For the quadratic model

.. math:: s_G = \Bigl|\sum_{q \in G}\bigl(-g_q\theta_q + \tfrac12 D_q\theta_q^2\bigr)\Bigr|
   + \tfrac12\lambda\sum_{q \in G}\theta_q^2,

the sum inside the absolute value (Laurent et al. 2020, Sec. 3, for a step of many weights);
magnitude is :math:`\tfrac12\|\theta_G\|^2`, the linear model (Taylor) :math:`|g_G^\top
\theta_G|`. Any criterion and composite works, in one statistics pass, except
:class:`~lossprune.SynFlow`, which scores through the network's path products and has no group
form here (refused).

:class:`GroupQuadratic` replaces the diagonal by the EXACT within-group quadratic form,

.. math:: s_G = \bigl|-g_G^\top\theta_G + \tfrac12\,\theta_G^\top C_{GG}\,\theta_G\bigr|
   + \tfrac12\lambda\|\theta_G\|^2,

with :math:`C` the Gauss-Newton matrix or the Hessian: one curvature-vector product per group
(:func:`lossprune.curvature.hvp` with a stack of vectors, each :math:`\theta` restricted to one
group), cheap where groups are few (heads, experts, channels of small networks).

Statistics read the weight matrices AND the biases and normalisation entries of a group (the
step removes them too), except for criteria that read input statistics (Wanda): those exist for
weight matrices only, so only those are scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common.batches import resolve_loss
from .._common.checks import check_lam, check_positive_int
from .._common.functional import statistics_dtype
from .._common.linear_maps import weight_matrices
from ..criteria import Criterion, ScoringContext, SynFlow
from ..criteria.base import ScaledCriterion, SumCriterion
from ..curvature import Statistics, compute_statistics, hvp
from ..curvature.errors import NonFiniteError, check_finite
from ..curvature.statistics import Values, dataset_mean
from .groups import GroupSet

__all__ = ["GroupQuadratic", "group_scores"]


def _terms(criterion: Criterion) -> list[Criterion]:
    if isinstance(criterion, SumCriterion):
        return [t for term in criterion.terms for t in _terms(term)]
    if isinstance(criterion, ScaledCriterion):
        return _terms(criterion.criterion)
    return [criterion]


def scored_parameters(
    model: nn.Module, groups: Sequence[GroupSet], matrices_only: bool
) -> dict[str, Tensor]:
    """The parameters the groups own (only weight matrices when ``matrices_only``)."""
    params = dict(model.named_parameters())
    chosen: dict[str, Tensor] = {}
    for group_set in groups:
        for piece in group_set.slices:
            if piece.tensor not in params:
                continue  # a buffer (batch-norm running statistics): no gradient, no score
            module_name, _, attribute = piece.tensor.rpartition(".")
            if matrices_only and attribute not in weight_matrices(model.get_submodule(module_name)):
                continue
            chosen[piece.tensor] = params[piece.tensor].detach()
    return chosen


def gather(values: Mapping[str, Tensor], group_set: GroupSet) -> Tensor:
    """``(groups, members)``: row g holds every entry group g owns in the tensors of ``values``."""
    rows = []
    for piece in group_set.slices:
        if piece.tensor not in values:
            continue
        moved = values[piece.tensor].movedim(piece.axis, 0)
        picked = moved[piece.positions.reshape(-1).to(moved.device)]
        rows.append(picked.reshape(group_set.size, -1))
    return torch.cat(rows, dim=1)


def _gathered_statistics(
    statistics: Statistics, params: Mapping[str, Tensor], groups: Sequence[GroupSet]
) -> Statistics:
    def per_set(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        full = {k: values[k].expand_as(params[k]) for k in params if k in values}
        return {g.name: gather(full, g) for g in groups}

    return Statistics(
        loss=statistics.loss,
        grad=per_set(statistics.grad),
        examples=statistics.examples,
        values={request: per_set(value) for request, value in statistics.values.items()},
        units=statistics.units,
    )


def _row_sum(name: str, tensor: Tensor) -> Tensor:
    return tensor.sum(1, keepdim=True).expand_as(tensor)


def group_scores(
    model: nn.Module,
    groups: Sequence[GroupSet],
    criterion: Criterion,
    data: Any = None,
    *,
    loss_fn: Any = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Each group's score under ``criterion`` (module docstring), lower = removed first.

    Args:
        model: the network, in eval mode (not modified).
        groups: its group sets (:func:`~lossprune.structured.find_groups`).
        criterion: any :class:`~lossprune.Criterion` or composite except SynFlow.
        data: scoring batches, as for :func:`lossprune.scores` (not needed by data-free
            criteria).
        loss_fn: the batch loss; ``None`` for a Hugging Face model's own loss.
        generator: random source for Monte-Carlo statistics.
        chunk_size: memory bound for the curvature routines.

    Returns:
        Group-set name to a float tensor of one score per group.

    Raises:
        TypeError: SynFlow, or a criterion that is not a :class:`~lossprune.Criterion`.
        NonFiniteError: a non-finite statistic or score.
    """
    if not isinstance(criterion, Criterion):
        raise TypeError(f"criterion must be a lossprune.Criterion, got {type(criterion).__name__}")
    if any(isinstance(term, SynFlow) for term in _terms(criterion)):
        raise TypeError(
            "group_scores: SynFlow scores weights through the network's path products and has "
            "no group form here; use Magnitude, LinearModel, QuadraticModel, OBD, GraSP or Wanda"
        )
    requests = criterion.requests()
    matrices_only = any(r.kind == "input_sq_norms" for r in requests)
    params = scored_parameters(model, groups, matrices_only)
    statistics = None
    if requests:
        loss = resolve_loss(model, loss_fn)
        statistics = compute_statistics(
            model, params, data, criterion.scoring_loss(loss), requests,
            generator=generator, chunk_size=chunk_size,
        )  # fmt: skip
        statistics = _gathered_statistics(statistics, params, groups)
    stacked = {
        g.name: gather(
            {k: p.to(torch.promote_types(p.dtype, torch.float32)) for k, p in params.items()}, g
        )
        for g in groups
    }
    context = ScoringContext(model, stacked, statistics, data)
    result = criterion.group_score(context, _row_sum)
    scores = {name: result[name][:, 0] for name in stacked}
    for name, value in scores.items():
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{criterion!r} gave a non-finite group score in {name!r}")
    return scores


@dataclass(frozen=True)
class GroupQuadratic:
    r"""The exact within-group quadratic model (module docstring).

    Args:
        lam: the step-size constraint λ ≥ 0.
        curvature: ``"ggn"`` (Gauss-Newton, positive semi-definite) or ``"hessian"``.
        chunk: curvature-vector products per pass (memory bound: ``chunk`` copies of the
            scored parameters).
    """

    lam: float = 0.0
    curvature: str = "ggn"
    chunk: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", check_lam(self.lam))
        if self.curvature not in ("ggn", "hessian"):
            raise ValueError(
                f"GroupQuadratic: curvature must be 'ggn' or 'hessian', got {self.curvature!r}"
            )
        object.__setattr__(self, "chunk", check_positive_int("chunk", self.chunk))

    def scores(
        self, model: nn.Module, groups: Sequence[GroupSet], data: Any, loss_fn: Any = None
    ) -> dict[str, Tensor]:
        """One score per group of each set, lower = removed first.

        Raises:
            NonFiniteError: a non-finite quadratic form.
        """
        loss = resolve_loss(model, loss_fn)
        params = scored_parameters(model, groups, matrices_only=False)
        owners = [(g, index) for g in groups for index in range(g.size)]
        parts = [
            self._forms(model, params, owners[start : start + self.chunk], data, loss)
            for start in range(0, len(owners), self.chunk)
        ]
        linear, quadratic, squares = (torch.cat(column) for column in zip(*parts, strict=True))
        check_finite("group quadratic form", quadratic)
        values = (-linear + 0.5 * quadratic).abs() + 0.5 * self.lam * squares
        sizes = [g.size for g in groups]
        return {g.name: v.clone() for g, v in zip(groups, values.split(sizes), strict=True)}

    def _forms(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor],
        owners: Sequence[tuple[GroupSet, int]],
        data: Any,
        loss: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`g^\top\theta_G`, :math:`\theta_G^\top C\theta_G`, :math:`\|\theta_G\|^2`."""
        vectors = {
            k: torch.zeros((len(owners), *p.shape), dtype=p.dtype, device=p.device)
            for k, p in params.items()
        }
        for row, (group_set, index) in enumerate(owners):
            for piece in group_set.slices:
                if piece.tensor in params:
                    positions = piece.positions[index].to(params[piece.tensor].device)
                    source = params[piece.tensor].index_select(piece.axis, positions)
                    vectors[piece.tensor][row].index_copy_(piece.axis, positions, source)

        def batch_values(batch: tuple[Any, Tensor]) -> Values:
            result = hvp(model, params, batch, loss, vectors, curvature=self.curvature)
            products = [(result.products[k] * vectors[k]).flatten(1).sum(1) for k in params]
            gradients = [
                (result.grad[k].unsqueeze(0) * vectors[k]).flatten(1).sum(1) for k in params
            ]
            return {"quad": torch.stack(products).sum(0), "grad": torch.stack(gradients).sum(0)}

        device = next(iter(params.values())).device
        dtype = statistics_dtype(params)
        means = dataset_mean(data, loss, batch_values, device=device, dtype=dtype).means
        squares = torch.stack(
            [v.flatten(1).double().square().sum(1) for v in vectors.values()]
        ).sum(0)
        quadratic, linear = means["quad"], means["grad"]
        assert isinstance(quadratic, Tensor) and isinstance(linear, Tensor)
        return linear.double().cpu(), quadratic.double().cpu(), squares.cpu()
