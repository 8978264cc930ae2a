r"""Which parameters are the weight matrices of linear maps, and which of them stay dense.

Pruning removes entries of the matrices :math:`W` of linear maps :math:`y = W x (+ b)`: the
weights of :class:`~torch.nn.Linear` (and its subclasses, e.g. the ``out_proj`` of
:class:`~torch.nn.MultiheadAttention`), of every convolution, of Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, stored transposed as
``(in, out)``) and the input projections of :class:`~torch.nn.MultiheadAttention`
(``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when the key
and value sizes differ). Biases and normalisation parameters are never in the default set
(Laurent et al. 2020, Sec. 5).

Two kinds of matrix stay dense by default, as llm-compressor and SparseGPT leave them
(``ignore=["lm_head"]``):

- an embedding table, and any weight tied to one (GPT-2's and tied Llama's ``lm_head`` is the
  input embedding ``wte``/``embed_tokens``: pruning it prunes the embedding);
- a language model's output head (``model.get_output_embeddings()`` of a Hugging Face model),
  whose rows are the vocabulary.

``include=`` overrides both. :class:`WeightMatrix` also records where the INPUT dimension of each
matrix lies (the axis whose entries one output sums over), which structured N:M selection needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["WeightMatrix", "dense_by_default", "is_hf_conv1d", "weight_matrices"]


@dataclass(frozen=True)
class WeightMatrix:
    """One prunable weight matrix of a module.

    Attributes:
        kind: what the module is, e.g. ``"Linear"``, ``"Conv2d"``, ``"Conv1D (Hugging Face)"``.
        input_axes: the axes of the parameter that index the map's input (flattened in this
            order): ``(1,)`` for ``nn.Linear`` ``(out, in)``, ``(0,)`` for Hugging Face ``Conv1D``
            ``(in, out)``, ``(1, 2, ...)`` for a convolution ``(out, in/groups, *kernel)`` and
            ``(0, 2, ...)`` for a transposed convolution ``(in, out/groups, *kernel)`` (each
            output channel sums over ``in`` and the kernel).
    """

    kind: str
    input_axes: tuple[int, ...]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``transformers.pytorch_utils.Conv1D``."""
    # Matched by name, so that lossprune never imports transformers just to look at a model.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def weight_matrices(module: nn.Module) -> dict[str, WeightMatrix]:
    """The module's OWN parameters that are weight matrices of linear maps, by local name.

    Only parameters registered as :class:`~torch.nn.Parameter` count (a module reparametrised by
    :mod:`torch.nn.utils.prune` holds ``weight_orig`` instead and is handled by the caller).
    """
    own = module._parameters
    if isinstance(module, nn.Linear):
        found = {"weight": WeightMatrix("Linear", (1,))}
    elif isinstance(module, _ConvNd):
        kind = type(module).__name__
        weight = own.get("weight")
        ndim = 0 if weight is None else weight.dim()
        axes = (0, *range(2, ndim)) if module.transposed else tuple(range(1, ndim))
        found = {"weight": WeightMatrix(kind, axes)} if weight is not None else {}
    elif is_hf_conv1d(module):
        found = {"weight": WeightMatrix("Conv1D (Hugging Face)", (0,))}
    elif isinstance(module, nn.MultiheadAttention):
        found = {
            name: WeightMatrix("MultiheadAttention", (1,))
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        }
    else:
        return {}
    return {k: v for k, v in found.items() if isinstance(own.get(k), nn.Parameter)}


def dense_by_default(model: nn.Module) -> dict[int, str]:
    """Parameters (by ``id``) left out of the default prunable set, with the reason.

    Embedding tables and everything tied to them, then the output head of a Hugging Face
    language model.
    """
    reasons: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            reasons[id(module.weight)] = f"weight of embedding {name!r} (dense by default)"
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        weight = head._parameters.get("weight")
        if weight is not None and id(weight) not in reasons:
            reasons[id(weight)] = (
                "language-model output head (left dense by default, like llm-compressor's "
                "ignore=['lm_head']; pass include= to prune it)"
            )
    return reasons
