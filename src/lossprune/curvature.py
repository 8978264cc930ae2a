r"""Curvature core: gradients, curvature-vector products and curvature diagonals.

Layer 2 of DESIGN.md. Pure functions of a model called functionally
(:func:`torch.func.functional_call`) at a dict ``params`` of tensors keyed by qualified parameter
name; derivatives are taken with respect to ``params`` only, every other parameter and buffer of
the model is held fixed (buffers are cloned, never mutated).

Conventions: ``loss_fn(outputs, targets)`` averages over the batch, :math:`L = \frac1N\sum_n
\ell_n`. Every statistic is the one of that mean loss. With :math:`J_n` the Jacobian of the
outputs of example :math:`n` and :math:`H_n = \partial^2 \ell_n / \partial f^2 = S_n S_n^\top` the
output Hessian of its loss:

* gradient :math:`g = \nabla L`;
* Hessian-vector products :math:`Hv` (forward-over-reverse, Pearlmutter 1994);
* GGN-vector products :math:`Gv`, :math:`G = \frac1N \sum_n J_n^\top H_n J_n` (Schraudolph 2002);
* the exact GGN/Fisher diagonal :math:`\operatorname{diag}G = \frac1N\sum_n\sum_c
  (J_n^\top S_n e_c)^2`; for softmax cross-entropy :math:`S_n e_c = \sqrt{p_{nc}}(e_c - p_n)`,
  which gives the Fisher of Laurent et al. (2020, Sec. 3):
  :math:`D_q = \frac1N \sum_n \sum_c p_{nc} (\partial \log p_c(x_n) / \partial\theta_q)^2`;
* its Monte-Carlo estimate from labels sampled from the model (Martens 2014);
* Hutchinson's estimate of the Hessian diagonal :math:`\mathbb E_z[z \odot Hz]` with Rademacher
  probes :math:`z` (Bekas et al. 2007).

:func:`compute_statistics` evaluates any set of these over many batches in one pass, as
example-weighted means (all-reduced across ranks when :mod:`torch.distributed` is initialised).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, hessian, jvp, vjp, vmap

from ._chain import NotAChain, find_chain, run_chain
from ._checks import check_positive_int
from ._data import iter_batches
from ._distributed import all_reduce_floats, all_reduce_sum
from ._functional import FunctionalModel, check_mean_reduction, statistics_dtype
from ._layer_diag import layer_ggn_diag

__all__ = [
    "Statistic",
    "Statistics",
    "NonFiniteError",
    "compute_statistics",
    "loss_and_grad",
    "hvp",
    "ggn_vp",
    "fisher_diag",
    "fisher_diag_mc",
    "hutchinson_diag",
    "output_hessian_sqrt",
]

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class NonFiniteError(FloatingPointError, ValueError):
    """A loss, gradient or score is NaN or infinite; nothing was modified."""


# --------------------------------------------------------------------------------------------
# Output-space curvature of the loss
# --------------------------------------------------------------------------------------------


def _is_plain_cross_entropy(loss_fn: object, outputs: Tensor, targets: Tensor) -> bool:
    """Softmax cross-entropy on class indices, where the closed forms below hold."""
    if loss_fn is nn.functional.cross_entropy:
        plain = True
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0.0
    else:
        return False
    return plain and outputs.dim() == 2 and not targets.is_floating_point() and targets.dim() == 1


def _per_example_loss(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    r""":math:`\ell_n` as a function of one example's output and target (a batch of one)."""

    def loss_one(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output.unsqueeze(0), target.unsqueeze(0))

    return loss_one


def output_hessian_sqrt(outputs: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
    r"""Per-example square roots :math:`S_n` of the output Hessians, :math:`H_n = S_n S_n^\top`.

    Softmax cross-entropy uses the closed form :math:`H = \operatorname{diag}(p) - pp^\top`,
    :math:`S = \operatorname{diag}(\sqrt p) - p\sqrt p^\top` (column :math:`c` is
    :math:`\sqrt{p_c}(e_c - p)`, valid since :math:`\sum_c p_c = 1`). Any other loss gets its
    per-example output Hessian from :func:`torch.func.hessian` and a symmetric eigendecomposition
    (negative eigenvalues, impossible for a convex loss, are clipped to keep :math:`G` PSD).

    Args:
        outputs: model outputs ``(N, *out)``; detached here.
        targets: ``(N, ...)``.
        loss_fn: batch-mean loss.

    Returns:
        ``(N, O, R)`` with ``O = prod(out)`` and ``R`` columns (``R = O``).
    """
    outputs = outputs.detach()
    if _is_plain_cross_entropy(loss_fn, outputs, targets):
        p = outputs.softmax(dim=1)
        sqrt_p = p.sqrt()
        return torch.diag_embed(sqrt_p) - p.unsqueeze(2) * sqrt_p.unsqueeze(1)
    n = outputs.shape[0]
    flat = outputs.reshape(n, -1)
    loss_one = _per_example_loss(loss_fn)
    out_shape = outputs.shape[1:]

    def loss_flat(o: Tensor, t: Tensor) -> Tensor:
        return loss_one(o.reshape(out_shape), t)

    h = vmap(hessian(loss_flat))(flat, targets)
    h = 0.5 * (h + h.transpose(1, 2))
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    return eigenvectors * eigenvalues.clamp_min(0.0).sqrt().unsqueeze(1)


def _sample_output_cotangents(
    outputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    r"""Random :math:`z_n` with :math:`\mathbb E[z_n z_n^\top] = H_n`, shape ``(N, O, samples)``.

    Cross-entropy: :math:`z = e_y - p` with :math:`y \sim p` sampled from the model, the gradient
    of :math:`-\log p_y` with respect to the logits up to sign (Martens 2014, "MC Fisher").
    Other losses: :math:`z = S_n \varepsilon` with Rademacher :math:`\varepsilon`.
    """
    outputs = outputs.detach()
    if _is_plain_cross_entropy(loss_fn, outputs, targets):
        p = outputs.softmax(dim=1)
        labels = torch.multinomial(p, samples, replacement=True, generator=generator)  # (N, k)
        one_hot = nn.functional.one_hot(labels, p.shape[1]).to(p.dtype)  # (N, k, C)
        return (one_hot - p.unsqueeze(1)).transpose(1, 2)
    s = output_hessian_sqrt(outputs, targets, loss_fn)
    eps = _rademacher((s.shape[0], s.shape[2], samples), s, generator)
    return s @ eps


def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


# --------------------------------------------------------------------------------------------
# Gradient and curvature-vector products on one batch
# --------------------------------------------------------------------------------------------


def _check_finite(name: str, value: Tensor | Mapping[str, Tensor]) -> None:
    tensors = value.values() if isinstance(value, Mapping) else [value]
    for t in tensors:
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"the {name} is not finite (NaN or inf); nothing was modified")


def loss_and_grad(
    model: nn.Module, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor], loss_fn: LossFn
) -> tuple[Tensor, Params]:
    """Batch-mean loss and its gradient with respect to ``params`` (one forward, one backward)."""
    check_mean_reduction(loss_fn)
    inputs, targets = batch
    batch_loss = FunctionalModel(model, params).loss_fn_of(loss_fn)
    grads, loss = grad_and_value(batch_loss)(dict(params), inputs, targets)
    return loss.detach(), {k: v.detach() for k, v in grads.items()}


_WARNED_DOUBLE_BACKWARD: set[str] = set()


def _warn_double_backward_once(error: Exception) -> None:
    key = type(error).__name__ + str(error).split("\n")[0]
    if key not in _WARNED_DOUBLE_BACKWARD:
        _WARNED_DOUBLE_BACKWARD.add(key)
        warnings.warn(
            "forward-mode AD is not available for an operation of this model "
            f"({str(error).splitlines()[0]}); falling back to double-backward "
            "Hessian-vector products (same numbers, slower).",
            RuntimeWarning,
            stacklevel=3,
        )


def _forward_ad_missing(error: Exception) -> bool:
    text = str(error).lower()
    # "ZeroTensors are immutable": some backward formulas (mse_loss in torch 2.13) write in place
    # into the zero tangent of a constant input under forward-over-reverse.
    return (
        isinstance(error, NotImplementedError)
        or ("forward" in text and ("not implemented" in text or "not supported" in text))
        or "zerotensors are immutable" in text
    )


def hvp(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    *,
    curvature: str = "hessian",
    chunk_size: int | None = None,
    fast: bool = True,
) -> tuple[Tensor, Params, Params]:
    r"""Loss, gradient and curvature-vector products for a stack of ``k`` vectors, fused.

    ``curvature="hessian"``: :math:`Hv` by forward-over-reverse differentiation of the gradient,
    ``jvp(grad(L))``, vmapped over the ``k`` tangents so the primal pass is shared.
    ``curvature="ggn"``: :math:`Gv = J^\top H_f J v` (Jacobian-vector product, output-space
    Hessian product, vector-Jacobian product), PSD for convex losses.

    Args:
        model: the network, called functionally (never modified).
        params: tensors to differentiate with respect to, by qualified parameter name.
        batch: ``(inputs, targets)``.
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``.
        vectors: for every name in ``params``, a tensor of shape ``(k, *param.shape)``.
        curvature: ``"hessian"`` or ``"ggn"``.
        chunk_size: at most this many vectors are processed at once (bounds memory).
        fast: use the layer-batched chain path when the model qualifies (``False``: always the
            generic ``torch.func`` path, the slow twin used in tests).

    Returns:
        ``(loss, grad, products)``, products shaped like ``vectors``.
    """
    check_mean_reduction(loss_fn)
    params = dict(params)
    k = _check_vectors(params, vectors)
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    if fast and curvature == "hessian" and k == 1:
        # One vector leaves no tangents to batch, and reverse-over-reverse is then the cheapest
        # exact product measured (benchmarks/README.md): 2.2-2.3 gradients on the MLP and CNN,
        # where the chain path takes 2.2 and 3.1 and vmap(jvp(grad)) 3.4-3.6.
        return _hvp_double_backward(model, params, batch, loss_fn, vectors)
    chain = find_chain(model, params) if fast else None
    if chain is not None:
        try:
            loss, grads, products = run_chain(
                chain,
                params,
                batch,
                loss_fn,
                vectors,
                hessian=curvature == "hessian",
                chunk_size=chunk_size,
            )
            assert products is not None  # run_chain only omits them when asked for none
            return loss, {k: grads[k] for k in params}, {k: products[k] for k in params}
        except NotAChain:
            pass  # the generic path below is exact for every model
    if curvature == "hessian":
        try:
            return _hvp_forward_over_reverse(model, params, batch, loss_fn, vectors, chunk_size)
        except (RuntimeError, NotImplementedError) as error:
            if not _forward_ad_missing(error):
                raise
            _warn_double_backward_once(error)
            return _hvp_double_backward(model, params, batch, loss_fn, vectors)
    return _ggn_vp(model, params, batch, loss_fn, vectors, chunk_size)


def ggn_vp(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    *,
    chunk_size: int | None = None,
    fast: bool = True,
) -> tuple[Tensor, Params, Params]:
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
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    chunk_size: int | None,
) -> tuple[Tensor, Params, Params]:
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
    return loss[0].detach(), {k: g[0].detach() for k, g in grads.items()}, products


def _hvp_double_backward(
    model: nn.Module,
    params: Params,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
) -> tuple[Tensor, Params, Params]:
    r"""Reverse-over-reverse twin: :math:`Hv = \nabla(g^\top v)`, one backward per vector."""
    inputs, targets = batch
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        loss = loss_fn(FunctionalModel(model, params)(leaves, inputs), targets)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), create_graph=True, materialize_grads=True
        )
        k = next(iter(vectors.values())).shape[0]
        columns = []
        for j in range(k):
            columns.append(
                torch.autograd.grad(
                    grads,
                    list(leaves.values()),
                    grad_outputs=[vectors[name][j] for name in leaves],
                    retain_graph=j < k - 1,
                    allow_unused=True,
                )
            )
    products = {
        name: torch.stack(
            [col[i] if col[i] is not None else torch.zeros_like(leaves[name]) for col in columns]
        )
        for i, name in enumerate(leaves)
    }
    return loss.detach(), dict(zip(leaves, (g.detach() for g in grads), strict=True)), products


def _ggn_vp(
    model: nn.Module,
    params: Params,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor],
    chunk_size: int | None,
) -> tuple[Tensor, Params, Params]:
    inputs, targets = batch
    fmodel = FunctionalModel(model, params)

    def outputs_of(p: Params) -> Tensor:
        return fmodel(p, inputs)

    # vjp's stubs allow an aux output; index instead of unpacking so the types stay exact.
    primal = vjp(outputs_of, params)
    outputs, pullback = primal[0], primal[1]
    outputs = outputs.detach()

    def output_grad(o: Tensor) -> Tensor:
        return torch.func.grad(loss_fn)(o, targets)

    # H_f Jv as the vjp of the output gradient (H_f is symmetric): reverse-over-reverse on the
    # small output space only, and it avoids forward-AD gaps in loss backward formulas.
    output_hessian = vjp(output_grad, outputs)[1]

    def ggn_one(v: Params) -> Params:
        jv = jvp(outputs_of, (params,), (v,))[1]
        return pullback(output_hessian(jv)[0])[0]

    loss = loss_fn(outputs, targets)
    (grads,) = pullback(output_grad(outputs))
    products = vmap(ggn_one, chunk_size=chunk_size)(dict(vectors))
    return loss.detach(), {k: g.detach() for k, g in grads.items()}, products


# --------------------------------------------------------------------------------------------
# Curvature diagonals on one batch
# --------------------------------------------------------------------------------------------

# Bound on the per-example tensors materialised at once: examples x columns x parameters.
_PER_EXAMPLE_ELEMENTS = 1 << 24


def _sum_squared_per_example_vjps(
    fmodel: FunctionalModel,
    params: Params,
    inputs: Tensor,
    cotangents: Tensor,
    chunk_size: int | None,
    fixed: Params | None = None,
) -> Params:
    r""":math:`\sum_n \sum_r (J_n^\top c_{nr})^2` for output cotangents ``(N, O, R)``.

    Each example's Jacobian is pulled back along its ``R`` columns (vmapped), squared and summed.
    Examples are processed ``chunk_size`` at a time so that at most
    ``chunk_size * R * P`` per-example numbers exist at once. ``fixed`` tensors of ``fmodel``'s
    explicit parameters are held constant (the layers a fast path already covered).
    """
    n, _, columns = cotangents.shape
    size = sum(p.numel() for p in params.values())
    fixed = fixed or {}
    if chunk_size is None:
        chunk_size = max(1, _PER_EXAMPLE_ELEMENTS // max(1, columns * size))

    def one_example(x: Tensor, cots: Tensor) -> Params:
        def output(p: Params) -> Tensor:
            return fmodel.single({**fixed, **p}, x).reshape(-1)

        pullback = vjp(output, params)[1]
        per_column = vmap(lambda c: pullback(c)[0], in_dims=1)(cots)
        return {k: (g * g).sum(0) for k, g in per_column.items()}

    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        chunk = vmap(one_example)(inputs[start:stop], cotangents[start:stop])
        for k in total:
            total[k] += chunk[k].sum(0)
    return total


def fisher_diag(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    *,
    chunk_size: int | None = None,
    fast: bool = True,
) -> Params:
    r"""Exact diagonal of the GGN (= Fisher for softmax cross-entropy), batch mean.

    .. math:: D = \frac1N \sum_n \sum_c (J_n^\top S_n e_c)^2

    Args:
        model: the network, called functionally (never modified).
        params: tensors to differentiate with respect to, by qualified parameter name.
        batch: ``(inputs, targets)``.
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``.
        chunk_size: examples processed at once (default: bounded by ``2**24`` per-example numbers).
        fast: use the per-layer squared contractions where they are exact (``False``: always the
            generic per-example path, the slow twin used in tests).
    """
    check_mean_reduction(loss_fn)
    return _diag_from_cotangents(model, dict(params), batch, loss_fn, None, 0, chunk_size, fast)


def fisher_diag_mc(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    *,
    samples: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    fast: bool = True,
) -> Params:
    r"""Monte-Carlo estimate of :func:`fisher_diag` from ``samples`` sampled outputs per example.

    .. math:: \hat D = \frac1N \sum_n \frac1k \sum_{j=1}^k (J_n^\top z_{nj})^2,
       \quad \mathbb E[z z^\top] = H_n

    Unbiased; for cross-entropy :math:`z = e_y - p`, :math:`y\sim p` (Laurent et al. 2020 use
    k = 10 on ImageNet).
    """
    check_mean_reduction(loss_fn)
    check_positive_int("samples", samples)
    return _diag_from_cotangents(
        model, dict(params), batch, loss_fn, generator, samples, chunk_size, fast
    )


def _diag_from_cotangents(
    model: nn.Module,
    params: Params,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    generator: torch.Generator | None,
    samples: int,
    chunk_size: int | None,
    fast: bool = True,
) -> Params:
    """Exact (``samples == 0``) or Monte-Carlo GGN diagonal, mean over the batch.

    With ``fast``, Linear/Conv layers get their diagonal from squared contractions of one
    batched backward pass (:func:`~lossprune._layer_diag.layer_ggn_diag`); whatever it does not
    cover goes through the generic per-example ``vmap`` path, its slow twin.
    """
    inputs, targets = batch
    fmodel = FunctionalModel(model, params)

    def cotangents_of(outputs: Tensor) -> Tensor:
        if samples == 0:
            return output_hessian_sqrt(outputs, targets, loss_fn)
        return _sample_output_cotangents(outputs, targets, loss_fn, samples, generator)

    scale = 1.0 / (len(inputs) * max(samples, 1))
    total: Params = {}
    cotangents = None
    if fast:
        drawn: list[Tensor] = []  # the one draw of cotangents, reused by the generic remainder

        def remember(outputs: Tensor) -> Tensor:
            drawn.append(cotangents_of(outputs))
            return drawn[0]

        _, total = layer_ggn_diag(model, params, inputs, remember)
        cotangents = drawn[0] if drawn else None
    rest = {k: v for k, v in params.items() if k not in total}
    if rest:
        if cotangents is None:
            with torch.no_grad():
                cotangents = cotangents_of(fmodel(params, inputs))
        fixed = {k: v for k, v in params.items() if k in total}
        total.update(
            _sum_squared_per_example_vjps(fmodel, rest, inputs, cotangents, chunk_size, fixed)
        )
    return {k: total[k] * scale for k in params}


def hutchinson_diag(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    *,
    probes: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Params:
    r"""Hutchinson's unbiased estimate of the Hessian diagonal (Bekas et al. 2007).

    .. math:: \widehat{\operatorname{diag} H} = \frac1k \sum_{j=1}^k z_j \odot H z_j,
       \quad z_j \in \{-1, 1\}^P \text{ uniform}

    The ``k`` products share one primal pass (:func:`hvp`).
    """
    check_positive_int("probes", probes)
    _, _, estimate = _hutchinson(model, dict(params), batch, loss_fn, probes, generator, chunk_size)
    return estimate


def _hutchinson(
    model: nn.Module,
    params: Params,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    probes: int,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> tuple[Tensor, Params, Params]:
    z = {k: _rademacher((probes, *p.shape), p, generator) for k, p in params.items()}
    loss, grads, hz = hvp(model, params, batch, loss_fn, z, chunk_size=chunk_size)
    return loss, grads, {k: (z[k] * hz[k]).mean(0) for k in params}


# --------------------------------------------------------------------------------------------
# Statistics over a whole dataset, in one pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statistic:
    """One statistic a criterion needs, with its options (hashable, so requests merge).

    ``kind`` is one of:

    * ``"grad"`` — :math:`g`;
    * ``"fisher"`` — exact GGN/Fisher diagonal;
    * ``"fisher_mc"`` — Monte-Carlo Fisher diagonal with ``samples`` labels per example;
    * ``"hutchinson"`` — Hutchinson Hessian diagonal with ``samples`` probes per batch;
    * ``"hessian_grad"`` — :math:`Hg` with :math:`g` the gradient over all the data (GraSP).
    """

    kind: str
    samples: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown statistic {self.kind!r}; expected one of {sorted(_KINDS)}")
        if self.kind in ("fisher_mc", "hutchinson"):
            check_positive_int("samples", self.samples)


_KINDS = frozenset({"grad", "fisher", "fisher_mc", "hutchinson", "hessian_grad"})


@dataclass
class Statistics:
    """Example-weighted means over the scoring data.

    Attributes:
        loss: mean loss.
        grad: mean gradient :math:`g`.
        examples: number of examples (all ranks together).
        values: every requested :class:`Statistic`, keyed by it.
    """

    loss: float
    grad: Params
    examples: int
    values: dict[Statistic, Params] = field(default_factory=dict)

    def __getitem__(self, request: Statistic) -> Params:
        if request.kind == "grad":
            return self.grad
        return self.values[request]


def compute_statistics(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Any,
    loss_fn: LossFn,
    requests: Iterable[Statistic] = (),
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Statistics:
    """Loss, gradient and every requested statistic over all of ``data``, example-weighted.

    One pass over the data computes the loss, the gradient and all diagonals of each batch
    together. :math:`Hg` (``"hessian_grad"``) needs the gradient of the WHOLE data first, so it
    adds a second pass. Under an initialised :mod:`torch.distributed` process group, sums and
    example counts are all-reduced so that every rank gets identical statistics.

    Args:
        model: the module (never modified).
        params: tensors to differentiate with respect to, by qualified name.
        data: an ``(inputs, targets)`` batch or a re-iterable of them (a DataLoader).
        loss_fn: batch-mean loss.
        requests: statistics to compute besides loss and gradient.
        generator: random source for Monte-Carlo labels and Hutchinson probes.
        chunk_size: memory bound passed to the per-batch routines.

    Raises:
        NonFiniteError: a batch loss or gradient is NaN or infinite.
    """
    check_mean_reduction(loss_fn)
    params = {k: v.detach() for k, v in params.items()}
    requests = set(requests)
    device = next(iter(params.values())).device
    dtype = statistics_dtype(params)
    sums: dict[Statistic, Params] = {r: _zeros(params, dtype) for r in requests if r.kind != "grad"}
    grad_sum = _zeros(params, dtype)
    loss_sum = torch.zeros((), dtype=dtype, device=device)
    examples = 0
    first_pass = [r for r in requests if r.kind not in ("grad", "hessian_grad")]
    for batch in iter_batches(data, device):
        n = len(batch[0])
        loss, grads, diagonals = _batch_statistics(
            model, params, batch, loss_fn, first_pass, generator, chunk_size
        )
        _check_finite("loss", loss)
        _check_finite("gradient", grads)
        loss_sum += n * loss.to(dtype)
        _add_scaled(grad_sum, grads, n)
        for request, diagonal in diagonals.items():
            _add_scaled(sums[request], diagonal, n)
        examples += n
    examples = _all_reduce(examples, loss_sum, grad_sum, *sums.values())
    grad = {k: v / examples for k, v in grad_sum.items()}
    if any(r.kind == "hessian_grad" for r in requests):
        _add_hessian_grad(model, params, data, loss_fn, grad, sums, device, chunk_size)
    values = {r: {k: v / examples for k, v in s.items()} for r, s in sums.items()}
    for request, value in values.items():
        _check_finite(f"{request.kind} statistic", value)
    return Statistics(loss=float(loss_sum / examples), grad=grad, examples=examples, values=values)


def _batch_statistics(
    model: nn.Module,
    params: Params,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    requests: list[Statistic],
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> tuple[Tensor, Params, dict[Statistic, Params]]:
    """Batch-mean loss, gradient and per-batch means of the requested diagonals."""
    diagonals: dict[Statistic, Params] = {}
    loss = grads = None
    for request in requests:
        if request.kind == "hutchinson":
            loss, grads, diagonals[request] = _hutchinson(
                model, params, batch, loss_fn, request.samples, generator, chunk_size
            )
        elif request.kind == "fisher":
            diagonals[request] = fisher_diag(model, params, batch, loss_fn, chunk_size=chunk_size)
        elif request.kind == "fisher_mc":
            diagonals[request] = fisher_diag_mc(
                model,
                params,
                batch,
                loss_fn,
                samples=request.samples,
                generator=generator,
                chunk_size=chunk_size,
            )
    if loss is None or grads is None:
        loss, grads = loss_and_grad(model, params, batch, loss_fn)
    return loss, grads, diagonals


def _add_hessian_grad(
    model: nn.Module,
    params: Params,
    data: Any,
    loss_fn: LossFn,
    grad: Params,
    sums: dict[Statistic, Params],
    device: torch.device,
    chunk_size: int | None,
) -> None:
    request = Statistic("hessian_grad")
    vectors = {k: g.to(params[k].dtype).unsqueeze(0) for k, g in grad.items()}
    for batch in iter_batches(data, device):
        _, _, products = hvp(model, params, batch, loss_fn, vectors, chunk_size=chunk_size)
        _add_scaled(sums[request], {k: v[0] for k, v in products.items()}, len(batch[0]))
    all_reduce_sum(sums[request])


def _zeros(params: Params, dtype: torch.dtype) -> Params:
    return {k: torch.zeros(p.shape, dtype=dtype, device=p.device) for k, p in params.items()}


def _add_scaled(total: Params, value: Mapping[str, Tensor], scale: float) -> None:
    for k, v in value.items():
        total[k].add_(v.to(total[k].dtype), alpha=scale)


def _all_reduce(examples: int, loss_sum: Tensor, *sums: Params) -> int:
    """All-reduce the first-pass accumulators and return the total number of examples."""
    all_reduce_sum(loss_sum, *sums)
    (total,) = all_reduce_floats([float(examples)], loss_sum.device)
    return round(total)
