"""Hugging Face families beyond the end-to-end test's, each a tiny model built from its config.

For each: the Monte-Carlo Fisher diagonal of EVERY parameter through the batched keyword path
equals the one-example-at-a-time slow twin in float64 (same sampled labels), and the README
flow (two stages to 50 %, ``save_pretrained`` + ``save_masks``, reload) keeps every zero.
Families whose experts kernel has no float64 (grouped_mm) run the flow in float32 only.
"""

from __future__ import annotations

import pytest
import torch

from lossprune import ExponentialSchedule, Pruner, QuadraticModel
from lossprune.curvature import fisher_diag_mc
from lossprune.selection import load_masks
from tests.test_families_end_to_end import _DECODER, VOCAB
from tests.test_keyword_layers import _relative_error

transformers = pytest.importorskip("transformers")

V, T, N = VOCAB, 8, 3
_ENCODER_DECODER = dict(
    vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
    pad_token_id=0, decoder_start_token_id=0,
)  # fmt: skip
_ENCODER = dict(
    vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=24, max_position_embeddings=34, num_labels=3,
)  # fmt: skip


def _causal(config_class, drop=(), **extra):
    options = {k: v for k, v in _DECODER.items() if k not in drop}
    return lambda: transformers.AutoModelForCausalLM.from_config(config_class(**options, **extra))


def _builders() -> dict:
    t = transformers
    return {
        "gpt_neox": _causal(t.GPTNeoXConfig, drop=("num_key_value_heads",)),
        "falcon": _causal(t.FalconConfig, drop=("intermediate_size", "num_key_value_heads")),
        "gptj": lambda: t.GPTJForCausalLM(
            t.GPTJConfig(
                vocab_size=V, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=32
            )  # fmt: skip
        ),
        "bloom": lambda: t.BloomForCausalLM(
            t.BloomConfig(vocab_size=V, hidden_size=16, n_layer=2, n_head=2)
        ),
        "codegen": lambda: t.CodeGenForCausalLM(
            t.CodeGenConfig(
                vocab_size=V, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=32, n_ctx=32
            )  # fmt: skip
        ),
        "stablelm": _causal(t.StableLmConfig),
        "olmo2": _causal(t.Olmo2Config),
        "cohere": _causal(t.CohereConfig),
        "starcoder2": _causal(t.Starcoder2Config),
        "phi": _causal(t.PhiConfig),
        "gpt_bigcode": lambda: t.GPTBigCodeForCausalLM(
            t.GPTBigCodeConfig(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32)
        ),
        "gpt_neo": lambda: t.GPTNeoForCausalLM(
            t.GPTNeoConfig(
                vocab_size=V,
                hidden_size=16,
                num_layers=2,
                num_heads=2,
                attention_types=[[["global", "local"], 1]],
                max_position_embeddings=32,
                window_size=4,
            )  # fmt: skip
        ),
        "mpt": lambda: t.MptForCausalLM(
            t.MptConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=32)
        ),
        "gpt_oss": _causal(
            t.GptOssConfig, num_local_experts=4, num_experts_per_tok=2, head_dim=8
        ),  # fmt: skip
        "distilbert": lambda: t.DistilBertForSequenceClassification(
            t.DistilBertConfig(
                vocab_size=V,
                dim=16,
                n_layers=1,
                n_heads=2,
                hidden_dim=24,
                max_position_embeddings=32,
                num_labels=3,
            )  # fmt: skip
        ),
        "albert": lambda: t.AlbertForSequenceClassification(
            t.AlbertConfig(embedding_size=8, **_ENCODER)
        ),
        "deberta_v2": lambda: t.DebertaV2ForSequenceClassification(t.DebertaV2Config(**_ENCODER)),
        "xlm_roberta": lambda: t.XLMRobertaForSequenceClassification(
            t.XLMRobertaConfig(pad_token_id=1, **_ENCODER)
        ),
        "pegasus": lambda: t.PegasusForConditionalGeneration(t.PegasusConfig(**_ENCODER_DECODER)),
        "marian": lambda: t.MarianMTModel(t.MarianConfig(**_ENCODER_DECODER)),
        "mt5": lambda: t.MT5ForConditionalGeneration(
            t.MT5Config(
                vocab_size=V,
                d_model=16,
                d_ff=16,
                num_layers=1,
                num_heads=2,
                d_kv=8,
                decoder_start_token_id=0,
            )  # fmt: skip
        ),
        "swin": lambda: t.SwinForImageClassification(
            t.SwinConfig(
                image_size=8,
                patch_size=2,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[1, 2],
                window_size=2,
                num_labels=3,
            )  # fmt: skip
        ),
        "convnext": lambda: t.ConvNextForImageClassification(
            t.ConvNextConfig(
                num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=8
            )  # fmt: skip
        ),
    }


FAMILIES = list(_builders())
#: Families whose default experts kernel (grouped_mm) has no float64.
FLOAT32_ONLY = {"gpt_oss"}


def _model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _builders()[family]().to(dtype).eval()
    with torch.no_grad():  # norms that are not all ones and zeros
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(family: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    if family in ("swin", "convnext"):
        pixels = torch.randn(N, 3, 8, 8, generator=g, dtype=dtype)
        return {"pixel_values": pixels, "labels": torch.arange(N) % 3}
    ids = torch.randint(3, V, (N, T), generator=g)
    if family in ("distilbert", "albert", "deberta_v2", "xlm_roberta"):
        return {"input_ids": ids, "labels": torch.arange(N) % 3}
    if family in ("pegasus", "marian", "mt5"):
        return {"input_ids": ids, "labels": torch.randint(3, V, (N, T), generator=g)}
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, -2:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - FLOAT32_ONLY))
def test_the_batched_fisher_of_every_parameter_equals_the_slow_twin(family):
    model = _model(family, torch.float64)
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = _batch(family, torch.float64)

    def diagonal(fast: bool) -> dict:
        generator = torch.Generator().manual_seed(3)
        return fisher_diag_mc(model, params, batch, None, generator=generator, fast=fast)

    assert _relative_error(diagonal(True), diagonal(False)) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_the_readme_flow_keeps_every_zero_through_a_reload(family, tmp_path):
    model = _model(family, torch.float32)
    batch = _batch(family, torch.float32)
    pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(sparsity=0.5, stages=2),
                    data=[batch, batch])  # fmt: skip
    reports = list(pruner.run())
    assert reports[-1].sparsity == pytest.approx(0.5, abs=0.01)
    model.save_pretrained(tmp_path)
    pruner.save_masks(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    masks = load_masks(tmp_path, again)
    assert masks.keys() == pruner.masks.keys()
    for name, mask in pruner.masks.items():
        assert not again.get_parameter(name).detach()[~mask].any(), name
