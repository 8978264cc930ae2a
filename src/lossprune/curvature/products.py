r"""Loss, gradient and curvature-vector products on one batch, and the choice of algorithm.

``curvature="hessian"``: :math:`Hv`; ``curvature="ggn"``: :math:`Gv = \sum_n J_n^\top M_n J_n v`
with :math:`M_n` the output-space curvature of :mod:`.outputs` (Schraudolph 2002), PSD for convex
losses. Four exact algorithms compute them; :func:`choose_backend` is the one place that picks:

* ``REVERSE_OVER_REVERSE``: :math:`Hv = \nabla(g^\top v)`, one backward pass per vector through
  the gradient's retained graph — on a CPU the fastest exact Hessian product for ANY number of
  vectors, and the lightest (benchmarks/README.md, "Hessian-vector products on a CPU"); the
  fallback of the forward-over-reverse path for operations without forward-mode derivatives;
* ``CHAIN``: the fused R-operator pass of :mod:`.chain` (batched tangents inside the layers);
* ``FORWARD_OVER_REVERSE``: ``vmap(jvp(grad(L)))`` over the ``k`` tangents (Pearlmutter 1994);
* ``GENERIC_GGN``: ``vmap`` over the tangents of :math:`J^\top M J v` with :func:`torch.func`.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._common.batches import Batch
from .._common.functional import FunctionalModel, check_deterministic
from .._common.model_loss import resolve_loss
from .._common.probe import PassCheck, probe_first_batch
from .chain import Chain, find_chain, run_chain
from .layers import NotAChain
from .outputs import (
    LossFn,
    check_reduction,
    check_scalar_loss,
    loss_and_output_grad,
    output_curvature,
    require_one_number,
)

__all__ = [
    "Backend",
    "BackendChoice",
    "CurvatureProducts",
    "GradientResult",
    "choose_backend",
    "ggn_vp",
    "hvp",
    "loss_and_grad",
    "prepare",
]

Params = dict[str, Tensor]


class GradientResult(NamedTuple):
    """Batch loss and its gradient with respect to ``params``."""

    loss: Tensor
    grad: Params


class CurvatureProducts(NamedTuple):
    """Batch loss, gradient and the ``k`` curvature-vector products (shaped like the vectors)."""

    loss: Tensor
    grad: Params
    products: Params


class Backend(enum.Enum):
    """The exact algorithms behind :func:`hvp` (module docstring)."""

    REVERSE_OVER_REVERSE = "reverse-over-reverse"
    CHAIN = "chain"
    FORWARD_OVER_REVERSE = "forward-over-reverse"
    GENERIC_GGN = "generic-ggn"


class BackendChoice(NamedTuple):
    """The chosen backend and, for ``CHAIN``, the chain it runs."""

    backend: Backend
    chain: Chain | None


def choose_backend(
    model: nn.Module, params: Mapping[str, Tensor], curvature: str, k: int, fast: bool
) -> BackendChoice:
    """Which exact algorithm computes ``k`` products of ``curvature`` for ``model``.

    Hessian products take reverse-over-reverse (one backward pass per vector through the
    gradient's retained graph) for one vector, and for any number of vectors when ``params``
    live on the CPU: there it beat the batched tangents of the chain and of ``vmap(jvp(grad))``
    on every workload measured (MLP, CNN, GPT-2 and Llama; 1.5-1.9x faster on the CNN) at a
    peak memory that does not grow with ``k`` (benchmarks/README.md). Otherwise (several
    vectors on a GPU, not measured yet; and GGN products) the fused chain when ``fast`` and
    :func:`~.chain.find_chain` proves the model a chain of covered layers, else
    forward-over-reverse (Hessian) or the generic GGN product.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> params = dict(model.named_parameters())
        >>> choose_backend(model, params, "ggn", k=4, fast=True).backend
        <Backend.CHAIN: 'chain'>
        >>> choose_backend(model, params, "hessian", k=4, fast=True).backend  # on the CPU
        <Backend.REVERSE_OVER_REVERSE: 'reverse-over-reverse'>
        >>> choose_backend(model, params, "hessian", k=4, fast=False).backend
        <Backend.FORWARD_OVER_REVERSE: 'forward-over-reverse'>
    """
    if fast and curvature == "hessian" and (k == 1 or _on_cpu(params)):
        return BackendChoice(Backend.REVERSE_OVER_REVERSE, None)
    chain = find_chain(model, params) if fast else None
    if chain is not None:
        return BackendChoice(Backend.CHAIN, chain)
    generic = Backend.FORWARD_OVER_REVERSE if curvature == "hessian" else Backend.GENERIC_GGN
    return BackendChoice(generic, None)


def _on_cpu(params: Mapping[str, Tensor]) -> bool:
    return all(p.device.type == "cpu" for p in params.values())


def check_inputs(model: nn.Module, loss_fn: object) -> None:
    """The checks every public curvature function makes before computing anything.

    Raises:
        ValueError: a model whose forward pass is random or uses batch statistics
            (:func:`~lossprune._common.functional.check_deterministic`), or a loss that is not
            a mean.
    """
    check_reduction(loss_fn)
    check_deterministic(model)


def prepare(model: nn.Module, loss_fn: LossFn | None, batch: Any) -> tuple[LossFn, Batch]:
    """The loss and the batch in the library's form, checked (:func:`check_inputs`).

    ``None`` is the model's own loss (:func:`~lossprune._common.model_loss.resolve_loss`); the
    batch takes the form of :func:`~lossprune._common.batches.to_batch`. A batch as the user wrote
    it (not yet a :class:`~lossprune._common.batches.Batch`) is first probed on two of its examples
    (:func:`~lossprune._common.probe.probe_first_batch`: no random draw, the model's own loss).
    """
    loss, batch, check = _prepare(model, loss_fn, batch, in_pass=False)
    assert check is None  # in_pass=False: checked already
    return loss, batch


class _Prepared(NamedTuple):
    """The loss and batch in the library's form, and the checks left for the pass (or None)."""

    loss_fn: LossFn
    batch: Batch
    check: PassCheck | None


def _prepare(model: nn.Module, loss_fn: LossFn | None, batch: Any, *, in_pass: bool) -> _Prepared:
    """:func:`prepare`, or with ``in_pass`` the first-batch checks left to the statistic's pass.

    ``in_pass``: the caller runs one plain forward pass over the whole batch (:func:`_batch_loss`),
    which makes the probe's checks itself: the separate probe forward pass is saved.
    """
    loss = resolve_loss(model, loss_fn)
    check_inputs(model, loss)
    if isinstance(batch, Batch):  # converted and probed by the caller's loop
        return _Prepared(loss, batch, None)
    if in_pass:
        check = PassCheck(model, loss, batch)
        return _Prepared(loss, check.batch, check)
    probe = probe_first_batch(model, loss, batch)
    check_scalar_loss(loss, probe.outputs, probe.targets)
    return _Prepared(loss, probe.batch, None)


def _batch_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    leaves: Mapping[str, Tensor],
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    check: PassCheck | None,
) -> Tensor:
    """The batch loss at ``leaves`` (with graph), making ``check``'s first-batch checks on it.

    The random draws are watched on this forward pass, the outputs checked before the loss reads
    them, the loss checked to be one number and, for a model's own loss, to be the model's
    ``.loss``: a batch nobody probed yet costs no probe forward pass of its own (none for a
    causal LM, :class:`~lossprune._common.probe.PassCheck`).
    """
    inputs, targets = batch
    call = FunctionalModel(model, params)
    if check is None:
        return loss_fn(call(leaves, inputs), targets)
    loss = loss_fn(check.forward(lambda checked_inputs: call(leaves, checked_inputs)), targets)
    require_one_number(loss)
    check.check_loss(loss)
    return loss


def loss_and_grad(
    model: nn.Module, params: Mapping[str, Tensor], batch: Any, loss_fn: LossFn | None = None
) -> GradientResult:
    """Batch loss and its gradient with respect to ``params`` (one forward, one backward).

    ``batch`` is any form of :mod:`lossprune._common.batches` (a pair, a nested tuple, a mapping
    with ``labels``); ``loss_fn=None`` is the model's own loss for a Hugging Face model. The model
    may return any pytree (tuple, dict) that ``loss_fn`` unpacks.
    """
    loss_fn, batch, check = _prepare(model, loss_fn, batch, in_pass=True)
    # Plain reverse mode, not torch.func.grad: the same numbers, and it also runs models with
    # an autograd.Function that torch.func cannot transform (BLOOM's GeLU has no
    # setup_context).
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        loss = _batch_loss(model, params, leaves, batch, loss_fn, check)
    if not loss.requires_grad:  # no parameter reaches the loss
        return GradientResult(loss.detach(), {k: torch.zeros_like(v) for k, v in leaves.items()})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return GradientResult(
        loss.detach(),
        {k: _or_zeros(g, leaf) for (k, leaf), g in zip(leaves.items(), grads, strict=True)},
    )


_WARNED_DOUBLE_BACKWARD: set[str] = set()


def _warn_double_backward_once(error: Exception, products: str = "Hessian-vector") -> None:
    key = products + type(error).__name__ + str(error).split("\n")[0]
    if key not in _WARNED_DOUBLE_BACKWARD:
        _WARNED_DOUBLE_BACKWARD.add(key)
        warnings.warn(
            "forward-mode AD failed for an operation of this model "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); falling "
            f"back to double-backward {products} products (same numbers, slower).",
            RuntimeWarning,
            stacklevel=3,
        )


def hvp(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    loss_fn: LossFn | None,
    vectors: Mapping[str, Tensor],
    *,
    curvature: str = "hessian",
    chunk_size: int | None = None,
    fast: bool = True,
) -> CurvatureProducts:
    r"""Loss, gradient and curvature-vector products for a stack of ``k`` vectors, fused.

    ``curvature="hessian"``: :math:`Hv`; ``curvature="ggn"``: :math:`Gv = J^\top M J v` (module
    docstring), the algorithm picked by :func:`choose_backend`.

    Args:
        model: the network, called functionally (never modified).
        params: tensors to differentiate with respect to, by qualified parameter name.
        batch: ``(inputs, targets)``, a nested tuple or a mapping
            (:mod:`lossprune._common.batches`).
        loss_fn: the batch loss ``loss_fn(outputs, targets)``, a mean (:mod:`.outputs`);
            ``None``: a Hugging Face model's own loss.
        vectors: for every name in ``params``, a tensor of shape ``(k, *param.shape)``.
        curvature: ``"hessian"`` or ``"ggn"``.
        chunk_size: at most this many vectors are processed at once (the one memory bound of
            every statistic, :mod:`.statistics`).
        fast: allow the fused chain path (``False``: always the generic ``torch.func`` path,
            the slow twin used in tests).

    Returns:
        ``(loss, grad, products)``, products shaped like ``vectors``.

    Raises:
        TypeError: an operation of the model has no second derivative (e.g. a fused attention
            kernel), so no exact Hessian-vector product exists.
    """
    params = dict(params)
    k = _check_vectors(params, vectors)
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    choice = choose_backend(model, params, curvature, k, fast)
    double_backward = choice.backend is Backend.REVERSE_OVER_REVERSE
    loss_fn, batch, check = _prepare(model, loss_fn, batch, in_pass=double_backward)
    if double_backward:
        return _hvp_double_backward(model, params, batch, loss_fn, vectors, check)
    if choice.chain is not None:
        try:
            result = run_chain(
                choice.chain,
                params,
                batch,
                loss_fn,
                vectors,
                hessian=curvature == "hessian",
                chunk_size=chunk_size,
            )
        except NotAChain:
            pass  # an input layout the chain rules do not cover: the generic path is exact
        else:
            assert result.products is not None  # run_chain only omits them when asked for none
            grads, products = result.grad, result.products
            return CurvatureProducts(
                result.loss, {k: grads[k] for k in params}, {k: products[k] for k in params}
            )
    if curvature == "hessian":
        try:
            return _hvp_forward_over_reverse(model, params, batch, loss_fn, vectors, chunk_size)
        except (RuntimeError, NotImplementedError) as error:
            # Announced only once double-backward has worked: its promise is "same numbers".
            fallback = _hvp_double_backward(model, params, batch, loss_fn, vectors)
            _warn_double_backward_once(error)
            return fallback
    return _ggn_vp(model, params, batch, loss_fn, vectors, chunk_size)


def ggn_vp(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    loss_fn: LossFn | None,
    vectors: Mapping[str, Tensor],
    *,
    chunk_size: int | None = None,
    fast: bool = True,
) -> CurvatureProducts:
    """:func:`hvp` with ``curvature="ggn"``."""
    return hvp(
        model, params, batch, loss_fn, vectors, curvature="ggn", chunk_size=chunk_size, fast=fast
    )


def _check_vectors(params: Params, vectors: Mapping[str, Tensor]) -> int:
    if set(vectors) != set(params):
        raise ValueError("vectors must have exactly the keys of params")
    ks = {v.shape[0] for v in vectors.values()}
    if len(ks) != 1:
        raise ValueError("every entry of vectors must stack the same number k of vectors")
    for name, v in vectors.items():
        if v.shape[1:] != params[name].shape:
            raise ValueError(
                f"vectors[{name!r}] must have shape (k, *{tuple(params[name].shape)}), "
                f"got {tuple(v.shape)}"
            )
    return ks.pop()


def _hvp_forward_over_reverse(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    chunk_size: int | None,
) -> CurvatureProducts:
    inputs, targets = batch
    batch_loss = FunctionalModel(model, params).loss_fn_of(loss_fn)

    def grad_with_loss(p: Params) -> tuple[Params, Tensor]:
        return grad_and_value(batch_loss)(p, inputs, targets)

    def one_tangent(v: Params) -> tuple[Params, Params, Tensor]:
        # (gradient, Hessian-vector product, loss): jvp's stubs do not know has_aux's arity.
        return cast(
            "tuple[Params, Params, Tensor]", jvp(grad_with_loss, (params,), (v,), has_aux=True)
        )

    grads, products, loss = vmap(one_tangent, chunk_size=chunk_size)(dict(vectors))
    # The primal outputs do not depend on the tangent: vmap expands them, take one copy.
    return CurvatureProducts(
        loss[0].detach(), {k: g[0].detach() for k, g in grads.items()}, products
    )


def _hvp_double_backward(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    check: PassCheck | None = None,
) -> CurvatureProducts:
    r"""Reverse-over-reverse: :math:`Hv = \nabla(g^\top v)`, one backward per vector.

    ``check``: the first-batch checks to make on its forward pass (:func:`_batch_loss`).
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(leaves)
    with torch.enable_grad():
        # Outside the try below: a refusal of the checks is not a missing second derivative.
        loss = _batch_loss(model, params, leaves, batch, loss_fn, check)
    try:
        with torch.enable_grad():
            raw = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=True, allow_unused=True
            )
            # Only gradients that are part of the graph have a derivative; the others (a
            # parameter the loss does not use, or uses linearly) have a zero Hessian row.
            in_graph = [i for i, g in enumerate(raw) if g is not None and g.requires_grad]
            k = next(iter(vectors.values())).shape[0]
            # Written column by column: the k products are never held twice (one vector: its
            # product is the result, no copy).
            products: Params = {}
            if k > 1 or not in_graph:
                products = {name: leaf.new_zeros((k, *leaf.shape)) for name, leaf in leaves.items()}
            for j in range(k if in_graph else 0):
                column = torch.autograd.grad(
                    [raw[i] for i in in_graph],
                    list(leaves.values()),
                    grad_outputs=[vectors[names[i]][j] for i in in_graph],
                    retain_graph=j < k - 1,
                    allow_unused=True,
                )
                if j == 0:
                    _refuse_cut_graph([names[i] for i in in_graph if column[i] is None])
                for name, leaf, product in zip(names, leaves.values(), column, strict=True):
                    if k == 1:
                        products[name] = (
                            leaf.new_zeros((1, *leaf.shape)) if product is None
                            else product.unsqueeze(0)
                        )  # fmt: skip
                    elif product is not None:
                        products[name][j] = product
    except (RuntimeError, NotImplementedError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TypeError(
            "Hessian-vector products need second derivatives of every operation of the model, "
            f"and one has none ({first_line}); use an implementation with double-backward "
            "support (e.g. the math kernel of scaled_dot_product_attention)"
        ) from error
    grads = {name: _or_zeros(g, leaves[name]).detach() for name, g in zip(names, raw, strict=True)}
    return CurvatureProducts(loss.detach(), grads, products)


def _refuse_cut_graph(cut: list[str]) -> None:
    """Gradients that are part of the graph but do not reach their own parameter.

    A backward pass that is not itself differentiable (``once_differentiable``) cut the graph
    (or, in theory, the loss is linear in that parameter with no interaction at all).

    Raises:
        TypeError: naming the parameters.
    """
    if cut:
        raise TypeError(
            "Hessian-vector products need second derivatives of every operation of the model, "
            f"but the gradient is disconnected from {cut} (an operation whose backward is "
            "not differentiable, e.g. once_differentiable)"
        )


def _or_zeros(t: Tensor | None, like: Tensor) -> Tensor:
    """A derivative autograd reported as unused (``None``) is zero."""
    return torch.zeros_like(like) if t is None else t


def _ggn_vp(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    chunk_size: int | None,
) -> CurvatureProducts:
    r""":math:`J^\top M J v` with :func:`torch.func`; outputs may be any pytree of tensors."""
    inputs, targets = batch
    fmodel = FunctionalModel(model, params)

    def outputs_of(p: Params) -> Any:
        return fmodel(p, inputs)

    try:
        # vjp's stubs allow an aux output; index instead of unpacking so the types stay exact.
        primal = vjp(outputs_of, params)
    except RuntimeError as error:
        if "setup_context" not in str(error):
            raise
        # An autograd.Function torch.func cannot transform (BLOOM's GeLU): reverse mode only.
        return _ggn_vp_double_backward(model, params, batch, loss_fn, vectors, error)
    outputs, pullback = tree_map(torch.Tensor.detach, primal[0]), primal[1]
    loss, output_grad = loss_and_output_grad(loss_fn, outputs, targets)
    space = output_curvature(loss_fn, outputs, targets)

    def ggn_one(v: Params) -> Params:
        jv = jvp(outputs_of, (params,), (v,))[1]
        return pullback(space.ggn_product_one(jv))[0]

    (grads,) = pullback(output_grad)
    try:
        products = vmap(ggn_one, chunk_size=chunk_size)(dict(vectors))
    except (RuntimeError, NotImplementedError) as error:
        # An operation without a forward-mode rule (the grouped_mm experts of transformers 5):
        # Jv by reverse mode alone, where the backward pass can be differentiated.
        try:
            return _ggn_vp_double_backward(model, params, batch, loss_fn, vectors, error)
        except (RuntimeError, NotImplementedError):
            pass
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TypeError(
            "Gauss-Newton-vector products need forward-mode derivatives (Jacobian-vector "
            "products) or a differentiable backward pass of every operation of the model, and "
            f"one has neither ({first_line}); use an implementation with forward-mode support "
            "(e.g. the math kernel of scaled_dot_product_attention)"
        ) from error
    return CurvatureProducts(loss.detach(), {k: g.detach() for k, g in grads.items()}, products)


def _ggn_vp_double_backward(
    model: nn.Module,
    params: Params,
    batch: tuple[Any, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    error: Exception,
) -> CurvatureProducts:
    r""":math:`J^\top M J v` by reverse mode alone, one vector at a time (the slow route).

    :math:`Jv` is the derivative with respect to :math:`u` of :math:`(J^\top u)^\top v`, which is
    linear in :math:`u` (the "double-backward trick"): one backward pass with a graph gives
    :math:`J^\top u`, then one per vector gives :math:`Jv`, and one more :math:`J^\top(MJv)`.
    """
    inputs, targets = batch
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(leaves)
    with torch.enable_grad():
        outputs = FunctionalModel(model, params)(leaves, inputs)
        flat, spec = tree_flatten(outputs)
        detached = tree_map(torch.Tensor.detach, outputs)
        loss, output_grad = loss_and_output_grad(loss_fn, detached, targets)
        space = output_curvature(loss_fn, detached, targets)
        differentiable = [i for i, o in enumerate(flat) if o.requires_grad]
        roots = [flat[i] for i in differentiable]

        def pull_back(cotangents: Any) -> list[Tensor | None]:
            flat_cotangents = tree_flatten(cotangents)[0]
            return list(
                torch.autograd.grad(
                    roots, list(leaves.values()),
                    grad_outputs=[flat_cotangents[i] for i in differentiable],
                    retain_graph=True, allow_unused=True,
                )
            )  # fmt: skip

        dummies = [torch.zeros_like(flat[i], requires_grad=True) for i in differentiable]
        transposed = torch.autograd.grad(
            roots, list(leaves.values()), grad_outputs=dummies, create_graph=True,
            allow_unused=True,
        )  # fmt: skip
        used = [i for i, t in enumerate(transposed) if t is not None and t.requires_grad]
        k = next(iter(vectors.values())).shape[0]
        products = {name: leaf.new_zeros((k, *leaf.shape)) for name, leaf in leaves.items()}
        for j in range(k if used else 0):
            jv_parts = torch.autograd.grad(
                [transposed[i] for i in used], dummies,
                grad_outputs=[vectors[names[i]][j] for i in used],
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
            jv = [torch.zeros_like(o) for o in flat]
            for i, part in zip(differentiable, jv_parts, strict=True):
                if part is not None:
                    jv[i] = part
            column = pull_back(space.ggn_product_one(tree_unflatten(jv, spec)))
            for name, c in zip(names, column, strict=True):
                if c is not None:
                    products[name][j] = c
        grads = pull_back(output_grad)
    _warn_double_backward_once(error, "Gauss-Newton-vector")
    return CurvatureProducts(
        loss.detach(),
        {
            name: _or_zeros(g, leaf).detach()
            for (name, leaf), g in zip(leaves.items(), grads, strict=True)
        },
        products,
    )
