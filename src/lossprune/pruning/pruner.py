"""Multi-stage, step-size-constrained pruning of any ``nn.Module`` (layer 5, docs/architecture.md).

:class:`Pruner` orchestrates: each :meth:`Pruner.step` plans a stage without side effects
(:mod:`lossprune.pruning._stage`) and then commits it. The pieces it orchestrates are separate
objects: the criterion (scores), the schedule (targets), the selection
(:mod:`lossprune.selection`), the weight update (:mod:`lossprune.pruning.updates`) and the hooks
that keep pruned weights at zero while training (:mod:`lossprune.selection.keep_at_zero`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._common.batches import model_loss
from .._common.checks import check_fraction, check_optional_positive_int, is_int
from .._common.data import check_can_sample
from .._common.models import check_weights, unwrap
from ..criteria.base import Criterion
from ..curvature import LossFn
from ..schedules import Schedule
from ..selection import (
    MaskHandle,
    Selection,
    apply_masks,
    as_selection,
    count_pruned,
    keep_pruned_at_zero,
    parameter_layouts,
    prunable_parameters,
    save_masks,
    sparsity_of,
)
from ..selection._connectivity import Connectivity, trace_chain
from ._checkpoint import configuration_text, pruner_state, read_pruner_state
from ._stage import LOSS_ONLY, WITH_PREDICTION, StageSetup, plan_stage
from .reports import ON_COLLAPSE, StageReport
from .scoring import check_criterion
from .updates import Compensation, CompensationState

__all__ = ["Pruner"]


class Pruner:
    r"""Prune a model in stages with a loss-model criterion.

    Each :meth:`step` re-fits the criterion at the current weights on the scoring data, selects
    the lowest scores so that exactly :math:`\operatorname{round}(P \cdot p_s)` of the :math:`P`
    prunable weights are zero after stage :math:`s` (globally, or per layer with
    ``scope="layerwise"``), and zeroes them in place (:math:`\Delta\theta_q = -\theta_q`). Masks
    only grow. Laurent et al. (2020, Sec. 4) show that more stages keep the loss far lower.

    The zeros a model already has are pruned weights: the initial masks are the prunable
    weights' nonzero pattern (:func:`lossprune.selection.masks_from_zeros`), so a model pruned
    earlier (and saved, reloaded, fine-tuned) reports its true sparsity, a stage whose target is
    below it is refused, and a higher target prunes only new weights (a report's ``pruned``
    counts the weights that stage pruned, its ``sparsity`` the adopted zeros too; ``adopted``
    holds their number). :func:`lossprune.scores` knows nothing of masks (a zero weight gets
    the criterion's score); :meth:`state_dict` and :meth:`load_state_dict` carry the current
    masks, adopted zeros included, and a loaded state replaces them.

    Args:
        model: the network; pruned in place (parameters keep their identity). A
            ``DistributedDataParallel``/``DataParallel``/``torch.compile`` wrapper is unwrapped
            (masks are keyed by the network's own names); with
            :mod:`torch.distributed` initialised, every statistic and diagnostic is all-reduced
            (example-weighted) so that all ranks select the same mask from their own shards.
            Parameters are looked up by name at every stage, so a parameter replaced between
            stages (``load_state_dict(..., assign=True)``) is followed; one whose shape changed
            is refused.
        criterion: e.g. ``QuadraticModel(lam=1e-3)``.
        schedule: e.g. ``ExponentialSchedule(sparsity=0.9, stages=14)``.
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``. May be omitted for a Hugging
            Face model (``*ForCausalLM``, ``*ForSequenceClassification``, ...): the loss is the
            one the model computes from ``labels`` (:class:`lossprune.ModelLoss`).
        data: scoring data: a batch or a DataLoader of batches; a batch is ``(inputs,
            targets)``, ``((input, ...), targets)`` or a mapping of keyword inputs with
            ``labels`` (a ``dict``, a ``BatchEncoding``).
        scope: ``"global"`` (one ranking over all weights, the paper's), ``"layerwise"``,
            ``"per_row"`` (:class:`~lossprune.PerRow`), a mapping of name patterns to sparsities
            (per-layer targets, :class:`~lossprune.Targets`), or a selection object
            (:mod:`lossprune.selection`: :class:`~lossprune.NM`, :class:`~lossprune.Blocks`,
            ...). Default: the criterion's own comparison group
            (:meth:`~lossprune.Criterion.default_scope`): per output row for
            :class:`~lossprune.Wanda`, as its authors define it; global for the others.
        examples: if given, a fresh random subset of this many examples is drawn from ``data``
            for every stage (the paper uses 1000), only among the rows the DataLoader's sampler
            reads.
        include, exclude: parameter names or regular expressions (default: every Linear and Conv
            ``.weight``); see :func:`lossprune.selection.prunable_parameters`.
        min_density: every layer (each expert's matrix of a fused MoE parameter) keeps at least
            this fraction of its weights.
        generator: seed (int) or :class:`torch.Generator` for example subsets and Monte-Carlo
            statistics; the pruner keeps its own state, so runs are reproducible.
        progress: show a tqdm progress bar in :meth:`run`, and one per batch inside each
            statistics pass.
        eval_mode: put the model in eval mode while scoring (restored afterwards). Without it,
            a model with batch norm or dropout in training mode is refused.
        diagnostics: what every report measures on the stage's scoring data. ``"loss"``:
            ``loss_before`` (the statistics pass's loss when it ran on that data, else one
            forward pass) and ``loss_after`` (one forward pass after the step). ``True``: also
            ``predicted_delta``, the quadratic model's prediction with the exact Hessian (one
            more gradient + Hessian-vector pass: about 3 forward+backwards per batch, more than
            the statistics pass of ``fisher_mc``). ``False``: none. Default (``None``):
            ``"loss"`` whenever ``data`` and ``loss_fn`` are given (a Hugging Face model's own
            loss counts as given).
        chunk_size: the one memory bound of every statistic: at most this many
            parameter-sized per-example pull-backs or tangent vectors exist at once
            (:mod:`lossprune.curvature.statistics`; default: automatic).
        update: ``None`` (the paper: pruned weights are set to zero, the rest is untouched) or a
            :class:`~lossprune.Compensation` (the kept weights also take the
            step-size-constrained quadratic model's best step).
        on_collapse: what to do when a stage prunes every weight of a layer or disconnects
            output units from the input (checked for chains of Linear / convolution layers;
            dead hidden units are counted in every :class:`StageReport`): ``"warn"``
            (:class:`LayerCollapseWarning`, default), ``"raise"`` (:class:`LayerCollapseError`
            before anything is modified) or ``"ignore"``. ``min_density`` prevents empty layers.
        adopt_zeros: start from the model's zeros (default). ``False``: every weight starts
            kept, zeros included (for a model with zero-initialised layers whose zeros are not
            pruning).

    Example:
        >>> import torch
        >>> from lossprune import Pruner, QuadraticModel, ExponentialSchedule
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
        ...                             torch.nn.Linear(16, 3))
        >>> data = (torch.randn(64, 8), torch.randint(0, 3, (64,)))
        >>> pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(0.9, 3),
        ...                 loss_fn=torch.nn.CrossEntropyLoss(), data=data)
        >>> reports = pruner.run()
        >>> [r.pruned for r in reports], round(pruner.sparsity(), 4)  # round(176 * 0.9) = 158
        ([94, 44, 20], 0.8977)
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Criterion,
        schedule: Schedule,
        *,
        loss_fn: LossFn | None = None,
        data: Any = None,
        scope: str | Mapping[str, float] | Selection | None = None,
        examples: int | None = None,
        include: Any = None,
        exclude: Any = None,
        min_density: float = 0.0,
        generator: int | torch.Generator | None = None,
        progress: bool = False,
        eval_mode: bool = False,
        diagnostics: bool | str | None = None,
        chunk_size: int | None = None,
        update: Compensation | None = None,
        on_collapse: str = "warn",
        adopt_zeros: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = unwrap(model)  # DDP, DataParallel, torch.compile: masks use the network's names
        check_weights(model)
        if loss_fn is None:  # a Hugging Face model's own loss, when it has one
            loss_fn = model_loss(model)
        check_criterion(criterion, data, loss_fn)
        self._targets = _check_schedule(schedule)
        self.selection = as_selection(criterion.default_scope() if scope is None else scope)
        for_schedule = getattr(self.selection, "for_schedule", None)
        if callable(for_schedule):  # a selection whose stage targets depend on the whole schedule
            self.selection = for_schedule(self._targets)
        examples = check_optional_positive_int("examples", examples)
        chunk_size = check_optional_positive_int("chunk_size", chunk_size)
        if examples is not None and data is None:
            raise ValueError("examples=n needs data to draw from")
        if examples is not None:
            check_can_sample(data)
        min_density = check_fraction("min_density", min_density)
        diagnostics = _diagnostics_level(diagnostics, data is not None and loss_fn is not None)
        if update is not None and not isinstance(update, Compensation):
            raise TypeError(
                f"update must be None or a lossprune.Compensation, got {type(update).__name__}"
            )
        if update is not None and (data is None or loss_fn is None):
            raise ValueError("update=Compensation(...) needs data and loss_fn")
        if on_collapse not in ON_COLLAPSE:
            raise ValueError(f"on_collapse must be one of {ON_COLLAPSE}, got {on_collapse!r}")
        if not isinstance(adopt_zeros, bool):
            raise TypeError(f"adopt_zeros must be a bool, got {type(adopt_zeros).__name__}")
        params = prunable_parameters(model, include, exclude)
        layouts = parameter_layouts(model, params)
        self.selection.check_schedule(layouts, self._targets, min_density)
        self._shapes = {k: p.shape for k, p in params.items()}

        self.model = model
        self.criterion = criterion
        self.schedule = schedule
        self.compensation = update
        self.on_collapse = on_collapse
        self.min_density = min_density
        self.progress = bool(progress)
        self.generator = _make_generator(generator)
        self._setup = StageSetup(
            model=model,
            criterion=criterion,
            selection=self.selection,
            layouts=layouts,
            loss_fn=loss_fn,
            data=data,
            examples=examples,
            min_density=min_density,
            update=update,
            diagnostics=diagnostics,
            eval_mode=bool(eval_mode),
            on_collapse=on_collapse,
            chunk_size=chunk_size,
            chain=trace_chain(model, params),
        )
        # check_weights refused meta tensors: every weight has a value to read zeros from.
        self.masks: dict[str, Tensor] = {
            k: p.detach() != 0 if adopt_zeros else torch.ones_like(p, dtype=torch.bool)
            for k, p in params.items()
        }
        self.adopted = count_pruned(self.masks)
        """Number of weights that were already zero when the pruner was built (adopted)."""
        self.stage = 0
        self.reports: list[StageReport] = []
        # (masks, their disconnection) from the last stage, reused while self.masks is that dict.
        self._connectivity: tuple[dict[str, Tensor], Connectivity] | None = None
        self.update_state: CompensationState | None = (
            None if update is None else update.init_state()
        )

    @property
    def data(self) -> Any:
        """The scoring data; may be replaced between stages (validated when set)."""
        return self._setup.data

    @data.setter
    def data(self, data: Any) -> None:
        check_criterion(self.criterion, data, self._setup.loss_fn)
        if data is None and (self._setup.examples is not None or self._setup.diagnostics):
            raise ValueError("data=None: this pruner draws examples or computes diagnostics")
        if self._setup.examples is not None:
            check_can_sample(data)
        self._setup = replace(self._setup, data=data)

    @property
    def loss_fn(self) -> LossFn | None:
        """The batch-mean loss the statistics describe."""
        return self._setup.loss_fn

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The prunable parameters by qualified name, looked up in the model now.

        Raises:
            ValueError: a parameter is gone or changed shape since the pruner was built.
        """
        params = {}
        for name, shape in self._shapes.items():
            try:
                param = self.model.get_parameter(name)
            except AttributeError:
                raise ValueError(
                    f"{name!r} is no longer a parameter of the model (replaced by a plain tensor "
                    "or a torch.nn.utils.prune reparametrisation?); build a new Pruner"
                ) from None
            if param.shape != shape:
                raise ValueError(
                    f"parameter {name!r} changed shape from {tuple(shape)} to "
                    f"{tuple(param.shape)} since the pruner was built"
                )
            params[name] = param
        return params

    # ----------------------------------------------------------------------------------------
    # Running the schedule
    # ----------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether every stage of the schedule has run."""
        return self.stage >= len(self._targets)

    def step(self) -> StageReport:
        """Run the next stage and return its report.

        The stage is planned first (statistics, scores, selection, update, diagnostics and
        collapse checks) without touching anything; only then are the weights, masks, update
        state and random state replaced. An error leaves all of them exactly as they were.

        Raises:
            RuntimeError: when the schedule is finished.
            NonFiniteError: a loss, gradient or score is NaN or infinite.
            LayerCollapseError: with ``on_collapse="raise"``, for a stage that empties a layer
                or disconnects units.
        """
        if self.finished:
            raise RuntimeError(f"the schedule's {len(self._targets)} stages have all run")
        self._check_target_reachable(self._targets[self.stage])
        params = self.params
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())  # the plan draws from a copy
        plan = plan_stage(
            replace(self._setup, progress=self.progress), params, self.masks, self.update_state,
            self.stage + 1, self._targets[self.stage], generator, self._known_connectivity(),
        )  # fmt: skip
        # Commit: nothing below can fail on inputs the plan accepted.
        if plan.delta is not None:
            with torch.no_grad():
                for k, param in params.items():
                    param.add_(plan.delta[k].to(param.dtype))
        apply_masks(params, plan.masks)  # pruned weights exactly zero, whatever the rounding
        self.masks = plan.masks
        self.update_state = plan.update_state
        self._connectivity = (plan.masks, plan.connectivity)
        self.generator.set_state(generator.get_state())
        self.stage += 1
        self.reports.append(plan.report)
        return plan.report

    def _check_target_reachable(self, target: float) -> None:
        """Masks never shrink: a target below the weights already pruned is refused."""
        pruned = self.num_pruned()
        total = sum(m.numel() for m in self.masks.values())
        if round(total * target) >= pruned:
            return
        adopted = (
            f" ({self.adopted:,} of them already zero when the Pruner was built)"
            if self.adopted
            else ""
        )
        raise ValueError(
            f"stage {self.stage + 1} targets sparsity {target!r} but {pruned:,} of the "
            f"{total:,} prunable weights ({pruned / total:.4f}) are already pruned{adopted}; "
            f"masks never shrink: use a schedule whose targets start at {pruned / total:.4f} "
            "or above (or Pruner(..., adopt_zeros=False) if those zeros are not pruning)"
        )

    def _known_connectivity(self) -> Connectivity | None:
        if self._connectivity is not None and self._connectivity[0] is self.masks:
            return self._connectivity[1]
        return None

    def run(self) -> list[StageReport]:
        """Run every remaining stage; returns their reports (a progress bar if asked for)."""
        reports = []
        remaining = range(self.stage, len(self._targets))
        with tqdm(remaining, desc="pruning", unit="stage", disable=not self.progress) as bar:
            for _ in bar:
                report = self.step()
                bar.set_postfix(sparsity=f"{report.sparsity:.4f}")
                reports.append(report)
        return reports

    def sparsity(self) -> float:
        """Fraction of the prunable weights that are pruned."""
        return sparsity_of(self.masks)

    def num_pruned(self) -> int:
        """Number of pruned weights."""
        return count_pruned(self.masks)

    # ----------------------------------------------------------------------------------------
    # Keeping pruned weights at zero while training
    # ----------------------------------------------------------------------------------------

    def attach(self, optimizer: Any) -> MaskHandle:
        """Keep pruned weights exactly zero while ``optimizer`` trains the model.

        See :func:`lossprune.selection.keep_pruned_at_zero`: gradients of pruned weights are
        overwritten with zeros as they are computed, and the weights are re-zeroed after every
        ``optimizer.step()``. The current masks are read at every call, so later stages are
        covered too. A wrapper such as Accelerate's ``AcceleratedOptimizer`` is unwrapped. A
        pruner built on a reloaded pruned model starts from its zeros, so they are kept too;
        without a pruner, ``keep_pruned_at_zero(optimizer, model, masks_or_mask_file)``.

        Returns:
            A handle whose ``remove()`` detaches the hooks.
        """
        return keep_pruned_at_zero(optimizer, self.params, lambda: self.masks)

    def apply(self) -> None:
        """Zero the pruned weights of the model in place (e.g. after loading new weights)."""
        apply_masks(self.params, self.masks)

    def save_masks(self, path: str | os.PathLike) -> Path:
        """Write the current masks beside ``save_pretrained``'s files; returns the file's path.

        See :func:`lossprune.selection.save_masks`: ``path`` is a directory (the file is
        ``lossprune_masks.safetensors`` in it) or a ``.safetensors`` file name. A process that
        reloads the model keeps every pruned weight at zero with
        ``keep_pruned_at_zero(optimizer, model, path)`` or ``PruningCallback(path)``.
        """
        return save_masks(self.masks, path)

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-schedule, and the configuration it belongs to.

        Stage, masks, random state and update state, with the schedule's targets, the
        criterion, scope, min_density and update they were computed with. Plain tensors, numbers
        and strings only, so ``torch.load(weights_only=True)`` reads it.
        """
        return pruner_state(
            stage=self.stage,
            masks=self.masks,
            generator=self.generator,
            targets=self._targets,
            criterion=configuration_text(self.criterion),
            scope=configuration_text(self.selection),
            min_density=self.min_density,
            update=self.compensation,
            update_state=self.update_state,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, validated completely before anything changes.

        Restores masks (and zeroes those weights), stage, random state and update state.

        Raises:
            TypeError: a malformed state.
            ValueError: the state belongs to another schedule, criterion, scope, min_density,
                update rule or set of parameters, or holds values out of range.
        """
        params = self.params
        checkpoint = read_pruner_state(
            state,
            params=params,
            targets=self._targets,
            criterion=configuration_text(self.criterion),
            scope=configuration_text(self.selection),
            min_density=self.min_density,
            update=self.compensation,
        )
        self.masks = checkpoint.masks
        self.stage = checkpoint.stage
        self.generator.set_state(checkpoint.generator_state)
        self.update_state = checkpoint.update_state
        apply_masks(params, self.masks)

    def __repr__(self) -> str:
        return (
            f"Pruner({self.criterion!r}, stage {self.stage}/{len(self._targets)}, "
            f"sparsity {self.sparsity():.4f}, scope={self.selection!r})"
        )


def _check_schedule(schedule: object) -> tuple[float, ...]:
    if not isinstance(schedule, Schedule):
        raise TypeError(
            "schedule must provide sparsity(stage), __len__ and __iter__ (e.g. "
            f"LinearSchedule), got {type(schedule).__name__}"
        )
    targets = tuple(float(t) for t in schedule)
    if len(targets) != len(schedule) or not targets:
        raise ValueError("schedule must yield len(schedule) >= 1 targets")
    previous = 0.0
    for stage, target in enumerate(targets, start=1):
        if not 0.0 <= target < 1.0:
            raise ValueError(f"schedule target {target} at stage {stage} is not in [0, 1)")
        if target < previous:
            raise ValueError(f"schedule target decreases at stage {stage}: masks never shrink")
        previous = target
    return targets


def _diagnostics_level(diagnostics: object, possible: bool) -> str | None:
    """The Pruner's ``diagnostics`` argument as a level of :mod:`._stage`, or ``None`` (off).

    ``possible``: ``data`` and ``loss_fn`` are given.
    """
    if diagnostics is None:
        return LOSS_ONLY if possible else None
    if diagnostics is False:
        return None
    if not (diagnostics is True or isinstance(diagnostics, str)):
        raise TypeError(
            f"diagnostics must be None, a bool or {LOSS_ONLY!r}, got {type(diagnostics).__name__}"
        )
    if diagnostics is not True and diagnostics != LOSS_ONLY:
        raise ValueError(f"diagnostics must be None, a bool or {LOSS_ONLY!r}, got {diagnostics!r}")
    if not possible:
        raise ValueError(f"diagnostics={diagnostics!r} needs data and loss_fn")
    return WITH_PREDICTION if diagnostics is True else LOSS_ONLY


def _make_generator(generator: object) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    if isinstance(generator, torch.Generator):
        # A CPU copy: the pruner owns its state so checkpoints restore it exactly.
        own = torch.Generator()
        if generator.device.type == "cpu":
            own.set_state(generator.get_state())
        else:
            own.manual_seed(generator.initial_seed())
        return own
    if is_int(generator):
        return torch.Generator().manual_seed(int(generator))  # type: ignore[call-overload]
    raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {generator!r}")
