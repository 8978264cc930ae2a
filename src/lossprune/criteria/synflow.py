"""SynFlow, a data-free foresight-pruning baseline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from .._common.batches import ModelInputs
from .._common.checks import is_int
from .._common.data import first_batch
from .._common.functional import check_deterministic, no_random_draws
from .base import Criterion, ScoringContext

__all__ = ["SynFlow"]


@dataclass(frozen=True)
class SynFlow(Criterion):
    r"""Iterative Synaptic Flow (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020).

    With every parameter replaced by its absolute value, an all-ones input gives the synaptic
    flow :math:`R = \mathbb 1^\top f(\mathbb 1; |\theta|)` (for a bias-free linear chain,
    :math:`R = \mathbb 1^\top \prod_l |W_l| \mathbb 1`). The score is

    .. math:: s = |\theta| \odot \partial R / \partial |\theta| \;\ge 0.

    As in the authors' reference code, floating-point buffers (batch-norm running statistics) are
    replaced by their absolute values too, the model must be in eval mode, and the computation is
    done in float64 because :math:`R` is a product over all layers. The scores stay in that
    dtype: cast back to float32 they overflow for deep networks (a ResNet-50 at initialisation).
    A model with several outputs (a tuple, a dict) has :math:`R` summed over all their
    floating-point entries. No data is read except, when ``input_shape`` is not given, the
    shapes of the first batch's inputs: every floating-point input, positional or keyword, is
    replaced by ones shaped like one example. The paper prunes with about 100 exponential
    stages.

    A token model (integer inputs, e.g. a language model) has no all-ones input: the flow runs
    through the embedding output instead, ``model(inputs_embeds=1)`` with ones of shape
    ``(1, T, d)``, for models that accept ``inputs_embeds`` and name their input embedding
    (``get_input_embeddings()``, every Hugging Face model); other token models raise. Integer
    keyword inputs (attention masks, token types) are left out: the model's defaults apply. An
    encoder-decoder (``config.is_encoder_decoder``) gets ``decoder_inputs_embeds`` of ones too,
    as long as the batch's decoder inputs, or as the encoder's when the batch has none. A
    forward pass that fails in ``dtype`` but may run in the model's own (a kernel without
    float64) raises a ``TypeError`` naming the ``dtype`` to pass.

    Args:
        input_shape: shape of one input example, e.g. ``(3, 32, 32)``: a sequence of positive
            ints; default: from the data.
        dtype: computation dtype (default float64).
    """

    input_shape: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", _check_input_shape(self.input_shape))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {self.dtype!r}")

    def score(self, context: ScoringContext) -> dict[str, Tensor]:
        model = context.model
        device = next(iter(context.params.values())).device
        if self.input_shape is not None:
            call = _ones_input(self.input_shape, self.dtype, device)
        elif context.data is not None:
            call = _flow_input(model, first_batch(context.data).inputs, self.dtype, device)
        else:
            raise ValueError("SynFlow needs input_shape=... or data to read the input shape from")
        fixed: dict[str, Tensor] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor = tensor.detach()
            fixed[name] = tensor.to(self.dtype).abs() if tensor.is_floating_point() else tensor
        leaves = {
            k: p.detach().to(self.dtype).abs().requires_grad_(True)
            for k, p in context.params.items()
        }
        check_deterministic(model)
        with torch.enable_grad():
            with no_random_draws(model):
                try:
                    outputs = functional_call(model, {**fixed, **leaves}, call.args, call.kwargs)
                except RuntimeError as error:
                    _explain_dtype(error, self.dtype, context.params.values())
                    raise
            flow = _total(outputs)
            grads = torch.autograd.grad(flow, list(leaves.values()), allow_unused=True)
        return {
            k: leaf.detach() * (g if g is not None else torch.zeros_like(leaf))
            for (k, leaf), g in zip(leaves.items(), grads, strict=True)
        }


def _ones_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> ModelInputs:
    return ModelInputs((torch.ones((1, *shape), dtype=dtype, device=device),))


def _flow_input(
    model: torch.nn.Module, inputs: Tensor | ModelInputs, dtype: torch.dtype, device: torch.device
) -> ModelInputs:
    """All ones shaped like one example of every floating-point input of ``inputs``.

    Positional and keyword inputs keep their places (a model of two inputs gets two). Token ids
    (``input_ids``, or an integer first input) are replaced by ones shaped like their embeddings,
    passed as ``inputs_embeds``. Other integer keyword inputs (attention masks, token types) are
    left out, so that the model's defaults apply and the flow does not depend on the data; other
    integer positional inputs, which cannot be left out, are the first example's own.

    Raises:
        TypeError: token inputs and a model with no input embedding to feed ones to.
    """
    if isinstance(inputs, Tensor):
        inputs = ModelInputs((inputs,))

    def one(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.is_floating_point():
            return torch.ones((1, *value.shape[1:]), dtype=dtype, device=device)
        return value[:1].to(device)

    args = [one(a) for a in inputs.args]
    kwargs = {
        k: one(v)
        for k, v in inputs.kwargs.items()
        if k == "input_ids" or not isinstance(v, Tensor) or v.is_floating_point()
    }
    ids = kwargs.pop("input_ids", None)
    if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        ids = args.pop(0)  # token ids as the first positional input
    if ids is not None:
        kwargs["inputs_embeds"] = _ones_embeddings(model, ids, dtype, device)
    config = getattr(model, "config", None)
    if ids is not None and getattr(config, "is_encoder_decoder", False):
        # The decoder's tokens too (else it would build its inputs from the missing ids):
        # as many as the batch's decoder inputs, or the encoder's.
        decoder_ids = inputs.kwargs.get("decoder_input_ids")
        decoder_ids = ids if not isinstance(decoder_ids, Tensor) else decoder_ids
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else model
        kwargs["decoder_inputs_embeds"] = _ones_embeddings(decoder, decoder_ids, dtype, device)
    return ModelInputs(tuple(args), kwargs)


def _explain_dtype(error: RuntimeError, dtype: torch.dtype, params: Iterable[Tensor]) -> None:
    """A forward pass that fails in SynFlow's dtype but may run in the model's own: say so.

    Kernels without float64 (the ``grouped_mm`` experts of transformers 5) or model code that
    assumes float32 fail with an error that does not name SynFlow's cast.
    """
    own = {p.dtype for p in params}
    if own and dtype not in own:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TypeError(
            f"SynFlow runs the model in {dtype} (R is a product over all layers), and its "
            f"forward pass failed in that dtype ({first_line}); pass "
            f"SynFlow(dtype={sorted(map(str, own))[0]}) to run it in the model's own dtype "
            "(mixtures of experts: or model.set_experts_implementation('eager'))"
        ) from error


def _ones_embeddings(
    model: torch.nn.Module, ids: Tensor, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Ones shaped like the embeddings of one example's token ids."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embedding, torch.nn.Embedding):
        raise TypeError(
            f"SynFlow feeds an all-ones input, but this model reads {ids.dtype} token ids, "
            "which cannot be all ones in a meaningful way; SynFlow runs through the embedding "
            "output only for models with get_input_embeddings() that accept inputs_embeds "
            "(Hugging Face models). Pass input_shape=... for a model with float inputs"
        )
    return torch.ones((1, *ids.shape[1:], embedding.embedding_dim), dtype=dtype, device=device)


def _check_input_shape(shape: object) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (not a string, not floats)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"input_shape must be a sequence of ints, e.g. (3, 32, 32), got {shape!r}")
    if not shape or not all(is_int(d) for d in shape):
        raise TypeError(f"input_shape must be a non-empty sequence of ints, got {shape!r}")
    if min(int(d) for d in shape) < 1:
        raise ValueError(f"input_shape must hold positive sizes, got {tuple(shape)}")
    return tuple(int(d) for d in shape)


def _total(outputs: Any) -> Tensor:
    """:math:`R`: the sum of every floating-point tensor in the model's outputs."""
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise TypeError(
            "SynFlow needs floating-point outputs to sum, the model returned "
            f"{type(outputs).__name__}"
        )
    return torch.stack([t.sum() for t in leaves]).sum()
