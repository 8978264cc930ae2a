"""Planning one pruning stage without side effects: the pure half of :meth:`Pruner.step`.

statistics → scores → selection → update → checks. Everything here reads the model and its
weights and returns a :class:`StagePlan`; only :meth:`lossprune.Pruner.step` writes, after the
plan is complete, so every refusal (bad data, a non-finite loss or score, a collapse under
``on_collapse="raise"``, a target the selection cannot reach) leaves the model, the masks and
the pruner's random state exactly as they were.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._common.data import random_subset
from .._common.functional import check_deterministic, statistics_dtype
from .._common.probe import probe_first_batch
from ..criteria.base import Criterion, GroupSum
from ..curvature import LossFn, NonFiniteError, Statistics
from ..selection import Global, Layerwise, ParameterLayout, Selection
from ..selection._connectivity import ChainLayer, Connectivity, connectivity
from ..selection.layout import per_matrix
from ._diagnostics import mean_loss, predicted_loss_change, stepped
from .reports import StageReport, collapse_message, handle_collapse
from .scoring import compute_scores
from .updates import Compensation, CompensationState, plan_update

__all__ = ["LOSS_ONLY", "WITH_PREDICTION", "StageSetup", "StagePlan", "plan_stage"]

#: Diagnostics levels (``Pruner(diagnostics=...)``): the measured loss before and after the step;
#: and also the quadratic model's prediction of the change (an exact Hessian-vector pass).
LOSS_ONLY = "loss"
WITH_PREDICTION = "prediction"


@dataclass(frozen=True)
class StageSetup:
    """What stays the same from stage to stage (the Pruner's configuration)."""

    model: nn.Module
    criterion: Criterion
    selection: Selection
    layouts: Mapping[str, ParameterLayout]
    loss_fn: LossFn | None
    data: Any
    examples: int | None
    min_density: float
    update: Compensation | None
    diagnostics: str | None  # LOSS_ONLY, WITH_PREDICTION or None (off)
    eval_mode: bool
    on_collapse: str
    chunk_size: int | None
    chain: list[ChainLayer] | None
    progress: bool = False


class StagePlan(NamedTuple):
    """Everything :meth:`Pruner.step` commits: new masks, the step, the update state, the report.

    ``delta`` is ``None`` for the paper's zeroing: then the commit only zeroes the newly
    pruned weights, which is exactly the step ``-θ`` on them.
    """

    masks: dict[str, Tensor]
    delta: dict[str, Tensor] | None
    update_state: CompensationState | None
    report: StageReport
    connectivity: Connectivity


def plan_stage(
    setup: StageSetup,
    params: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    update_state: CompensationState | None,
    stage: int,
    target: float,
    generator: torch.Generator,
    previous: Connectivity | None = None,
) -> StagePlan:
    """Plan stage ``stage`` (1-based) at ``target`` sparsity; ``generator`` is the pruner's copy.

    ``previous`` is the disconnection of ``masks`` when known (the last plan's), so that it is
    not computed again.

    Raises:
        NonFiniteError: a loss, gradient, score or the loss after the step is not finite.
        LayerCollapseError: the stage collapses a layer or disconnects units and
            ``on_collapse="raise"``.
        ValueError, TypeError: data, scores or a target the selection refuses.
    """
    start = time.perf_counter()
    data = setup.data
    if setup.examples is not None:
        data = random_subset(setup.data, setup.examples, generator)
    params = {k: p.detach() for k, p in params.items()}
    with _scoring_mode(setup.model, setup.eval_mode):
        _check_deterministic(setup, data, params)
        scores, statistics = compute_scores(
            setup.model, setup.criterion, params, data, setup.loss_fn,
            generator=_device_generator(generator, params), chunk_size=setup.chunk_size,
            group_sum=_group_sum(setup),
            progress=setup.progress,
        )  # fmt: skip
        new_masks = _select(setup, scores, masks, target)
        newly_pruned = {k: masks[k] & ~new_masks[k] for k in masks}
        kept = {k: int(m.count_nonzero()) for k, m in new_masks.items()}
        pruned = {k: int(m.count_nonzero()) for k, m in newly_pruned.items()}
        after = _check_collapse(setup, masks, new_masks, stage, previous)
        update = None
        if setup.update is not None or setup.diagnostics:
            update = plan_update(
                setup.update, update_state, setup.model, params, new_masks, newly_pruned,
                data, setup.loss_fn, chunk_size=setup.chunk_size,
            )  # fmt: skip
        diagnostics = _diagnostics(setup, params, update.delta, data, stage, statistics) if (
            setup.diagnostics and update is not None
        ) else (None, None, None)  # fmt: skip
    if update is None:  # Δθ = -θ on the weights pruned now, a small fraction: gather them
        step_norm_sq = float(
            sum(p[newly_pruned[k]].double().square().sum() for k, p in params.items())
        )
    else:
        step_norm_sq = float(sum(d.double().square().sum() for d in update.delta.values()))
    cg = None if update is None else update.cg
    report = StageReport(
        stage=stage,
        target_sparsity=target,
        sparsity=1.0 - sum(kept.values()) / sum(m.numel() for m in new_masks.values()),
        pruned=sum(pruned.values()),
        step_norm_sq=step_norm_sq,
        loss_before=diagnostics[0],
        loss_after=diagnostics[1],
        predicted_delta=diagnostics[2],
        layer_density={k: kept[k] / m.numel() if m.numel() else 1.0 for k, m in new_masks.items()},
        seconds=time.perf_counter() - start,
        update_lam=None if update is None else update.lam,
        compensated=None if update is None else update.compensated,
        cg_iterations=None if cg is None else cg.iterations,
        cg_residual=None if cg is None else cg.residual,
        cg_negative_curvature=None if cg is None else cg.negative_curvature,
        disconnected_outputs=after.outputs if after.checked else None,
        disconnected_units=dict(after.hidden) if after.checked else None,
        curvature=_curvature_used(statistics),
    )
    delta = None if setup.update is None else update.delta  # type: ignore[union-attr]
    state = update_state if update is None else update.state
    return StagePlan(new_masks, delta, state, report, after)


def _check_deterministic(setup: StageSetup, data: Any, params: Mapping[str, Tensor]) -> None:
    """A stage that runs the model on data needs a deterministic forward pass.

    The statistics pass checks it itself (:func:`~lossprune._common.probe.probe_first_batch`);
    a data-free criterion (Magnitude) with an update or diagnostics is checked here; a stage that
    never runs the model (Magnitude alone) does not care about the model's mode.
    """
    if setup.criterion.requests() or not (setup.update is not None or setup.diagnostics):
        return
    check_deterministic(setup.model)
    device = next(iter(params.values())).device
    probe_first_batch(setup.model, setup.loss_fn, data, device)


def _select(
    setup: StageSetup, scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], target: float
) -> dict[str, Tensor]:
    """The selection's new masks, checked to be bool masks that only grow the pruned set.

    A selection other than the built-in :class:`Global`/:class:`Layerwise` (the user's own, or
    one that wraps user code) gets copies of the scores and masks, so that editing them in place
    can neither un-prune weights nor hide new ones from the collapse check.
    """
    if isinstance(setup.selection, (Global, Layerwise)):
        return setup.selection.select(
            scores, masks, sparsity=target, min_density=setup.min_density, layouts=setup.layouts
        )
    new_masks = setup.selection.select(
        {k: s.clone() for k, s in scores.items()},
        {k: m.clone() for k, m in masks.items()},
        sparsity=target,
        min_density=setup.min_density,
        layouts=setup.layouts,
    )
    _check_selected(new_masks, masks)
    return {k: new_masks[k] for k in masks}


def _curvature_used(statistics: Statistics | None) -> str | None:
    """The curvature statistics the scores read, as computed (``"auto"`` resolved)."""
    if statistics is None:
        return None
    used = {str(s) for s in statistics.resolved.values() if s.kind in _CURVATURE_KINDS}
    return ", ".join(sorted(used)) or None


_CURVATURE_KINDS = ("fisher", "fisher_mc", "hutchinson")


def _group_sum(setup: StageSetup) -> GroupSum | None:
    """The selection's ``group_sum`` by parameter name, if it removes groups together."""
    group_sum = getattr(setup.selection, "group_sum", None)
    if group_sum is None:
        return None
    layouts = setup.layouts
    return lambda name, tensor: group_sum(layouts[name], tensor)


def _check_collapse(
    setup: StageSetup,
    masks: Mapping[str, Tensor],
    new_masks: Mapping[str, Tensor],
    stage: int,
    previous: Connectivity | None,
) -> Connectivity:
    """Route an emptied layer or newly cut-off outputs through ``on_collapse``.

    Each expert's matrix of a fused mixture-of-experts parameter is a layer of its own
    (``"…down_proj[3]"``). Returns the disconnection after the stage (for the report). Only a
    growth counts, so the disconnection before is computed (when not known) only if there is any
    after.
    """
    before_pieces = per_matrix(masks, setup.layouts)
    emptied = [
        k
        for k, piece in per_matrix(new_masks, setup.layouts).items()
        if not bool(piece.any()) and bool(before_pieces[k].any())
    ]
    after = connectivity(setup.chain, new_masks)
    if after.total and previous is None:
        previous = connectivity(setup.chain, masks)
    message = collapse_message(stage, emptied, after if previous is None else previous, after)
    handle_collapse(message, setup.on_collapse)
    return after


def _check_selected(new: Mapping[str, Tensor], old: Mapping[str, Tensor]) -> None:
    """A selection (possibly the user's) must return bool masks that only grow the pruned set."""
    if set(new) != set(old):
        raise ValueError(f"the selection returned masks for {sorted(new)}, not {sorted(old)}")
    for name, mask in new.items():
        if (
            not (isinstance(mask, Tensor) and mask.dtype == torch.bool)
            or mask.shape != old[name].shape
        ):
            raise ValueError(f"the selection returned no bool mask shaped like {name!r}")
        if bool((mask & ~old[name].to(mask.device)).any()):
            raise ValueError(f"the selection un-pruned entries of {name!r}: masks never shrink")


def _diagnostics(
    setup: StageSetup,
    params: dict[str, Tensor],
    delta: dict[str, Tensor],
    data: Any,
    stage: int,
    statistics: Statistics | None,
) -> tuple[float, float, float | None]:
    """Loss before, loss after and (:data:`WITH_PREDICTION`) the quadratic model's prediction.

    The loss before is the statistics pass's when there was one: the same mean over the same
    ``data`` at the same weights (in the same dtype: a half-precision model's is recomputed in
    float32, as :func:`~._diagnostics.mean_loss` computes it).
    """
    assert setup.loss_fn is not None
    predicted: float | None = None
    if setup.diagnostics == WITH_PREDICTION:
        loss_before, predicted = predicted_loss_change(
            setup.model, params, delta, data, setup.loss_fn, chunk_size=setup.chunk_size
        )
    elif statistics is not None and statistics_dtype(params) == next(iter(params.values())).dtype:
        loss_before = statistics.loss
    else:
        loss_before = mean_loss(setup.model, params, data, setup.loss_fn)
    loss_after = mean_loss(setup.model, stepped(params, delta), data, setup.loss_fn)
    if not math.isfinite(loss_after):
        raise NonFiniteError(f"the loss after stage {stage} is not finite; nothing was modified")
    return loss_before, loss_after, predicted


@contextmanager
def _scoring_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Eval mode while scoring when asked for; every module's own mode restored afterwards."""
    if not eval_mode:
        yield
        return
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _device_generator(generator: torch.Generator, params: Mapping[str, Tensor]) -> torch.Generator:
    """A generator on the parameters' device, seeded from the pruner's own generator."""
    device = next(iter(params.values())).device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
