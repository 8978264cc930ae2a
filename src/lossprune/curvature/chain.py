r"""Fused gradient and batched curvature-vector products for chains of rule-covered layers.

A model whose traced forward pass is a chain ``x -> m_1 -> m_2 -> ... -> f`` of layers covered
by :data:`~.layers.RULES` gets its loss, gradient and ``k`` Hessian- (or GGN-) vector products
from a hand-written forward-over-reverse pass: Pearlmutter's (1994, "Fast exact multiplication by
the Hessian") R-operator applied layer by layer with the rules' pieces (equations in
:mod:`.layers`). The primal forward and backward passes run once; the ``k`` tangents are then
carried through every layer TOGETHER, laid out ``(N, k, ...)``, so that each Linear layer does
one matmul with a ``(k * out, in)`` stacked weight and each convolution one convolution with
``k * C_out`` output channels (instead of ``k`` small products under ``vmap``). The output-space
pieces (gradient, Hessian or Gauss-Newton output products) come from :mod:`.outputs`.

A chain passes dim 0 from layer to layer unchanged, so the per-example layout of every layer is
proven by construction; :func:`find_chain` refuses a model with any hook, a module used twice,
a tied or uncovered differentiated parameter, or a layer its rule does not accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layers import (
    FixedLinearRule,
    LayerRule,
    NotAChain,
    fast_paths_allowed,
    parameter_uses,
    rule_for,
)
from .layout import chain_links
from .outputs import LossFn, loss_and_output_grad, output_curvature

__all__ = ["Chain", "ChainResult", "find_chain", "run_chain"]

Params = dict[str, Tensor]


class Chain(NamedTuple):
    """The rules of a chain-shaped model, each restricted to the differentiated parameters."""

    layers: list[LayerRule]


class ChainResult(NamedTuple):
    """Loss, gradient and (when vectors were given) the curvature-vector products."""

    loss: Tensor
    grad: Params
    products: Params | None


class _Flatten(FixedLinearRule):
    """``torch.flatten(x, start, end)`` called as a function in the traced forward."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__(nn.Identity(), {})
        self.start, self.end = start, end

    def map(self, a: Tensor) -> Tensor:
        return a.flatten(self.start, self.end)


def find_chain(model: nn.Module, params: Mapping[str, Tensor]) -> Chain | None:
    """The chain of ``model`` when the fused path applies to it and to ``params``, else ``None``.

    Checked every call (cheap): no hook anywhere, the traced modules are still the model's, no
    module appears twice, every link is covered by an eligible rule, and every differentiated
    parameter is owned by a layer of the chain.
    """
    if not fast_paths_allowed(model):
        return None
    links = chain_links(model)
    if links is None:
        return None
    modules = [link.module for link in links if link.module is not None]
    if len({id(m) for m in modules}) != len(modules):
        return None
    uses = parameter_uses(model)
    layers: list[LayerRule] = []
    for link in links:
        if link.module is None:
            assert link.flatten is not None
            layers.append(_Flatten(*link.flatten))
            continue
        rule = rule_for(link.module, link.name, dict(params), uses)
        if rule is None or not rule.chain_capable():
            return None
        layers.append(rule)
    owned = {q for layer in layers for q in layer.names.values()}
    if owned != set(params):
        return None
    return Chain(layers)


def run_chain(
    chain: Chain,
    params: Params,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    vectors: Mapping[str, Tensor] | None,
    *,
    hessian: bool = True,
    chunk_size: int | None = None,
) -> ChainResult:
    """Loss, gradient and (when ``vectors`` is given) the ``k`` curvature-vector products.

    Raises:
        NotAChain: a layer meets an input layout its rule does not cover (the caller then
            takes the generic path).
    """
    inputs, targets = batch
    if not isinstance(inputs, Tensor):
        raise NotAChain("a chain takes one tensor of inputs")
    layers = chain.layers
    local = [{k: params[q] for k, q in layer.names.items()} for layer in layers]
    # The input gradient of link i is needed when an earlier link holds a differentiated param.
    need = [any(local[j] for j in range(i)) for i in range(len(layers))]
    first = min(i for i, p in enumerate(local) if p)  # nothing below it is differentiated
    with torch.no_grad():
        acts = [inputs]
        for layer, p in zip(layers, local, strict=True):
            acts.append(layer.forward(acts[-1], p))
        outputs = acts[-1]
        loss, d_out = loss_and_output_grad(loss_fn, outputs, targets)
        deltas: list[Tensor | None] = [None] * len(layers)  # gradient at each link's OUTPUT
        grads: Params = {}
        delta: Tensor | None = d_out
        for i in reversed(range(first, len(layers))):
            deltas[i] = delta
            assert delta is not None
            delta, g = layers[i].backward(delta, acts[i], local[i], need[i])
            grads.update({layers[i].names[k]: v for k, v in g.items()})
        if vectors is None:
            return ChainResult(loss, grads, None)
        space = output_curvature(loss_fn, outputs, targets)
        output_product = space.hessian_product if hessian else space.ggn_product
        k = next(iter(vectors.values())).shape[0]
        step = k if chunk_size is None else max(1, chunk_size)
        parts: list[Params] = []
        for start in range(0, k, step):
            v_all = {q: t[start : start + step] for q, t in vectors.items()}
            v = [{k_: v_all[q] for k_, q in layer.names.items()} for layer in layers]
            tangents: list[Tensor | None] = [None]
            for i, layer in enumerate(layers):
                tangents.append(layer.tangent(acts[i], tangents[-1], local[i], v[i]))
            r_out = tangents[-1]  # (N, k, *out)
            assert r_out is not None  # some layer holds a differentiated parameter
            r_delta: Tensor | None = output_product(r_out)
            products: Params = {}
            for i in reversed(range(first, len(layers))):
                dz = deltas[i]
                assert dz is not None and r_delta is not None
                r_delta, prod = layers[i].tangent_backward(
                    dz, r_delta, acts[i], tangents[i], local[i], v[i], need[i], hessian
                )
                products.update({layers[i].names[k_]: t for k_, t in prod.items()})
            parts.append(products)
    if len(parts) == 1:
        return ChainResult(loss, grads, parts[0])
    return ChainResult(loss, grads, {q: torch.cat([part[q] for part in parts]) for q in parts[0]})
