r"""Exact Gauss-Newton diagonals of rule-covered layers without per-example gradients.

For a layer :math:`z = W a + b` inside the model, the pull-back of an output cotangent
:math:`c` to the weight of example :math:`n` is :math:`\delta_n a_n^\top` (summed over positions
for a convolution or a Linear applied to a sequence), with :math:`\delta = \partial
(c^\top f)/\partial z`. The GGN diagonal of Dangel et al. (2020, "BackPACK: packing more into
backprop", ICLR, DiagGGN) is therefore :math:`\sum_n \sum_r (\delta_{nr} a_n^\top)^{\odot 2}`,
the squared contraction of the layer's rule (:mod:`.layers`). All ``R`` output cotangent
columns are back-propagated as ONE batched backward pass (``is_grads_batched``) from the layer
outputs captured by forward hooks; the weight gradients of that pass are never formed.

A layer is covered only when the result is provably the per-example definition: its rule is
eligible (:func:`~.layers.rule_for`), no hook is registered anywhere in the model, the layer's
input and the model's output are proven per-example (:func:`~.layout.proven_layers`), it is
called exactly once, its parameters are used by no other operation of the graph (counted on the
autograd graph), and its input and output are not modified in place afterwards. Every other
parameter is left to the caller's generic per-example path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._common.functional import FunctionalModel
from .layers import LayerRule, fast_paths_allowed, parameter_uses, rule_for
from .layout import proven_layers

__all__ = ["LayerDiagonal", "layer_ggn_diag"]

Params = dict[str, Tensor]

# Bound on the back-propagated layer-output gradients that exist at once (columns x entries).
_COLUMN_ELEMENTS = 1 << 26


class LayerDiagonal(NamedTuple):
    """The detached model outputs and the squared sums of the covered parameters only."""

    outputs: Any
    sums: Params


def _candidates(model: nn.Module, params: Mapping[str, Tensor], inputs: Any):
    """Eligible parametric rules whose module owns a differentiated parameter, by module name.

    Only a model called on one tensor of inputs has a layout proof (:mod:`.layout`); keyword
    inputs (a Hugging Face model) take the generic path.
    """
    if not isinstance(inputs, Tensor) or not fast_paths_allowed(model):
        return {}
    uses = parameter_uses(model)
    proven = None
    found: dict[str, LayerRule] = {}
    for name, module in model.named_modules():
        rule = rule_for(module, name, dict(params), uses)
        if rule is None or not rule.parametric or not rule.names:
            continue
        if proven is None:
            proven = proven_layers(model, inputs)
        if name in proven:
            found[name] = rule
    return found


def covered_parameters(model: nn.Module, params: Mapping[str, Tensor], inputs: Any) -> set[str]:
    """The parameters whose layer has an eligible rule (the most :func:`layer_ggn_diag` covers)."""
    rules = _candidates(model, params, inputs)
    return {q for rule in rules.values() for q in rule.names.values()}


def _leaf_uses(root: Tensor) -> dict[int, int]:
    """How many graph edges point at each leaf tensor (by ``id``), from ``root`` backwards."""
    uses: dict[int, int] = {}
    if root.grad_fn is None:
        return uses
    stack, seen = [root.grad_fn], {root.grad_fn}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return uses


def layer_ggn_diag(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    cotangents_of: Callable[[Tensor], Tensor],
    elements: int | None = None,
) -> LayerDiagonal:
    r""":math:`\sum_n\sum_r (J_n^\top c_{nr})^2` for every parameter of a covered layer.

    Args:
        model: the module (hooks are attached during the call and removed).
        params: all differentiated tensors by qualified name.
        inputs: one batch of inputs.
        cotangents_of: maps the detached outputs ``(N, *out)`` to cotangents ``(N, O, R)``.
        elements: the most back-propagated layer-output gradients and per-example weight
            gradients that exist at once, in numbers (``None``: ``2**26`` and ``2**24``); the
            statistics' ``chunk_size`` times the number of parameters.
    """
    rules = _candidates(model, params, inputs)
    records: dict[str, list[tuple[Tensor, Tensor, int, int]]] = {name: [] for name in rules}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            a = args[0]
            records[name].append((a, output, a._version, output._version))

        return hook

    handles = [rule.module.register_forward_hook(recorder(n)) for n, rule in rules.items()]
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    try:
        with torch.enable_grad():
            outputs = FunctionalModel(model, params)(leaves, inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(outputs, Tensor):
        return LayerDiagonal(outputs, {})
    uses = _leaf_uses(outputs)
    covered: list[tuple[LayerRule, Tensor, Tensor]] = []
    for name, rule in rules.items():
        if len(records[name]) != 1:
            continue
        a, z, a_version, z_version = records[name][0]
        if a._version != a_version or z._version != z_version or not z.requires_grad:
            continue
        if any(uses.get(id(leaves[q]), 0) != 1 for q in rule.names.values()):
            continue
        covered.append((rule, a.detach(), z))
    detached = outputs.detach()
    if not covered:
        return LayerDiagonal(detached, {})
    cotangents = cotangents_of(detached)  # (N, O, R)
    deltas = _batched_output_grads(
        outputs, [z for _, _, z in covered], cotangents, elements or _COLUMN_ELEMENTS
    )
    sums: Params = {}
    for (rule, a, _), delta in zip(covered, deltas, strict=True):
        local = rule.squared_contraction(a, delta.detach(), list(rule.names), elements)
        sums.update({rule.names[k]: v for k, v in local.items()})
    return LayerDiagonal(detached, sums)


def _batched_output_grads(
    outputs: Tensor, zs: list[Tensor], cotangents: Tensor, elements: int
) -> list[Tensor]:
    r""":math:`\partial (c_r^\top f)/\partial z` for every column ``r``: ``(R, *z.shape)``.

    Columns go through the graph as one vmapped backward, in chunks bounding ``R' x |z|`` by
    ``elements``.
    """
    columns = cotangents.shape[2]
    grad_outputs = cotangents.permute(2, 0, 1).reshape(columns, *outputs.shape)
    activations = sum(z.numel() for z in zs)
    step = max(1, min(columns, elements // max(1, activations)))
    deltas = [z.new_empty(columns, *z.shape) for z in zs] if step < columns else None
    for start in range(0, columns, step):
        chunk = grad_outputs[start : start + step]
        last = start + step >= columns
        try:
            grads = torch.autograd.grad(
                outputs, zs, chunk, retain_graph=not last, is_grads_batched=True, allow_unused=True
            )
        except RuntimeError:
            # An op without a batching rule for its backward: one column at a time (same sums).
            grads = _column_by_column(outputs, zs, chunk, retain_last=not last)
        full = [
            g if g is not None else z.new_zeros(len(chunk), *z.shape)
            for g, z in zip(grads, zs, strict=True)
        ]
        if deltas is None:
            return full
        for delta, g in zip(deltas, full, strict=True):
            delta[start : start + len(chunk)] = g
    assert deltas is not None
    return deltas


def _column_by_column(outputs: Tensor, zs: list[Tensor], chunk: Tensor, retain_last: bool):
    per_column = []
    for j in range(len(chunk)):
        keep = retain_last or j < len(chunk) - 1
        grads = torch.autograd.grad(outputs, zs, chunk[j], retain_graph=keep, allow_unused=True)
        per_column.append(
            [g if g is not None else torch.zeros_like(z) for g, z in zip(grads, zs, strict=True)]
        )
    return [torch.stack([c[i] for c in per_column]) for i in range(len(zs))]
