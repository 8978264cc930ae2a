"""The default prunable set: weight matrices of linear maps, never embeddings or LM heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune import selection as lm
from lossprune._common.linear_maps import weight_matrices
from tests.hf_models import tiny_bert, tiny_gpt2, tiny_llama, transformers


def _names(model, **kwargs):
    return list(lm.prunable_parameters(model, **kwargs))


def test_gpt2_prunes_its_conv1d_projections_not_the_tied_embedding():
    model = tiny_gpt2()
    expected = [
        f"transformer.h.{i}.{part}.weight"
        for i in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert _names(model) == expected
    rows = {row.name: row for row in lm.describe_prunable(model).rows}
    wte = rows["transformer.wte.weight"]
    assert not wte.pruned and wte.aliases == ("lm_head.weight",) and "embedding" in wte.reason
    assert "Conv1D" in rows[expected[0]].reason
    text = str(lm.describe_prunable(model))
    assert text.startswith("prunable: 8 of 28 parameters")
    assert "(= lm_head.weight)" in text


def test_llama_with_tied_embeddings_prunes_every_projection():
    model = tiny_llama()
    names = _names(model)
    assert len(names) == 14
    assert all(n.endswith("_proj.weight") for n in names)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names


def test_untied_language_model_head_stays_dense_unless_included():
    config = tiny_llama().config
    config.tie_word_embeddings = False
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    rows = {row.name: row for row in lm.describe_prunable(model).rows}
    assert not rows["lm_head.weight"].pruned
    assert "output head" in rows["lm_head.weight"].reason
    assert "lm_head.weight" in _names(model, include=[r".*_proj\.weight", "lm_head.weight"])


def test_bert_classifier_keeps_its_head_pooler_and_embeddings_dense():
    names = _names(tiny_bert())
    assert "classifier.weight" not in names and "bert.pooler.dense.weight" not in names
    assert not any("embeddings" in n for n in names)
    assert len(names) == 2 * 6  # q, k, v, attention output, intermediate, output per layer


def test_multihead_attention_input_projections_are_prunable():
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32), 1, enable_nested_tensor=False
    )
    assert _names(encoder) == [
        "layers.0.self_attn.in_proj_weight",
        "layers.0.self_attn.out_proj.weight",
        "layers.0.linear1.weight",
        "layers.0.linear2.weight",
    ]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert _names(separate) == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]


def test_weight_matrices_record_the_input_axes():
    assert weight_matrices(nn.Linear(3, 2))["weight"].input_axes == (1,)
    assert weight_matrices(nn.Conv2d(3, 2, 3))["weight"].input_axes == (1, 2, 3)
    assert weight_matrices(nn.ConvTranspose2d(3, 2, 3))["weight"].input_axes == (0, 2, 3)
    conv1d = tiny_gpt2().transformer.h[0].attn.c_attn
    assert weight_matrices(conv1d)["weight"].input_axes == (0,)
    assert weight_matrices(nn.LayerNorm(3)) == {}
    assert weight_matrices(nn.Linear(3, 2, bias=False)).keys() == {"weight"}


def test_frozen_and_excluded_weights_say_why():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    rows = {row.name: row for row in lm.describe_prunable(model, exclude="1.weight").rows}
    assert rows["0.weight"].reason == "frozen (requires_grad=False)"
    assert rows["1.weight"].reason == "matches exclude="
    with pytest.raises(ValueError, match="no trainable weight matrix"):
        lm.prunable_parameters(model, exclude="1.weight")


def test_to_torch_prune_masks_every_alias_of_a_tied_weight():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    mask = torch.rand(10, 4) > 0.5
    lm.to_torch_prune(model, {"0.weight": mask})
    assert torch.equal(model[0].weight, model[1].weight)
    assert (model[1].weight[~mask] == 0).all()
    tokens = torch.arange(10)
    expected = nn.functional.linear(model[0].weight[tokens], model[0].weight)
    assert torch.equal(model(tokens), expected)
    read = lm.from_torch_prune(model, remove=True)
    assert list(read) == ["0.weight"] and torch.equal(read["0.weight"], mask)
    assert model[1].weight is model[0].weight  # the tie survives prune.remove


def test_from_torch_prune_refuses_two_masks_on_one_tied_weight():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    torch.nn.utils.prune.random_unstructured(model[0], "weight", 0.5)
    torch.nn.utils.prune.identity(model[1], "weight")
    with pytest.raises(ValueError, match="one tied weight with two different"):
        lm.from_torch_prune(model)
