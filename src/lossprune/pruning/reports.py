"""What a pruning stage did (:class:`StageReport`) and the collapse it may cause."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from ..selection._connectivity import Connectivity

__all__ = ["StageReport", "LayerCollapseWarning", "LayerCollapseError", "ON_COLLAPSE"]

#: What :class:`~lossprune.Pruner` may do when a stage collapses a layer or disconnects units.
ON_COLLAPSE = ("warn", "raise", "ignore")


class LayerCollapseWarning(UserWarning):
    """A stage pruned every weight of a layer, or disconnected units.

    The network's output then no longer depends on its input through that layer or unit: the
    OBD π = 1, λ = 0 divergence of Laurent et al. (2020, Sec. 5), or GraSP at T = 1 cutting
    classes off the input.
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
            \tfrac12\Delta\theta^\top H\Delta\theta` (exact Hessian); ``None`` unless the
            pruner was made with ``diagnostics=True``.
        layer_density: fraction of each parameter kept, by qualified name.
        seconds: wall time of the stage.
        update_lam: λ of the compensation update (``None`` when pruned weights are only zeroed).
        compensated: whether the kept weights moved (``False``: ``auto_lam`` found no λ for
            which the model held and fell back to zeroing only; ``None`` without compensation).
        cg_iterations: curvature-vector products spent in conjugate gradients.
        cg_residual: final relative CG residual.
        cg_negative_curvature: CG stopped at a direction of negative curvature (Hessian only).
        disconnected_outputs: output units (classes) with no path from the input after this
            stage; ``None``: not checked (the model is not a chain of Linear / convolution
            layers that this can be proved for).
        disconnected_units: per hidden layer (its weight's name), the output units with no
            path from the input or none to the output; ``None``: not checked.
        curvature: the curvature statistic the scores used (``"fisher"``,
            ``"fisher_mc(samples=1)"``, ``"hutchinson(samples=64)"``; for ``curvature="auto"``
            the one it chose); ``None`` when the criterion reads none.
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
    disconnected_outputs: int | None = None
    disconnected_units: dict[str, int] | None = None
    curvature: str | None = None

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
            predicted = (
                "" if self.predicted_delta is None else f", predicted {self.predicted_delta:+.4g}"
            )
            text += (
                f", loss {self.loss_before:.4g} -> {self.loss_after:.4g}"
                f" (ΔL {self.delta_loss:+.4g}{predicted})"
            )
        if self.disconnected_outputs:
            text += f", {self.disconnected_outputs} outputs disconnected"
        return text


def collapse_message(
    stage: int, emptied: list[str], before: Connectivity, after: Connectivity
) -> str | None:
    """What stage ``stage`` collapsed, or ``None`` when it emptied no layer and cut no output.

    A collapse is what makes the network's output independent of its input, wholly or in part:
    an emptied layer, or an output unit with no path left from the input. Dead hidden units
    alone (no kept input, or no kept output) are a normal consequence of unstructured pruning at
    high sparsity (magnitude pruning of the digits MLP to 95% leaves most of the first layer's
    units dead and still fine-tunes to 4-5% error): they are counted in every
    :class:`StageReport`, and named in the message once outputs are cut off.
    """
    parts = []
    if emptied:
        parts.append(
            f"prunes every weight of {emptied} (layer collapse: the output no longer depends on "
            "the input through it; pass min_density=... to keep some weights in every layer)"
        )
    if after.checked and after.outputs > before.outputs:
        dead = {k: n for k, n in after.hidden.items() if n}
        hidden = f"; hidden units with no kept input or output: {dead}" if dead else ""
        parts.append(
            f"disconnects {after.outputs} output units from the input (the output no longer "
            f"depends on the input through them{hidden})"
        )
    if not parts:
        return None
    return f"stage {stage} " + "; it ".join(parts)


def handle_collapse(message: str | None, on_collapse: str) -> None:
    """Route a collapse through ``on_collapse`` (``"raise"`` happens before any change)."""
    if message is None or on_collapse == "ignore":
        return
    if on_collapse == "raise":
        raise LayerCollapseError(message + "; nothing was modified")
    warnings.warn(message, LayerCollapseWarning, stacklevel=5)
