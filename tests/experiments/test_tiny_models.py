"""The tiny trained causal LMs of the layer-wise benchmark: build, train, cache, reload."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lossprune.experiments import tiny_models
from lossprune.experiments.tiny_models import (
    DataSettings,
    ModelSpec,
    Preset,
    TrainSettings,
    build_model,
    load_cached,
    load_data,
    load_or_train,
    pad_right,
    perplexity,
)

pytest.importorskip("transformers")

SMALL_DATA = DataSettings(text_bytes=40_000, block_size=16, calib_sequences=8,
                          heldout_sequences=4, pad_min_length=4)  # fmt: skip


@pytest.fixture
def small_preset(monkeypatch):
    preset = Preset(
        "test-llama", ModelSpec("llama", layers=1, hidden=16, heads=2, kv_heads=1,
                                max_positions=16),
        TrainSettings(steps=3, batch_size=4), SMALL_DATA,
    )  # fmt: skip
    monkeypatch.setitem(tiny_models.PRESETS, preset.name, preset)
    return preset


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"family": "bert"}, "family must be one of"),
        ({"layers": 0}, "layers must be a positive int"),
        ({"hidden": 10, "heads": 4}, "must be a multiple of heads"),
        ({"family": "opt", "kv_heads": 2}, "only supported for llama"),
        ({"kv_heads": 3}, "kv_heads must divide heads"),
        ({"intermediate": 0}, "intermediate must be positive"),
    ],
)
def test_bad_specs_are_refused(kwargs, match):
    options = {"family": "llama", "layers": 1, "hidden": 16, "heads": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        ModelSpec(**options)


def test_settings_are_validated_and_families_build():
    with pytest.raises(ValueError, match="steps must be positive"):
        TrainSettings(steps=0)
    for family in tiny_models.FAMILIES:
        model = build_model(ModelSpec(family, layers=1, hidden=16, heads=2, max_positions=16))
        assert not model.training
        assert model.config.vocab_size == 256


def test_right_padding_keeps_the_first_sequence_and_marks_the_rest():
    ids = torch.arange(1, 25).reshape(3, 8)
    padded = pad_right(ids, min_length=2, seed=0)
    assert padded["lengths"][0] == 8 and bool((padded["lengths"] >= 2).all())
    real = padded["attention_mask"].bool()
    assert torch.equal(padded["input_ids"][real], ids[real])
    assert bool((padded["input_ids"][~real] == tiny_models.PAD_ID).all())
    assert bool((padded["labels"][~real] == -100).all())
    with pytest.raises(ValueError, match="min_length must be in"):
        pad_right(ids, min_length=9, seed=0)


def test_a_preset_is_trained_once_then_loaded_from_the_cache(small_preset, tmp_path):
    first = load_or_train(small_preset.name, root=tmp_path)
    assert first.path.parent == tmp_path / small_preset.name
    assert (tmp_path / small_preset.name / "LATEST").read_text().strip() == first.path.name
    data = load_data(first.path)
    assert data["calib"]["input_ids"].shape == (8, 16)
    assert data["heldout"]["input_ids"].shape == (4, 16)
    assert set(data["calib_padded"]) == {"input_ids", "attention_mask", "labels", "lengths"}
    assert first.log["heldout_ppl"] == pytest.approx(perplexity(first.model, data["heldout"]))
    again, cached = (
        load_or_train(small_preset.name, root=tmp_path),
        load_cached(small_preset.name, tmp_path),
    )
    for model in (again.model, cached.model):
        for (name, a), b in zip(first.model.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name


def test_a_cache_of_other_settings_is_not_reused(small_preset, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no cached model"):
        load_cached(small_preset.name, tmp_path)
    trained = load_or_train(small_preset.name, root=tmp_path)
    changed = Preset(small_preset.name, small_preset.spec, TrainSettings(steps=4, batch_size=4),
                     SMALL_DATA)  # fmt: skip
    monkeypatch.setitem(tiny_models.PRESETS, small_preset.name, changed)
    with pytest.raises(FileNotFoundError, match="other settings"):
        load_cached(small_preset.name, tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        load_or_train("no-such-model", root=tmp_path)
    assert json.loads((trained.path / "tiny_model.json").read_text())["train"]["steps"] == 3


def test_not_enough_blocks_for_the_data_settings_is_refused(small_preset):
    split = tiny_models.text_split(SMALL_DATA)
    with pytest.raises(ValueError, match="training blocks"):
        tiny_models.calibration_data(split, DataSettings(calib_sequences=10**6))
    with pytest.raises(ValueError, match="validation blocks"):
        tiny_models.heldout_data(split, DataSettings(heldout_sequences=10**6))


def test_the_command_line_lists_the_presets(capsys):
    assert tiny_models.main(["--list"]) == 0
    assert "llama-4x64" in capsys.readouterr().out


def test_tiny_models_need_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModuleNotFoundError, match="tiny models need Hugging Face transformers"):
        build_model(ModelSpec("llama", layers=1, hidden=16, heads=2))
