r"""Channels and everything coupled to them, found by tracing the model with :mod:`torch.fx`.

Removing output channel :math:`c` of a convolution also removes entry :math:`c` of the batch
norm after it, input channel :math:`c` of every convolution or linear map that reads it, and
channel :math:`c` of every tensor ADDED to it (a residual stream is one set of channels across
all the blocks that add into it); a concatenation shifts channels by the sizes before them and a
flatten spreads channel :math:`c` over ``H·W`` consecutive features. None of this is a property
of module classes: it is the data flow, so this module traces it.

:func:`trace_channels` traces the model symbolically (:func:`torch.fx.symbolic_trace`),
propagates shapes with the example inputs (:class:`torch.fx.passes.shape_prop.ShapeProp`), and
follows each tensor's *channel layout*: the axis that holds channels and the sequence of channel
*spaces* along it (a concatenation has several; ``inner`` features per channel after a flatten).
A convolution or linear map starts a new space (its output units); channel-wise operations
(batch norm, activations, pooling, dropout, depthwise convolutions) keep the layout; elementwise
additions and products UNIFY the spaces of their operands (union-find). Every other use of a
tracked tensor — an operation this module has no rule for, a norm across channels, the model's
output, a tensor whose channels cannot be removed (the input) added to it — BLOCKS the spaces it
touches, and the reason is reported: a rule missing means a space is left alone, never cut wrong.

Each unblocked space becomes a :class:`~.groups.GroupSet` of kind ``"channels"``, named after its
first producer: the rows of its producers and depthwise convolutions, the entries of its batch
norms and PReLUs, and the input columns of its consumers.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .groups import Consumer, GroupSet, Slice

__all__ = ["ChannelTrace", "trace_channels"]


class Segment(NamedTuple):
    """A run of channels along a tensor's channel axis: ``space`` (None: untracked) × ``inner``."""

    space: int | None
    channels: int
    inner: int


class Layout(NamedTuple):
    """Where a tensor's channels lie: ``axis`` (non-negative) and the segments along it."""

    axis: int
    segments: tuple[Segment, ...]


class Member(NamedTuple):
    """Entries of one tensor that channel ``c`` of a space owns.

    Positions ``offset + c·inner + [0, inner)`` along ``axis``; ``kernel`` > 1 for a
    convolution's input (each input channel is ``kernel`` flattened columns).
    """

    tensor: str
    axis: int
    offset: int
    inner: int
    consumer: str | None = None
    kernel: int = 1


@dataclass
class _Space:
    channels: int
    producers: list[str] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


class ChannelTrace(NamedTuple):
    """What :func:`trace_channels` found.

    Attributes:
        groups: one ``"channels"`` group set per removable space, in the order of the graph.
        blocked: space name (its first producer) to why its channels stay.
    """

    groups: list[GroupSet]
    blocked: dict[str, str]


_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample,
)  # fmt: skip
_CHANNELWISE_FUNCTIONS: set[Callable[..., Any] | str] = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, operator.neg, torch.neg,
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "neg", "detach",
}  # fmt: skip
_SPATIAL_FUNCTIONS: set[Callable[..., Any] | str] = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
}  # fmt: skip
# Division is not among them: a removed channel is zero in the masked dense model, and 0 / 0
# there would not be the removed model's nothing.
_BINARY: set[Callable[..., Any] | str] = {
    operator.add, operator.sub, operator.mul, operator.iadd, operator.imul, torch.add,
    torch.sub, torch.mul, "add", "add_", "sub", "mul", "mul_",
}  # fmt: skip
_CONCAT: set[Callable[..., Any] | str] = {torch.cat, torch.concat}
_FLATTEN: set[Callable[..., Any] | str] = {torch.flatten, "flatten"}
_RESHAPE: set[Callable[..., Any] | str] = {"view", "reshape", torch.reshape}
_REDUCE: set[Callable[..., Any] | str] = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}


class _Tracer:
    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.module = graph_module
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.layouts: dict[fx.Node, Layout] = {}
        self.outputs: dict[str, int] = {}  # module name -> the space its outputs start
        self.inputs: dict[str, Layout] = {}  # module name -> the layout it read first
        self.names: dict[int, str] = {}
        self.rows: set[str] = set()  # modules whose output rows are members already

    # ---- union-find over spaces ----
    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def new_space(self, channels: int, name: str) -> int:
        self.spaces.append(_Space(channels))
        self.parent.append(len(self.parent))
        self.names[len(self.spaces) - 1] = name
        return len(self.spaces) - 1

    def unify(self, a: int, b: int, why: str) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        first, second = min(a, b), max(a, b)
        self.parent[second] = first
        kept, merged = self.spaces[first], self.spaces[second]
        if kept.channels != merged.channels:
            kept.blocked.append(f"{why} couples {kept.channels} with {merged.channels} channels")
        kept.producers += merged.producers
        kept.members += merged.members
        kept.blocked += merged.blocked

    def block(self, layout: Layout | None, why: str) -> None:
        if layout is None:
            return
        for segment in layout.segments:
            if segment.space is not None:
                self.spaces[self.find(segment.space)].blocked.append(why)

    def unify_layouts(self, layouts: Sequence[Layout], why: str) -> Layout | None:
        """One layout for tensors combined elementwise; ``None`` (and blocked) if they differ."""
        first = layouts[0]
        shapes = [(s.channels, s.inner) for s in first.segments]
        if any([(s.channels, s.inner) for s in lay.segments] != shapes for lay in layouts[1:]):
            for layout in layouts:
                self.block(layout, f"{why} of tensors whose channels are laid out differently")
            return None
        for layout in layouts[1:]:
            for mine, theirs in zip(first.segments, layout.segments, strict=True):
                if (mine.space is None) != (theirs.space is None):
                    self.block(first, f"{why} with channels that cannot be removed")
                    self.block(layout, f"{why} with channels that cannot be removed")
                elif mine.space is not None and theirs.space is not None:
                    self.unify(mine.space, theirs.space, why)
        return first

    def add_members(self, layout: Layout, tensor: str, axis: int, **extra: Any) -> None:
        offset = 0
        for segment in layout.segments:
            if segment.space is not None:
                member = Member(tensor, axis, offset, segment.inner, **extra)
                self.spaces[self.find(segment.space)].members.append(member)
            offset += segment.channels * segment.inner

    # ---- the graph ----
    def shape(self, node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def layout(self, node: Any) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, fx.Node) else None

    def run(self) -> None:
        for node in self.module.graph.nodes:
            inputs = [a for a in node.all_input_nodes if a in self.layouts]
            if node.op == "output":
                for arg in inputs:
                    self.block(self.layouts[arg], "it reaches the model's output")
            elif node.op == "call_module":
                self.call_module(node, self.module.get_submodule(node.target))
            elif node.op in ("call_function", "call_method"):
                self.call_function(node, inputs)
            elif node.op == "get_attr":
                continue

    def new_output(self, node: fx.Node, name: str, channels: int, axis: int) -> Layout:
        if name not in self.outputs:
            self.outputs[name] = self.new_space(channels, name)
            self.spaces[self.outputs[name]].producers.append(name)
        return Layout(axis, (Segment(self.outputs[name], channels, 1),))

    def read(self, name: str, layout: Layout | None, weight_axis: int, kernel: int) -> None:
        """Module ``name`` reads ``layout`` along ``weight_axis`` of its weight."""
        if layout is None:
            return
        if name in self.inputs:  # a module called twice reads one set of channels
            self.unify_layouts([self.inputs[name], layout], f"{name} called twice")
            return
        self.inputs[name] = layout
        self.add_members(layout, f"{name}.weight", weight_axis, consumer=name, kernel=kernel)

    def call_module(self, node: fx.Node, module: nn.Module) -> None:
        name = str(node.target)
        source = node.args[0] if node.args else None
        layout = self.layout(source)
        shape = self.shape(node)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and shape is not None:
            kernel = math.prod(module.kernel_size)
            if layout is not None and layout.axis != 1:
                self.block(layout, f"{name} reads it along axis 1, not its channel axis")
                layout = None
            if module.groups == 1:
                self.read(name, layout, 1, kernel)
                self.layouts[node] = self.new_output(node, name, module.out_channels, 1)
                self.producer_rows(name, module, self.layouts[node])
                return
            if (
                module.groups == module.in_channels == module.out_channels
                and layout is not None
                and all(s.inner == 1 for s in layout.segments)
            ):  # depthwise: output channel c is input channel c
                self.layouts[node] = layout
                self.producer_rows(name, module, layout)
                if name in self.inputs:
                    self.unify_layouts([self.inputs[name], layout], f"{name} called twice")
                self.inputs.setdefault(name, layout)
                return
            self.block(layout, f"{name} is a grouped convolution")
            self.layouts[node] = self.blocked_output(node, name, module.out_channels, 1)
            return
        if isinstance(module, nn.Linear) and shape is not None:
            axis = len(shape) - 1
            if layout is not None and layout.axis != axis:
                self.block(layout, f"{name} reads features along the last axis, not its channels")
                layout = None
            self.read(name, layout, 1, 1)
            self.layouts[node] = self.new_output(node, name, module.out_features, axis)
            self.producer_rows(name, module, self.layouts[node])
            return
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            self.channelwise(node, layout, name, requires_axis=1)
            if node in self.layouts:
                for tensor in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(module, tensor, None) is not None:
                        self.add_members(self.layouts[node], f"{name}.{tensor}", 0)
            return
        if isinstance(module, nn.PReLU):
            self.channelwise(
                node, layout, name, requires_axis=1 if module.num_parameters > 1 else None
            )
            if node in self.layouts and module.num_parameters > 1:
                self.add_members(self.layouts[node], f"{name}.weight", 0)
            return
        if isinstance(module, _CHANNELWISE_MODULES):
            self.channelwise(node, layout, name, requires_axis=None)
            return
        if isinstance(module, _SPATIAL_MODULES):
            self.channelwise(node, layout, name, requires_axis=1)
            return
        if isinstance(module, nn.Flatten):
            self.flatten(node, layout, module.start_dim, module.end_dim)
            return
        self.block(layout, f"it is used by {type(module).__name__} {name!r} (no rule for it)")

    def producer_rows(self, name: str, module: nn.Module, layout: Layout) -> None:
        if name in self.rows:
            return  # a module called twice: its rows are members already
        self.rows.add(name)
        self.add_members(layout, f"{name}.weight", 0)
        if getattr(module, "bias", None) is not None:
            self.add_members(layout, f"{name}.bias", 0)

    def blocked_output(self, node: fx.Node, name: str, channels: int, axis: int) -> Layout:
        layout = self.new_output(node, name, channels, axis)
        self.block(layout, f"{name} is a grouped convolution")
        return layout

    def channelwise(
        self, node: fx.Node, layout: Layout | None, what: str, requires_axis: int | None
    ) -> None:
        if layout is None:
            return
        if requires_axis is not None and layout.axis != requires_axis:
            self.block(layout, f"{what} acts along axis {requires_axis}, not the channel axis")
            return
        self.layouts[node] = layout

    def flatten(self, node: fx.Node, layout: Layout | None, start: int, end: int) -> None:
        source_shape = self.shape(node.args[0])
        if layout is None or source_shape is None:
            return
        start, end = start % len(source_shape), end % len(source_shape)
        axis = layout.axis
        if start > axis:  # only axes after the channels merge
            self.layouts[node] = layout
        elif end < axis:  # only axes before the channels merge
            self.layouts[node] = Layout(axis - (end - start), layout.segments)
        elif start == axis:  # each channel spreads over the merged axes after it
            spread = math.prod(source_shape[start + 1 : end + 1])
            segments = tuple(
                Segment(s.space, s.channels, s.inner * spread) for s in layout.segments
            )
            self.layouts[node] = Layout(axis, segments)
        else:
            self.block(layout, "a flatten that merges the channel axis into an axis before it")

    @staticmethod
    def argument(node: fx.Node, position: int, keyword: str, default: object = None) -> object:
        """An argument of a call, given by position or keyword."""
        if keyword in node.kwargs:
            return node.kwargs[keyword]
        return node.args[position] if len(node.args) > position else default

    def call_function(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        target = node.target
        if not inputs:
            return
        first = self.layout(node.args[0]) if node.args else None
        if target in _CHANNELWISE_FUNCTIONS:
            self.channelwise(node, first, str(getattr(target, "__name__", target)), None)
            self.block_others(node, inputs, node.args[0] if node.args else None)
        elif target in _SPATIAL_FUNCTIONS:
            self.channelwise(node, first, str(getattr(target, "__name__", target)), 1)
            self.block_others(node, inputs, node.args[0])
        elif target in _BINARY:
            self.binary(node, inputs)
        elif target in _CONCAT:
            self.concat(node)
        elif target in _FLATTEN:
            start, end = (
                self.argument(node, 1, "start_dim", 0),
                self.argument(node, 2, "end_dim", -1),
            )
            assert isinstance(start, int) and isinstance(end, int)
            self.flatten(node, first, start, end)
        elif target in _RESHAPE:
            self.reshape(node, first)
        elif target in _REDUCE:
            self.reduce(node, first)
        elif target == "size" or target is getattr:
            return
        else:
            for arg in inputs:
                self.block(self.layouts[arg], f"it is used by {target!r} (no rule for it)")

    def block_others(self, node: fx.Node, inputs: list[fx.Node], kept: Any) -> None:
        for arg in inputs:
            if arg is not kept:
                self.block(self.layouts[arg], f"it is an extra argument of {node.target!r}")

    def binary(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        out_shape = self.shape(node)
        if out_shape is None:
            for arg in inputs:
                self.block(self.layouts[arg], f"{node.target!r} of unknown shape")
            return
        tracked: list[Layout] = []
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        for operand in operands:
            layout = self.layouts.get(operand)
            if layout is not None:
                shift = len(out_shape) - len(self.shape(operand) or ())
                tracked.append(Layout(layout.axis + shift, layout.segments))
        if not tracked:
            return
        axis = tracked[0].axis
        if any(t.axis != axis for t in tracked):
            for t in tracked:
                self.block(t, f"{node.target!r} of tensors with channels on different axes")
            return
        for operand in operands:
            if operand in self.layouts:
                continue
            shape = self.shape(operand)
            offset = len(out_shape) - len(shape) if shape is not None else 0
            broadcast = shape is not None and (
                not 0 <= axis - offset < len(shape) or shape[axis - offset] == 1
            )
            if not broadcast:  # channels that cannot be removed, combined with removable ones
                for t in tracked:
                    self.block(t, f"{node.target!r} with a tensor whose channels stay")
                return
        combined = self.unify_layouts(tracked, f"{node.target!r}")
        if combined is not None:
            self.layouts[node] = combined

    def concat(self, node: fx.Node) -> None:
        tensors, dim = self.argument(node, 0, "tensors"), self.argument(node, 1, "dim", 0)
        shape = self.shape(node)
        assert isinstance(tensors, (list, tuple)) and isinstance(dim, int)
        layouts = [self.layout(t) for t in tensors]
        if shape is None:
            for lay in layouts:
                self.block(lay, "a concatenation of unknown shape")
            return
        dim = dim % len(shape)
        present = [lay for lay in layouts if lay is not None]
        if any(lay.axis != dim for lay in present):
            combined = self.unify_layouts(present, "a concatenation") if present else None
            if combined is not None and all(lay is not None for lay in layouts):
                self.layouts[node] = combined
            else:
                for lay in present:
                    self.block(lay, "a concatenation along another axis with untracked tensors")
            return
        segments: list[Segment] = []
        for tensor, lay in zip(tensors, layouts, strict=True):
            if lay is None:
                size = (self.shape(tensor) or (0,) * (dim + 1))[dim]
                segments.append(Segment(None, size, 1))
            else:
                segments += lay.segments
        self.layouts[node] = Layout(dim, tuple(segments))

    def reshape(self, node: fx.Node, layout: Layout | None) -> None:
        source, target = self.shape(node.args[0]), self.shape(node)
        if layout is None or source is None or target is None:
            return
        axis = layout.axis
        if target == source:
            self.layouts[node] = layout
        elif target == (*source[:axis], math.prod(source[axis:])):
            self.flatten(node, layout, axis, len(source) - 1)
        else:
            self.block(layout, f"a reshape from {source} to {target}")

    def reduce(self, node: fx.Node, layout: Layout | None) -> None:
        source = self.shape(node.args[0])
        if layout is None or source is None:
            return
        dim = self.argument(node, 1, "dim")
        if not isinstance(dim, (int, list, tuple)):
            self.block(layout, f"{node.target!r} over all axes")
            return
        dims = [int(d) % len(source) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if layout.axis in dims or any(d < layout.axis for d in dims):
            self.block(layout, f"{node.target!r} over the channel axis or an axis before it")
            return
        self.layouts[node] = layout

    # ---- results ----
    def group_sets(self) -> ChannelTrace:
        roots: dict[int, _Space] = {}
        for index in range(len(self.spaces)):
            root = self.find(index)
            roots.setdefault(root, self.spaces[root])
        groups, blocked = [], {}
        for root, space in sorted(roots.items()):
            name = self.names[root]
            if space.blocked:
                blocked[name] = "; ".join(dict.fromkeys(space.blocked))
                continue
            groups.append(self.group_set(name, space))
        return ChannelTrace(groups, blocked)

    def group_set(self, name: str, space: _Space) -> GroupSet:
        channels = torch.arange(space.channels).unsqueeze(1)
        slices: list[Slice] = []
        consumers: dict[str, Tensor] = {}
        for member in space.members:
            index = member.offset + channels * member.inner + torch.arange(member.inner)
            slices.append(Slice(member.tensor, member.axis, index))
            if member.consumer is not None:
                columns = (
                    index.unsqueeze(2) * member.kernel + torch.arange(member.kernel)
                ).flatten(1)
                previous = consumers.get(member.consumer)
                consumers[member.consumer] = (
                    columns if previous is None else torch.cat([previous, columns], 1)
                )
        return GroupSet(
            name,
            "channels",
            space.channels,
            tuple(slices),
            consumers=tuple(Consumer(k, v) for k, v in consumers.items()),
        )


def trace_channels(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> ChannelTrace:
    """The removable channel spaces of ``model`` (module docstring), and why others stay.

    Args:
        model: a module :func:`torch.fx.symbolic_trace` can trace (no data-dependent control
            flow); it is not modified.
        example_inputs: inputs for one forward pass, for the shapes (a flatten spreads a channel
            over ``H·W`` features).

    Raises:
        TypeError: the model cannot be traced symbolically.
    """
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as error:  # torch.fx raises many types for an untraceable forward
        raise TypeError(
            f"find_groups: torch.fx cannot trace {type(model).__name__} ({error}); channels are "
            "found by tracing, so the model's forward must be free of data-dependent control flow"
        ) from error
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(*inputs)
    tracer = _Tracer(graph_module)
    tracer.run()
    return tracer.group_sets()
