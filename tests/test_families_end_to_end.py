"""The README flow on the Hugging Face families of issue 18 (and BART), end to end.

For each family, a tiny model built from its config (nothing downloaded): prune with the README's
criterion and no ``loss_fn`` (the model's own loss) -> ``save_pretrained`` + ``save_masks`` ->
``from_pretrained`` -> a new pruner adopts the zeros -> fine-tune with ``keep_pruned_at_zero``
from the mask file: every pruned weight is still exactly zero, and the kept ones trained.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lossprune import ExponentialSchedule, LinearSchedule, Magnitude, Pruner, QuadraticModel
from lossprune.selection import keep_pruned_at_zero, load_masks

transformers = pytest.importorskip("transformers")

N, T, VOCAB = 4, 8, 64
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
    bos_token_id=0, eos_token_id=0,
)  # fmt: skip
_MOE = dict(_DECODER, num_experts_per_tok=2)


def _configs() -> dict:
    t = transformers
    return {
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32
        ),
        "llama": lambda: t.LlamaConfig(**_DECODER),
        "qwen2": lambda: t.Qwen2Config(**_DECODER),
        "qwen3": lambda: t.Qwen3Config(head_dim=8, **_DECODER),
        "mistral": lambda: t.MistralConfig(**_DECODER),
        "gemma2": lambda: t.Gemma2Config(head_dim=8, **_DECODER),
        "gemma3": lambda: t.Gemma3TextConfig(head_dim=8, **_DECODER),
        "phi3": lambda: t.Phi3Config(**_DECODER),
        "opt": lambda: t.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            ffn_dim=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
            pad_token_id=1,
        ),
        "mixtral": lambda: t.MixtralConfig(num_local_experts=4, **_MOE),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=8, **_MOE
        ),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(
            num_experts=4, moe_intermediate_size=8, head_dim=8, **_MOE
        ),
        "olmoe": lambda: t.OlmoeConfig(num_experts=4, **_MOE),
        "bert": lambda: t.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            num_labels=3,
        ),
        "t5": lambda: t.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_ff=24,
            num_layers=2,
            num_heads=2,
            d_kv=8,
            decoder_start_token_id=0,
        ),
        "bart": lambda: t.BartConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=24,
            decoder_ffn_dim=24,
            max_position_embeddings=32,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "vit": lambda: t.ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            image_size=8,
            patch_size=4,
            num_channels=3,
            num_labels=3,
        ),
        "whisper": lambda: t.WhisperConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=24,
            decoder_ffn_dim=24,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            decoder_start_token_id=0,
        ),
    }


FAMILIES = list(_configs())
_CLASSES = {
    "bert": "BertForSequenceClassification",
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "vit": "ViTForImageClassification",
    "whisper": "WhisperForConditionalGeneration",
}


def _model_class(family: str) -> type:
    if family in _CLASSES:
        return getattr(transformers, _CLASSES[family])
    return transformers.AutoModelForCausalLM


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = _configs()[family]()
    if family in _CLASSES:
        return _model_class(family)(config).eval()
    kwargs = {"experts_implementation": "eager"} if hasattr(config, "num_experts_per_tok") else {}
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()


def _rows(family: str) -> list[dict[str, torch.Tensor]]:
    """Eight examples; the decoders' are right-padded (mask 0, label -100)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(2 * N):
        if family == "vit":
            rows.append({"pixel_values": torch.randn(3, 8, 8, generator=g),
                         "labels": torch.tensor(i % 3)})  # fmt: skip
        elif family == "bert":
            rows.append({"input_ids": torch.randint(3, VOCAB, (T,), generator=g),
                         "labels": torch.tensor(i % 3)})  # fmt: skip
        elif family == "whisper":
            rows.append({"input_features": torch.randn(8, 16, generator=g),
                         "labels": torch.randint(3, VOCAB, (T,), generator=g)})  # fmt: skip
        elif family in ("t5", "bart"):
            rows.append({"input_ids": torch.randint(3, VOCAB, (T,), generator=g),
                         "labels": torch.randint(3, VOCAB, (T,), generator=g)})  # fmt: skip
        else:
            ids = torch.randint(3, VOCAB, (T,), generator=g)
            mask = torch.ones(T, dtype=torch.long)
            mask[T - (i % 3) :] = 0  # right padding
            rows.append({"input_ids": ids, "attention_mask": mask,
                         "labels": ids.masked_fill(mask == 0, -100)})  # fmt: skip
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_and_fine_tune_keep_every_zero(family, tmp_path):
    model = _model(family)
    loader = DataLoader(_rows(family), batch_size=N)
    pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(sparsity=0.5, stages=2),
                    data=loader, examples=N)  # fmt: skip
    reports = list(pruner.run())
    assert reports[-1].sparsity == pytest.approx(0.5, abs=0.01)
    masks = {k: m.clone() for k, m in pruner.masks.items()}

    model.save_pretrained(tmp_path)
    pruner.save_masks(tmp_path)
    again = _model_class(family).from_pretrained(tmp_path).eval()
    assert load_masks(tmp_path, again).keys() == masks.keys()
    for name, mask in masks.items():
        assert not again.get_parameter(name).detach()[~mask].any(), name

    adopted = Pruner(again, Magnitude(), LinearSchedule(0.6, 1), data=loader)
    assert adopted.sparsity() == pytest.approx(reports[-1].sparsity, abs=1e-6)

    before = {k: again.get_parameter(k).detach().clone() for k in masks}
    again.train()
    optimizer = torch.optim.AdamW(again.parameters(), lr=1e-2)
    handle = keep_pruned_at_zero(optimizer, again, tmp_path)
    for batch in loader:
        optimizer.zero_grad()
        again(**batch).loss.backward()
        optimizer.step()
    handle.remove()
    for name, mask in masks.items():
        weight = again.get_parameter(name).detach()
        assert not weight[~mask].any(), name
    assert any(not torch.equal(again.get_parameter(k).detach(), before[k]) for k in masks)
