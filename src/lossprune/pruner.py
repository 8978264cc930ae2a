"""Multi-stage, step-size-constrained pruning of any ``nn.Module`` (layer 5 of DESIGN.md)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_fraction, check_optional_positive_int, is_int
from ._compensation import (
    CGResult,
    Compensation,
    compensation_step,
    trust_region_step,
)
from ._data import random_subset
from ._diagnostics import mean_loss, predicted_loss_change
from ._functional import check_deterministic
from .criteria.base import Criterion
from .curvature import LossFn, NonFiniteError
from .masks import (
    apply_masks,
    count_pruned,
    layer_densities,
    prunable_parameters,
    select_masks,
    sparsity_of,
)
from .schedules import Schedule
from .scoring import check_criterion, compute_scores

__all__ = ["Pruner", "StageReport", "LayerCollapseWarning", "LayerCollapseError"]

_SCOPES = ("global", "layerwise")
_UPDATES = ("zero", "compensate")
_ON_COLLAPSE = ("warn", "raise", "ignore")


class LayerCollapseWarning(UserWarning):
    """A stage pruned every weight of a layer.

    The network's output then no longer depends on its input through that layer: the OBD π = 1,
    λ = 0 divergence of Laurent et al. (2020, Sec. 5).
    """


class LayerCollapseError(ValueError):
    """Raised instead of :class:`LayerCollapseWarning` with ``on_collapse="raise"``.

    Nothing was modified when it is raised.
    """


@dataclass(frozen=True)
class StageReport:
    r"""What one pruning stage did.

    Attributes:
        stage: 1-based stage number.
        target_sparsity: the schedule's target after this stage.
        sparsity: fraction of prunable weights pruned after this stage.
        pruned: number of weights pruned in this stage.
        step_norm_sq: :math:`\|\Delta\theta\|^2` of the stage: the squared norm of the
            weights removed now (plus the compensation of the kept weights, if any).
        loss_before: mean loss on the stage's scoring data before the step (``None`` without
            diagnostics).
        loss_after: the same after the step.
        predicted_delta: the quadratic model's :math:`g^\top\Delta\theta +
            \tfrac12\Delta\theta^\top H\Delta\theta` (exact Hessian).
        layer_density: fraction of each parameter kept, by qualified name.
        seconds: wall time of the stage.
        update_lam: λ of the compensation update (``None`` when pruned weights are only zeroed).
        compensated: whether the kept weights moved (``False``: ``auto_lam`` found no λ for
            which the model held and fell back to zeroing only; ``None`` without compensation).
        cg_iterations: curvature-vector products spent in conjugate gradients.
        cg_residual: final relative CG residual.
        cg_negative_curvature: CG stopped at a direction of negative curvature (Hessian only).
    """

    stage: int
    target_sparsity: float
    sparsity: float
    pruned: int
    step_norm_sq: float
    loss_before: float | None
    loss_after: float | None
    predicted_delta: float | None
    layer_density: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    update_lam: float | None = None
    compensated: bool | None = None
    cg_iterations: int | None = None
    cg_residual: float | None = None
    cg_negative_curvature: bool | None = None

    @property
    def delta_loss(self) -> float | None:
        """Measured loss change ``loss_after - loss_before`` on the scoring data."""
        if self.loss_before is None or self.loss_after is None:
            return None
        return self.loss_after - self.loss_before

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-friendly)."""
        return asdict(self)

    def __str__(self) -> str:
        text = (
            f"stage {self.stage}: sparsity {self.sparsity:.4f} (target {self.target_sparsity:.4f}),"
            f" pruned {self.pruned}, |dθ|²={self.step_norm_sq:.4g}"
        )
        if self.delta_loss is not None:
            text += (
                f", loss {self.loss_before:.4g} -> {self.loss_after:.4g}"
                f" (ΔL {self.delta_loss:+.4g}, predicted {self.predicted_delta:+.4g})"
            )
        return text


class Pruner:
    r"""Prune a model in stages with a loss-model criterion.

    Each :meth:`step` re-fits the criterion at the current weights on the scoring data, selects
    the lowest scores so that exactly :math:`\operatorname{round}(P \cdot p_s)` of the :math:`P`
    prunable weights are zero after stage :math:`s` (globally, or per layer with
    ``scope="layerwise"``), and zeroes them in place (:math:`\Delta\theta_q = -\theta_q`). Masks
    only grow. Laurent et al. (2020, Sec. 4) show that more stages keep the loss far lower.

    Args:
        model: the network; pruned in place (parameters keep their identity). A
            ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped; with
            :mod:`torch.distributed` initialised, every statistic and diagnostic is all-reduced
            (example-weighted) so that all ranks select the same mask from their own shards.
        criterion: e.g. ``QuadraticModel(lam=1e-3)``.
        schedule: e.g. ``ExponentialSchedule(sparsity=0.9, stages=14)``.
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``.
        data: an ``(inputs, targets)`` batch or a DataLoader; scoring data.
        scope: ``"global"`` (one ranking over all weights, the paper's) or ``"layerwise"``.
        examples: if given, a fresh random subset of this many examples is drawn from ``data``
            for every stage (the paper uses 1000).
        include, exclude: parameter names or regular expressions (default: every Linear and Conv
            ``.weight``); see :func:`lossprune.masks.prunable_parameters`.
        min_density: every layer keeps at least this fraction of its weights.
        generator: seed (int) or :class:`torch.Generator` for example subsets and Monte-Carlo
            statistics; the pruner keeps its own state, so runs are reproducible.
        progress: show a tqdm progress bar in :meth:`run`.
        eval_mode: put the model in eval mode while scoring (restored afterwards). Without it,
            a model with batch norm or dropout in training mode is refused.
        diagnostics: compute ``loss_before``, ``loss_after`` and ``predicted_delta`` for every
            report (one extra gradient + Hessian-vector pass and one forward pass per stage).
            Default: whenever ``data`` and ``loss_fn`` are given.
        chunk_size: memory bound passed to the curvature routines.
        update: ``"zero"`` (the paper: pruned weights are set to zero, the rest is untouched),
            ``"compensate"`` (the kept weights also take the step-size-constrained quadratic
            model's best step, see :class:`Compensation`) or a :class:`Compensation`.
        update_lam, curvature, cg_iters, cg_tol, auto_lam: shortcuts for the fields ``lam``,
            ``curvature``, ``cg_iters``, ``cg_tol``, ``auto_lam`` of :class:`Compensation`
            (only with ``update="compensate"``).
        on_collapse: what to do when a stage would prune every weight of a layer: ``"warn"``
            (:class:`LayerCollapseWarning`, default), ``"raise"`` (:class:`LayerCollapseError`
            before anything is modified) or ``"ignore"``. ``min_density`` prevents it.

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
        scope: str = "global",
        examples: int | None = None,
        include: Any = None,
        exclude: Any = None,
        min_density: float = 0.0,
        generator: int | torch.Generator | None = None,
        progress: bool = False,
        eval_mode: bool = False,
        diagnostics: bool | None = None,
        chunk_size: int | None = None,
        update: str | Compensation = "zero",
        update_lam: float | None = None,
        curvature: str | None = None,
        cg_iters: int | None = None,
        cg_tol: float | None = None,
        auto_lam: bool | None = None,
        on_collapse: str = "warn",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            # Statistics are computed functionally on the wrapped network (its own all-reduce
            # below replaces DDP's gradient sync); masks use the names of the unwrapped model.
            model = model.module
        check_criterion(criterion, data, loss_fn)
        self._targets = _check_schedule(schedule)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        examples = check_optional_positive_int("examples", examples)
        chunk_size = check_optional_positive_int("chunk_size", chunk_size)
        if examples is not None and data is None:
            raise ValueError("examples=n needs data to draw from")
        min_density = check_fraction("min_density", min_density)
        if diagnostics is None:
            diagnostics = data is not None and loss_fn is not None
        elif diagnostics and (data is None or loss_fn is None):
            raise ValueError("diagnostics=True needs data and loss_fn")
        shortcuts = {
            "lam": update_lam,
            "curvature": curvature,
            "cg_iters": cg_iters,
            "cg_tol": cg_tol,
            "auto_lam": auto_lam,
        }
        self.compensation = _make_compensation(update, shortcuts)
        if self.compensation is not None and (data is None or loss_fn is None):
            raise ValueError("update='compensate' needs data and loss_fn")
        if on_collapse not in _ON_COLLAPSE:
            raise ValueError(f"on_collapse must be one of {_ON_COLLAPSE}, got {on_collapse!r}")
        self.on_collapse = on_collapse

        self.model = model
        self.criterion = criterion
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.data = data
        self.scope = scope
        self.examples = examples
        self.min_density = min_density
        self.generator = _make_generator(generator)
        self.progress = bool(progress)
        self.eval_mode = bool(eval_mode)
        self.diagnostics = bool(diagnostics)
        self.chunk_size = chunk_size
        self.params: dict[str, nn.Parameter] = prunable_parameters(model, include, exclude)
        self.masks: dict[str, Tensor] = {
            k: torch.ones_like(p, dtype=torch.bool) for k, p in self.params.items()
        }
        self.stage = 0
        self.reports: list[StageReport] = []
        # Compensation state carried across stages: λ (auto_lam) and the last kept-weight step
        # (CG warm start). Both are checkpointed so that a resumed run is identical.
        self._update_lam = None if self.compensation is None else self.compensation.lam
        self._last_step: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------------------------------
    # Running the schedule
    # ----------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether every stage of the schedule has run."""
        return self.stage >= len(self._targets)

    def step(self) -> StageReport:
        """Run the next stage and return its report.

        Everything (statistics, scores, selection, diagnostics) is computed before the model is
        touched: an error leaves weights and masks exactly as they were.

        Raises:
            RuntimeError: when the schedule is finished.
            NonFiniteError: a loss, gradient or score is NaN or infinite.
        """
        if self.finished:
            raise RuntimeError(f"the schedule's {len(self._targets)} stages have all run")
        start = time.perf_counter()
        target = self._targets[self.stage]
        data = self.data
        if self.examples is not None:
            data = random_subset(self.data, self.examples, self.generator)
        with self._scoring_mode():
            check_deterministic(self.model)
            params = {k: p.detach() for k, p in self.params.items()}
            scores, _ = compute_scores(
                self.model,
                self.criterion,
                params,
                data,
                self.loss_fn,
                generator=self._device_generator(),
                chunk_size=self.chunk_size,
            )
            masks = select_masks(
                scores,
                self.masks,
                sparsity=target,
                scope=self.scope,
                min_density=self.min_density,
            )
            newly_pruned = {k: self.masks[k] & ~masks[k] for k in masks}
            self._check_collapse(masks)
            # The paper's step: pruned weights to zero, the others untouched.
            delta = {k: torch.where(newly_pruned[k], -params[k], 0) for k in params}
            cg = lam_used = compensated = None
            if self.compensation is not None:
                delta, cg, lam_used, compensated = self._compensate(
                    params, masks, newly_pruned, delta, data
                )
            loss_before = loss_after = predicted = None
            if self.diagnostics:
                assert self.loss_fn is not None
                loss_before, predicted = predicted_loss_change(
                    self.model, params, delta, data, self.loss_fn, chunk_size=self.chunk_size
                )
                after = {k: params[k] + delta[k] for k in params}
                loss_after = mean_loss(self.model, after, data, self.loss_fn)
                if not math.isfinite(loss_after):
                    raise NonFiniteError(
                        f"the loss after stage {self.stage + 1} is not finite; nothing was modified"
                    )
        step_norm_sq = float(sum(d.double().square().sum() for d in delta.values()))
        with torch.no_grad():
            for k, param in self.params.items():
                param.add_(delta[k].to(param.dtype))
        apply_masks(self.params, masks)  # pruned weights exactly zero, whatever the rounding
        self.masks = masks
        self.stage += 1
        if self.compensation is not None and compensated:
            assert lam_used is not None
            # Levenberg-Marquardt: after a stage needed a larger λ, try a smaller one next time,
            # never below the user's λ. After a fall-back the next stage starts where this one
            # did, not from the rejected λ.
            self._update_lam = max(self.compensation.lam, lam_used / 10.0)
            self._last_step = {k: torch.where(masks[k], delta[k], 0) for k in delta}
        report = StageReport(
            stage=self.stage,
            target_sparsity=target,
            sparsity=sparsity_of(masks),
            pruned=sum(int(m.sum()) for m in newly_pruned.values()),
            step_norm_sq=step_norm_sq,
            loss_before=loss_before,
            loss_after=loss_after,
            predicted_delta=predicted,
            layer_density=layer_densities(masks),
            seconds=time.perf_counter() - start,
            update_lam=lam_used if compensated else None,
            compensated=compensated,
            cg_iterations=None if cg is None else cg.iterations,
            cg_residual=None if cg is None else cg.residual,
            cg_negative_curvature=None if cg is None else cg.negative_curvature,
        )
        self.reports.append(report)
        return report

    def _check_collapse(self, masks: dict[str, Tensor]) -> None:
        emptied = [k for k, m in masks.items() if self.masks[k].any() and not m.any()]
        if not emptied or self.on_collapse == "ignore":
            return
        message = (
            f"stage {self.stage + 1} prunes every weight of {emptied} (layer collapse: the "
            "output no longer depends on the input through it); pass min_density=... to keep "
            "some weights in every layer"
        )
        if self.on_collapse == "raise":
            raise LayerCollapseError(message + "; nothing was modified")
        warnings.warn(message, LayerCollapseWarning, stacklevel=3)

    def _compensate(
        self,
        params: dict[str, Tensor],
        masks: dict[str, Tensor],
        newly_pruned: dict[str, Tensor],
        zero_step: dict[str, Tensor],
        data: Any,
    ) -> tuple[dict[str, Tensor], CGResult, float, bool]:
        """The step, its CG result, the λ used and whether the kept weights were compensated.

        Not compensated: ``auto_lam`` found no λ for which the model held and fell back to
        ``zero_step`` (the paper's step).
        """
        options = self.compensation
        assert options is not None and self.loss_fn is not None and self._update_lam is not None
        loss_fn = self.loss_fn

        def solve(lam: float) -> tuple[dict[str, Tensor], CGResult]:
            return compensation_step(
                self.model,
                params,
                masks,
                newly_pruned,
                data,
                loss_fn,
                lam=lam,
                curvature=options.curvature,
                max_iters=options.cg_iters,
                tol=options.cg_tol,
                warm_start=self._last_step,
                chunk_size=self.chunk_size,
            )

        if not options.auto_lam:
            return (*solve(self._update_lam), self._update_lam, True)
        loss_before = mean_loss(self.model, params, data, loss_fn)

        def model_change(delta: dict[str, Tensor]) -> float:
            return predicted_loss_change(
                self.model, params, delta, data, loss_fn, curvature=options.curvature,
                chunk_size=self.chunk_size,
            )[1]  # fmt: skip

        def measured_change(delta: dict[str, Tensor]) -> float:
            after = {k: params[k] + delta[k] for k in params}
            return mean_loss(self.model, after, data, loss_fn) - loss_before

        return trust_region_step(
            solve, model_change, measured_change, zero_step, self._update_lam, options
        )

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

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskHandle:
        """Keep pruned weights exactly zero while ``optimizer`` trains the model.

        Gradients of pruned weights are zeroed as they are computed (so momentum buffers never
        pick them up) and the weights are re-zeroed after every ``optimizer.step()`` (so weight
        decay, Adam's moments or an earlier momentum cannot move them). The current masks are read
        at every call, so later stages are covered too.

        Returns:
            A handle whose ``remove()`` detaches the hooks.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        handles = [
            param.register_hook(self._grad_masker(name)) for name, param in self.params.items()
        ]
        handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        self.apply()
        return MaskHandle(handles)

    def _grad_masker(self, name: str):
        def mask_grad(grad: Tensor) -> Tensor:
            return grad * self.masks[name].to(grad.dtype)

        return mask_grad

    def apply(self) -> None:
        """Zero the pruned weights of the model in place (e.g. after loading new weights)."""
        apply_masks(self.params, self.masks)

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-schedule: stage, masks, RNG state and configuration.

        Plain tensors, numbers and strings only, so ``torch.load(weights_only=True)`` reads it.
        """
        return {
            "stage": self.stage,
            "masks": {k: m.detach().cpu().clone() for k, m in self.masks.items()},
            "generator": self.generator.get_state(),
            "targets": list(self._targets),
            "criterion": repr(self.criterion.config()),
            "scope": self.scope,
            "min_density": self.min_density,
            "update_lam": self._update_lam,
            "last_step": None
            if self._last_step is None
            else {k: v.detach().cpu().clone() for k, v in self._last_step.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: restores masks (and zeroes those weights), stage and RNG.

        Raises:
            ValueError: the state belongs to another schedule, criterion or set of parameters.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"stage", "masks", "generator", "targets"} - state.keys()
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}")
        if [float(t) for t in state["targets"]] != list(self._targets):
            raise ValueError("state was saved with a different schedule")
        if "criterion" in state and state["criterion"] != repr(self.criterion.config()):
            raise ValueError(
                f"state was saved with criterion {state['criterion']}, "
                f"not {self.criterion.config()!r}"
            )
        masks = state["masks"]
        if set(masks) != set(self.params):
            raise ValueError(
                f"state has masks for {sorted(masks)}, the pruner prunes {sorted(self.params)}"
            )
        for name, mask in masks.items():
            if mask.shape != self.params[name].shape or mask.dtype != torch.bool:
                raise ValueError(f"state mask {name!r} does not fit the parameter")
        stage = state["stage"]
        if not (isinstance(stage, int) and 0 <= stage <= len(self._targets)):
            raise ValueError(f"state stage {stage!r} is out of range")
        self.masks = {k: masks[k].to(self.params[k].device).clone() for k in self.params}
        self.stage = stage
        self.generator.set_state(state["generator"])
        self._update_lam = state.get("update_lam", self._update_lam)
        last_step = state.get("last_step")
        self._last_step = (
            None
            if last_step is None
            else {k: last_step[k].to(self.params[k].device) for k in self.params}
        )
        self.apply()

    # ----------------------------------------------------------------------------------------

    @contextmanager
    def _scoring_mode(self) -> Iterator[None]:
        if not self.eval_mode:
            yield
            return
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            yield
        finally:
            for module, training in modes.items():
                module.training = training

    def _device_generator(self) -> torch.Generator:
        """A generator on the parameters' device, seeded from the pruner's own generator."""
        device = next(iter(self.params.values())).device
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return torch.Generator(device=device).manual_seed(seed)

    def __repr__(self) -> str:
        return (
            f"Pruner({self.criterion!r}, stage {self.stage}/{len(self._targets)}, "
            f"sparsity {self.sparsity():.4f}, scope={self.scope!r})"
        )


class MaskHandle:
    """Returned by :meth:`Pruner.attach`; ``remove()`` detaches the hooks."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Detach the hooks that keep pruned weights at zero; calling it again does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


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


def _make_compensation(update: object, shortcuts: dict[str, Any]) -> Compensation | None:
    given = {k: v for k, v in shortcuts.items() if v is not None}
    if isinstance(update, Compensation):
        if given:
            raise ValueError(f"pass {sorted(given)} inside the Compensation, not beside it")
        return update
    if update not in _UPDATES:
        raise ValueError(f"update must be one of {_UPDATES} or a Compensation, got {update!r}")
    if update == "zero":
        if given:
            names = ["update_lam" if k == "lam" else k for k in sorted(given)]
            raise ValueError(f"{names} only apply with update='compensate'")
        return None
    return Compensation(**given)


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
