r"""Which weight matrices stay dense by default, and why: the model's own structure decides.

Pruning aims at the matrices that do the work of each layer. The ones a model uses to read its
input, to route tokens or to write its task's output stay dense, as llm-compressor and SparseGPT
leave them (``ignore=["lm_head"]``), unless ``include=`` names them:

- an **embedding** table, and any weight tied to one (GPT-2's and tied Llama's ``lm_head`` is the
  input embedding ``wte``/``embed_tokens``: pruning it prunes the embedding);
- a language model's **output head** (``model.get_output_embeddings()``), whose rows are the
  vocabulary;
- an **input front-end**: the module a model or any of its sub-models names as its input
  embedding when it is not an embedding table (``get_input_embeddings()``: ViT's and CLIP's patch
  embedding, Whisper's encoder ``conv1``), with the convolutions beside it (Whisper's ``conv2``);
  they see the raw pixels or the spectrogram, like a token embedding sees the tokens;
- a **router or gate** of a mixture of experts: inside a module that holds ``experts``, every
  submodule outside the experts whose name is ``gate``/``router`` or ends in ``_gate``/``_router``
  (Mixtral's ``gate``, Qwen2-MoE's ``shared_expert_gate``, GPT-OSS's ``router``); it decides which
  experts see each token, so a pruned router changes the routing itself;
- a **pooler** (the child ``pooler`` of a Hugging Face base model, BERT's): it feeds only the
  task head;
- a **task head**: every linear map of a Hugging Face model outside its base model
  (``model.base_model``: ``bert`` in ``BertForSequenceClassification``, ``vit`` in
  ``ViTForImageClassification``), e.g. a classifier whose few rows each decide one class.
  Wanda, with no gradient, would otherwise empty BERT's 2-row classifier first.

Nothing here is matched by class name: the rules read ``get_input_embeddings``,
``get_output_embeddings``, ``base_model``, tied parameters and module positions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.conv import _ConvNd

from .._common.linear_maps import weight_matrices

__all__ = ["dense_by_default"]

# A router's or gate's name inside a mixture-of-experts block: "gate", "router",
# "shared_expert_gate"... but not a gated MLP's "gate_proj".
_ROUTER_NAME = re.compile(r"(.*_)?(gate|router)")


def dense_by_default(model: nn.Module) -> dict[int, str]:
    """Parameters (by ``id``) left out of the default prunable set, with the reason.

    The first rule that applies gives the reason, in the order of the module docstring.
    """
    reasons: dict[int, str] = {}

    def keep(module: nn.Module, reason: str, *, every_parameter: bool = False) -> None:
        """Mark the weight matrices of ``module`` and its submodules (or all their parameters)."""
        for sub in module.modules():
            names = sub._parameters if every_parameter else weight_matrices(sub)
            for local in names:
                param = sub._parameters.get(local)
                if param is not None and id(param) not in reasons:
                    reasons[id(param)] = reason

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            reason = f"weight of embedding {name!r} (dense by default)"
            reasons.setdefault(id(module.weight), reason)
    head = _call(model, "get_output_embeddings")
    if isinstance(head, nn.Module):
        keep(
            head,
            "language-model output head (left dense by default, like llm-compressor's "
            "ignore=['lm_head']; pass include= to prune it)",
        )
    for name, front in _input_front_ends(model):
        keep(
            front,
            f"input front-end {name!r} (patch or convolutional embedding of the raw input, left "
            "dense by default like token embeddings; pass include= to prune it)",
        )
    for block, router in _routers(model):
        keep(
            router[1],
            f"router or gate {router[0]!r} of the mixture of experts {block!r} (it decides "
            "which experts see each token or how much an expert's output counts; left dense by "
            "default, pass include= to prune it)",
            every_parameter=True,
        )
    base = _base_model(model)
    if base is not None:
        base_name = next(n for n, m in model.named_modules() if m is base)
        pooler = base._modules.get("pooler")
        if isinstance(pooler, nn.Module):
            keep(
                pooler,
                f"pooler '{base_name}.pooler' (feeds only the task head; left dense by default, "
                "pass include= to prune it)",
            )
        inside = {id(m) for m in base.modules()}
        for name, module in model.named_modules():
            if id(module) not in inside and weight_matrices(module):
                keep(
                    module,
                    f"task head {name!r} (outside the base model {base_name!r}; left dense by "
                    "default like the language-model head, pass include= to prune it)",
                )
    return reasons


def _call(module: nn.Module, method: str) -> object:
    """``module.method()`` of a Hugging Face model, ``None`` when it has none or raises."""
    function = getattr(module, method, None)
    if not callable(function):
        return None
    try:
        return function()
    except (NotImplementedError, AttributeError):  # transformers' default: "not implemented"
        return None


def _input_front_ends(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every input embedding that is not a table, and the convolutions beside."""
    names = {id(m): n for n, m in model.named_modules()}
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    seen: set[int] = set()
    for module in model.modules():
        front = _call(module, "get_input_embeddings")
        if not isinstance(front, nn.Module) or isinstance(front, nn.Embedding | nn.EmbeddingBag):
            continue
        if id(front) not in names:  # not a submodule of this model
            continue
        parent = parents.get(id(front))
        beside = [] if parent is None else list(parent.children())
        for candidate in [front, *(m for m in beside if isinstance(m, _ConvNd))]:
            if id(candidate) not in seen:
                seen.add(id(candidate))
                yield names[id(candidate)], candidate


def _routers(model: nn.Module) -> Iterator[tuple[str, tuple[str, nn.Module]]]:
    """(block name, (router name, router)) inside every module that holds ``experts``."""
    for block_name, block in model.named_modules():
        experts = block._modules.get("experts")
        if not isinstance(experts, nn.Module):
            continue
        for name, module in block.named_modules():
            if not name or module is experts or name.startswith("experts."):
                continue
            if _ROUTER_NAME.fullmatch(name.rpartition(".")[2]):
                full = f"{block_name}.{name}" if block_name else name
                yield block_name, (full, module)


def _base_model(model: nn.Module) -> nn.Module | None:
    """A Hugging Face task model's base model (``model.base_model``), if it is a submodule."""
    if not isinstance(getattr(model, "base_model_prefix", None), str):
        return None
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return None
    return base
