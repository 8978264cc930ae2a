r"""The pattern constraint of a mask-choosing solver, from a lossprune selection.

A solver that chooses the mask asks one question of the pattern: given scores of the weights of
ONE matrix (lower = pruned first), the entries still allowed and a target sparsity, which
entries stay? :class:`Pattern` answers it with any :class:`~lossprune.selection.Selection`, so the
solvers inherit the selections' exact counts and deterministic tie rules:

- :class:`~lossprune.selection.Layerwise` (default): ``round(out·in·p)`` pruned in the matrix;
- ``PerRow()`` (when :mod:`lossprune.selection` has it): every output row alone;
- :class:`~lossprune.NM` ``(n, m)``: n kept in every m consecutive inputs;
- :class:`~lossprune.Blocks`: whole tiles, a tile scored by the sum of its weights' scores.

The matrix is presented to the selection as the weight of an ``nn.Linear`` (outputs, inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..._common.checks import check_fraction
from ...selection import NM, Layerwise, ParameterLayout, Selection, Targets
from .problem import LayerProblem, check_problem

__all__ = ["Pattern"]

_NAME = "weight"


@dataclass(frozen=True)
class Pattern:
    """``Pattern(selection)(scores, kept, sparsity) -> mask``: a selection on one matrix.

    Attributes:
        selection: a :class:`~lossprune.selection.Selection` other than
            :class:`~lossprune.selection.Targets` (a layer's own target is resolved before its
            solve: pass that sparsity instead).

    Raises:
        TypeError: not a selection, or a :class:`~lossprune.selection.Targets`.
    """

    selection: Selection = field(default_factory=Layerwise)

    def __post_init__(self) -> None:
        if isinstance(self.selection, Targets) or not isinstance(self.selection, Selection):
            raise TypeError(
                "Pattern: selection must be a Selection on one matrix (Layerwise(), PerRow(), "
                f"NM(n, m), Blocks(h, w)), got {self.selection!r}; for per-layer targets pass "
                "each layer's own sparsity"
            )

    @property
    def local_columns(self) -> int | None:
        """``m`` for N:M (any aligned run of ``m`` columns is chosen on its own), else ``None``."""
        return self.selection.m if isinstance(self.selection, NM) else None

    def check(self, shape: torch.Size, sparsity: float) -> None:
        """Raise ``ValueError`` (the selection's) if it cannot reach ``sparsity`` on ``shape``."""
        self.selection.check_schedule({_NAME: _layout(shape)}, [sparsity], 0.0)

    def __call__(self, scores: Tensor, kept: Tensor, sparsity: float) -> Tensor:
        """The new mask (a subset of ``kept``) at ``sparsity``; pruned entries count first."""
        layout = _layout(scores.shape)
        group_sum = getattr(self.selection, "group_sum", None)
        if group_sum is not None:
            scores = group_sum(layout, scores)
        chosen = self.selection.select(
            {_NAME: scores},
            {_NAME: kept},
            sparsity=sparsity,
            min_density=0.0,
            layouts={_NAME: layout},
        )
        return chosen[_NAME]


def _layout(shape: torch.Size) -> ParameterLayout:
    return ParameterLayout(tuple(shape), "Linear", (1,))


def as_pattern(pattern: object) -> Pattern:
    """A :class:`Pattern` from a pattern or a selection.

    Raises:
        TypeError: neither (a plain callable does not say which of its choices are local).
    """
    if isinstance(pattern, Pattern):
        return pattern
    return Pattern(pattern)  # type: ignore[arg-type]


def check_solve(
    problem: object, pattern: object, sparsity: object
) -> tuple[LayerProblem, Pattern, float]:
    """The checked arguments of a solver's ``solve``, refused before any work."""
    checked = check_problem(problem)
    projection = as_pattern(pattern)
    target = check_fraction("sparsity", sparsity)
    projection.check(checked.reference.shape, target)
    return checked, projection, target
