r"""The exact least-squares refit of the kept weights of a layer, row by row.

For an output row with reference :math:`w_0`, kept set :math:`S` and pruned set :math:`P` (the
rest), the refit minimises the damped local loss (:mod:`~lossprune.layerwise.solvers.problem`)
over the kept weights, the pruned ones held at zero:

.. math:: \hat w_S = \arg\min_{w_S}\,(w_0 - \hat w)^\top H (w_0 - \hat w)
   = w_{0,S} + u_S, \qquad H_{SS}\, u_S = H_{SP}\, w_{0,P} = G_{SP}\, w_{0,P},

with :math:`H = G + \delta I`: Optimal Brain Surgeon's compensation (Hassibi & Stork 1993) for
the whole pruned set of the row at once. Rows are independent; a row with nothing kept is zero,
a row with nothing pruned is :math:`w_0`.

Fast path: preconditioned conjugate gradients on all rows at once
(:func:`masked_conjugate_gradients`): one product :math:`U H` and one :math:`R H^{-1}` per
iteration, masked to the kept entries. The preconditioner :math:`(H^{-1})_{SS}` is the inverse of
the Schur complement :math:`H_{SS} - H_{SP} H_{PP}^{-1} H_{PS} \preceq H_{SS}`, so for the
residual :math:`r = H_{SS}(u^\star - u)` of an iterate,

.. math:: E_\delta(u) - E_\delta(u^\star) = r^\top H_{SS}^{-1} r \le r^\top (H^{-1})_{SS}\, r
   = r^\top z ,

a RIGOROUS bound on the excess objective that CG computes anyway. Each row stops when
:math:`r^\top z \le \text{rtol}\cdot(E_\delta(u) - r^\top z)`, which guarantees
:math:`E_\delta(\hat w) \le (1 + \text{rtol})\, \min E_\delta` for that row (in exact
arithmetic). On convergence the residual is recomputed from scratch (recursion drifts in floating
point) and the bound checked again; CG restarts from there while iterations remain, and rows
still above the bound are solved by the slow twin. Nothing inexact is returned silently.

Slow twin: a dense Cholesky solve of :math:`H_{SS} u_S = G_{SP} w_{0,P}` per row
(``method="cholesky"``), the reference the tests compare against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..._common.checks import check_nonnegative, check_positive_int
from ._hessian import DampedHessian, damped_hessian
from .problem import (
    DEFAULT_DAMPING,
    Damping,
    LayerProblem,
    LayerSolution,
    check_mask,
    check_placed_like,
    check_problem,
    solution,
)

__all__ = ["default_rtol", "refit"]

_METHODS = ("cg", "cholesky")

#: Default relative excess objective at which CG stops, by dtype: float32 cannot resolve the
#: objective much below 1e-6 of itself (the residual is a difference of two rounded products).
_DEFAULT_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}

#: Restarts from a freshly computed residual before the remaining rows go to Cholesky.
_MAX_RESTARTS = 3


class ConjugateGradientResult(NamedTuple):
    r"""What :func:`masked_conjugate_gradients` found.

    Attributes:
        correction: :math:`u` (out, in), zero outside the mask: :math:`\hat w = (w_0 + u)`
            on the kept entries.
        iterations: CG iterations run (products with :math:`H`).
        unconverged: ``bool`` (out,), rows whose bound was not met (solve them otherwise).
    """

    correction: Tensor
    iterations: int
    unconverged: Tensor


def default_rtol(dtype: torch.dtype) -> float:
    """The default ``rtol`` of :func:`refit` for a problem in ``dtype``."""
    return _DEFAULT_RTOL[dtype]


def refit(
    problem: LayerProblem,
    mask: Tensor,
    damping: Damping = DEFAULT_DAMPING,
    *,
    initial: Tensor | None = None,
    method: str = "cg",
    rtol: float | None = None,
    max_iter: int = 200,
) -> LayerSolution:
    r"""The exact least-squares refit of the weights ``mask`` keeps (module docstring).

    Args:
        problem: the layer (:class:`LayerProblem`).
        mask: ``bool`` (out, in), a subset of ``problem.kept``: the weights that stay.
        damping: :math:`\delta` of :math:`H = G + \delta I` (:class:`Damping`).
        initial: a warm start :math:`\hat W` (e.g. the previous stage's weights); its entries
            outside ``mask`` are ignored. Only for ``method="cg"``.
        method: ``"cg"`` (batched preconditioned conjugate gradients, the fast path) or
            ``"cholesky"`` (a dense solve per row, the slow twin).
        rtol: relative excess of the damped objective allowed per row (the bound of the
            module docstring); default :func:`default_rtol` of the dtype.
        max_iter: CG iterations before the remaining rows are solved by Cholesky.

    Returns:
        A :class:`LayerSolution` with ``mask`` as given.

    Raises:
        TypeError: a bad problem, mask, damping or initial weight, or a non-number option.
        ValueError: shapes or devices that do not fit, a mask that keeps what
            ``problem.kept`` prunes, an unknown method, a non-positive ``max_iter``, a
            negative ``rtol``, ``initial`` with ``method="cholesky"``, non-finite inputs, or
            :math:`H` not positive definite.
    """
    problem = check_problem(problem)
    mask = check_mask(problem, mask)
    if method not in _METHODS:
        raise ValueError(f"refit: method must be one of {_METHODS}, got {method!r}")
    rtol = default_rtol(problem.gram.dtype) if rtol is None else check_nonnegative("rtol", rtol)
    max_iter = check_positive_int("max_iter", max_iter)
    start = None
    if initial is not None:
        if method != "cg":
            raise ValueError("refit: initial (a warm start) only applies to method='cg'")
        start = _check_initial(problem, initial)
    hessian = damped_hessian(problem.gram, damping)
    weight = refit_weight(
        hessian, problem.reference, mask, method=method, initial=start, rtol=rtol, max_iter=max_iter
    )
    return solution(problem, weight, mask)


def refit_weight(
    hessian: DampedHessian,
    reference: Tensor,
    mask: Tensor,
    *,
    method: str = "cg",
    initial: Tensor | None = None,
    rtol: float,
    max_iter: int = 200,
) -> Tensor:
    r"""The refitted :math:`\hat W = (W_0 + u) \odot M`, arguments already checked.

    The building block the solvers share (one :class:`DampedHessian` for many refits).
    """
    if method == "cholesky":
        return _masked_sum(reference, _cholesky_correction(hessian.matrix, reference, mask), mask)
    start = None if initial is None else (initial - reference).masked_fill(~mask, 0.0)
    result = masked_conjugate_gradients(
        hessian, reference, mask, initial=start, rtol=rtol, max_iter=max_iter
    )
    correction = result.correction
    rows = result.unconverged.nonzero().flatten()
    if rows.numel():
        correction[rows] = _cholesky_correction(hessian.matrix, reference[rows], mask[rows])
    return _masked_sum(reference, correction, mask)


def _masked_sum(reference: Tensor, correction: Tensor, mask: Tensor) -> Tensor:
    return (reference + correction).masked_fill_(~mask, 0.0)


def masked_conjugate_gradients(
    hessian: DampedHessian,
    reference: Tensor,
    mask: Tensor,
    *,
    initial: Tensor | None = None,
    rtol: float,
    max_iter: int,
) -> ConjugateGradientResult:
    r"""Solve :math:`H_{SS}\,u_S = H_{SP}\,w_{0,P}` for every row at once (module docstring).

    Args:
        hessian: :math:`H` and :math:`H^{-1}` (:func:`~.hessian.damped_hessian`).
        reference: :math:`W_0` (out, in).
        mask: ``bool`` (out, in), :math:`S` of each row.
        initial: a starting correction :math:`u` (zero outside ``mask``), or ``None`` for 0.
        rtol: the relative excess objective at which a row stops.
        max_iter: most products with :math:`H` in all.
    """
    matrix, inverse = hessian.matrix, hessian.inverse
    pruned_part = reference.masked_fill(mask, 0.0)
    pulled = pruned_part @ matrix
    rhs = pulled.masked_fill(~mask, 0.0)  # H_SP w_P (H_SS w_S = 0 as w is 0 on S)
    unchanged = (pulled * pruned_part).sum(1)  # E_δ of the row with no update (u = 0)
    correction = torch.zeros_like(reference) if initial is None else initial.clone()
    iterations = 0
    active = torch.ones(reference.shape[0], dtype=torch.bool, device=reference.device)
    for _ in range(_MAX_RESTARTS + 1):
        # A fresh residual: the recursion below drifts in floating point.
        residual = rhs - (correction @ matrix).masked_fill(~mask, 0.0)
        preconditioned = (residual @ inverse).masked_fill(~mask, 0.0)
        residual_norm = (residual * preconditioned).sum(1)
        active = ~_converged(unchanged, correction, rhs, residual, residual_norm, rtol)
        if not bool(active.any()) or iterations >= max_iter:
            break
        direction = preconditioned
        while iterations < max_iter:
            iterations += 1
            product = (direction @ matrix).masked_fill(~mask, 0.0)
            curvature = (direction * product).sum(1)
            step = torch.where(active & (curvature > 0), residual_norm / curvature, 0.0)
            correction += step[:, None] * direction
            residual -= step[:, None] * product
            preconditioned = (residual @ inverse).masked_fill(~mask, 0.0)
            new_norm = (residual * preconditioned).sum(1)
            active &= ~_converged(unchanged, correction, rhs, residual, new_norm, rtol)
            if not bool(active.any()):
                break
            ratio = torch.where(residual_norm > 0, new_norm / residual_norm, 0.0)
            residual_norm = new_norm
            direction = preconditioned + ratio[:, None] * direction
    return ConjugateGradientResult(correction, iterations, active)


def _converged(
    unchanged: Tensor, correction: Tensor, rhs: Tensor, residual: Tensor, bound: Tensor, rtol: float
) -> Tensor:
    r"""Rows whose excess bound :math:`r^\top z` is at most rtol of the optimum's lower bound.

    :math:`E_\delta(u) = c - u^\top b - u^\top r` with :math:`c` the objective of no update,
    :math:`b` the right-hand side and :math:`r = b - H_{SS} u` (no extra product).
    """
    objective = unchanged - (correction * (rhs + residual)).sum(1)
    return bound <= rtol * (objective - bound)


def _cholesky_correction(matrix: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """The slow twin: one dense Cholesky solve per row."""
    correction = torch.zeros_like(reference)
    for row in range(reference.shape[0]):
        kept = mask[row]
        if bool(kept.all()) or not bool(kept.any()):
            continue
        pruned = ~kept
        rhs = matrix[kept][:, pruned] @ reference[row, pruned]
        factor = torch.linalg.cholesky(matrix[kept][:, kept])
        correction[row, kept] = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    return correction


def _check_initial(problem: LayerProblem, initial: object) -> Tensor:
    if not isinstance(initial, Tensor) or not initial.is_floating_point():
        what = initial.dtype if isinstance(initial, Tensor) else type(initial).__name__
        raise TypeError(f"refit: initial must be a floating tensor, got {what}")
    check_placed_like(initial, problem.reference, "refit: initial")
    if not bool(initial.isfinite().all()):
        raise ValueError("refit: initial has non-finite entries")
    return initial.to(problem.gram.dtype)
