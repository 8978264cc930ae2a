"""Tiny mixture-of-experts models of six Hugging Face families, built from configs.

transformers 5 stores their experts fused: ``experts.gate_up_proj`` ``(experts, 2·inter, hidden)``
and ``experts.down_proj`` ``(experts, hidden, inter)``; GPT-OSS transposed (``(experts, in,
out)``), with biases and interleaved gate/up columns. ``experts_implementation="eager"`` runs
every expert as a plain matrix product (the default ``grouped_mm`` kernel has no float64).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 16
HIDDEN = 8
INTER = 4
EXPERTS = 4

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0, bos_token_id=0,
    eos_token_id=0,
)  # fmt: skip


def _configs() -> dict:
    t = transformers
    moe = dict(intermediate_size=INTER, num_experts_per_tok=2)
    return {
        "mixtral": lambda: t.MixtralConfig(num_local_experts=EXPERTS, **moe, **_COMMON),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(
            moe_intermediate_size=INTER,
            shared_expert_intermediate_size=INTER,
            num_experts=EXPERTS,
            **moe,
            **_COMMON,
        ),  # fmt: skip
        "qwen3_moe": lambda: t.Qwen3MoeConfig(
            moe_intermediate_size=INTER, num_experts=EXPERTS, head_dim=4, **moe, **_COMMON
        ),
        "olmoe": lambda: t.OlmoeConfig(num_experts=EXPERTS, **moe, **_COMMON),
        "deepseek_v3": lambda: t.DeepseekV3Config(
            moe_intermediate_size=INTER,
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            kv_lora_rank=4,
            q_lora_rank=None,
            qk_rope_head_dim=2,
            qk_nope_head_dim=2,
            v_head_dim=4,
            **moe,
            **_COMMON,
        ),  # fmt: skip
        "gpt_oss": lambda: t.GptOssConfig(
            num_local_experts=EXPERTS,
            head_dim=4,
            layer_types=["full_attention"],
            **moe,
            **_COMMON,
        ),  # fmt: skip
    }


FAMILIES = list(_configs())


def tiny_moe(family: str = "mixtral", dtype: torch.dtype = torch.float64, seed: int = 0):
    """A one-layer causal LM of ``family`` with 4 experts of 2 per token, in eval mode."""
    torch.manual_seed(seed)
    config = _configs()[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    return model.eval().to(dtype)


def experts_of(model) -> torch.nn.Module:
    return model.model.layers[0].mlp.experts


def token_batch(n: int = 3, t: int = 5, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=generator)
    return {"input_ids": ids, "labels": ids}
