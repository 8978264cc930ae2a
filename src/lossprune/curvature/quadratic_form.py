r"""Loss, slope and curvature along ONE direction: :math:`L`, :math:`g^\top v`, :math:`v^\top Cv`.

On one batch, these three numbers are all that a prediction
:math:`\Delta L \approx g^\top v + \tfrac12 v^\top C v` needs (a pruning step's diagnostics, a
trust region's model change); no parameter-sized product is formed.

``curvature="ggn"`` (:math:`C = G = J^\top M J`, Schraudolph 2002): ONE forward-mode pass, no
autograd graph through the model. A Jacobian-vector product (Pearlmutter's 1994 R-operator,
:func:`torch.func.jvp`) gives the outputs :math:`f` and :math:`Jv` together; at the outputs,

.. math:: g^\top v = \nabla_f L^\top (Jv), \qquad v^\top G v = (Jv)^\top M\, (Jv),

with :math:`M` the output-space curvature of :mod:`.outputs` (closed forms for cross-entropy and
squared error, :mod:`torch.func` for any other loss): 1.3 forward+backward passes per batch on
a 23M GPT-2 (CPU), against 2.4-3.4 for the gradient + Gauss-Newton-vector product it replaces.
A model with an operation that has no forward-mode derivative takes :func:`~.products.hvp`
instead (same numbers, or the same error), announced once.

``curvature="hessian"``: the reverse-over-reverse product :math:`Hv = \nabla(g^\top v)` of
:func:`~.products.hvp`, reduced to :math:`v^\top Hv` (about 3 forward+backward passes). The
second directional derivative :math:`v^\top H v = \frac{d^2}{dt^2} L(\theta + t v)|_{t=0}` could
be taken by nested forward mode (``jvp`` of ``jvp``, forward-over-forward), but not safely:
PyTorch's nested JVP of ``native_layer_norm`` (also of ``batch_norm``, ``det``,
``linalg.solve``, ``cumprod`` at a zero, custom :class:`torch.autograd.Function`) is silently
wrong (pytorch/pytorch#196700, #198017). On a 23M GPT-2 in float64 it gives :math:`v^\top Hv`
0.4% off, where finite differences agree with reverse-over-reverse; and it was no faster on CPU
(2.9-3.8 forward+backward passes per batch against 2.8-3.4: about eight matrix products per
product of the forward pass, the double backward about nine).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jvp
from torch.utils._pytree import tree_leaves

from .._common.functional import FunctionalModel
from .outputs import LossFn, loss_and_output_grad, output_curvature
from .products import _check_vectors, hvp, prepare

__all__ = ["QuadraticForm", "quadratic_form"]


class QuadraticForm(NamedTuple):
    r"""The batch loss :math:`L`, :math:`g^\top v` and :math:`v^\top C v` (float64 scalars)."""

    loss: Tensor
    slope: Tensor
    curvature: Tensor


def quadratic_form(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    loss_fn: LossFn | None,
    vector: Mapping[str, Tensor],
    *,
    curvature: str = "hessian",
) -> QuadraticForm:
    r"""Loss, slope :math:`g^\top v` and curvature :math:`v^\top C v` along ``vector``.

    The algorithm depends on ``curvature`` (module docstring).

    Args:
        model: the network, called functionally (never modified).
        params: tensors to differentiate with respect to, by qualified parameter name.
        batch: ``(inputs, targets)``, a nested tuple or a mapping
            (:mod:`lossprune._common.batches`).
        loss_fn: the batch loss, a mean (:mod:`.outputs`); ``None``: a Hugging Face model's own
            loss.
        vector: :math:`v`, one tensor shaped like each entry of ``params`` (cast to its dtype).
        curvature: ``"hessian"`` or ``"ggn"``.

    Returns:
        :class:`QuadraticForm`; ``loss`` in the model's dtype (as computed), the two inner
        products summed in float64 from products in the model's dtype.

    Raises:
        TypeError: an operation of the model has no derivative of the order the curvature needs
            (:func:`~.products.hvp`).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> params = {"weight": model.weight.detach()}
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
        >>> v = {"weight": torch.ones(1, 3, dtype=torch.float64)}
        >>> form = quadratic_form(model, params, (x, y), torch.nn.MSELoss(), v, curvature="ggn")
        >>> bool(torch.isclose(form.curvature, 2 * (x.sum(1) ** 2).mean()))  # v^T (2/N X^T X) v
        True
    """
    loss_fn, batch = prepare(model, loss_fn, batch)
    params = dict(params)
    v = {k: t.to(params[k].dtype) for k, t in vector.items()}
    _check_vectors(params, {k: t.unsqueeze(0) for k, t in v.items()})
    if curvature == "ggn":
        try:
            return _ggn_forward(model, params, batch, loss_fn, v)
        except (RuntimeError, NotImplementedError) as error:
            # Announced only once the products have worked: the promise is "same numbers".
            fallback = _from_products(model, params, batch, loss_fn, v, curvature)
            _warn_forward_mode_once(error)
            return fallback
    return _from_products(model, params, batch, loss_fn, v, curvature)


def _ggn_forward(
    model: nn.Module,
    params: dict[str, Tensor],
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    v: Mapping[str, Tensor],
) -> QuadraticForm:
    r"""One ``jvp`` through the model for :math:`(f, Jv)`; the rest at the outputs.

    :math:`L` and :math:`\nabla_f L` by :func:`~.outputs.loss_and_output_grad`, :math:`M\,Jv` by
    the closed forms of :func:`~.outputs.output_curvature` (what :func:`~.products.ggn_vp` pulls
    back).
    """
    inputs, targets = batch
    fmodel = FunctionalModel(model, params)
    with torch.no_grad():  # the tangents carry the derivative; no graph is recorded
        # jvp's stubs allow an aux output; index instead of unpacking so the types stay exact.
        primal_and_tangent = jvp(lambda p: fmodel(p, inputs), (params,), (dict(v),))
    outputs, jv = primal_and_tangent[0], primal_and_tangent[1]
    loss, output_grad = loss_and_output_grad(loss_fn, outputs, targets)
    curvature_jv = output_curvature(loss_fn, outputs, targets).ggn_product_one(jv)
    return QuadraticForm(loss.detach(), _inner(output_grad, jv), _inner(jv, curvature_jv))


def _from_products(
    model: nn.Module,
    params: dict[str, Tensor],
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    v: Mapping[str, Tensor],
    curvature: str,
) -> QuadraticForm:
    """The gradient and the curvature-vector product of :func:`~.products.hvp`, dotted with v."""
    loss, grad, products = hvp(
        model, params, batch, loss_fn, {k: t.unsqueeze(0) for k, t in v.items()},
        curvature=curvature,
    )  # fmt: skip
    return QuadraticForm(loss, _inner(grad, v), _inner({k: p[0] for k, p in products.items()}, v))


def _inner(a: Any, b: Any) -> Tensor:
    """``Σ a·b`` over the leaves of two pytrees of the same structure, summed in float64."""
    pairs = zip(tree_leaves(a), tree_leaves(b), strict=True)
    terms = [(x.double() * y.double()).sum() for x, y in pairs]
    return torch.stack(terms).sum()


_WARNED_FORWARD_MODE: set[str] = set()


def _warn_forward_mode_once(error: Exception) -> None:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    key = type(error).__name__ + first_line
    if key not in _WARNED_FORWARD_MODE:
        _WARNED_FORWARD_MODE.add(key)
        warnings.warn(
            f"forward-mode AD failed for an operation of this model ({first_line}); the "
            "Gauss-Newton quadratic form falls back to gradient + Gauss-Newton-vector products "
            "(same numbers, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
