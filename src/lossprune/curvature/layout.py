"""Which layers a fast path may take: traced structure and a proof of the per-example layout.

Both fast paths assume that dim 0 of a layer's input indexes the examples of the batch and that
row :math:`n` depends on example :math:`n` only. That is false for a Linear applied to
``x.reshape(N * T, E)``, frames folded into the batch of a convolution, or a sequence-first
(``(T, N, E)``) transformer. Nothing is assumed here: the model is traced with
:func:`torch.fx.symbolic_trace` and executed node by node on the batch, and every value gets one
of three states:

* ``CONSTANT``: does not depend on the inputs (parameters, buffers, Python constants);
* ``EXAMPLE``: dim 0 has size ``N`` and row ``n`` depends on example ``n`` only — proven for the
  inputs and kept by the operations listed below when their arguments are ``EXAMPLE`` or
  ``CONSTANT`` and their shapes prove it (a reshape must keep ``N`` in dim 0, a transpose must
  not move dim 0, a reduction or softmax must not run over dim 0, a constant operand must
  broadcast along dim 0, ...);
* ``UNKNOWN``: anything else, absorbing.

A layer's fast path is proven when its input is ``EXAMPLE`` and so is the model's output (then
no operation downstream mixes examples either, since ``UNKNOWN`` is absorbing). Models that do
not trace, or whose graph holds any other operation on input-dependent values, take the generic
path. The proof depends on the graph and the input shapes only and is cached on those.
"""

from __future__ import annotations

import enum
import operator
import weakref
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from .layers import RULES

__all__ = ["ChainLink", "Layout", "chain_links", "proven_layers"]


class Layout(enum.Enum):
    """How a traced value relates to the examples of the batch (module docstring)."""

    CONSTANT = 0
    EXAMPLE = 1
    UNKNOWN = 2


class ChainLink(NamedTuple):
    """One link of a chain-shaped forward: a module call or a flatten from ``start`` to ``end``."""

    module: nn.Module | None
    name: str
    flatten: tuple[int, int] | None


class _Traced(NamedTuple):
    graph_module: torch.fx.GraphModule | None
    links: list[ChainLink] | None


# model -> its trace; rebuilt when a traced module was replaced.
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> {(shape, dtype, device): proven layer names}
_PROOFS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trace(model: nn.Module) -> _Traced:
    cached = _TRACES.get(model)
    if cached is not None and cached.graph_module is not None:
        stale = any(
            node.op == "call_module"
            and cached.graph_module.get_submodule(node.target) is not _find(model, node.target)
            for node in cached.graph_module.graph.nodes
        )
        if not stale:
            return cached
    elif cached is not None:
        return cached
    try:
        gm = _trace_without_side_effects(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "not proven": generic path
        traced = _Traced(None, None)
    else:
        traced = _Traced(gm, _links(model, gm.graph))
    _TRACES[model] = traced
    _PROOFS.pop(model, None)
    return traced


def _trace_without_side_effects(model: nn.Module) -> torch.fx.GraphModule:
    """:func:`torch.fx.symbolic_trace`, with every buffer restored afterwards.

    Tracing runs the Python of ``forward``: an in-place update of a buffer would change the
    user's model, and an assignment would leave a proxy in its place.
    """
    slots = [(m, dict(m._buffers)) for m in model.modules()]
    values = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        return torch.fx.symbolic_trace(model)
    finally:
        for module, buffers in slots:
            module._buffers.clear()
            module._buffers.update(buffers)
        with torch.no_grad():
            for buffer, value in values:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _links(model: nn.Module, graph: torch.fx.Graph) -> list[ChainLink] | None:
    """The links of a chain-shaped forward (one input, each node feeding only the next).

    Only calls of leaf modules (and ``torch.flatten``) are accepted: tracing runs through
    functions, including the forward of a custom :class:`torch.autograd.Function`, whose own
    backward the chain would silently ignore.
    """
    links: list[ChainLink] = []
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None
            previous = node
            continue
        if node.op == "output":
            return links if node.args == (previous,) and links else None
        if previous is None or len(previous.users) != 1 or not node.args:
            return None
        if node.args[0] is not previous:
            return None
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            links.append(ChainLink(model.get_submodule(node.target), str(node.target), None))
        elif node.op == "call_function" and node.target is torch.flatten and not node.kwargs:
            start = node.args[1] if len(node.args) > 1 else 0
            end = node.args[2] if len(node.args) > 2 else -1
            if not isinstance(start, int) or not isinstance(end, int) or start < 1:
                return None
            links.append(ChainLink(None, "", (start, end)))
        else:
            return None
        previous = node
    return None


def chain_links(model: nn.Module) -> list[ChainLink] | None:
    """The links of ``model`` when its traced forward is a chain, else ``None``."""
    return _trace(model).links


def proven_layers(model: nn.Module, inputs: Tensor) -> frozenset[str]:
    """Qualified names of the modules whose input is proven per-example (module docstring).

    Empty when the model does not trace or its output is not proven per-example.
    """
    traced = _trace(model)
    if traced.graph_module is None:
        return frozenset()
    key = (tuple(inputs.shape), inputs.dtype, inputs.device)
    proofs = _PROOFS.setdefault(model, {})
    if key not in proofs:
        gm = traced.graph_module
        prover = _Prover(gm, len(inputs))
        # Buffers are cloned: a forward pass that updates one must not touch the user's model.
        buffers = {f"graph.{k}": b.clone() for k, b in gm.named_buffers()}
        with torch.no_grad():
            try:
                torch.func.functional_call(_Running(gm, prover), buffers, (inputs,))
            except Exception:  # noqa: BLE001 - the model's own call will raise it again
                proofs[key] = frozenset()
                return proofs[key]
        proofs[key] = prover.proven()
    return proofs[key]


class _Running(nn.Module):
    """Runs ``prover`` over ``graph`` as a module, so that its state can be swapped."""

    def __init__(self, graph: torch.fx.GraphModule, prover: _Prover) -> None:
        super().__init__()
        self.graph = graph
        self.prover = [prover]  # a list: not registered as a submodule

    def forward(self, inputs: Tensor) -> Any:
        return self.prover[0].run(inputs)


# Elementwise operations (function, method name): the output row n is a function of the
# arguments' rows n once every argument is EXAMPLE of the same rank or a CONSTANT that
# broadcasts along dim 0.
_ELEMENTWISE = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.tanh,
    torch.relu,
    torch.sigmoid,
    torch.exp,
    torch.sqrt,
    torch.square,
    nn.functional.relu,
    nn.functional.gelu,
    nn.functional.silu,
    nn.functional.tanh,
    nn.functional.sigmoid,
    nn.functional.leaky_relu,
    nn.functional.elu,
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "tanh",
    "relu",
    "sigmoid",
    "exp",
    "sqrt",
    "square",
    "contiguous",
    "float",
    "double",
    "to",
    "clone",
}
_RESHAPES = {torch.flatten, torch.reshape, "view", "reshape", "flatten", "view_as", "reshape_as"}
_TRANSPOSES = {torch.transpose, "transpose", torch.permute, "permute"}
_OVER_DIMS = {
    torch.sum,
    torch.mean,
    torch.softmax,
    torch.log_softmax,
    nn.functional.softmax,
    nn.functional.log_softmax,
    "sum",
    "mean",
    "softmax",
    "log_softmax",
}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_POOLS = {
    nn.functional.avg_pool1d: 1,
    nn.functional.avg_pool2d: 2,
    nn.functional.max_pool1d: 1,
    nn.functional.max_pool2d: 2,
    nn.functional.adaptive_avg_pool1d: 1,
    nn.functional.adaptive_avg_pool2d: 2,
}
# Parameter-free or per-example modules besides the rules of layers.RULES.
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PER_EXAMPLE_MODULES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Embedding,
    *_NORMS,
)


class _Prover(torch.fx.Interpreter):
    def __init__(self, graph_module: torch.fx.GraphModule, examples: int) -> None:
        super().__init__(graph_module)
        self.examples = examples
        self.states: dict[torch.fx.Node, Layout] = {}
        self.layer_inputs: dict[str, Layout] = {}
        self.output_state = Layout.UNKNOWN
        self.first_placeholder = True

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        self.states[n] = self._state(n, value)
        return value

    def proven(self) -> frozenset[str]:
        if self.output_state is not Layout.EXAMPLE:
            return frozenset()
        return frozenset(k for k, s in self.layer_inputs.items() if s is Layout.EXAMPLE)

    # -- helpers -------------------------------------------------------------------------------

    def _arg_states(self, node: torch.fx.Node) -> list[tuple[Layout, Any]]:
        """``(state, value)`` of every tensor argument (nested in lists) of ``node``."""
        found: list[tuple[Layout, Any]] = []

        def visit(a: Any) -> None:
            if isinstance(a, torch.fx.Node):
                found.append((self.states.get(a, Layout.UNKNOWN), self.env.get(a)))
            elif isinstance(a, (list, tuple)):
                for item in a:
                    visit(item)
            elif isinstance(a, dict):
                for item in a.values():
                    visit(item)

        visit(node.args)
        visit(node.kwargs)
        return found

    def _batched(self, value: Any) -> bool:
        return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == self.examples

    def _state(self, node: torch.fx.Node, value: Any) -> Layout:
        if node.op == "placeholder":
            first, self.first_placeholder = self.first_placeholder, False
            return Layout.EXAMPLE if first and self._batched(value) else Layout.CONSTANT
        if node.op == "get_attr":
            return Layout.CONSTANT
        if node.op == "output":
            self.output_state = self._arg_states(node)[0][0] if node.args else Layout.UNKNOWN
            if len(self._arg_states(node)) != 1:
                self.output_state = Layout.UNKNOWN
            return self.output_state
        if _is_shape_query(node):
            return Layout.CONSTANT  # sizes are the same for every example: no example values
        args = self._arg_states(node)
        states = {s for s, _ in args}
        if Layout.UNKNOWN in states:
            return Layout.UNKNOWN
        if Layout.EXAMPLE not in states:
            return Layout.CONSTANT
        if not self._batched(value):
            return Layout.UNKNOWN
        if node.op == "call_module":
            ok = self._module_keeps_examples(node, args, value)
        else:
            ok = self._function_keeps_examples(node, args, value)
        return Layout.EXAMPLE if ok else Layout.UNKNOWN

    def _module_keeps_examples(
        self, node: torch.fx.Node, args: list[tuple[Layout, Any]], value: Tensor
    ) -> bool:
        module = self.module.get_submodule(str(node.target))
        if len(node.args) != 1 or node.kwargs or len(args) != 1:
            return False
        a = args[0][1]
        kind = type(module)
        if kind in RULES:
            batched = _batched_layer_input(module, a)
            if RULES[kind].parametric:
                self.layer_inputs[str(node.target)] = Layout.EXAMPLE if batched else Layout.UNKNOWN
            return batched
        if kind in _NORMS:
            assert isinstance(module, nn.modules.batchnorm._BatchNorm)
            return not module.training and module.track_running_stats and a.dim() >= 2
        if isinstance(module, nn.LayerNorm):
            return a.dim() > len(module.normalized_shape)
        if isinstance(module, nn.GroupNorm):
            return a.dim() >= 2
        return kind in _PER_EXAMPLE_MODULES

    def _function_keeps_examples(
        self, node: torch.fx.Node, args: list[tuple[Layout, Any]], value: Tensor
    ) -> bool:
        target = node.target
        if not args:
            return False
        first: tuple[Layout, Any] = args[0]
        if target in _ELEMENTWISE:
            return all(_broadcasts(state, a, value) for state, a in args)
        # One EXAMPLE tensor, every other argument a size or option (no tensor).
        unary = first[0] is Layout.EXAMPLE and not any(isinstance(a, Tensor) for _, a in args[1:])
        if target in _RESHAPES:
            return unary and self._batched(first[1])
        if target in _TRANSPOSES:
            return unary and _keeps_dim0(node, first[1])
        if target in _OVER_DIMS:
            return unary and _dims_avoid_0(node, first[1])
        if target in _MATMULS and len(args) == 2:
            (sa, a), (sb, b) = args
            if sa is Layout.EXAMPLE and sb is Layout.EXAMPLE:
                return a.dim() >= 3 and b.dim() == a.dim()
            return sa is Layout.EXAMPLE and sb is Layout.CONSTANT and a.dim() >= 2 and b.dim() <= 2
        if target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            same = all(s is Layout.EXAMPLE for s, _ in args)
            return same and isinstance(dim, int) and dim % value.dim() != 0
        if target in _POOLS:
            return unary and first[1].dim() == _POOLS[target] + 2
        if target is operator.getitem:
            return unary and _getitem_keeps_dim0(node)
        return False


def _is_shape_query(node: torch.fx.Node) -> bool:
    """``x.size(...)``, ``x.dim()``, ``x.shape``: metadata, not values of the examples."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in ("shape", "ndim")
    )


def _batched_layer_input(module: nn.Module, a: Any) -> bool:
    """The rule's module sees a batched input (an unbatched one would treat dim 0 otherwise)."""
    if not isinstance(a, Tensor):
        return False
    if isinstance(module, nn.Linear):
        return a.dim() >= 2
    spatial = getattr(module, "kernel_size", None)
    if isinstance(module, nn.Conv1d | nn.MaxPool1d | nn.AvgPool1d | nn.AdaptiveAvgPool1d):
        return a.dim() == 3
    if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d):
        return a.dim() == 4
    return spatial is None


def _broadcasts(state: Layout, a: Any, out: Tensor) -> bool:
    if not isinstance(a, Tensor):
        return True
    if state is Layout.EXAMPLE:
        return a.dim() == out.dim() and a.shape[0] == out.shape[0]
    return a.dim() < out.dim() or a.shape[0] == 1


def _normalise(dim: Any, rank: int) -> int | None:
    return dim % rank if isinstance(dim, int) and rank > 0 else None


def _keeps_dim0(node: torch.fx.Node, a: Tensor) -> bool:
    dims = [d for d in node.args[1:] if not isinstance(d, torch.fx.Node)]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if node.target in ("permute", torch.permute):
        return bool(dims) and _normalise(dims[0], a.dim()) == 0
    return len(dims) == 2 and all(_normalise(d, a.dim()) not in (0, None) for d in dims)


def _dims_avoid_0(node: torch.fx.Node, a: Tensor) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return all(_normalise(d, a.dim()) not in (0, None) for d in dims)


def _getitem_keeps_dim0(node: torch.fx.Node) -> bool:
    index = node.args[1] if len(node.args) > 1 else None
    if not isinstance(index, tuple) or not index:
        return False
    if any(isinstance(i, (torch.fx.Node, Tensor, list)) for i in index):
        return False
    return index[0] == slice(None)
