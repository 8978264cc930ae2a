"""Tiny Hugging Face models of the families whose default selection has heads and front-ends.

Classifiers (BERT, RoBERTa, ViT), an encoder-decoder (T5) and a speech model with a
convolutional front-end (Whisper); tests/hf_models.py has GPT-2, Llama and BERT builders, and
tests/moe_models.py the mixtures of experts. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

_TEXT = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=16, max_position_embeddings=16,
)  # fmt: skip


def tiny_roberta(labels: int = 3) -> torch.nn.Module:
    config = transformers.RobertaConfig(num_labels=labels, pad_token_id=1, **_TEXT)
    return transformers.RobertaForSequenceClassification(config).eval()


def tiny_vit(labels: int = 3) -> torch.nn.Module:
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        image_size=8, patch_size=4, num_channels=3, num_labels=labels,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval()


def tiny_whisper() -> torch.nn.Module:
    config = transformers.WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.WhisperForConditionalGeneration(config).eval()


def tiny_t5() -> torch.nn.Module:
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8,
        decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()
