r"""Structured pruning end to end: choose groups, refit their consumers, remove them.

:class:`StructuredPruner` removes a fraction of the groups of every group set (exactly
:math:`\operatorname{round}(\text{size} \cdot p)` per set after a stage at target :math:`p`, at
least one group kept), in one stage or on the paper's multi-stage schedules
(:class:`~lossprune.LinearSchedule`, :class:`~lossprune.ExponentialSchedule`: each stage re-scores
the model as the previous stages left it, Laurent et al. 2020, Sec. 4). The choice is a loss
model at either scale:

* the network's loss: any :class:`~lossprune.Criterion` at group level
  (:func:`~lossprune.structured.scores.group_scores`: Magnitude, the linear model (Taylor),
  QuadraticModel, OBD...) or :class:`~lossprune.structured.scores.GroupQuadratic` (the exact
  within-group quadratic form), all sets scored in one pass per stage;
* the layer's reconstruction error: :class:`~lossprune.structured.obs.GroupOBS` (the cost of a
  group with the rest refitted, greedy with downdates), set by set.

With ``refit=True`` (default) the consumers of each set (``down_proj``, ``o_proj``, ``fc2``, the
next convolution) are refitted by exact least squares on the calibration data
(:mod:`~lossprune.structured.refit`), SEQUENTIALLY: sets are visited in the order the data
reaches their consumers, and each set's statistics are computed on the model with every earlier
set already removed and refitted (inputs from the pruned blocks, as SparseGPT and OSSCAR do).
Until the end the removed groups are zero in a dense working model (the masked dense model
computes exactly what the smaller one will); then :func:`~lossprune.structured.remove` makes it
small in one step.

Statistics come block by block where every set lies inside one block (the decoder layers of a
transformer: the layer-wise engine's capture, one block on ``device`` at a time), else from one
pass of the whole model per set (:mod:`~lossprune.structured.calibration`). Models dispatched by
accelerate (weights offloaded to the meta device) are refused: the masking and the refits write
ordinary tensors; load the model on the CPU and pass ``device=``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._common.batches import ModelInputs, resolve_loss
from .._common.checks import check_fraction
from .._common.data import check_data, iter_batches
from .._common.functional import check_deterministic
from ..criteria import Criterion, Magnitude
from ..layerwise.offload import is_dispatched
from ..layerwise.solvers import Damping
from ..layerwise.solvers.problem import layer_error
from ..pruning._diagnostics import mean_loss
from ..schedules import Schedule
from .calibration import Moments, block_stack, visits
from .find import find_groups
from .groups import GroupSet, masked_state, parameters_removed
from .measured import MeasuredLoss
from .obs import GroupOBS
from .refit import (
    STRUCTURED_DAMPING,
    ConsumerProblem,
    column_refit,
    consumer_problems,
    refit_tensors,
    removed_columns,
    write_refit,
)
from .removal import _plan, parameter_count, remove
from .scores import GroupQuadratic, group_scores

__all__ = ["StructuredPruner", "StructuredReport", "SetReport"]

Choice = Criterion | GroupQuadratic | GroupOBS | MeasuredLoss


class SetReport(NamedTuple):
    r"""What happened to one group set.

    Attributes:
        name: the set.
        kind: its kind.
        size: groups before.
        removed: the removed group indices (sorted).
        errors: per consumer, the relative reconstruction error
            :math:`\\|W_0X - \\hat WX\\|^2 / \\|W_0X\\|^2` after the last stage (refitted, or with
            the columns simply zeroed when ``refit=False``), on the calibration data.
    """

    name: str
    kind: str
    size: int
    removed: tuple[int, ...]
    errors: dict[str, float]


class StructuredReport(NamedTuple):
    """The result of :meth:`StructuredPruner.run`.

    Attributes:
        model: the smaller model.
        removed: set name to removed group indices.
        sets: one :class:`SetReport` per set, in the order they were visited.
        parameters_before: parameters of the dense model.
        parameters_after: parameters of the smaller model.
    """

    model: nn.Module
    removed: dict[str, tuple[int, ...]]
    sets: list[SetReport]
    parameters_before: int
    parameters_after: int


@dataclass
class StructuredPruner:
    r"""Remove heads, neurons, channels or experts chosen by a loss model, refit, shrink.

    Args:
        model: the network, in eval mode (batch norm and dropout deterministic).
        kinds: ``"heads"``, ``"neurons"``, ``"channels"``, ``"experts"`` or several
            (:func:`~lossprune.structured.find_groups`).
        amount: the fraction of groups removed from every set (``0.25``: one KV group in four),
            or a :class:`~lossprune.Schedule` of such fractions (one per stage).
        choice: a :class:`~lossprune.Criterion` (network scale, group level; default
            :class:`~lossprune.Magnitude`), :class:`~lossprune.structured.GroupQuadratic`,
            :class:`~lossprune.structured.GroupOBS` (layer scale) or
            :class:`~lossprune.structured.MeasuredLoss` (the calibration loss of each candidate).
        refit: refit the consumers of each set by least squares on ``data``.
        data: calibration/scoring batches (the forms of :class:`~lossprune.Pruner`: ``(x, y)``
            pairs, dicts with ``input_ids``, ``attention_mask``, ``labels``), a batch or a
            re-iterable of batches.
        loss_fn: the batch loss for network-scale criteria; ``None`` for a Hugging Face model's
            own loss.
        example_inputs: one batch of inputs for tracing (``"channels"``); default the inputs of
            the first batch of ``data``.
        include: a regular expression; only sets whose name matches it (``re.search``) are
            pruned.
        damping: the damping of every refit (GroupOBS refits with its own).
        statistics_dtype: dtype of the Gram matrices (float64 by default: the refit of small
            models is cheap, and exact).
        inplace: shrink ``model`` itself (default: a copy).
        hf_config: ``"update"`` or ``"record"`` (:func:`~lossprune.structured.remove`).
        device: the compute device of block-by-block calibration (each block is moved there
            while its sets are visited, :mod:`~lossprune.structured.calibration`); default the
            model's own device. Only for models calibrated block by block.

    Raises:
        TypeError: a model, choice or amount of the wrong type; a model that cannot be traced.
        ValueError: an amount outside [0, 1), a choice or refit without data, a model that is
            not deterministic, experts mixed with other kinds or staged, a pattern that
            matches no set, or a removal the Hugging Face config cannot express (checked
            before anything changes).
    """

    model: nn.Module
    kinds: str | Iterable[str]
    amount: float | Schedule
    choice: Choice = field(default_factory=Magnitude)
    refit: bool = True
    data: Any = None
    loss_fn: Any = None
    example_inputs: Any = None
    include: str | None = None
    damping: Damping = STRUCTURED_DAMPING
    statistics_dtype: torch.dtype = torch.float64
    inplace: bool = False
    hf_config: str = "update"
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.choice, Criterion | GroupQuadratic | GroupOBS | MeasuredLoss):
            raise TypeError(
                "choice must be a lossprune Criterion, GroupQuadratic, GroupOBS or MeasuredLoss, "
                f"got {type(self.choice).__name__}"
            )
        self.targets = _targets(self.amount)
        needs_data = self.refit or isinstance(self.choice, GroupOBS | GroupQuadratic | MeasuredLoss)
        needs_data = needs_data or bool(
            isinstance(self.choice, Criterion) and self.choice.requests()
        )
        if needs_data and self.data is None:
            raise ValueError(
                "StructuredPruner: the refit and every data-dependent choice need data=... "
                "(calibration batches)"
            )
        if self.data is not None:
            check_data(self.data)
        check_deterministic(self.model)
        if is_dispatched(self.model) or any(p.is_meta for p in self.model.parameters()):
            raise ValueError(
                "StructuredPruner: the model is dispatched by accelerate or has weights on the "
                "meta device; structured removal writes ordinary tensors: load the model on the "
                "CPU and pass device= to calibrate one block at a time on the accelerator"
            )
        example = self.example_inputs
        wanted = [self.kinds] if isinstance(self.kinds, str) else list(self.kinds)
        if "channels" in wanted and example is None and self.data is not None:
            example = _first_inputs(self.data)
        groups = find_groups(self.model, wanted, example_inputs=example)
        if self.include is not None:
            groups = [g for g in groups if re.search(self.include, g.name)]
            if not groups:
                raise ValueError(f"StructuredPruner: include={self.include!r} matches no group set")
        if "experts" in wanted and (len(wanted) > 1 or len(self.targets) > 1):
            raise ValueError(
                "StructuredPruner: experts are removed in one stage and on their own (removing "
                "an expert reroutes tokens, which a zeroed expert does not model); run another "
                "StructuredPruner for the other kinds"
            )
        if isinstance(self.choice, MeasuredLoss):
            large = [g.name for g in groups if g.size > self.choice.max_groups]
            if large:
                raise ValueError(
                    f"MeasuredLoss measures one pass per group, but {large[:3]} have more than "
                    f"max_groups={self.choice.max_groups} groups; use GroupOBS for them"
                )
        self.groups = _ordered(self.model, groups)
        if self.device is not None:
            if block_stack(self.model, self.groups) is None:
                raise ValueError(
                    "StructuredPruner: device= moves one block at a time to the device, but "
                    "these sets do not each lie inside one block of the model; leave device "
                    "out and move the model"
                )
            if isinstance(self.choice, MeasuredLoss):
                raise ValueError(
                    "StructuredPruner: MeasuredLoss runs the whole model on its own device; "
                    "leave device out"
                )
        final = {g.name: tuple(range(_count(g, self.targets[-1]))) for g in self.groups}
        # The config (and the experts' top-k) are checked now: a refusal after the work would
        # leave an in-place model masked but not removed.
        _plan(self.model, self.groups, {k: v for k, v in final.items() if v}, self.hf_config)

    def run(self) -> StructuredReport:
        """Choose, refit and remove (module docstring); the smaller model is in the report."""
        working = self.model if self.inplace else copy.deepcopy(self.model)
        before = parameter_count(working)
        removed: dict[str, list[int]] = {g.name: [] for g in self.groups}
        errors: dict[str, dict[str, float]] = {g.name: {} for g in self.groups}
        for target in self.targets:
            scores = self._network_scores(working)
            needed = [g for g in self.groups if _count(g, target) > len(removed[g.name])]
            stack = block_stack(working, needed) if needed and self.data is not None else None
            for group_set, moments in self._visits(working, needed, stack):
                extra = _count(group_set, target) - len(removed[group_set.name])
                self._prune_set(working, group_set, removed, errors, scores, extra, moments)
        final = {k: tuple(sorted(v)) for k, v in removed.items() if v}
        saved = parameters_removed(working, self.groups, final)
        small = remove(working, self.groups, final, inplace=True, hf_config=self.hf_config)
        assert before - parameter_count(small) == saved
        sets = [
            SetReport(g.name, g.kind, g.size, final.get(g.name, ()), errors[g.name])
            for g in self.groups
        ]
        return StructuredReport(small, final, sets, before, parameter_count(small))

    def _visits(
        self, working: nn.Module, groups: list[GroupSet], stack: Any
    ) -> Iterator[tuple[GroupSet, Moments | None]]:
        if self.data is None:
            for group_set in groups:
                yield group_set, None
            return
        device = None if self.device is None else torch.device(self.device)
        yield from visits(
            working, groups, stack, self.data, self.loss_fn, self.statistics_dtype, device
        )

    def _network_scores(self, working: nn.Module) -> dict[str, Tensor] | None:
        if isinstance(self.choice, GroupQuadratic):
            return self.choice.scores(working, self.groups, self.data, self.loss_fn)
        if isinstance(self.choice, Criterion):
            return group_scores(working, self.groups, self.choice, self.data, loss_fn=self.loss_fn)
        return None

    def _prune_set(
        self,
        working: nn.Module,
        group_set: GroupSet,
        removed: dict[str, list[int]],
        errors: dict[str, dict[str, float]],
        scores: dict[str, Tensor] | None,
        extra: int,
        moments: Moments | None,
    ) -> None:
        problems: list[ConsumerProblem] = []
        if group_set.consumers and moments is not None:
            problems = consumer_problems(
                working, group_set.consumers, moments(), self.statistics_dtype
            )
        earlier = list(removed[group_set.name])
        solutions = None
        if isinstance(self.choice, GroupOBS):
            if not problems:
                raise ValueError(
                    f"GroupOBS chooses by the consumers' reconstruction error, but "
                    f"{group_set.name!r} ({group_set.kind}) has no consumer; use a criterion"
                )
            result = self.choice.select(problems, earlier, extra)
            chosen, solutions = result.removed, result.solutions
        elif isinstance(self.choice, MeasuredLoss):
            chosen = self._measured(working, group_set, problems, earlier, extra)
        else:
            assert scores is not None
            chosen = _lowest(scores[group_set.name], earlier, extra)
        removed[group_set.name] = earlier + chosen
        gone = torch.tensor(removed[group_set.name], dtype=torch.long)
        if problems and self.refit and solutions is None:
            solutions = [
                column_refit(p.problem, removed_columns(p, gone), self.damping) for p in problems
            ]
        state = masked_state(working, [group_set], {group_set.name: removed[group_set.name]})
        working.load_state_dict(state, strict=False)
        for index, problem in enumerate(problems):
            if self.refit:
                assert solutions is not None
                write_refit(working, problem, solutions[index].weight)
                errors[group_set.name][problem.module] = solutions[index].relative_error
            else:
                zeroed = problem.problem.reference.clone()
                zeroed[:, removed_columns(problem, gone)] = 0
                errors[group_set.name][problem.module] = layer_error(problem.problem, zeroed)[1]

    def _measured(
        self,
        working: nn.Module,
        group_set: GroupSet,
        problems: list[ConsumerProblem],
        earlier: list[int],
        extra: int,
    ) -> list[int]:
        """MeasuredLoss: greedy on the calibration loss after removal (and refit)."""
        loss = resolve_loss(working, self.loss_fn)
        parameters = dict(working.named_parameters())
        chosen: list[int] = []
        for _ in range(extra):
            losses = {}
            for candidate in range(group_set.size):
                if candidate in earlier or candidate in chosen:
                    continue
                removed = [*earlier, *chosen, candidate]
                state = masked_state(working, [group_set], {group_set.name: removed})
                tensors = {k: v for k, v in state.items() if k in parameters}
                gone = torch.tensor(removed, dtype=torch.long)
                for problem in problems if self.refit else []:
                    solved = column_refit(
                        problem.problem, removed_columns(problem, gone), self.damping
                    )
                    tensors.update(refit_tensors(problem, solved.weight, working))
                losses[candidate] = mean_loss(working, tensors, self.data, loss)
            chosen.append(min(losses, key=lambda c: (losses[c], c)))
        return chosen


def _targets(amount: object) -> list[float]:
    if isinstance(amount, int | float) and not isinstance(amount, bool):
        return [check_fraction("amount", amount)]
    if isinstance(amount, Schedule):
        return [check_fraction("amount", target) for target in amount]
    raise TypeError(f"amount must be a fraction or a Schedule, got {type(amount).__name__}")


def _count(group_set: GroupSet, target: float) -> int:
    """Groups removed at ``target``: round(size · target) (Python's round), one kept."""
    return min(round(group_set.size * target), group_set.size - 1)


def _lowest(scores: Tensor, earlier: Sequence[int], count: int) -> list[int]:
    """The ``count`` lowest-scoring groups not removed yet (ties: the lower index)."""
    scores = scores.double().clone().cpu()
    scores[list(earlier)] = float("inf")
    order = torch.sort(scores, stable=True).indices
    return [int(i) for i in order[:count]]


def _ordered(model: nn.Module, groups: Sequence[GroupSet]) -> list[GroupSet]:
    """Sets in the order the data reaches their consumers (their own module when none)."""
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}

    def first(group_set: GroupSet) -> int:
        if group_set.consumers:
            return min(position[c.module] for c in group_set.consumers)
        return position[group_set.name]

    return sorted(groups, key=first)


def _first_inputs(data: Any) -> Any:
    batch = next(iter_batches(data))
    inputs = batch.inputs
    if isinstance(inputs, ModelInputs):
        return inputs.args
    return inputs
