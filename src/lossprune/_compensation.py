r"""Step-size-constrained compensation of the kept weights (beyond Laurent et al. 2020).

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
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_nonnegative, check_positive_int
from ._diagnostics import curvature_product
from .curvature import LossFn

__all__ = ["CGResult", "Compensation", "compensation_step", "trust_region_step"]

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
        for name in ("lam", "cg_tol", "auto_lam_tol"):
            check_nonnegative(name, getattr(self, name))
        for name in ("cg_iters", "auto_lam_tries"):
            check_positive_int(name, getattr(self, name))
        if self.curvature not in _CURVATURES:
            raise ValueError(f"curvature must be one of {_CURVATURES}, got {self.curvature!r}")
        if not isinstance(self.auto_lam, bool):
            raise TypeError(f"auto_lam must be a bool, got {type(self.auto_lam).__name__}")
        if self.auto_lam and self.lam == 0:
            raise ValueError("auto_lam needs lam > 0 to start from (it multiplies λ by 10)")


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
    keep = {k: m.to(params[k].dtype) for k, m in kept.items()}
    pruned_step = {k: torch.where(newly_pruned[k], -params[k], 0) for k in params}

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
    x = {k: torch.zeros_like(p) for k, p in params.items()}
    if b_norm == 0.0:
        return pruned_step, CGResult(0, 0.0, False)
    iterations = 0
    if warm_start is not None:
        x = {k: warm_start[k] * keep[k] for k in params}
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
