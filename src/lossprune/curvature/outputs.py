r"""Output-space curvature of a loss: closed forms where they exist, ``torch.func`` elsewhere.

Every statistic of the core is a pull-back through the model Jacobian :math:`J_n` of something
that lives in the space of the model outputs :math:`f_n` of one batch. This module gives those
output-space objects for ``loss_fn(outputs, targets)`` at fixed outputs: the loss :math:`L` and its
output gradient, the product with the output-space curvature :math:`M_n` of the Gauss-Newton
matrix :math:`G = \sum_n J_n^\top M_n J_n` (Schraudolph 2002), square roots :math:`S_n S_n^\top =
M_n` and random :math:`z_n` with :math:`\mathbb E[z_n z_n^\top] = M_n`.

What "mean" means. :math:`L` is the loss exactly as ``loss_fn`` computes it: the mean over the
UNITS the loss averages, with their weights. For softmax cross-entropy on class indices with
class weights :math:`w` and ``ignore_index``, over every position of ``(N, C, d1, ...)`` logits,

.. math:: L = \frac{\sum_u w_{y_u} \ell_u}{Z}, \qquad Z = \sum_{u:\, y_u \ne \text{ignore}} w_{y_u}

(``torch.nn.functional.cross_entropy``, reduction ``"mean"``). :func:`loss_normaliser` returns
:math:`Z`: a dataset made of several batches has the mean :math:`\sum_b Z_b L_b / \sum_b Z_b`.

Closed forms (no per-example eigendecomposition):

* softmax cross-entropy, class indices or probabilities, class weights, label smoothing
  :math:`\varepsilon`, ``ignore_index``: the loss of unit :math:`u` is
  :math:`-\sum_c a_{uc}\log p_{uc}` with :math:`a_u = ((1-\varepsilon) e_{y_u} +
  \tfrac{\varepsilon}{C}\mathbf 1) \odot w`, and :math:`\partial^2 \ell_u/\partial f_u^2 =
  (\sum_c a_{uc})\,(\operatorname{diag} p_u - p_u p_u^\top)`. With :math:`c_u = \sum_c a_{uc} / Z`,
  :math:`M_u = c_u (\operatorname{diag}p_u - p_u p_u^\top)`, its square root has the columns
  :math:`\sqrt{c_u p_{uc}}(e_c - p_u)` and :math:`z_u = \sqrt{c_u}(e_y - p_u)`, :math:`y \sim
  p_u`, samples it (Martens 2014); for one unit per example and no weights this is the Fisher of
  Laurent et al. (2020, Sec. 3);
* log-probability outputs (``NLLLoss``, ``KLDivLoss``): the loss is LINEAR in its input, so the
  Gauss-Newton matrix split at the outputs would be exactly zero. The outputs :math:`f = \log p`
  are log-probabilities, :math:`J_f^\top p = 0` (since :math:`\sum_c p_c = 1` identically), so the
  Gauss-Newton matrix split at the logits, the Fisher, is :math:`J_f^\top c_u
  (\operatorname{diag}p_u - p_u p_u^\top) J_f` with :math:`p = e^f`: the same closed form. Outputs
  that are not normalised raise (their Gauss-Newton matrix is zero);
* mean squared error over :math:`N \times O` entries: :math:`M_n = \tfrac{2}{NO} I`.

Any other loss is differentiated by :mod:`torch.func`; its per-example output Hessians come from
``loss_fn`` on batches of one, which assumes :math:`L = \frac1N\sum_n \ell_n` and is checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, hessian, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._common.model_loss import ModelLoss
from .errors import NonFiniteError

__all__ = [
    "LossFn",
    "OutputCurvature",
    "SoftmaxCrossEntropy",
    "check_mean_over_examples",
    "check_reduction",
    "check_scalar_loss",
    "check_tensor_outputs",
    "flatten_example",
    "flatten_examples",
    "loss_normaliser",
    "output_curvature",
    "output_hessian_sqrt",
    "require_one_number",
    "softmax_cross_entropy",
]

LossFn = Callable[[Any, Tensor], Tensor]

_CROSS_ENTROPY = (nn.functional.cross_entropy,)
_NLL = (nn.functional.nll_loss,)
_MSE = (nn.functional.mse_loss,)


def check_reduction(loss_fn: object) -> None:
    """A loss must be a mean (``"batchmean"`` for :class:`~torch.nn.KLDivLoss`).

    Raises:
        ValueError: when ``loss_fn`` declares another reduction.
    """
    reduction = getattr(loss_fn, "reduction", "mean")
    allowed = ("mean", "batchmean") if type(loss_fn) is nn.KLDivLoss else ("mean",)
    if reduction not in allowed:
        raise ValueError(
            f"loss_fn must average over the batch (reduction='mean'), got reduction={reduction!r}"
        )


def _family(loss_fn: object) -> str:
    """Which closed form applies: ``"ce"``, ``"nll"``, ``"kl"``, ``"mse"`` or ``"generic"``.

    Exact types only: a subclass may override ``forward``.
    """
    if type(loss_fn) is ModelLoss:  # a Hugging Face model's own loss: its task's form
        return {"regression": "mse", "multi_label": "generic"}.get(loss_fn.task, "ce")
    if loss_fn in _CROSS_ENTROPY or type(loss_fn) is nn.CrossEntropyLoss:
        return "ce"
    if loss_fn in _NLL or type(loss_fn) is nn.NLLLoss:
        return "nll"
    if type(loss_fn) is nn.KLDivLoss:
        return "kl"
    if loss_fn in _MSE or type(loss_fn) is nn.MSELoss:
        return "mse"
    return "generic"


def _wrapped(loss_fn: object) -> object:
    """The innermost loss of wrappers that keep the loss they wrap in ``.loss_fn``."""
    while callable(getattr(loss_fn, "loss_fn", None)):
        loss_fn = loss_fn.loss_fn  # type: ignore[attr-defined]
    return loss_fn


def _class_options(loss_fn: object) -> tuple[Tensor | None, int, float]:
    """``(weight, ignore_index, label_smoothing)`` of a cross-entropy or NLL loss."""
    if isinstance(loss_fn, ModelLoss):
        return None, loss_fn.ignore_index, 0.0
    if isinstance(loss_fn, nn.Module):
        weight = getattr(loss_fn, "weight", None)
        return (
            weight,
            getattr(loss_fn, "ignore_index", -100),
            getattr(loss_fn, "label_smoothing", 0.0),
        )
    return None, -100, 0.0


def _index_targets(outputs: Tensor, targets: Tensor) -> bool:
    """Class indices for ``(N, C, d1, ...)`` outputs: shape ``(N, d1, ...)``, integer dtype."""
    return (
        not targets.is_floating_point()
        and outputs.dim() >= 2
        and targets.shape == outputs.shape[:1] + outputs.shape[2:]
    )


def _probability_targets(outputs: Tensor, targets: Tensor) -> bool:
    return targets.is_floating_point() and targets.shape == outputs.shape and outputs.dim() >= 2


def loss_normaliser(loss_fn: object, targets: Tensor) -> Tensor:
    r"""The denominator :math:`Z` of the mean ``loss_fn`` computes (module docstring).

    Class-index cross-entropy / NLL: :math:`\sum_u w_{y_u}` over the units not ignored (their
    number without class weights). Probability targets: the number of units
    :math:`N d_1 \cdots`. Every other loss: the number of examples :math:`N` (a mean over
    :math:`N \times O` entries is proportional to it). A wrapper that keeps the loss it wraps
    in ``.loss_fn`` (GraSP's tempered loss) averages over the units of the wrapped loss.
    """
    loss_fn = _wrapped(loss_fn)
    family = _family(loss_fn)
    if family in ("ce", "nll") and not targets.is_floating_point():
        weight, ignore_index, _ = _class_options(loss_fn)
        kept = targets != ignore_index
        if weight is None:
            return kept.sum().to(torch.float64)
        safe = torch.where(kept, targets, 0)
        return (weight.to(torch.float64)[safe] * kept).sum()
    if family == "ce" and targets.is_floating_point() and targets.dim() >= 2:
        # Probability targets have the outputs' shape (N, C, d1, ...).
        return torch.tensor(float(targets.numel() // targets.shape[1]), dtype=torch.float64)
    return torch.tensor(float(len(targets)), dtype=torch.float64)


class OutputCurvature:
    """Output-space pieces of ``loss_fn`` at fixed outputs (see the module docstring).

    Product methods take ``r`` laid out ``(N, k, *out)`` (``k`` stacked directions) and return
    the same layout; :meth:`sqrt_columns` returns ``(N, O, R)`` with ``O = prod(out)``.
    """

    def ggn_product(self, r: Tensor) -> Tensor:
        """:math:`M_n r_{nj}`: the Gauss-Newton output curvature applied to ``r``."""
        raise NotImplementedError

    def hessian_product(self, r: Tensor) -> Tensor:
        r""":math:`\partial^2 L/\partial f^2\, r`: the exact output Hessian (Hessian products)."""
        raise NotImplementedError

    def ggn_product_one(self, r: Any) -> Any:
        """:meth:`ggn_product` of ONE direction laid out like the outputs, ``(N, *out)``."""
        return self.ggn_product(r.unsqueeze(1)).squeeze(1)

    def sqrt_columns(self) -> Tensor:
        """Columns :math:`S_n` with :math:`S_n S_n^T = M_n`, ``(N, O, R)``."""
        raise NotImplementedError

    def sample_columns(self, samples: int, generator: torch.Generator | None) -> Tensor:
        r"""``(N, O, samples)`` with :math:`\mathbb E[\sum_j z_{nj} z_{nj}^\top] = M_n`."""
        raise NotImplementedError

    def column_blocks(self, n: int, width: int) -> Iterator[Tensor]:
        """The columns of :meth:`sqrt_columns` of example ``n``, ``(O, <= width)`` at a time.

        Zero columns may be left out (they add nothing to any sum of squares).
        """
        if getattr(self, "_dense", None) is None:
            self._dense = self.sqrt_columns()
        columns = self._dense[n]
        for start in range(0, columns.shape[1], width):
            yield columns[:, start : start + width]


class SoftmaxCrossEntropy(OutputCurvature):
    r"""Closed forms of softmax cross-entropy with per-unit coefficients :math:`c_u`.

    Args:
        probs: :math:`p`, ``(N, C, d1, ...)`` with ``class_dim=1`` (PyTorch's layout), or
            ``(N, d1, ..., C)`` with ``class_dim=-1`` (a language model's ``(N, T, V)``).
        coefficients: :math:`c_u`, one per unit, ``(N, d1, ...)`` (already divided by
            :math:`Z`).
        exact_hessian: the output Hessian equals :math:`M` (logit outputs); ``False`` for
            log-probability outputs, where the loss is linear and its Hessian is zero.
        class_dim: ``1`` or ``-1``.
    """

    def __init__(
        self, probs: Tensor, coefficients: Tensor, exact_hessian: bool, class_dim: int = 1
    ) -> None:
        if class_dim not in (1, -1):
            raise ValueError(f"class_dim must be 1 or -1, got {class_dim}")
        self.class_last = class_dim == -1 and probs.dim() > 2
        # Internally the classes are dim 1: (N, C, d1, ...).
        self.probs = probs.movedim(-1, 1) if self.class_last else probs
        self.coefficients, self.exact_hessian = coefficients, exact_hessian

    def ggn_product(self, r: Tensor) -> Tensor:
        r""":math:`c_u(p_u \odot r - p_u (p_u^\top r))` per unit."""
        if self.class_last:
            r = r.movedim(-1, 2)
        p = self.probs.unsqueeze(1)  # (N, 1, C, ...) against r (N, k, C, ...)
        c = self.coefficients.unsqueeze(1).unsqueeze(2)
        product = c * (p * r - p * (p * r).sum(2, keepdim=True))
        return product.movedim(2, -1) if self.class_last else product

    def hessian_product(self, r: Tensor) -> Tensor:
        """:meth:`ggn_product` for logits; zero for log-probability outputs (a linear loss)."""
        return self.ggn_product(r) if self.exact_hessian else torch.zeros_like(r)

    def sqrt_columns(self) -> Tensor:
        r"""Columns :math:`\sqrt{c_u p_{uc}}(e_c - p_u)`, block-diagonal over positions."""
        p = self.probs
        n, classes = p.shape[:2]
        positions = p[0, 0].numel()
        p = p.reshape(n, classes, positions).transpose(1, 2)  # (N, D, C)
        root = p.sqrt()
        blocks = torch.diag_embed(root) - p.unsqueeze(3) * root.unsqueeze(2)  # (N, D, C, C')
        blocks = blocks * self.coefficients.reshape(n, positions, 1, 1).sqrt()
        # Rows and columns in the order of the flattened outputs: (c, d) for classes in dim 1,
        # (d, c) for classes last; zero unless the two positions agree.
        eye = torch.eye(positions, dtype=p.dtype, device=p.device)
        pattern = "ndab,de->ndaeb" if self.class_last else "ndab,de->nadbe"
        dense = torch.einsum(pattern, blocks, eye)
        return dense.reshape(n, classes * positions, classes * positions)

    def column_blocks(self, n: int, width: int) -> Iterator[Tensor]:
        r"""Example ``n``'s columns :math:`\sqrt{c_u p_{uc}}(e_c - p_u)`, built block by block.

        Only positions with :math:`c_u > 0` (not ignored) have columns; each block holds at most
        ``width`` classes of one position, so the block-diagonal ``(O, O)`` matrix of
        :meth:`sqrt_columns` is never formed.
        """
        p = self.probs[n]
        classes = p.shape[0]
        p = p.reshape(classes, -1)  # (C, D)
        positions = p.shape[1]
        c = self.coefficients[n].reshape(-1)
        for d in torch.nonzero(c > 0).flatten().tolist():
            root = (c[d] * p[:, d]).sqrt()
            for start in range(0, classes, width):
                stop = min(classes, start + width)
                block = -p[:, d : d + 1] * root[start:stop].unsqueeze(0)  # (C, w)
                block[start:stop] += torch.diag(root[start:stop])
                # Rows in the order of the flattened outputs: (c, d), or (d, c) classes last.
                dense = p.new_zeros(classes, positions, stop - start)
                dense[:, d] = block
                yield (dense.transpose(0, 1) if self.class_last else dense).reshape(
                    -1, stop - start
                )

    def sample_columns(self, samples: int, generator: torch.Generator | None) -> Tensor:
        r""":math:`\sqrt{c_u/k}(e_y - p_u)`, :math:`y \sim p_u`, every position independently."""
        p = self.probs
        n, classes = p.shape[:2]
        flat = p.movedim(1, -1).reshape(-1, classes)  # (N * D, C)
        # Inverse-CDF sampling, y = min{c : P(Y <= c) >= u} with u uniform on (0, 1]: the same
        # distribution as torch.multinomial, and an order of magnitude faster on CPU for a
        # language model's vocabulary (a class of probability 0 is never drawn).
        uniform = 1.0 - torch.rand(
            flat.shape[0], samples, generator=generator, dtype=flat.dtype, device=flat.device
        )
        labels = torch.searchsorted(flat.cumsum(1), uniform).clamp_max(classes - 1)
        one_hot = nn.functional.one_hot(labels, classes).to(p.dtype)  # (N * D, k, C)
        z = (one_hot - flat.unsqueeze(1)) * (self.coefficients.reshape(-1, 1, 1) / samples).sqrt()
        z = z.reshape(n, -1, samples, classes)  # (N, D, k, C)
        z = z.permute(0, 1, 3, 2) if self.class_last else z.permute(0, 3, 1, 2)
        return z.reshape(n, -1, samples)


def softmax_cross_entropy(
    outputs: Tensor,
    targets: Tensor,
    *,
    class_dim: int = 1,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    log_probabilities: bool = False,
) -> SoftmaxCrossEntropy:
    r"""The closed forms of :func:`torch.nn.functional.cross_entropy` (mean reduction).

    Class indices ``targets`` have the outputs' shape without the class dim; probability
    targets have the outputs' shape. With ``log_probabilities`` the outputs are log-probabilities
    (``NLLLoss``): same Gauss-Newton matrix (at the logits), zero output Hessian.

    Example:
        >>> import torch
        >>> logits = torch.randn(2, 3, 5, dtype=torch.float64)  # (N, T, V)
        >>> labels = torch.tensor([[0, 4, -100], [1, 1, 2]])
        >>> space = softmax_cross_entropy(logits, labels, class_dim=-1)
        >>> loss = lambda o: torch.nn.functional.cross_entropy(o.transpose(1, 2), labels)
        >>> h = torch.func.hessian(loss)(logits).reshape(30, 30)
        >>> s = space.sqrt_columns()  # (N, T * V, T * V), the output order of (N, T, V)
        >>> torch.allclose(torch.block_diag(*(s @ s.transpose(1, 2))), h)
        True
    """
    moved = outputs.movedim(-1, 1) if class_dim == -1 else outputs
    targets_moved = (
        targets.movedim(-1, 1) if class_dim == -1 and targets.shape == outputs.shape else targets
    )
    probs = moved.exp() if log_probabilities else moved.softmax(1)
    index = not targets.is_floating_point()
    classes = moved.shape[1]
    w = (
        torch.ones(classes, dtype=outputs.dtype, device=outputs.device)
        if weight is None
        else weight.to(outputs.dtype)
    )
    smooth = label_smoothing / classes * w.sum()
    if index:
        kept = targets != ignore_index
        w_y = w[torch.where(kept, targets, 0)]
        units = ((1.0 - label_smoothing) * w_y + smooth) * kept
        normaliser = (w_y * kept).sum()
    else:
        w_view = w.view(1, classes, *([1] * (moved.dim() - 2)))
        units = (1.0 - label_smoothing) * (targets_moved * w_view).sum(1) + smooth
        normaliser = torch.tensor(float(units.numel()), dtype=outputs.dtype)
    probs_out = probs.movedim(1, -1) if class_dim == -1 else probs
    return SoftmaxCrossEntropy(
        probs_out, units / normaliser, exact_hessian=not log_probabilities, class_dim=class_dim
    )


class MeanSquaredError(OutputCurvature):
    r""":math:`L = \frac{1}{NO}\sum (f - t)^2`: :math:`M_n = \frac{2}{NO} I`, its own Hessian."""

    def __init__(self, outputs: Tensor) -> None:
        self.outputs = outputs
        self.scale = 2.0 / outputs.numel()

    def ggn_product(self, r: Tensor) -> Tensor:
        return self.scale * r

    def hessian_product(self, r: Tensor) -> Tensor:
        return self.scale * r

    def sqrt_columns(self) -> Tensor:
        n = self.outputs.shape[0]
        size = self.outputs[0].numel()
        eye = torch.eye(size, dtype=self.outputs.dtype, device=self.outputs.device)
        return (math.sqrt(self.scale) * eye).expand(n, size, size)

    def sample_columns(self, samples: int, generator: torch.Generator | None) -> Tensor:
        return _rademacher_columns(self.sqrt_columns(), samples, generator)


class GenericLoss(OutputCurvature):
    r"""Any other loss, by :mod:`torch.func` at the outputs (any pytree of tensors).

    Products use the exact output Hessian (the vjp of the output gradient: reverse-over-reverse
    on the small output space). Square roots need outputs whose leaves hold the examples in dim
    0 (:func:`flatten_examples`) and :math:`L = \frac1N \sum_n \ell_n` with :math:`\ell_n` the
    loss of a batch of one; both are checked, and a loss that is linear in the outputs (zero
    Gauss-Newton matrix) is refused.
    """

    def __init__(self, loss_fn: LossFn, outputs: Any, targets: Tensor) -> None:
        self.loss_fn, self.outputs, self.targets = loss_fn, outputs, targets

        def output_grad(o: Any) -> Any:
            return torch.func.grad(loss_fn)(o, targets)

        # Built here, outside any caller's vmap: the product closes over this pullback.
        self._output_hessian = vjp(output_grad, outputs)[1]

    def hessian_product(self, r: Tensor) -> Tensor:
        product = self._output_hessian
        return vmap(lambda v: product(v)[0], in_dims=1, out_dims=1)(r)

    ggn_product = hessian_product

    def ggn_product_one(self, r: Any) -> Any:
        return self._output_hessian(r)[0]

    def sqrt_columns(self) -> Tensor:
        flat, example_outputs = flatten_examples(self.outputs)  # (N, O)
        n = flat.shape[0]
        loss_fn, targets = self.loss_fn, self.targets

        def loss_one(o: Tensor, t: Tensor) -> Tensor:
            return loss_fn(example_outputs(o), t.unsqueeze(0))

        per_example = vmap(loss_one)(flat, targets)
        _check_mean_of_per_example(loss_fn(self.outputs, targets), per_example)
        h = vmap(hessian(loss_one))(flat, targets) / n
        if not bool(h.abs().sum() > 0):
            raise ValueError(
                "loss_fn has a zero output Hessian (it is linear in the model outputs, e.g. "
                "NLLLoss on outputs that are not log-probabilities), so its Gauss-Newton matrix "
                "and Fisher are exactly zero; use cross-entropy on logits"
            )
        h = 0.5 * (h + h.transpose(1, 2))
        eigenvalues, eigenvectors = torch.linalg.eigh(h)
        # Negative eigenvalues (impossible for a convex loss) are clipped to keep G PSD.
        return eigenvectors * eigenvalues.clamp_min(0.0).sqrt().unsqueeze(1)

    def sample_columns(self, samples: int, generator: torch.Generator | None) -> Tensor:
        return _rademacher_columns(self.sqrt_columns(), samples, generator)


def flatten_examples(outputs: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """Per-example flat outputs ``(N, O)`` of a tensor or a pytree of ``(N, ...)`` tensors.

    Returns the flat outputs and the map from ONE example's flat outputs ``(O,)`` back to the
    layout of a batch of one (what ``loss_fn`` reads); leaves are concatenated in pytree order.

    Raises:
        TypeError: a leaf is not a floating-point tensor whose dim 0 indexes the examples.
    """
    leaves, spec = tree_flatten(outputs)
    n = len(leaves[0]) if leaves and isinstance(leaves[0], Tensor) and leaves[0].dim() else -1
    for leaf in leaves:
        if not (isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dim() >= 1):
            raise TypeError(
                "the exact and Monte-Carlo Fisher/GGN diagonals need model outputs whose "
                f"leaves are floating-point tensors with the examples in dim 0, got {leaf!r:.60}"
            )
        if len(leaf) != n:
            raise TypeError(
                "the exact and Monte-Carlo Fisher/GGN diagonals need every output tensor to "
                f"hold the {n} examples in dim 0, got one of shape {tuple(leaf.shape)}"
            )
    shapes = [leaf.shape[1:] for leaf in leaves]
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.cat([leaf.reshape(n, -1) for leaf in leaves], dim=1)

    def example_outputs(o: Tensor) -> Any:
        parts = o.split(sizes)
        batch_of_one = [p.reshape(1, *shape) for p, shape in zip(parts, shapes, strict=True)]
        return tree_unflatten(batch_of_one, spec)

    return flat, example_outputs


def flatten_example(outputs_of_one: Any) -> Tensor:
    """The flat outputs ``(O,)`` of a batch of one, in :func:`flatten_examples`' order."""
    return torch.cat([leaf.reshape(-1) for leaf in tree_flatten(outputs_of_one)[0]])


def _check_mean_of_per_example(loss: Tensor, per_example: Tensor) -> None:
    """``loss_fn`` of the batch must be the mean of its batches of one (not a sum)."""
    mean = per_example.mean()
    tolerance = 100 * torch.finfo(per_example.dtype).eps * len(per_example)
    if not torch.isclose(loss, mean, rtol=tolerance, atol=tolerance * float(mean.abs())):
        raise ValueError(
            "loss_fn(outputs, targets) is not the mean over examples of loss_fn on batches of "
            f"one ({float(loss):.6g} != {float(mean):.6g}): a sum (reduction='sum') or a loss "
            "that couples examples is not supported; pass a per-batch mean"
        )


def check_mean_over_examples(
    loss_fn: LossFn, outputs_and_targets: Callable[[], tuple[Any, Tensor]]
) -> None:
    """Detect, where possible, a plain-function loss that is not a mean over examples.

    Losses with a closed form here declare their reduction (checked by :func:`check_reduction`);
    for any other loss, ``outputs_and_targets()`` (called only then: a forward pass the
    closed-form losses never pay) gives one batch, and a loss of one tensor of outputs is
    compared with the mean of its batches of one. Nothing can be said about a batch of one
    example or a loss that cannot be vmapped.

    Raises:
        ValueError: the loss is a sum or couples the examples.
    """
    if _family(_wrapped(loss_fn)) != "generic":
        return
    outputs, targets = outputs_and_targets()
    if not isinstance(outputs, Tensor) or len(outputs) < 2:
        return
    outputs = outputs.detach()

    def loss_one(o: Tensor, t: Tensor) -> Tensor:
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    try:
        per_example = vmap(loss_one)(outputs, targets)
    except (RuntimeError, NotImplementedError):
        return  # the loss does not run on batches of one under vmap: cannot be checked
    _check_mean_of_per_example(loss_fn(outputs, targets), per_example)


@torch.no_grad()
def check_scalar_loss(loss_fn: LossFn, outputs: Any, targets: Tensor) -> None:
    """``loss_fn`` returns one number for a batch (losses with a closed form say so themselves).

    Raises:
        ValueError: a plain function that returns one loss per example (``reduction='none'``).
    """
    if _family(_wrapped(loss_fn)) != "generic":
        return
    require_one_number(loss_fn(outputs, targets))


def require_one_number(loss: Any) -> None:
    """What a loss function returned for a batch is one number.

    Raises:
        ValueError: one loss per example (``reduction='none'``), or not a tensor.
    """
    if not (isinstance(loss, Tensor) and loss.dim() == 0):
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn returned {got}, not one number for the batch: return the batch mean "
            "(reduction='mean', or .mean() of the per-example losses)"
        )


def check_tensor_outputs(loss_fn: LossFn, outputs_of: Callable[[], Any]) -> None:
    """A loss with a closed form here (cross-entropy, NLL, KL, MSE) reads one tensor of outputs.

    ``outputs_of()`` is the model's outputs on a batch (called only for such losses).

    Raises:
        TypeError: the model returns something else (e.g. a Hugging Face ``ModelOutput``).
    """
    if _family(loss_fn) == "generic":
        return
    outputs = outputs_of()
    if isinstance(outputs, Tensor):
        return
    hint = (
        "omit loss_fn to use the model's own loss (lossprune.ModelLoss reads .logits), or pass "
        "a loss_fn that reads the tensor it needs"
        if hasattr(outputs, "logits")
        else "pass a loss_fn that reads the tensor it needs from the outputs"
    )
    raise TypeError(
        f"loss_fn {type(loss_fn).__name__} reads one tensor of model outputs, but the model "
        f"returns {type(outputs).__name__}: {hint}"
    )


def _rademacher_columns(
    sqrt_columns: Tensor, samples: int, generator: torch.Generator | None
) -> Tensor:
    r""":math:`z = S\varepsilon/\sqrt k`, Rademacher :math:`\varepsilon`: unbiased for :math:`M`."""
    n, _, columns = sqrt_columns.shape
    eps = rademacher((n, columns, samples), sqrt_columns, generator)
    return sqrt_columns @ eps / math.sqrt(samples)


def rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform random signs, dtype and device of ``like``."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _log_probabilities(outputs: Tensor, name: str) -> Tensor:
    """``exp(outputs)`` after checking the outputs are log-probabilities along dim 1."""
    total = outputs.logsumexp(1)
    tolerance = math.sqrt(torch.finfo(outputs.dtype).eps)
    if not bool((total.abs() <= tolerance).all()):
        raise ValueError(
            f"{name} reads log-probabilities (e.g. from LogSoftmax), but exp(outputs) does not sum "
            "to 1 along dim 1: the loss is linear in such outputs and its Gauss-Newton matrix is "
            "zero; return log_softmax outputs or use CrossEntropyLoss on logits"
        )
    return outputs.exp()


def output_curvature(loss_fn: LossFn, outputs: Any, targets: Tensor) -> OutputCurvature:
    """The output-space pieces of ``loss_fn`` at ``outputs``: the ONE place that picks a form.

    Raises:
        NonFiniteError: the outputs are NaN or infinite.
        ValueError: log-probability losses on outputs that are not log-probabilities.
    """
    if isinstance(outputs, Tensor):
        outputs = outputs.detach()
        if not bool(torch.isfinite(outputs).all()):
            raise NonFiniteError(
                "the model outputs are not finite (NaN or inf); nothing was modified"
            )
    family = _family(loss_fn) if isinstance(outputs, Tensor) else "generic"
    if family in ("ce", "nll"):
        index = _index_targets(outputs, targets)
        if index or (family == "ce" and _probability_targets(outputs, targets)):
            if family == "nll":
                _log_probabilities(outputs, "NLLLoss")
            weight, ignore_index, smoothing = _class_options(loss_fn)
            return softmax_cross_entropy(
                outputs,
                targets,
                weight=weight,
                ignore_index=ignore_index,
                label_smoothing=smoothing,
                log_probabilities=family == "nll",
            )
    if family == "kl" and _probability_targets(outputs, targets):
        probs = _log_probabilities(outputs, "KLDivLoss")
        target = targets.exp() if getattr(loss_fn, "log_target", False) else targets
        units = target.sum(1)
        divisor = len(outputs) if loss_fn.reduction == "batchmean" else outputs.numel()  # type: ignore[attr-defined]
        return SoftmaxCrossEntropy(probs, units / divisor, exact_hessian=False)
    if family == "mse" and isinstance(targets, Tensor) and targets.shape == outputs.shape:
        return MeanSquaredError(outputs)
    return GenericLoss(loss_fn, outputs, targets)


def output_hessian_sqrt(outputs: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
    r"""Square roots :math:`S_n` of the batch loss's output curvature, :math:`S_n S_n^\top = M_n`.

    :math:`M_n` is the block of :math:`\partial^2 L / \partial f^2` of example :math:`n` (the
    closed forms of this module, mean and weights included, so that :math:`\sum_n J_n^\top S_n
    S_n^\top J_n` is the Gauss-Newton matrix of the batch loss :math:`L`).

    Args:
        outputs: model outputs ``(N, *out)``; detached here.
        targets: ``(N, ...)``.
        loss_fn: the batch loss.

    Returns:
        ``(N, O, R)`` with ``O = prod(out)``.

    Example:
        >>> import torch
        >>> logits, labels = torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 2])
        >>> s = output_hessian_sqrt(logits, labels, torch.nn.CrossEntropyLoss())
        >>> torch.allclose(s @ s.transpose(1, 2), (torch.eye(3) / 3 - 1 / 9).double() / 2)
        True
    """
    return output_curvature(loss_fn, outputs, targets).sqrt_columns()


def loss_and_output_grad(loss_fn: LossFn, outputs: Any, targets: Tensor) -> tuple[Tensor, Any]:
    """``(L, dL/df)`` at fixed outputs, by :mod:`torch.func` (exact for every loss)."""
    grad, loss = grad_and_value(loss_fn)(outputs, targets)
    return loss, grad
