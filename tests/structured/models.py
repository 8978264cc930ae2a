"""Tiny models for structured removal: every Hugging Face layout the finders know, and CNNs.

Built from configs in float64 (nothing is downloaded); random weights, with biases and norms
perturbed away from their neutral initial values so that a wrongly sliced one shows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB = 50
SEQ = 12


def _perturbed(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model.double().eval()


def llama(heads: int = 8, kv_heads: int = 4, hidden: int = 48) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=SEQ,
        tie_word_embeddings=False, attention_bias=True,
    )  # fmt: skip
    return _perturbed(transformers.LlamaForCausalLM(config))


def qwen3() -> nn.Module:
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.Qwen3ForCausalLM(config))


def mistral() -> nn.Module:
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.MistralForCausalLM(config))


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4
    )
    return _perturbed(transformers.GPT2LMHeadModel(config))


def opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=SEQ, word_embed_proj_dim=32,
        activation_function="gelu",
    )  # fmt: skip
    return _perturbed(transformers.OPTForCausalLM(config))


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=40, max_position_embeddings=SEQ, num_labels=3,
    )  # fmt: skip
    return _perturbed(transformers.BertForSequenceClassification(config))


def mixtral() -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=SEQ, experts_implementation="eager",
    )  # fmt: skip
    return _perturbed(transformers.MixtralForCausalLM(config))


def qwen3_moe() -> nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ, norm_topk_prob=True,
        experts_implementation="eager",
    )  # fmt: skip
    return _perturbed(transformers.Qwen3MoeForCausalLM(config))


def starcoder2() -> nn.Module:
    """``c_fc``/``c_proj`` MLP whose width the config calls ``intermediate_size``."""
    config = transformers.Starcoder2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.Starcoder2ForCausalLM(config))


def phi() -> nn.Module:
    """``fc1``/``fc2`` MLP whose width the config calls ``intermediate_size``; its attention's
    output map is ``dense``."""
    config = transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.PhiForCausalLM(config))


def gpt_neox() -> nn.Module:
    """``dense_h_to_4h``/``dense_4h_to_h`` MLP (``intermediate_size``); fused
    ``query_key_value``, one run of q, k, v rows per head."""
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.GPTNeoXForCausalLM(config))


def gpt_neox_japanese() -> nn.Module:
    """GPT-NeoX's fused layout, viewed by its own ``num_attention_heads``."""
    config = transformers.GPTNeoXJapaneseConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_multiple_size=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.GPTNeoXJapaneseForCausalLM(config))


def falcon(layout: str = "multi_query") -> nn.Module:
    """The same MLP names, its width in ``ffn_hidden_size``; ``FalconLinear`` maps; a fused
    ``query_key_value`` in one of Falcon's three layouts: ``"multi_query"`` (the default: one
    key and value for all heads), ``"per_head"`` (q, k, v per head), ``"grouped"`` (the new
    decoder architecture, 2 key/value groups of 2 query heads)."""
    layouts = {
        "multi_query": {},
        "per_head": {"multi_query": False, "num_kv_heads": 4},
        "grouped": {"new_decoder_architecture": True, "num_kv_heads": 2},
    }
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=40, num_hidden_layers=2,
        num_attention_heads=4, **layouts[layout],
    )  # fmt: skip
    return _perturbed(transformers.FalconForCausalLM(config))


def gptj() -> nn.Module:
    """``fc_in``/``fc_out`` MLP (``n_inner``); q/k/v/out_proj heads, 4 of 8 features rotated."""
    config = transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_inner=40, n_layer=2, n_head=4, rotary_dim=4,
        n_positions=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.GPTJForCausalLM(config))


def gpt_bigcode(multi_query: bool = True) -> nn.Module:
    """StarCoder's attention: ``c_attn``/``c_proj`` as ``nn.Linear``, multi-query by default."""
    config = transformers.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ,
        multi_query=multi_query,
    )  # fmt: skip
    return _perturbed(transformers.GPTBigCodeForCausalLM(config))


def stablelm(qk_layernorm: bool = False) -> nn.Module:
    """Llama's projection names under grouped-query attention, but a module that views them by
    its own ``num_heads`` and derives its head size from ``hidden_size``."""
    config = transformers.StableLmConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        qk_layernorm=qk_layernorm,
    )  # fmt: skip
    return _perturbed(transformers.StableLmForCausalLM(config))


def gpt_neo() -> nn.Module:
    """``q/k/v/out_proj`` with ``num_heads`` (as OPT), global and local attention layers."""
    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, window_size=4,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=SEQ,
    )  # fmt: skip
    return _perturbed(transformers.GPTNeoForCausalLM(config))


def bloom() -> nn.Module:
    """``dense_h_to_4h`` of width 4 x hidden, a width its config has no field for."""
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    return _perturbed(transformers.BloomForCausalLM(config))


HF_MODELS = {
    "llama": llama, "qwen3": qwen3, "mistral": mistral, "gpt2": gpt2, "opt": opt, "bert": bert,
    "starcoder2": starcoder2, "phi": phi, "gpt_neox": gpt_neox, "gptj": gptj, "falcon": falcon,
    "falcon_per_head": lambda: falcon("per_head"), "falcon_grouped": lambda: falcon("grouped"),
    "gpt_bigcode": gpt_bigcode, "gpt_bigcode_per_head": lambda: gpt_bigcode(multi_query=False),
    "stablelm": stablelm, "gpt_neo": gpt_neo, "gpt_neox_japanese": gpt_neox_japanese,
}  # fmt: skip
#: Models with removable neurons only (their attention has no supported layout).
NEURON_MODELS = {"bloom": bloom}
MOE_MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}


def token_batch(examples: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (examples, SEQ), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


class BasicBlock(nn.Module):
    """A residual block: conv-BN-ReLU-conv-BN, plus the input or its 1x1 projection."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, two residual stages, a concatenation branch, global pooling, a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.stage1 = nn.Sequential(BasicBlock(6, 6), BasicBlock(6, 6))
        self.stage2 = BasicBlock(6, 8, stride=2)
        self.side = nn.Conv2d(8, 4, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(12 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        x = torch.cat([torch.relu(self.depthwise(x)), self.side(x)], dim=1)
        x = nn.functional.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


def resnet() -> nn.Module:
    model = ResNet()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                module.running_var.copy_(
                    torch.rand(module.running_var.shape, generator=generator) + 0.5
                )
    return model.double().eval()
