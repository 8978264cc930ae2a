r"""Squared per-example gradients of ANY module's own parameters, from its recorded call.

The layers of :mod:`.layers` have closed forms; every other module that owns a differentiated
parameter (a norm, an embedding table, a head tied to the embedding) gets its per-example
gradients the generic way, from what one batched pass recorded of its call: its input
:math:`a` ``(N, ...)`` and the back-propagated output cotangents :math:`\delta` ``(R, N, ...)``.
For example :math:`n` and column :math:`r`,

.. math:: g_{nr} = \Big(\frac{\partial m(p, a_n)}{\partial p}\Big)^{\!\top} \delta_{rn},

the pull-back through the module's own forward pass :math:`m` run on example :math:`n` alone
(``vmap`` over examples of a ``vjp`` of :func:`torch.func.functional_call`); a parameter held by
several modules (tied) sums its holders' :math:`g_{nr}` before squaring. That is the per-example
gradient of the whole model only when the parameter reaches the loss through those calls and
nothing else; :func:`reaches_only_through` checks it on the autograd graph: every graph edge to
the parameter must come from a node created during one of its holders' calls and reachable from
that call's output (node creation order, ``Node._sequence_nr``, marks what a call created).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .per_example import fit_at_once

__all__ = [
    "ModuleCall",
    "consumers",
    "holders_of",
    "leaf_edges",
    "reaches_only_through",
    "sequence_now",
    "squared_module_grads",
]

Params = dict[str, Tensor]


class ModuleCall(NamedTuple):
    """One recorded call of a module.

    The module, its differentiated parameters (local -> qualified name), its input and output,
    and the autograd sequence numbers read before and after it.
    """

    module: nn.Module
    names: dict[str, str]
    a: Tensor
    z: Tensor
    start: int
    end: int


def sequence_now() -> int:
    """This thread's autograd sequence counter, read from a throwaway node.

    Nodes are numbered in creation order (per thread), so a module call created exactly the
    nodes numbered between the readings before and after it.
    """
    with torch.enable_grad():
        node = torch.empty(0, requires_grad=True).sum().grad_fn
    assert node is not None
    return node._sequence_nr()


def holders_of(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, dict[str, str]]:
    """Every module owning a parameter in ``params``: name -> {local name: qualified name}.

    A tied parameter is listed under every module that holds it, with its first name.
    """
    qualified = {id(p): q for q, p in model.named_parameters() if q in params}
    found: dict[str, dict[str, str]] = {}
    for name, module in model.named_modules():
        own = {
            local: qualified[id(p)]
            for local, p in module.named_parameters(recurse=False)
            if id(p) in qualified
        }
        if own:
            found[name] = own
    return found


def leaf_edges(root: Any, inside: Callable[[Any], bool] | None = None) -> dict[int, int]:
    """How many graph edges point at each leaf tensor (by ``id``), from node ``root`` back.

    ``inside``: which nodes the walk may pass through (default: all); a ``None`` root has none.
    """
    edges: dict[int, int] = {}
    if root is None:
        return edges
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                edges[id(variable)] = edges.get(id(variable), 0) + 1
            elif child not in seen and (inside is None or inside(child)):
                seen.add(child)
                stack.append(child)
    return edges


def consumers(root: Any, targets: set[Any]) -> dict[Any, list[Any]]:
    """The graph nodes that take each of ``targets`` as an input, from node ``root`` back.

    One entry per edge (a node using a target twice is listed twice); a target never reached
    has none.
    """
    found: dict[Any, list[Any]] = {}
    if root is None:
        return found
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child in targets:
                found.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def reaches_only_through(leaf: Tensor, calls: Iterable[ModuleCall], total_edges: int) -> bool:
    """Whether every one of the ``total_edges`` graph edges to ``leaf`` lies inside ``calls``.

    Counted from each call's output backwards through the nodes that call created (its
    sequence-number window): an edge inside a call that does not lead to its output, or any
    edge outside the calls, makes the counts differ.
    """
    inside = 0
    for call in calls:
        if call.z.grad_fn is None:
            return False

        def created_by_call(node: Any, call: ModuleCall = call) -> bool:
            return call.start < node._sequence_nr() < call.end

        inside += leaf_edges(call.z.grad_fn, created_by_call).get(id(leaf), 0)
    return inside == total_edges


def squared_module_grads(
    calls: list[ModuleCall], deltas: list[Tensor], elements: int | None = None
) -> Params:
    r""":math:`\sum_n \sum_r (\sum_{\text{holders}} g_{nr})^2` for every parameter of ``calls``.

    Args:
        calls: the recorded calls (every holder of each parameter among them).
        deltas: per call, the output cotangents ``(R, N, *z.shape[1:])``.
        elements: the most per-example gradients that exist at once, in numbers (``None``:
            ``2**24``): examples are taken that many at a time.

    Raises:
        RuntimeError: a module's forward pass cannot run under ``vmap`` (the caller leaves its
            parameters to the one-example-at-a-time path).
    """
    examples = len(calls[0].a)
    columns = deltas[0].shape[0]
    sizes = {call.names[local]: p.numel() for call in calls for local, p in _own(call).items()}
    per_example = columns * sum(sizes.values())  # a tied parameter counted once
    step = fit_at_once(per_example, elements)
    totals: Params = {}
    for start in range(0, examples, step):
        stop = min(examples, start + step)
        summed: Params = {}
        for call, delta in zip(calls, deltas, strict=True):
            grads = _per_example(call, call.a[start:stop], delta[:, start:stop])
            for local, g in grads.items():
                q = call.names[local]
                summed[q] = g if q not in summed else summed[q] + g
        for q, g in summed.items():
            square = (g * g).sum((0, 1))
            totals[q] = square if q not in totals else totals[q] + square
    return totals


def _own(call: ModuleCall) -> Params:
    """The call's differentiated parameters of its module, by local name."""
    own = dict(call.module.named_parameters(recurse=False))
    return {local: own[local].detach() for local in call.names}


def _per_example(call: ModuleCall, a: Tensor, delta: Tensor) -> Params:
    """``{local name: (n, R, *param.shape)}``: each example's pull-back of each column."""
    params = _own(call)

    def one_example(x: Tensor, columns: Tensor) -> Params:
        def output(p: Params) -> Tensor:
            return functional_call(call.module, p, (x.unsqueeze(0),))

        pull_back = vjp(output, params)[1]
        return vmap(lambda c: pull_back(c.unsqueeze(0))[0])(columns)

    return vmap(one_example)(a, delta.transpose(0, 1))
