"""The README flow on the Hugging Face families of issue 18 (and BART), end to end.

For each family, a tiny model built from its config (nothing downloaded): prune with the README's
criterion and no ``loss_fn`` (the model's own loss) -> ``save_pretrained`` + ``save_masks`` ->
``from_pretrained`` -> a new pruner adopts the zeros -> fine-tune with ``keep_pruned_at_zero``
from the mask file: every pruned weight is still exactly zero, and the kept ones trained.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from lossprune import ExponentialSchedule, LinearSchedule, Magnitude, Pruner, QuadraticModel
from lossprune.selection import keep_pruned_at_zero, load_masks
from tests.hf_families import tiny_t5, tiny_vit, tiny_whisper
from tests.hf_models import tiny_bert, tiny_gpt2, tiny_llama
from tests.moe_models import tiny_moe

transformers = pytest.importorskip("transformers")

N, T, VOCAB = 4, 8, 64
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
    bos_token_id=0, eos_token_id=0,
)  # fmt: skip


def _decoder(config_class: type, **extra) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_config(config_class(**extra, **_DECODER))


def _builders() -> dict:
    """A tiny model of each family: the suite's own builders where it has one."""
    t = transformers
    moe = {family: partial(tiny_moe, family, dtype=torch.float32) for family in MOE_FAMILIES}
    return {
        "gpt2": tiny_gpt2,
        "llama": tiny_llama,
        "qwen2": lambda: _decoder(t.Qwen2Config),
        "qwen3": lambda: _decoder(t.Qwen3Config, head_dim=8),
        "mistral": lambda: _decoder(t.MistralConfig),
        "gemma2": lambda: _decoder(t.Gemma2Config, head_dim=8),
        "gemma3": lambda: _decoder(t.Gemma3TextConfig, head_dim=8),
        "phi3": lambda: _decoder(t.Phi3Config),
        "opt": lambda: t.OPTForCausalLM(
            t.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                ffn_dim=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=32,
                word_embed_proj_dim=16,
                pad_token_id=1,
            )  # fmt: skip
        ),
        **moe,
        "bert": tiny_bert,
        "t5": tiny_t5,
        "bart": lambda: t.BartForConditionalGeneration(
            t.BartConfig(
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
            )  # fmt: skip
        ),
        "vit": tiny_vit,
        "whisper": tiny_whisper,
    }


#: The four mixture-of-experts families of issue 18 (tests/moe_models.py has six).
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FAMILIES = list(_builders())


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _builders()[family]().float().eval()


def _rows(family: str, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Eight examples of tokens below ``vocab`` (or images); the decoders' are right-padded
    (mask 0, label -100)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(2 * N):
        if family == "vit":
            rows.append({"pixel_values": torch.randn(3, 8, 8, generator=g),
                         "labels": torch.tensor(i % 3)})  # fmt: skip
        elif family == "bert":
            rows.append({"input_ids": torch.randint(3, vocab, (T,), generator=g),
                         "labels": torch.tensor(i % 3)})  # fmt: skip
        elif family == "whisper":
            rows.append({"input_features": torch.randn(8, 16, generator=g),
                         "labels": torch.randint(3, vocab, (T,), generator=g)})  # fmt: skip
        elif family in ("t5", "bart"):
            rows.append({"input_ids": torch.randint(3, vocab, (T,), generator=g),
                         "labels": torch.randint(3, vocab, (T,), generator=g)})  # fmt: skip
        else:
            ids = torch.randint(3, vocab, (T,), generator=g)
            mask = torch.ones(T, dtype=torch.long)
            mask[T - (i % 3) :] = 0  # right padding
            rows.append({"input_ids": ids, "attention_mask": mask,
                         "labels": ids.masked_fill(mask == 0, -100)})  # fmt: skip
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_and_fine_tune_keep_every_zero(family, tmp_path):
    model = _model(family)
    loader = DataLoader(_rows(family, getattr(model.config, "vocab_size", 0)), batch_size=N)
    pruner = Pruner(model, QuadraticModel(lam=1e-3), ExponentialSchedule(sparsity=0.5, stages=2),
                    data=loader, examples=N)  # fmt: skip
    reports = list(pruner.run())
    assert reports[-1].sparsity == pytest.approx(0.5, abs=0.01)
    masks = {k: m.clone() for k, m in pruner.masks.items()}

    model.save_pretrained(tmp_path)
    pruner.save_masks(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
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
