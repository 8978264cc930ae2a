"""Tiny causal language models of the families layer-wise pruning supports, and their data.

Built from configs (nothing downloaded), float64 unless asked otherwise, in eval mode. Each has
the distinguishing feature of its family: grouped-query attention and rotary embeddings (Llama,
Qwen2/3, Mistral, Gemma, Phi-3 with fused qkv), learned positions (OPT, GPT-2), GPT-2's
transposed ``Conv1D`` projections, Gemma's sliding-window layers (Gemma 2).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 48
SEQ = 12

_COMMON = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
    "head_dim": 4,
}  # fmt: skip

FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_COMMON, **_DECODER)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON, **_DECODER)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_COMMON, **_DECODER)),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_COMMON, **_DECODER)
    ),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**_COMMON, **_DECODER)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**_COMMON, **_DECODER, sliding_window=4)
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**_COMMON, **{k: v for k, v in _DECODER.items() if k != "head_dim"})
    ),
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            **_COMMON,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
    ),  # fmt: skip
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**_COMMON, n_embd=16, n_layer=3, n_head=4, n_positions=32)
    ),
}


def tiny(family: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]().to(dtype).eval()
    with torch.no_grad():  # larger weights than the initialiser's: activations of every size
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(3.0)
    return model


def batches(
    lengths: tuple[tuple[int, ...], ...] = ((12, 9, 12), (5, 12)),
    seed: int = 0,
    ignore_first: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Right-padded token batches: attention_mask 0 and labels -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for group in lengths:
        ids = torch.randint(3, VOCAB, (len(group), SEQ), generator=generator)
        mask = torch.zeros(len(group), SEQ, dtype=torch.long)
        for n, length in enumerate(group):
            mask[n, :length] = 1
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :ignore_first] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
