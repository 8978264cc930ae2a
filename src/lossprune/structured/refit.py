r"""The exact least-squares refit of the layers that read removed units.

Removing a group removes input columns of each consumer (``down_proj``, ``o_proj``, ``fc2``, the
next convolution). With :math:`W_0` the consumer's weights when its block is reached, :math:`X`
its calibration inputs computed from the already pruned blocks, :math:`G = X X^\top / n` and
:math:`S` the kept columns, the refit is the layer-wise problem of
:mod:`lossprune.layerwise.solvers.problem` with a mask that keeps the SAME columns in every row:

.. math:: \min_{\hat W_S}\ \operatorname{tr}\bigl((W_0 - \hat W)(G + \delta I)
   (W_0 - \hat W)^\top\bigr), \quad \hat W_P = 0
   \quad\Longrightarrow\quad
   \hat W_S = W_{0,S} + W_{0,P}\, H_{PS} H_{SS}^{-1},\ H = G + \delta I,

one Cholesky factorisation of :math:`H_{SS}` for all rows (:func:`column_refit`; the general
row-by-row refit :func:`lossprune.layerwise.solvers.refit` with the broadcast mask is its slow
twin in the tests). A consumer with a bias refits it too: its input is :math:`(x, 1)`, whose Gram
matrix holds the mean input (:class:`~lossprune.curvature.inputs.InputMoments`), so a removed
unit's mean contribution moves into the bias (the bias column is never removed).

A batch norm BETWEEN the removed units and the consumer is sliced with the units (it is part of
the group); one AFTER the consumer needs nothing: the refit is row by row, and a per-channel
affine map of the outputs scales each row's objective without moving its minimum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..curvature.inputs import InputMoments
from ..layerwise.solvers import Damping, LayerProblem, LayerSolution
from ..layerwise.solvers._hessian import damped_hessian
from ..layerwise.solvers.problem import check_problem, solution
from ..selection.layout import ParameterLayout, from_matrix_view, matrix_view, parameter_layouts
from .groups import Consumer

__all__ = [
    "ConsumerProblem",
    "STRUCTURED_DAMPING",
    "column_refit",
    "consumer_problem",
    "write_refit",
]

#: The damping of structured refits: :math:`\delta = 10^{-5} \operatorname{mean}_j G_{jj}`.
#: A consumer's refit keeps whole columns and has many more calibration rows than columns (16,384
#: tokens for at most a few hundred columns in the benchmarks), so it needs damping only against
#: rounding; SparseGPT's 1 % (the layer-wise default) measurably pulls the refit away from the
#: least-squares solution (benchmarks/README.md: the damping sweep).
STRUCTURED_DAMPING = Damping(relative=1e-5)


class ConsumerProblem(NamedTuple):
    """One consumer's least-squares problem, in the (outputs, inputs) view of its matrix.

    Attributes:
        module: the consumer's qualified name.
        problem: reference :math:`W_0` (with the bias as a last column when ``bias``), Gram
            matrix, kept entries (all of them: the removal is described by ``columns``).
        columns: ``(groups, width)``, the columns each group of the set feeds.
        bias: whether the last column is the bias.
        layout: how the weight maps to the matrix view.
    """

    module: str
    problem: LayerProblem
    columns: Tensor
    bias: bool
    layout: ParameterLayout


def consumer_problem(
    model: nn.Module, consumer: Consumer, moments: InputMoments, dtype: torch.dtype
) -> ConsumerProblem:
    """The refit problem of ``consumer`` at its current weights, from its input moments.

    Raises:
        ValueError: the moments have no Gram matrix (ask for ``gram=True``).
    """
    module = model.get_submodule(consumer.module)
    weight = module.weight
    assert isinstance(weight, Tensor)
    name = f"{consumer.module}.weight"
    layout = parameter_layouts(model, {name: weight})[name]
    if moments.gram is None or moments.mean is None:
        raise ValueError(f"the refit of {consumer.module!r} needs its Gram matrix (gram=True)")
    reference = matrix_view(weight.detach(), layout).to(dtype, copy=True)  # never a view
    gram = moments.gram.to(dtype)
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        reference = torch.cat([reference, bias.detach().to(dtype).unsqueeze(1)], dim=1)
        mean = moments.mean.to(dtype).unsqueeze(1)
        one = torch.ones(1, 1, dtype=dtype, device=gram.device)
        gram = torch.cat([torch.cat([gram, mean], 1), torch.cat([mean.T, one], 1)], 0)
    gram = (gram + gram.T) / 2
    kept = torch.ones_like(reference, dtype=torch.bool)
    problem = LayerProblem(reference.to(gram.device), gram, kept.to(gram.device))
    return ConsumerProblem(consumer.module, problem, consumer.columns, bias is not None, layout)


def removed_columns(problem: ConsumerProblem, removed: Tensor) -> Tensor:
    """``bool`` (columns,): the columns of the removed groups (``removed``: group indices)."""
    mask = torch.zeros(problem.problem.reference.shape[1], dtype=torch.bool)
    mask[problem.columns[removed.cpu()].reshape(-1)] = True
    return mask.to(problem.problem.reference.device)


def column_refit(
    problem: LayerProblem, removed: Tensor, damping: Damping = STRUCTURED_DAMPING
) -> LayerSolution:
    r"""The exact refit when every row loses the same columns ``removed`` (module docstring).

    Args:
        problem: the layer; its ``kept`` must keep every entry (the removal is ``removed``).
        removed: ``bool`` (in,), the columns set to zero.
        damping: :math:`\delta` of :math:`H = G + \delta I`.

    Returns:
        The :class:`~lossprune.layerwise.solvers.LayerSolution` with mask ``~removed`` in every
        row.
    """
    problem = check_problem(problem)
    reference = problem.reference
    hessian = damped_hessian(problem.gram, damping).matrix
    kept = ~removed
    weight = reference.clone()
    weight[:, removed] = 0
    if bool(removed.any()) and bool(kept.any()):
        factor = torch.linalg.cholesky(hessian[kept][:, kept])
        # H_SS U_S^T = H_SP W0_P^T, the pruned weights' effect moved onto the kept ones.
        right = hessian[kept][:, removed] @ reference[:, removed].T
        weight[:, kept] += torch.cholesky_solve(right, factor).T
    mask = kept.unsqueeze(0).expand_as(reference).clone()
    return solution(problem, weight, mask)


def refit_tensors(problem: ConsumerProblem, weight: Tensor, like: nn.Module) -> dict[str, Tensor]:
    """A solved matrix (bias last when the consumer has one) as the consumer's new tensors."""
    module = like.get_submodule(problem.module)
    target = module.weight
    assert isinstance(target, Tensor)
    matrix = weight[:, :-1] if problem.bias else weight
    tensors = {
        f"{problem.module}.weight": from_matrix_view(matrix, problem.layout).to(target.dtype)
    }
    if problem.bias:
        bias = module.bias
        assert isinstance(bias, Tensor)
        tensors[f"{problem.module}.bias"] = weight[:, -1].to(bias.dtype)
    return tensors


def write_refit(model: nn.Module, problem: ConsumerProblem, weight: Tensor) -> None:
    """Write a solved matrix (bias last when the consumer has one) into the consumer, in place."""
    with torch.no_grad():
        for name, value in refit_tensors(problem, weight, model).items():
            model.get_parameter(name).copy_(value)


def consumer_problems(
    model: nn.Module,
    consumers: tuple[Consumer, ...],
    moments: Mapping[str, InputMoments],
    dtype: torch.dtype,
) -> list[ConsumerProblem]:
    """:func:`consumer_problem` for each consumer (moments keyed by ``"<module>.weight"``)."""
    return [consumer_problem(model, c, moments[f"{c.module}.weight"], dtype) for c in consumers]
