r"""Disconnected units of a pruned chain of Linear / convolution layers.

Pruning can cut a network long before any layer is empty: a class whose every kept incoming
weight starts at a unit that no longer sees the input has no path from the input (its logit is a
constant), and a hidden unit with no kept input or no kept output is dead weight. For a *chain*
(each layer feeds only the next; Linear and convolution layers separated by element-wise
activations, dropout, normalisation, pooling or a flatten) this is decided exactly from the
masks alone, layer by layer, with the units of a layer being the output features of a Linear
layer and the output channels of a convolution (a kept kernel tap connects its two channels):

.. math:: \text{reach}_l = \bigl(C_l\,\text{reach}_{l-1} > 0\bigr), \qquad
   \text{need}_{l-1} = \bigl(C_l^\top\,\text{need}_l > 0\bigr),

with :math:`C_l[o, i]` true when layer :math:`l` keeps a weight from unit :math:`i` to unit
:math:`o`, every input unit reached and every output unit needed. A unit is disconnected when it
is not both reached and needed. Biases do not connect anything to the input.

The chain is read once with :func:`torch.fx.symbolic_trace`; anything the trace cannot prove to
be such a chain (residual connections, attention, control flow, grouped or transposed
convolutions, a prunable parameter outside the chain) is reported as not checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["ChainLayer", "Connectivity", "trace_chain", "connectivity"]

# Modules that map each unit to the same unit: they neither join nor split paths.
_UNITWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)  # fmt: skip
_UNITWISE_FUNCTIONS = (torch.relu, F.relu, torch.tanh, torch.sigmoid, F.gelu, F.silu)
_FLATTEN_FUNCTIONS = (torch.flatten,)


class ChainLayer(NamedTuple):
    """One Linear or convolution layer of a chain: its weight's qualified name and shape."""

    weight: str
    out_units: int
    in_units: int


class Connectivity(NamedTuple):
    """Disconnected units after a stage.

    Attributes:
        checked: whether the model is a chain this could be decided for.
        outputs: output units (classes) with no path from the input.
        hidden: per weight name of a hidden layer, how many of its output units have no path
            from the input or none to the output.
    """

    checked: bool
    outputs: int = 0
    hidden: Mapping[str, int] = {}

    @property
    def total(self) -> int:
        """All disconnected units (outputs and hidden)."""
        return self.outputs + sum(self.hidden.values())


NOT_CHECKED = Connectivity(False)


def trace_chain(model: nn.Module, params: Mapping[str, Tensor]) -> list[ChainLayer] | None:
    """The Linear / convolution layers of ``model`` in data order, or ``None`` if not a chain.

    Every parameter in ``params`` must be the weight of one of these layers.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any untraceable forward simply cannot be checked
        return None
    weight_names = {id(p): name for name, p in model.named_parameters()}
    layers: list[ChainLayer] = []
    previous: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None  # a second input
            previous = node
            continue
        if node.op == "output":
            if node.args[0] is not previous:
                return None
            break
        tensor_inputs = [a for a in node.all_input_nodes]
        if previous is None or tensor_inputs != [previous] or len(previous.users) != 1:
            return None  # a branch or a join: not a chain
        layer = _chain_step(model, node, weight_names)
        if layer is None:
            return None
        if isinstance(layer, ChainLayer):
            layers.append(layer)
        previous = node
    chained = {layer.weight for layer in layers}
    if not layers or not set(params) <= chained or len(chained) != len(layers):
        return None
    return layers


def _chain_step(
    model: nn.Module, node: fx.Node, weight_names: dict[int, str]
) -> ChainLayer | bool | None:
    """A layer, ``True`` for a unit-preserving step (or a flatten), ``None`` for anything else."""
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            weight = module._parameters.get("weight")  # None when reparametrised
            if weight is None or id(weight) not in weight_names:
                return None
            if isinstance(module, nn.modules.conv._ConvNd) and (
                module.transposed or module.groups != 1
            ):
                return None
            return ChainLayer(weight_names[id(weight)], *weight.shape[:2])
        return isinstance(module, (*_UNITWISE_MODULES, nn.Flatten)) or None
    if node.op == "call_function":
        return node.target in (*_UNITWISE_FUNCTIONS, *_FLATTEN_FUNCTIONS) or None
    if node.op == "call_method":
        return node.target in ("relu", "tanh", "sigmoid", "flatten") or None
    return None


def connectivity(layers: list[ChainLayer] | None, masks: Mapping[str, Tensor]) -> Connectivity:
    """Disconnected units of the chain ``layers`` under ``masks`` (``True`` = kept).

    Layers without a mask (not pruned) are fully connected. A flatten between a convolution with
    ``c`` channels and a Linear layer with ``c·s`` inputs maps each channel to its ``s`` features.
    """
    if layers is None:
        return NOT_CHECKED
    links: list[Tensor | None] = []
    for layer in layers:
        mask = masks.get(layer.weight)
        if mask is None:
            links.append(None)  # dense
        else:
            links.append(
                mask
                if mask.dim() == 2
                else mask.reshape(layer.out_units, layer.in_units, -1).any(-1)
            )
    reach: Tensor | None = None  # None: every unit of the network's input
    reached = []
    for layer, link in zip(layers, links, strict=True):
        if reach is not None:
            reach = _resize(reach, layer.in_units, gather=False)
            if reach is None:
                return NOT_CHECKED
        reach = _forward(link, reach, layer)
        reached.append(reach)
    need: Tensor | None = None  # None: every output unit
    needed: list[Tensor] = []
    for layer, link in zip(reversed(layers), reversed(links), strict=True):
        needed.append(torch.ones(layer.out_units, dtype=torch.bool) if need is None else need)
        need = _backward(link, needed[-1].to(_device(link)), layer)
        index = len(layers) - len(needed) - 1
        if index >= 0:
            need = _resize(need, layers[index].out_units, gather=True)
            if need is None:
                return NOT_CHECKED
    needed.reverse()
    hidden = {
        layer.weight: int((~(r.cpu() & n.cpu())).sum())
        for layer, r, n in zip(layers[:-1], reached[:-1], needed[:-1], strict=True)
    }
    return Connectivity(True, int((~reached[-1]).sum()), hidden)


def _device(link: Tensor | None) -> torch.device:
    return torch.device("cpu") if link is None else link.device


def _forward(link: Tensor | None, reach: Tensor | None, layer: ChainLayer) -> Tensor:
    if link is None:
        alive = True if reach is None else bool(reach.any())
        return torch.full((layer.out_units,), alive, dtype=torch.bool)
    if reach is None:
        return link.any(1)
    return (link & reach.to(link.device)).any(1)


def _backward(link: Tensor | None, need: Tensor, layer: ChainLayer) -> Tensor:
    if link is None:
        return torch.full((layer.in_units,), bool(need.any()), dtype=torch.bool)
    return (link & need.unsqueeze(1)).any(0)


def _resize(units: Tensor, size: int, *, gather: bool) -> Tensor | None:
    """Channels to flattened features (``gather=False``) or back (``gather=True``)."""
    if units.numel() == size:
        return units
    if gather:  # features (c·s) -> channels (size = c)
        if units.numel() % size:
            return None
        return units.reshape(size, -1).any(1)
    if size % units.numel():
        return None
    return units.repeat_interleave(size // units.numel())
