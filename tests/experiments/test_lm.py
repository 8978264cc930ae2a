"""The tiny byte-level GPT-2 of the transformer experiments."""

from __future__ import annotations

import pytest
import torch

from lossprune import LinearSchedule, Magnitude, Pruner
from lossprune.experiments.lm import LMConfig, build_tiny_lm, evaluate_lm, token_loss, train_lm
from lossprune.experiments.text import load_text_split

pytest.importorskip("transformers")

TINY = LMConfig(layers=1, width=32, heads=2, block_size=16)


@pytest.fixture(scope="module")
def split():
    return load_text_split(max_bytes=8_000, block_size=TINY.block_size)


def test_token_loss_is_the_models_own_shifted_loss(split):
    model = build_tiny_lm(TINY)
    batch = next(iter(split.loader("train", 4, shuffle=False)))
    output = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert torch.allclose(token_loss(output.logits, batch["labels"]), output.loss, atol=1e-6)
    labels = batch["labels"].clone()
    labels[:, 5:] = -100  # ignored tokens carry no loss and are not counted
    output = model(input_ids=batch["input_ids"], labels=labels)
    assert torch.allclose(token_loss(output.logits, labels), output.loss, atol=1e-6)


def test_training_lowers_the_validation_loss_deterministically(split):
    val = split.loader("val", 16, shuffle=False)
    first, second = build_tiny_lm(TINY, seed=1), build_tiny_lm(TINY, seed=1)
    before = evaluate_lm(first, val)
    history = train_lm(first, split, steps=30, seed=0, batch_size=8)
    after = evaluate_lm(first, val)
    assert after.loss < before.loss - 0.5
    assert after.tokens == len(split.val) * (TINY.block_size - 1)
    assert after.perplexity == pytest.approx(torch.tensor(after.loss).exp().item())
    assert history[-1]["step"] == 30
    train_lm(second, split, steps=30, seed=0, batch_size=8)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_fine_tuning_keeps_the_pruners_masks(split):
    model = build_tiny_lm(TINY)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    pruner.run()
    train_lm(model, split, steps=5, seed=0, batch_size=8, pruner=pruner)
    for name, param in pruner.params.items():
        assert (param.detach()[~pruner.masks[name]] == 0).all(), name
    assert all(not p._backward_hooks for p in pruner.params.values())


def test_training_arguments_are_checked(split):
    with pytest.raises(ValueError, match="steps must be positive"):
        train_lm(build_tiny_lm(TINY), split, steps=0, seed=0)


def test_lm_errors_are_clear(split, monkeypatch):
    with pytest.raises(ValueError, match="no predicted token"):
        evaluate_lm(build_tiny_lm(TINY), [])
    model = build_tiny_lm(TINY)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training loss is not finite at step 1"):
        train_lm(model, split, steps=2, seed=0, batch_size=4)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lossprune\[transformers\]'"):
        build_tiny_lm(TINY)
