"""The blocks a model is pruned by, in the order its forward runs them.

Layer-wise pruning calibrates one block at a time on the outputs of the blocks before it, so a
model must be a chain: whatever runs before the first block (embeddings, rotary position
embeddings, the attention mask), then the blocks one after another (each one's output is the
next one's input), then whatever runs after the last (final norm, head). The blocks are

* the decoder layers of a Hugging Face model: the :class:`~torch.nn.ModuleList` whose modules
  are of the model's ``_no_split_modules`` classes (``LlamaDecoderLayer``, ``OPTDecoderLayer``,
  ``GPT2Block``...): the layer list of every causal LM of the transformers page (Llama,
  Qwen2/3, Mistral, Gemma, Phi-3, OPT, GPT-2);
* the children of an :class:`~torch.nn.Sequential` model;
* else the :class:`~torch.nn.ModuleList` of modules of one class that holds weight matrices
  (several such lists side by side are refused: an encoder and a decoder), or the longest
  list of modules of one class;
* or what the user names: ``blocks="model.layers"`` (a ``ModuleList``/``Sequential`` whose
  children are the blocks) or a list of module names in forward order.

Whether the named modules really form a chain is checked on the data before anything is pruned
(:mod:`lossprune.layerwise.calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["BlockStack", "find_blocks"]


class BlockStack(NamedTuple):
    """The blocks of a model, in forward order.

    Attributes:
        names: qualified module names of the blocks (``"model.layers.0"``, ...).
        modules: the blocks themselves.
        found_by: how they were found (for reports and error messages).
    """

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    found_by: str


def find_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> BlockStack:
    """The blocks of ``model`` (module docstring).

    Args:
        model: the model.
        blocks: ``None`` (found automatically), the name of a ``ModuleList``/``Sequential``
            whose children are the blocks, or the names of the blocks in forward order.

    Raises:
        TypeError: ``blocks`` of another type.
        ValueError: a name that is no module of the model, a named container that is not a
            ``ModuleList``/``Sequential``, a block named twice or inside another, or a model
            whose blocks cannot be found (name them with ``blocks=``).
    """
    if blocks is None:
        return _found(model)
    if isinstance(blocks, str):
        container = _module(model, blocks)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"blocks={blocks!r} names a {type(container).__name__}; name a ModuleList or "
                "Sequential whose children are the blocks, or pass the blocks' names as a list"
            )
        prefix = f"{blocks}." if blocks else ""
        names = tuple(f"{prefix}{child}" for child, _ in container.named_children())
        return _stack(model, names, f"the children of {blocks!r}")
    if not isinstance(blocks, Sequence) or not all(isinstance(b, str) for b in blocks):
        raise TypeError(
            "blocks must be None, a module name or a list of module names, got "
            f"{type(blocks).__name__}"
        )
    return _stack(model, tuple(blocks), "named by blocks=")


def _outermost_with_linear_maps(
    lists: list[tuple[str, nn.ModuleList]],
) -> list[tuple[str, nn.ModuleList]]:
    """The stacks whose weights layer-wise pruning would prune.

    The lists of ``lists`` that lie inside none of the others and hold a linear map (a weight
    of two or more dimensions).
    """
    return [
        (name, module)
        for name, module in _outermost(lists)
        if any(p.dim() >= 2 for p in module.parameters())
    ]


def _outermost(lists: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    """The lists that lie inside none of the others (ConvNeXt's stages, not their layers)."""
    return [
        (name, module)
        for name, module in lists
        if not any(name.startswith(f"{other}.") for other, _ in lists if other != name)
    ]


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"blocks: {name!r} is not a module of the model") from None


def _stack(model: nn.Module, names: tuple[str, ...], found_by: str) -> BlockStack:
    if not names:
        raise ValueError(f"blocks: {found_by} holds no module")
    if len(set(names)) != len(names):
        raise ValueError(f"blocks: a block is named twice in {list(names)}")
    for outer in names:
        for inner in names:
            if inner != outer and (not outer or inner.startswith(f"{outer}.")):
                raise ValueError(f"blocks: {inner!r} lies inside the block {outer!r}")
    return BlockStack(names, tuple(_module(model, name) for name in names), found_by)


def _found(model: nn.Module) -> BlockStack:
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = [
        (name, module)
        for name, module in model.named_modules()
        # a parametrization's list of functions (weight_norm) is a ModuleList, not a stack
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and not isinstance(module, parametrize.ParametrizationList)
    ]
    if no_split:
        decoder = _outermost([
            (name, module)
            for name, module in lists
            if all(type(child).__name__ in no_split for child in module)
        ])  # fmt: skip
        if len(decoder) == 1:
            name = decoder[0][0]
            return find_blocks(model, name)._replace(found_by=f"the layer list {name!r}")
        if len(decoder) > 1:
            raise ValueError(
                f"blocks: {type(model).__name__} has several stacks of layers "
                f"({[name for name, _ in decoder]}; an encoder and a decoder?), which do not "
                "form one chain; name the blocks with blocks=[...]"
            )
    if isinstance(model, nn.Sequential):
        return find_blocks(model, "")._replace(found_by="the children of the Sequential model")
    uniform = [
        (name, module)
        for name, module in lists
        if len({type(child) for child in module}) == 1 and name
    ]
    stacks = _outermost_with_linear_maps(uniform)
    if len(stacks) > 1:
        # Marian's and Pegasus's encoder and decoder layers (no ``_no_split_modules``): the
        # longest would be pruned and the other left dense.
        raise ValueError(
            f"blocks: {type(model).__name__} has several stacks of layers "
            f"({[name for name, _ in stacks]}; an encoder and a decoder?), which do not form "
            "one chain; name the blocks with blocks=[...]"
        )
    if uniform:
        # the list whose weights would be pruned, not a longer list of norms beside it
        if stacks:
            name = stacks[0][0]
            return find_blocks(model, name)._replace(found_by=f"the layer list {name!r}")
        name, _ = max(uniform, key=lambda item: len(item[1]))
        return find_blocks(model, name)._replace(found_by=f"the longest ModuleList {name!r}")
    raise ValueError(
        f"blocks: no stack of blocks found in {type(model).__name__} (no decoder layer list, "
        "not an nn.Sequential, no ModuleList); name them with blocks='path.to.layers' or a list"
    )
