r"""One linear map's least-squares problem: its data, its damping, its objective.

For a linear map with reference weights :math:`W_0` (out × in) and calibration inputs
:math:`X` (in × n), the layer's local loss (docs: "the local loss model") is

.. math:: E(\hat W) = \lVert W_0 X - \hat W X \rVert_F^2 / n
   = \operatorname{tr}\bigl((W_0 - \hat W)\, G\, (W_0 - \hat W)^\top\bigr),
   \qquad G = X X^\top / n,

and the layer error reported everywhere is :math:`E(\hat W) / \operatorname{tr}(W_0 G W_0^\top)`.

Damping
-------
Every solver minimises the DAMPED objective

.. math:: E_\delta(\hat W) = \operatorname{tr}\bigl((W_0 - \hat W)(G + \delta I)
   (W_0 - \hat W)^\top\bigr) = E(\hat W) + \delta \lVert W_0 - \hat W \rVert_F^2,

that is :math:`G` replaced by :math:`H = G + \delta I`: damping pulls the kept weights toward
the reference, never toward zero. This is what SparseGPT (Frantar & Alistarh 2023, ``percdamp``)
and ALPS (Meng et al. 2024, ``damp1``) solve, and it is the step-size constraint of the paper
(Laurent et al. 2020, arXiv:2006.12279): its objective adds :math:`\tfrac{\lambda}{2}\lVert
\Delta\rVert^2` to a quadratic model with Hessian :math:`2G`, i.e.
:math:`\Delta^\top (G + \tfrac{\lambda}{2} I)\Delta`. One rule (:class:`Damping`):

.. math:: \delta = \text{relative} \cdot \operatorname{mean}_j G_{jj} + \lambda / 2 .

As :math:`\delta \to 0` the refit tends to the minimum-norm change of the kept weights that
minimises :math:`E`; :math:`\delta > 0` makes every sub-problem positive definite (dead inputs,
fewer tokens than inputs). Directions the calibration data never excites keep their reference
weights, which is why the pull is toward :math:`W_0` (the design page first wrote the ridge
form :math:`(G_{SS} + \delta I)^{-1} (G w_0)_S`, which pulls toward zero; this module replaces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..._common.checks import check_lam, check_nonnegative
from ...curvature.errors import check_finite

__all__ = ["Damping", "LayerProblem", "LayerSolution", "layer_error"]

_DTYPES = (torch.float32, torch.float64)


class LayerProblem(NamedTuple):
    r"""One linear map's least-squares problem.

    Attributes:
        reference: :math:`W_0`, (out, in); any floating dtype (solved in ``gram``'s dtype).
        gram: :math:`G = X X^\top / n`, (in, in), float32 or float64, symmetric positive
            semi-definite (symmetrised by the solvers: :math:`(G + G^\top)/2`).
        kept: ``bool`` (out, in), the entries still allowed (masks only shrink).
    """

    reference: Tensor
    gram: Tensor
    kept: Tensor


class LayerSolution(NamedTuple):
    r"""A solver's answer.

    Attributes:
        weight: :math:`\hat W` in ``gram``'s dtype, exactly zero outside ``mask``.
        mask: ``bool`` (out, in), a subset of the problem's ``kept``.
        error: :math:`E(\hat W)`, the UNDAMPED local loss (the damped one is what solvers
            minimise: :func:`damped_objective`).
        relative_error: :math:`E(\hat W) / \operatorname{tr}(W_0 G W_0^\top)` (0 when the
            denominator is 0).
    """

    weight: Tensor
    mask: Tensor
    error: float
    relative_error: float


@dataclass(frozen=True)
class Damping:
    r"""The damping :math:`\delta` of :math:`H = G + \delta I` (module docstring).

    :math:`\delta = \text{relative} \cdot \operatorname{mean}_j G_{jj} + \lambda/2`.

    Attributes:
        relative: multiple of the mean diagonal of :math:`G` (SparseGPT's ``percdamp``,
            default 0.01 as in SparseGPT and ALPS).
        lam: the paper's step-size constraint :math:`\lambda \ge 0`, in the units of the
            local loss (its Hessian is :math:`2G`, hence :math:`\lambda/2`).

    Raises:
        TypeError: a value that is not a real number.
        ValueError: a negative or non-finite value.
    """

    relative: float = 0.01
    lam: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "relative", check_nonnegative("Damping: relative", self.relative))
        object.__setattr__(self, "lam", check_lam(self.lam, "Damping: lam"))

    def value(self, gram: Tensor) -> float:
        r""":math:`\delta` for this Gram matrix."""
        mean_diagonal = float(gram.diagonal().mean()) if gram.numel() else 0.0
        return self.relative * mean_diagonal + self.lam / 2


def check_damping(owner: str, damping: object) -> Damping:
    """``damping`` if it is a :class:`Damping`, else ``TypeError`` naming ``owner``."""
    if not isinstance(damping, Damping):
        raise TypeError(f"{owner}: damping must be a Damping, got {type(damping).__name__}")
    return damping


def check_positive(name: str, value: object) -> float:
    """A finite real number ``> 0``, returned as float."""
    number = check_nonnegative(name, value)
    if number == 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


#: The damping every solver uses unless told otherwise.
DEFAULT_DAMPING = Damping()


def check_problem(problem: object) -> LayerProblem:
    """The problem with ``reference`` in ``gram``'s dtype; precise errors for anything else.

    Raises:
        TypeError: not a :class:`LayerProblem`, a field that is not a tensor, a Gram matrix
            that is not float32/float64, a non-floating reference or a non-bool ``kept``.
        ValueError: shapes that do not fit, tensors on different devices, or non-finite values.
    """
    if not isinstance(problem, LayerProblem):
        raise TypeError(f"problem must be a LayerProblem, got {type(problem).__name__}")
    reference, gram, kept = problem
    for name, tensor in zip(LayerProblem._fields, problem, strict=True):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"LayerProblem.{name} must be a tensor, got {type(tensor).__name__}")
    if gram.dtype not in _DTYPES:
        raise TypeError(
            f"LayerProblem.gram must be float32 or float64, got {gram.dtype}: accumulate the "
            "Gram matrix in float32 (float64 when asked) whatever the model's dtype"
        )
    if not reference.is_floating_point():
        raise TypeError(f"LayerProblem.reference must be floating, got {reference.dtype}")
    if kept.dtype != torch.bool:
        raise TypeError(f"LayerProblem.kept must be a bool tensor, got {kept.dtype}")
    if reference.dim() != 2:
        raise ValueError(
            f"LayerProblem.reference must be a (out, in) matrix, got shape {tuple(reference.shape)}"
        )
    inputs = reference.shape[1]
    if tuple(gram.shape) != (inputs, inputs):
        raise ValueError(
            f"LayerProblem.gram must be ({inputs}, {inputs}) for a reference of shape "
            f"{tuple(reference.shape)}, got {tuple(gram.shape)}"
        )
    if kept.shape != reference.shape:
        raise ValueError(
            f"LayerProblem.kept must have the reference's shape {tuple(reference.shape)}, got "
            f"{tuple(kept.shape)}"
        )
    devices = {reference.device, gram.device, kept.device}
    if len(devices) > 1:
        raise ValueError(
            f"LayerProblem's tensors must be on one device, got {sorted(map(str, devices))}"
        )
    check_finite("reference weight W0", reference)
    check_finite("Gram matrix G", gram)
    return LayerProblem(reference.to(gram.dtype), gram, kept)


def check_placed_like(tensor: Tensor, like: Tensor, name: str) -> None:
    """``ValueError`` unless ``tensor`` has the shape and device of ``like``."""
    if tensor.shape != like.shape or tensor.device != like.device:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} on {like.device}, got "
            f"{tuple(tensor.shape)} on {tensor.device}"
        )


def check_mask(problem: LayerProblem, mask: object, name: str = "mask") -> Tensor:
    """``mask`` as a bool (out, in) subset of ``problem.kept``.

    Raises:
        TypeError: not a bool tensor.
        ValueError: another shape or device, or an entry kept that ``problem.kept`` prunes.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor, got {what}")
    check_placed_like(mask, problem.kept, name)
    if bool((mask & ~problem.kept).any()):
        raise ValueError(f"{name} keeps entries that problem.kept prunes (masks only shrink)")
    return mask


def damped_objective(problem: LayerProblem, weight: Tensor, delta: float) -> Tensor:
    r"""Per output row, :math:`(w_0 - \hat w)^\top (G + \delta I) (w_0 - \hat w)`."""
    difference = problem.reference - weight
    return ((difference @ problem.gram) * difference).sum(1) + delta * difference.square().sum(1)


def layer_error(problem: LayerProblem, weight: Tensor) -> tuple[float, float]:
    r""":math:`E(\hat W)` and :math:`E(\hat W) / \operatorname{tr}(W_0 G W_0^\top)`."""
    error = float(damped_objective(problem, weight, 0.0).sum())
    scale = float(((problem.reference @ problem.gram) * problem.reference).sum())
    return error, (error / scale if scale > 0 else 0.0)


def solution(problem: LayerProblem, weight: Tensor, mask: Tensor) -> LayerSolution:
    """A :class:`LayerSolution`; ``weight`` is zeroed outside ``mask`` and checked finite."""
    weight = weight.masked_fill(~mask, 0.0)
    check_finite("solved weight", weight)
    error, relative = layer_error(problem, weight)
    return LayerSolution(weight, mask, error, relative)
