"""Scores of a criterion at the current weights: statistics pass, then the criterion's formula."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import is_dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .._common.batches import model_loss
from .._common.checks import is_int
from .._common.data import check_data
from .._common.models import check_weights, unwrap
from ..criteria.base import Criterion, GroupSum, ScoringContext
from ..curvature import LossFn, NonFiniteError, Statistics, compute_statistics
from ..selection import prunable_parameters

__all__ = ["scores", "compute_scores", "check_criterion", "monte_carlo_alternative"]


def check_criterion(criterion: object, data: Any, loss_fn: object) -> Criterion:
    """Validate a criterion together with what it needs (data and a loss for statistics)."""
    if not isinstance(criterion, Criterion):
        raise TypeError(f"criterion must be a lossprune.Criterion, got {type(criterion).__name__}")
    if data is not None:
        check_data(data)
    if criterion.requests():
        if data is None:
            raise ValueError(f"{criterion!r} computes statistics of the loss: pass data=...")
        if loss_fn is None:
            raise ValueError(
                f"{criterion!r} computes statistics of the loss: pass loss_fn=... (only a "
                "Hugging Face model that computes its loss from labels may omit it)"
            )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return criterion


def monte_carlo_alternative(criterion: Criterion) -> str | None:
    """``criterion`` written with ``curvature="fisher_mc"`` where it asks for the exact Fisher.

    What the warning before an expensive exact Fisher suggests (``None``: no term of the
    criterion has a ``curvature`` option).
    """
    terms = getattr(criterion, "terms", None)
    if terms is not None:  # a sum: the first term that can switch
        return next(filter(None, map(monte_carlo_alternative, terms)), None)
    inner = getattr(criterion, "criterion", None)
    if isinstance(inner, Criterion):  # a scaled criterion
        return monte_carlo_alternative(inner)
    if is_dataclass(criterion) and getattr(criterion, "curvature", None) == "fisher":
        return repr(replace(criterion, curvature="fisher_mc"))
    return None


def compute_scores(
    model: nn.Module,
    criterion: Criterion,
    params: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn | None,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    group_sum: GroupSum | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], Statistics | None]:
    """Run the statistics pass the criterion asks for, then score.

    With ``group_sum`` (a selection that removes groups of weights together), the scores are
    :meth:`Criterion.group_score`: every weight holds its group's score.

    Returns:
        ``(scores, statistics)``; ``statistics`` is ``None`` for data-free criteria.

    Raises:
        NonFiniteError: a loss, gradient, statistic or score is NaN or infinite.
    """
    params = {k: p.detach() for k, p in params.items()}
    statistics = None
    requests = criterion.requests()
    if requests:
        assert loss_fn is not None
        statistics = compute_statistics(
            model, params, data, criterion.scoring_loss(loss_fn), requests,
            generator=generator, chunk_size=chunk_size, progress=progress,
            fisher_alternative=monte_carlo_alternative(criterion),
        )  # fmt: skip
    # Scores are formed in at least float32: squares of float16 weights round (and underflow)
    # so coarsely that the ranking of a float16 layer would be wrong.
    scoring_params = {
        k: p.to(torch.promote_types(p.dtype, torch.float32)) for k, p in params.items()
    }
    context = ScoringContext(model, scoring_params, statistics, data)
    if group_sum is None:
        result = criterion.score(context)
    else:
        result = criterion.group_score(context, group_sum)
    for name, param in params.items():
        score = result.get(name)
        if score is None or score.shape != param.shape:
            raise RuntimeError(f"{criterion!r} returned no score of the right shape for {name!r}")
    # min and max of each score: NaN propagates through them, and both are finite only when every
    # entry is; one host synchronisation for all tensors, no boolean tensor as large as the score.
    checked = [n for n in params if result[n].is_floating_point() and result[n].numel()]
    extremes = [torch.stack(result[n].aminmax()).double() for n in checked]
    finite = torch.isfinite(torch.stack(extremes)).all(dim=1) if extremes else torch.ones(0)
    if not bool(finite.all()):
        name = checked[int((~finite).nonzero()[0])]
        raise NonFiniteError(
            f"{criterion!r} gave a non-finite score for {name!r}; nothing was modified"
        )
    return result, statistics


def scores(
    model: nn.Module,
    criterion: Criterion,
    data: Any = None,
    *,
    loss_fn: LossFn | None = None,
    include: Any = None,
    exclude: Any = None,
    generator: int | torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Scores of ``criterion`` for the prunable weights of ``model``, lower = pruned first.

    Args:
        model: the network, in eval mode if it has batch norm or dropout (criteria that run it;
            :class:`~lossprune.Magnitude` does not).
        criterion: any :class:`~lossprune.Criterion` (or a composite).
        data: an ``(inputs, targets)`` batch or a re-iterable of batches (DataLoader); statistics
            are example-weighted means over all of it. Not needed by data-free criteria.
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``; may be omitted for a Hugging
            Face model (its own loss from ``labels``, :class:`lossprune.ModelLoss`).
        include: which parameters to score, by name or regular expression (see
            :func:`lossprune.selection.prunable_parameters`); default every Linear/Conv ``.weight``.
        exclude: parameters to leave out, same form as ``include``.
        generator: random source for Monte-Carlo criteria: a seed (int) or a
            :class:`torch.Generator` on the parameters' device.
        chunk_size: the one memory bound of every statistic: at most this many
            parameter-sized per-example pull-backs or tangent vectors exist at once
            (:mod:`lossprune.curvature.statistics`; default: automatic).

    Returns:
        Qualified parameter name to a score tensor shaped like the parameter, in at least
        float32 (float16 weights are scored in float32, whose rounding keeps their ranking;
        SynFlow's scores stay in its computation dtype, float64 by default).

    Example:
        >>> import torch
        >>> from lossprune import LinearModel, scores
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> s = scores(model, LinearModel(lam=1e-3), batch, loss_fn=torch.nn.CrossEntropyLoss())
        >>> s["0.weight"].shape
        torch.Size([3, 4])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)  # DDP, DataParallel, torch.compile: scores keyed by the network's names
    check_weights(model)
    if loss_fn is None:  # a Hugging Face model's own loss, when it has one
        loss_fn = model_loss(model)
    check_criterion(criterion, data, loss_fn)
    params = prunable_parameters(model, include, exclude)
    if is_int(generator):  # a seed, on the parameters' device
        device = next(iter(params.values())).device
        generator = torch.Generator(device).manual_seed(int(generator))  # type: ignore[arg-type]
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be None, an int seed or a torch.Generator, got {generator!r}"
        )
    return compute_scores(
        model, criterion, params, data, loss_fn, generator=generator, chunk_size=chunk_size
    )[0]
