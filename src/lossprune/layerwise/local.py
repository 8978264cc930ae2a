r"""The paper's criteria on a linear map's local loss (its reconstruction error).

For a map with reference weights :math:`W_0` (out × in) and calibration inputs :math:`X`
(in × n, the counted tokens), the local loss is

.. math:: E(\hat W) = \|W_0 X - \hat W X\|_F^2 / n = \operatorname{tr}\bigl((\hat W - W_0)
   \,G\,(\hat W - W_0)^\top\bigr), \qquad G = X X^\top / n,

with gradient :math:`\nabla E = 2 (\hat W - W_0) G` (zero at :math:`W_0`) and Hessian
:math:`2G` for every output row. :math:`E` is quadratic, so this model is EXACT: the diagonal
curvature :math:`D_{ij} = 2 G_{jj}` is at once the Hessian, Gauss-Newton and Fisher diagonal.
Every criterion therefore applies unchanged (DESIGN.md: "a criterion does not know which loss it
models"): :func:`local_statistics` answers a criterion's requests with

====================================================  =========================================
request                                               on the local loss
====================================================  =========================================
``grad``                                              :math:`2 (\hat W - W_0) G`
``fisher``, ``fisher_mc``, ``fisher_auto``,           :math:`D_{ij} = 2 G_{jj}` (exact, no
``hutchinson`` (any samples)                          sampling; ``fisher_auto`` resolves to
                                                      ``fisher``)
``input_sq_norms``                                    :math:`G_{jj}` (Wanda's
                                                      :math:`\|X_j\|^2 / n`)
====================================================  =========================================

so OBD's :math:`\tfrac12 D_{ij} W_{ij}^2 = G_{jj} W_{ij}^2` is Wanda's score squared, and at
:math:`\hat W = W_0` the linear and quadratic models reduce to OBD (:math:`g = 0`).
:class:`~lossprune.GraSP` (its :math:`Hg` needs the network's gradient) and
:class:`~lossprune.SynFlow` (a data-free path norm of the whole network) have no meaning on one
layer's reconstruction error and are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor

from ..criteria import GraSP, SynFlow
from ..criteria.base import Criterion, ScaledCriterion, SumCriterion
from ..curvature import Statistic, Statistics
from .solvers import LayerProblem

__all__ = ["check_local_criterion", "local_statistics"]

_DIAGONALS = frozenset({"fisher", "fisher_mc", "fisher_auto", "hutchinson"})
_KNOWN = _DIAGONALS | {"grad", "input_sq_norms"}


def _terms(criterion: Criterion) -> Iterator[Criterion]:
    if isinstance(criterion, SumCriterion):
        for term in criterion.terms:
            yield from _terms(term)
    elif isinstance(criterion, ScaledCriterion):
        yield from _terms(criterion.criterion)
    else:
        yield criterion


def check_local_criterion(criterion: object) -> Criterion:
    """``criterion``, if it has a meaning on a layer's local loss (module docstring).

    Raises:
        TypeError: not a criterion, GraSP, SynFlow, or a criterion requesting a statistic the
            local loss does not define.
    """
    if not isinstance(criterion, Criterion):
        raise TypeError(f"criterion must be a lossprune.Criterion, got {type(criterion).__name__}")
    for term in _terms(criterion):
        if isinstance(term, (GraSP, SynFlow)):
            raise TypeError(
                f"{type(term).__name__} has no meaning on a layer's reconstruction loss (it "
                "reads the whole network's loss or paths); use Wanda, OBD, QuadraticModel, "
                "LinearModel or Magnitude, or the network-scale Pruner"
            )
    unknown = sorted(r.kind for r in criterion.requests() if r.kind not in _KNOWN)
    if unknown:
        raise TypeError(
            f"{criterion!r} requests {unknown}, which the local loss does not define (it "
            f"answers {sorted(_KNOWN)})"
        )
    return criterion


def local_statistics(
    criterion: Criterion,
    problems: Mapping[str, LayerProblem],
    weights: Mapping[str, Tensor],
    rows: int,
) -> Statistics:
    r"""The statistics ``criterion`` requests, of the local loss at ``weights`` (module docstring).

    Args:
        criterion: a criterion accepted by :func:`check_local_criterion`.
        problems: by name, each map's :class:`~lossprune.layerwise.solvers.LayerProblem`
            (:math:`W_0`, :math:`G`), in the (out, in) layout.
        weights: by name, the current :math:`\hat W` (out, in), in ``G``'s dtype.
        rows: :math:`n`, the counted tokens the Gram matrices average over.

    Returns:
        :class:`~lossprune.curvature.Statistics` whose ``loss`` is :math:`\sum E` over the maps.
    """
    grads: dict[str, Tensor] = {}
    loss = 0.0
    for name, problem in problems.items():
        difference = weights[name] - problem.reference
        product = difference @ problem.gram
        grads[name] = 2 * product
        loss += float((product * difference).sum())
    values: dict[Statistic, dict[str, Tensor]] = {}
    resolved: dict[Statistic, Statistic] = {}
    for request in criterion.requests():
        resolved[request] = Statistic("fisher") if request.kind == "fisher_auto" else request
        if request.kind in _DIAGONALS:
            values[request] = {
                name: (2 * p.gram.diagonal()).expand_as(p.reference) for name, p in problems.items()
            }
        elif request.kind == "input_sq_norms":
            values[request] = {name: p.gram.diagonal().unsqueeze(0) for name, p in problems.items()}
    return Statistics(
        loss=loss, grad=grads, examples=rows, values=values, units=float(rows), resolved=resolved
    )
