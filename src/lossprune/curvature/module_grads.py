r"""Squared per-example gradients of ANY module's own parameters, from its recorded call.

The layers of :mod:`.layers` have closed forms; every other module that owns a differentiated
parameter (a norm, an embedding table, a head tied to the embedding, a router, fused experts)
gets its per-example gradients the generic way, from what one batched pass recorded of its
call: its positional tensor inputs :math:`a` and the back-propagated cotangents :math:`\delta`
``(R, rows, ...)`` of its differentiable outputs. The rows of each tensor are the examples, or
``k`` consecutive rows per example when the model flattened its tokens first (a mixture of
experts routes ``(N·T, D)`` tokens; a router may take ``(N, T, D)`` and return ``(N·T, E)``).
For example :math:`n` and column :math:`r`,

.. math:: g_{nr} = \Big(\frac{\partial m(p, a_n)}{\partial p}\Big)^{\!\top} \delta_{rn},

the pull-back through the module's own forward pass :math:`m` run on example :math:`n`'s rows
alone (``vmap`` over examples of a ``vjp`` of :func:`torch.func.functional_call`, or a loop over
examples for a module ``vmap`` cannot run, such as experts that pick their tokens with
``nonzero``); a parameter held by several modules (tied) sums its holders' :math:`g_{nr}`
before squaring. That is the per-example gradient of the whole model only when the parameter
reaches the loss through those calls and nothing else; :func:`reaches_only_through` checks it on
the autograd graph: every graph edge to the parameter must come from a node created during one
of its holders' calls and reachable from that call's outputs (node creation order,
``Node._sequence_nr``, marks what a call created).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .per_example import fit_at_once

__all__ = [
    "CallInputs",
    "ModuleCall",
    "consumers",
    "holders_of",
    "leaf_edges",
    "reaches_only_through",
    "sequence_now",
    "squared_module_grads",
]

Params = dict[str, Tensor]


#: Inputs of a call that are not tensors and may be passed to every example as they are.
_CONSTANT_TYPES = (bool, int, float, str, type(None))


class _Slot(NamedTuple):
    """Where tensor number ``number`` of a call's inputs goes."""

    number: int


class CallInputs(NamedTuple):
    """A call's inputs split into its tensors and the rest.

    ``tensors``: every tensor input, positional ones first, then keyword ones in call order;
    ``constants``: the rest, with each tensor's place marked (comparable between two calls);
    :meth:`build` puts other tensors in their places: ``(args, kwargs)``.
    """

    tensors: tuple[Tensor, ...]
    constants: tuple

    @classmethod
    def of(cls, args: tuple, kwargs: Mapping[str, Any]) -> CallInputs | None:
        """The split of ``args``/``kwargs``.

        ``None`` when an input is neither a tensor nor a plain constant (a cache object, a
        tuple of tensors).
        """
        values = (*args, *kwargs.values())
        if not all(isinstance(v, (Tensor, *_CONSTANT_TYPES)) for v in values):
            return None
        tensors: list[Tensor] = []

        def place(value: Any) -> Any:
            if isinstance(value, Tensor):
                tensors.append(value)
                return _Slot(len(tensors) - 1)
            return value

        positional = tuple(place(a) for a in args)
        keyword = tuple((k, place(v)) for k, v in kwargs.items())
        return cls(tuple(tensors), (positional, keyword))

    def build(self, tensors: tuple[Tensor, ...]) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of the call with ``tensors`` in the places of its own."""
        positional, keyword = self.constants

        def put(value: Any) -> Any:
            return tensors[value.number] if isinstance(value, _Slot) else value

        return tuple(put(a) for a in positional), {k: put(v) for k, v in keyword}


class ModuleCall(NamedTuple):
    """One recorded call of a module.

    The module, its differentiated parameters (local -> qualified name), its tensor inputs
    (positional, then keyword: :class:`CallInputs`), its differentiable outputs and their
    positions in what it returned (``None``: it returned one tensor), the autograd sequence
    numbers read before and after it, and the number of examples: each tensor's
    ``len // examples`` consecutive rows are one example's.
    """

    module: nn.Module
    names: dict[str, str]
    args: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    picks: tuple[int, ...] | None
    start: int
    end: int
    examples: int
    inputs: CallInputs | None = None  # how to call the module with ``args``: None, positionally


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

    ``root``: one node or a list of them (each node is walked once); ``inside``: which nodes
    the walk may pass through (default: all); a ``None`` root has none.
    """
    edges: dict[int, int] = {}
    roots = [n for n in (root if isinstance(root, list) else [root]) if n is not None]
    stack, seen = list(roots), set(roots)
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


def consumers(root: Any, targets: set[tuple[Any, int]]) -> dict[tuple[Any, int], list[Any]]:
    """The graph nodes that take each of ``targets`` as an input, from node ``root`` back.

    A target is a node and the index of one of its outputs (a tensor's ``grad_fn`` and
    ``output_nr``). One entry per edge (a node using a target twice is listed twice); a target
    never reached has none.
    """
    found: dict[tuple[Any, int], list[Any]] = {}
    if root is None:
        return found
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for child, index in node.next_functions:
            if child is None:
                continue
            if (child, index) in targets:
                found.setdefault((child, index), []).append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def reaches_only_through(leaf: Tensor, calls: Iterable[ModuleCall], total_edges: int) -> bool:
    """Whether every one of the ``total_edges`` graph edges to ``leaf`` lies inside ``calls``.

    Counted from each call's outputs backwards through the nodes that call created (its
    sequence-number window): an edge inside a call that does not lead to its outputs, or any
    edge outside the calls, makes the counts differ.
    """
    inside = 0
    for call in calls:
        roots = [z.grad_fn for z in call.outputs]
        if any(root is None for root in roots):
            return False

        def created_by_call(node: Any, call: ModuleCall = call) -> bool:
            return call.start < node._sequence_nr() < call.end

        inside += leaf_edges(roots, created_by_call).get(id(leaf), 0)
    return inside == total_edges


def squared_module_grads(
    calls: list[ModuleCall], deltas: list[tuple[Tensor, ...]], elements: int | None = None
) -> Params:
    r""":math:`\sum_n \sum_r (\sum_{\text{holders}} g_{nr})^2` for every parameter of ``calls``.

    Args:
        calls: the recorded calls (every holder of each parameter among them).
        deltas: per call, the cotangents ``(R, rows, ...)`` of each of its ``outputs``.
        elements: the most per-example gradients that exist at once, in numbers (``None``:
            ``2**24``): examples are taken that many at a time.
    """
    examples = calls[0].examples
    columns = deltas[0][0].shape[0]
    sizes = {call.names[local]: p.numel() for call in calls for local, p in _own(call).items()}
    per_example = columns * sum(sizes.values())  # a tied parameter counted once
    step = fit_at_once(per_example, elements)
    totals: Params = {}
    for start in range(0, examples, step):
        stop = min(examples, start + step)
        summed: Params = {}
        for call, delta in zip(calls, deltas, strict=True):
            # No graph to the module's other parameters (a bias left out of ``params`` still
            # requires grad): the pull-backs are numbers, not functions of them.
            with torch.no_grad():
                grads = _per_example(call, start, stop, delta)
            for local, g in grads.items():
                q = call.names[local]
                summed[q] = g if q not in summed else summed[q] + g
        for q, g in summed.items():
            total = totals.setdefault(q, g.new_zeros(g.shape[2:]))
            for row in g.flatten(0, 1):  # no squared copy of all the per-example gradients
                total.addcmul_(row, row)
    return totals


def _own(call: ModuleCall) -> Params:
    """The call's differentiated parameters of its module, by local name."""
    own = dict(call.module.named_parameters(recurse=False))
    return {local: own[local].detach() for local in call.names}


def _per_example(call: ModuleCall, start: int, stop: int, deltas: tuple[Tensor, ...]) -> Params:
    """``{local name: (n, R, *param.shape)}``: examples ``start:stop``, each column pulled back.

    Batched over examples and columns by ``vmap`` where the module allows it; example by
    example (and column by column) where it does not: the same numbers.
    """
    params = _own(call)
    n = stop - start

    def rows(t: Tensor, dim: int) -> Tensor:  # (..., N·k, ...) -> (..., n, k, ...)
        k = t.shape[dim] // call.examples
        return t.narrow(dim, start * k, n * k).unflatten(dim, (n, k))

    args = tuple(rows(a, 0) for a in call.args)
    columns = tuple(rows(d, 1).transpose(0, 1) for d in deltas)  # (n, R, k, ...)

    def one_example(example_args: tuple[Tensor, ...], example_columns: tuple[Tensor, ...]):
        def outputs(p: Params) -> tuple[Tensor, ...]:
            if call.inputs is None:
                out = functional_call(call.module, p, example_args)
            else:
                out = functional_call(call.module, p, *call.inputs.build(example_args))
            return (out,) if call.picks is None else tuple(out[i] for i in call.picks)

        pull_back = vjp(outputs, params)[1]
        return _mapped(lambda c: pull_back(c)[0], example_columns)

    return _mapped(one_example, args, columns)


def _mapped(fn: Callable[..., Params], *inputs: tuple[Tensor, ...]) -> Params:
    """``fn`` over dim 0 of every tensor of ``inputs``, stacked: by ``vmap``, else a loop.

    The loop is for a module ``vmap`` cannot run (its forward pass reads a tensor's value:
    fused experts select their tokens with ``nonzero``).
    """
    try:
        with warnings.catch_warnings():
            # An operator without a batching rule (``_grouped_mm``, the default experts kernel
            # of transformers 5) runs example by example inside vmap: the same numbers.
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            return vmap(fn)(*inputs)
    except RuntimeError:
        count = len(inputs[0][0])
        each = [fn(*(tuple(t[i] for t in group) for group in inputs)) for i in range(count)]
        return {name: torch.stack([e[name] for e in each]) for name in each[0]}
