"""Removal costs on the current weights (formulas: :mod:`~lossprune.layerwise.solvers.stages`)."""

from __future__ import annotations

from torch import Tensor

from ._hessian import DampedHessian

__all__ = ["SCORES", "removal_cost"]

SCORES = ("obs", "obd")


def removal_cost(kind: str, weight: Tensor, hessian: DampedHessian) -> Tensor:
    """The score of each entry of ``weight`` (lower = pruned first), ``kind`` in :data:`SCORES`."""
    if kind == "obs":
        return weight.square() / hessian.inverse.diagonal()
    return weight.square() * hessian.matrix.diagonal()


def check_score(owner: str, kind: object) -> str:
    """``kind`` if it is one of :data:`SCORES`, else ``ValueError`` naming ``owner``."""
    if kind not in SCORES:
        raise ValueError(f"{owner}: score must be one of {SCORES}, got {kind!r}")
    return str(kind)
