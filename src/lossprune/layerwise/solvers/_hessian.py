r"""The damped Hessian :math:`H = G + \delta I` of a layer and its inverse, factored once.

Every solver of :mod:`lossprune.layerwise.solvers` works on the same matrix (the local loss's
Hessian is :math:`2H`; the factor 2 cancels everywhere): the exact refit multiplies by
:math:`H` and preconditions with :math:`H^{-1}`, OBS reads the Cholesky factor of
:math:`H^{-1}`, the π stages score with the diagonal of :math:`H^{-1}`. :math:`G` is
symmetrised first (:math:`(G + G^\top)/2`): a Gram matrix accumulated by matrix products in
floating point need not be bit-symmetric.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .problem import Damping, check_damping

__all__ = ["DampedHessian", "damped_hessian"]


class DampedHessian(NamedTuple):
    r""":math:`H = (G + G^\top)/2 + \delta I`, its inverse and :math:`\delta`."""

    matrix: Tensor
    inverse: Tensor
    delta: float


def damped_hessian(gram: Tensor, damping: Damping) -> DampedHessian:
    """Factor :math:`H` by Cholesky and invert it.

    Raises:
        TypeError: ``damping`` is not a :class:`Damping`.
        ValueError: :math:`H` is not positive definite (a zero Gram matrix, or a singular one
            with no damping).
    """
    check_damping("refit", damping)
    delta = damping.value(gram)
    matrix = (gram + gram.T) / 2
    matrix.diagonal().add_(delta)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        why = (
            "with no damping, a Gram matrix whose inputs span fewer directions than the map "
            "has inputs is singular: use Damping(relative > 0)"
            if delta == 0
            else "the Gram matrix is zero or not positive semi-definite: check the statistics"
        )
        raise ValueError(f"G + delta*I is not positive definite (delta = {delta:.3g}): {why}")
    return DampedHessian(matrix, torch.cholesky_inverse(factor), delta)
