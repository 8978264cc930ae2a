r"""The weight update of a stage: the paper's zeroing, or step-size-constrained compensation.

``Pruner(..., update=None)`` only zeroes the pruned weights (Laurent et al. 2020).
``Pruner(..., update=Compensation(lam=...))`` also moves the kept weights (beyond the paper).
Like an optax transformation, :class:`Compensation` is an immutable configuration; the state it
carries from stage to stage (λ chosen by ``auto_lam``, the previous step for the CG warm start)
is an explicit :class:`CompensationState` with its own ``state_dict``, returned by
:func:`plan_update` and stored by the pruner only when a stage commits.

The paper only zeroes the pruned weights. The quadratic model it scores with also says how the
KEPT weights should move: with :math:`P` the weights pruned in this stage (fixed at
:math:`\Delta_P = -\theta_P`), :math:`K` the weights still kept, :math:`g` the gradient, :math:`C`
a curvature matrix (GGN by default, PSD) and λ > 0 the step-size constraint, the step

.. math:: \delta_K = \arg\min_{\delta}\; g^\top\Delta + \tfrac12 \Delta^\top (C + \lambda I)\Delta,
   \qquad \Delta = (\delta, -\theta_P, 0)

solves :math:`(C + \lambda I)_{KK}\,\delta_K = -g_K + C_{KP}\,\theta_P` (weights pruned in earlier
stages stay zero). This is Optimal Brain Surgeon's compensation (Hassibi & Stork 1993) for a whole
set of weights at once, regularised by the step-size constraint. It is solved matrix-free with
conjugate gradients (Hestenes & Stiefel 1952), one curvature-vector product pass over the scoring
data per iteration. With the true Hessian (indefinite) CG stops at the first direction of
negative curvature (Steihaug 1983) and says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._common.checks import check_lam, check_nonnegative, check_positive_int
from .._common.functional import statistics_dtype
from ..curvature import LossFn
from ._diagnostics import curvature_product, mean_loss, predicted_loss_change, stepped

__all__ = [
    "CGResult",
    "Compensation",
    "CompensationState",
    "UpdatePlan",
    "compensation_step",
    "plan_update",
    "trust_region_step",
]

Params = dict[str, Tensor]


_CURVATURES = ("ggn", "hessian")


@dataclass(frozen=True)
class Compensation:
    r"""Options of the compensation update (``Pruner(..., update=Compensation(...))``).

    Attributes:
        lam: λ ≥ 0 of :math:`(C + \lambda I)`; the step-size constraint of the update.
        curvature: ``"ggn"`` (Gauss-Newton, PSD: CG always applies) or ``"hessian"``.
        cg_iters: conjugate-gradient iteration cap per solve.
        cg_tol: relative residual at which CG stops.
        auto_lam: choose λ per stage as a trust region (Levenberg-Marquardt, see
            :func:`trust_region_step`): λ is multiplied by 10 until the compensation achieves
            at least ``1 - auto_lam_tol`` of the loss improvement the quadratic model predicts
            for it; the next stage starts from the accepted λ divided by 10, never below
            ``lam``.
        auto_lam_tol: how far the measured improvement may fall short of the predicted one
            (0.5: at least half of it).
        auto_lam_tries: most λ increases per stage.
    """

    lam: float = 1e-3
    curvature: str = "ggn"
    cg_iters: int = 20
    cg_tol: float = 1e-4
    auto_lam: bool = False
    auto_lam_tol: float = 0.5
    auto_lam_tries: int = 8

    def __post_init__(self) -> None:
        check_lam(self.lam)
        for name in ("cg_tol", "auto_lam_tol"):
            check_nonnegative(name, getattr(self, name))
        for name in ("cg_iters", "auto_lam_tries"):
            check_positive_int(name, getattr(self, name))
        if self.curvature not in _CURVATURES:
            raise ValueError(f"curvature must be one of {_CURVATURES}, got {self.curvature!r}")
        if not isinstance(self.auto_lam, bool):
            raise TypeError(f"auto_lam must be a bool, got {type(self.auto_lam).__name__}")
        if self.auto_lam and self.lam == 0:
            raise ValueError("auto_lam needs lam > 0 to start from (it multiplies λ by 10)")

    def init_state(self) -> CompensationState:
        """The state before the first stage: λ = :attr:`lam`, no warm start."""
        return CompensationState(self.lam, None)


@dataclass(frozen=True)
class CGResult:
    r"""How the conjugate-gradient solve ended.

    Attributes:
        iterations: curvature-vector products spent on CG iterations.
        residual: final relative residual :math:`\|b - Ax\| / \|b\|`.
        negative_curvature: CG met a direction with :math:`p^\top A p \le 0` and stopped.
    """

    iterations: int
    residual: float
    negative_curvature: bool


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def compensation_step(
    model: nn.Module,
    params: Mapping[str, Tensor],
    kept: Mapping[str, Tensor],
    newly_pruned: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn,
    *,
    lam: float,
    curvature: str = "ggn",
    max_iters: int = 20,
    tol: float = 1e-4,
    warm_start: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = None,
) -> tuple[Params, CGResult]:
    r"""The full step :math:`\Delta` (pruned weights to zero, kept weights compensated).

    Args:
        model: the network (called functionally, never modified).
        params: current weights θ.
        kept: bool masks of the weights kept AFTER this stage (:math:`K`).
        newly_pruned: bool masks of the weights pruned in this stage (:math:`P`).
        lam: λ ≥ 0 added to the curvature (must be > 0 when ``C`` is singular).
        curvature: ``"ggn"`` (PSD, default) or ``"hessian"``.
        max_iters: CG iteration cap.
        tol: stop when the relative residual falls below it.
        warm_start: initial :math:`\delta_K` (e.g. the previous stage's step); zero otherwise.
        data: scoring data, an ``(inputs, targets)`` batch or a DataLoader.
        loss_fn: batch-mean loss.
        chunk_size: memory bound for the curvature-vector products.

    Returns:
        ``(delta, result)`` with ``delta`` shaped like ``params``.
    """
    # The solve is in the statistics dtype (float32 for half-precision weights): CG's inner
    # products and updates in bfloat16 would stall; the products run in the model's dtype.
    dtype = statistics_dtype(params)
    keep = {k: m.to(dtype) for k, m in kept.items()}
    pruned_step = {k: torch.where(newly_pruned[k], -params[k], 0).to(dtype) for k in params}

    def restricted_product(v: Mapping[str, Tensor]) -> Params:
        """(C + λI)_KK v for v supported on K."""
        _, _, cv = curvature_product(
            model, params, data, loss_fn, v, curvature=curvature, chunk_size=chunk_size
        )
        return {k: (cv[k] + lam * v[k]) * keep[k] for k in v}

    # b = -g_K - (C Δ_P)_K, with Δ_P = -θ_P.
    _, grad, c_pruned = curvature_product(
        model, params, data, loss_fn, pruned_step, curvature=curvature, chunk_size=chunk_size
    )
    b = {k: -(grad[k] + c_pruned[k]) * keep[k] for k in params}
    b_norm = math.sqrt(_dot(b, b))
    x = {k: torch.zeros_like(p, dtype=dtype) for k, p in params.items()}
    if b_norm == 0.0:
        return pruned_step, CGResult(0, 0.0, False)
    iterations = 0
    if warm_start is not None:
        x = {k: warm_start[k].to(dtype) * keep[k] for k in params}
        ax = restricted_product(x)
        iterations += 1
        r = {k: b[k] - ax[k] for k in params}
    else:
        r = dict(b)
    p = dict(r)
    rr = _dot(r, r)
    negative = False
    while math.sqrt(rr) > tol * b_norm and iterations < max_iters:
        ap = restricted_product(p)
        iterations += 1
        curvature_along = _dot(p, ap)
        if curvature_along <= 0.0 or not math.isfinite(curvature_along):
            negative = True
            break
        alpha = rr / curvature_along
        x = {k: x[k] + alpha * p[k] for k in params}
        r = {k: r[k] - alpha * ap[k] for k in params}
        rr_next = _dot(r, r)
        p = {k: r[k] + (rr_next / rr) * p[k] for k in params}
        rr = rr_next
    delta = {k: x[k] + pruned_step[k] for k in params}
    return delta, CGResult(iterations, math.sqrt(rr) / b_norm, negative)


def trust_region_step(
    solve: Callable[[float], tuple[Params, CGResult]],
    model_change: Callable[[Params], float],
    measured_change: Callable[[Params], float],
    zero_step: Params,
    lam: float,
    options: Compensation,
) -> tuple[Params, CGResult, float, bool]:
    r"""Levenberg-Marquardt choice of λ for one stage's compensation.

    The compensation is judged by what it adds to the paper's step (pruned weights zeroed, the
    rest untouched): its predicted gain :math:`\rho_m = m(\Delta) - m(\Delta_0)`, with
    :math:`m` the quadratic model :math:`g^\top\Delta + \tfrac12\Delta^\top C\Delta`, against
    its measured gain :math:`\rho_L = L(\theta+\Delta) - L(\theta+\Delta_0)` on the scoring
    data. As in Levenberg-Marquardt (Moré 1978) the step is accepted when it achieves at least
    ``1 - options.auto_lam_tol`` of the improvement the model predicts,
    :math:`\rho_L \le (1 - \text{tol}) \min(\rho_m, 0)` (a larger improvement is welcome);
    otherwise λ is multiplied by 10, which shortens the step towards the region where the model
    holds. After ``options.auto_lam_tries`` increases the stage falls back to the zero step, so
    compensation never does worse on the scoring data than pruning alone.

    Returns:
        ``(delta, cg_result, lam, accepted)``: ``cg_result`` counts the CG iterations of every
        try; ``lam`` is the accepted λ (the last one tried when ``accepted`` is False).
    """
    zero_model, zero_measured = model_change(zero_step), measured_change(zero_step)
    iterations = 0
    for attempt in range(options.auto_lam_tries + 1):
        if attempt:
            lam *= 10.0
        delta, result = solve(lam)
        iterations += result.iterations
        result = replace(result, iterations=iterations)
        predicted = model_change(delta) - zero_model
        measured = measured_change(delta) - zero_measured
        if measured <= 0 and measured <= (1.0 - options.auto_lam_tol) * min(predicted, 0.0):
            return delta, result, lam, True
    return zero_step, result, lam, False


@dataclass(frozen=True)
class CompensationState:
    """What a :class:`Compensation` carries from one stage to the next.

    Attributes:
        lam: λ the next stage starts from (``auto_lam`` lowers it after a success, never below
            :attr:`Compensation.lam`).
        last_step: the previous stage's step of the kept weights (CG warm start), by parameter
            name, or ``None`` before the first compensated stage.
    """

    lam: float
    last_step: Mapping[str, Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain floats and CPU tensors (``torch.load(weights_only=True)`` reads it)."""
        last_step = None
        if self.last_step is not None:
            last_step = {k: v.detach().cpu().clone() for k, v in self.last_step.items()}
        return {"lam": self.lam, "last_step": last_step}

    @classmethod
    def from_state_dict(cls, state: object, params: Mapping[str, Tensor]) -> CompensationState:
        """Validate a :meth:`state_dict` against the parameters; nothing is changed here.

        Raises:
            TypeError: ``state`` is not a dict, ``lam`` not a real number, or a step not a
                floating-point tensor.
            ValueError: a missing key, λ out of range, or steps whose names or shapes differ
                from the parameters'.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"the update state must be a dict, got {type(state).__name__}")
        missing = {"lam", "last_step"} - state.keys()
        if missing:
            raise ValueError(f"the update state lacks {sorted(missing)}")
        lam = check_lam(state["lam"], "the update state's lam")
        last_step = state["last_step"]
        if last_step is None:
            return cls(lam, None)
        if not isinstance(last_step, Mapping) or set(last_step) != set(params):
            names = sorted(last_step) if isinstance(last_step, Mapping) else type(last_step)
            raise ValueError(
                f"the update state's last_step has entries {names}, "
                f"the pruner prunes {sorted(params)}"
            )
        for name, step in last_step.items():
            if not isinstance(step, Tensor) or not step.is_floating_point():
                raise TypeError(
                    f"the update state's last_step[{name!r}] must be a floating-point tensor"
                )
            if step.shape != params[name].shape:
                raise ValueError(
                    f"the update state's last_step[{name!r}] has shape {tuple(step.shape)}, "
                    f"the parameter {tuple(params[name].shape)}"
                )
        return cls(lam, {k: last_step[k].to(params[k].device) for k in params})


class UpdatePlan(NamedTuple):
    """One stage's update, computed without touching the model.

    Attributes:
        delta: the full step Δθ by parameter name (pruned weights: ``-θ``).
        state: the compensation state to keep if the stage commits (``None`` without
            compensation).
        lam: λ of the accepted compensation, ``None`` when the kept weights did not move.
        compensated: whether the kept weights moved (``None`` without compensation).
        cg: how conjugate gradients ended (``None`` without compensation).
    """

    delta: Params
    state: CompensationState | None
    lam: float | None
    compensated: bool | None
    cg: CGResult | None


def zero_step(params: Mapping[str, Tensor], newly_pruned: Mapping[str, Tensor]) -> Params:
    r"""The paper's step: :math:`\Delta\theta_q = -\theta_q` for the pruned weights, 0 elsewhere."""
    return {k: torch.where(newly_pruned[k], -params[k], 0) for k in params}


def plan_update(
    update: Compensation | None,
    state: CompensationState | None,
    model: nn.Module,
    params: Mapping[str, Tensor],
    kept: Mapping[str, Tensor],
    newly_pruned: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn | None,
    *,
    chunk_size: int | None = None,
) -> UpdatePlan:
    """The step of one stage under ``update`` (``None``: the paper's zeroing), side-effect free.

    With a :class:`Compensation` this is :func:`compensation_step` at the state's λ, or, with
    ``auto_lam``, :func:`trust_region_step`; the returned state is the one to keep if the stage
    commits (λ divided by 10 after a success, never below ``update.lam``; the kept weights'
    step for the next warm start). After a fall-back to zeroing the state does not change.
    """
    zero = zero_step(params, newly_pruned)
    if update is None:
        return UpdatePlan(zero, None, None, None, None)
    assert state is not None and loss_fn is not None

    def solve(lam: float) -> tuple[Params, CGResult]:
        return compensation_step(
            model, params, kept, newly_pruned, data, loss_fn, lam=lam,
            curvature=update.curvature, max_iters=update.cg_iters, tol=update.cg_tol,
            warm_start=state.last_step, chunk_size=chunk_size,
        )  # fmt: skip

    if update.auto_lam:
        loss_before = mean_loss(model, params, data, loss_fn)

        def model_change(delta: Params) -> float:
            return predicted_loss_change(
                model, params, delta, data, loss_fn, curvature=update.curvature,
                chunk_size=chunk_size,
            )[1]  # fmt: skip

        def measured_change(delta: Params) -> float:
            return mean_loss(model, stepped(params, delta), data, loss_fn) - loss_before

        delta, cg, lam, accepted = trust_region_step(
            solve, model_change, measured_change, zero, state.lam, update
        )
    else:
        (delta, cg), lam, accepted = solve(state.lam), state.lam, True
    if not accepted:
        return UpdatePlan(delta, state, None, False, cg)
    # Levenberg-Marquardt: after a stage needed a larger λ, try a smaller one next time, never
    # below the user's λ. After a fall-back the next stage starts where this one did.
    next_lam = max(update.lam, lam / 10.0)
    last_step = {k: torch.where(kept[k], delta[k], 0) for k in delta}
    return UpdatePlan(delta, CompensationState(next_lam, last_step), lam, True, cg)
