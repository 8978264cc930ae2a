"""Tiny Hugging Face ``transformers`` models built from configs (nothing is ever downloaded).

Shapes are the smallest that keep each architecture's distinguishing features: GPT-2's fused
``Conv1D`` projections (weights stored (in, out)) and its LM head tied to the input embedding;
Llama's grouped-query attention (fewer key/value heads than query heads) with tied embeddings;
BERT as a sequence classifier.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64
SEQ = 16


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert(labels: int = 3) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=SEQ, num_labels=labels,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


class TokenBlocks(torch.utils.data.Dataset):
    """Random token blocks as ``{"input_ids", "labels"}`` examples (labels = inputs: causal LM)."""

    def __init__(self, examples: int = 16, length: int = SEQ, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (examples, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
