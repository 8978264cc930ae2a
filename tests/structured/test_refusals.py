"""Layouts whose shapes contradict them, and options a structured method cannot honour, are
refused with a precise error before anything changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune import Magnitude, NonFiniteError
from lossprune.curvature.inputs import InputMoments
from lossprune.structured import (
    GroupOBS,
    GroupQuadratic,
    MeasuredLoss,
    StructuredPruner,
    find_groups,
    group_scores,
)
from lossprune.structured.refit import consumer_problem

from . import models

transformers = pytest.importorskip("transformers")


def test_attention_and_mlp_shapes_that_contradict_their_layout_are_refused():
    qwen = models.qwen3()
    qwen.model.layers[0].self_attn.q_norm.weight = nn.Parameter(torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="normalises 5 features"):
        find_groups(qwen, "heads")
    opt = models.opt()
    opt.model.decoder.layers[0].self_attn.num_heads = 3
    with pytest.raises(TypeError, match="num_heads x head_dim=3"):
        find_groups(opt, "heads")
    gpt2 = models.gpt2()
    gpt2.transformer.h[0].attn.num_heads = 3
    with pytest.raises(TypeError, match="c_attn/c_proj shapes"):
        find_groups(gpt2, "heads")
    gpt2 = models.gpt2()
    gpt2.transformer.h[0].attn.is_cross_attention = True
    with pytest.raises(TypeError, match="cross-attention"):
        find_groups(gpt2, "heads")
    bert = models.bert()
    bert.bert.encoder.layer[0].attention.self.num_attention_heads = 3
    with pytest.raises(TypeError, match="attention_head_size=3"):
        find_groups(bert, "heads")
    neox = models.gpt_neox()
    neox.gpt_neox.layers[0].attention.head_size = 5  # 32 columns are no whole number of heads
    with pytest.raises(TypeError, match="query_key_value/dense sizes 96/32 .* head_size=5"):
        find_groups(neox, "heads")
    falcon = models.falcon()
    falcon.transformer.h[0].self_attention.num_heads = 3
    with pytest.raises(TypeError, match="sizes 48/32 that do not match num_heads=3"):
        find_groups(falcon, "heads")
    bigcode = models.gpt_bigcode()
    bigcode.transformer.h[0].attn.num_heads = 3
    with pytest.raises(TypeError, match="c_attn/c_proj sizes 48/32 .* num_heads=3"):
        find_groups(bigcode, "heads")
    config = transformers.GPTBigCodeConfig(
        vocab_size=models.VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=models.SEQ,
        multi_query=False, add_cross_attention=True,
    )  # fmt: skip
    with pytest.raises(TypeError, match="'transformer.h.0.crossattention' is a cross-attention"):
        find_groups(transformers.GPTBigCodeForCausalLM(config), "heads")
    gptj = models.gptj()
    gptj.transformer.h[0].attn.num_attention_heads = 3
    with pytest.raises(TypeError, match="num_attention_heads x head_dim=3 x 8"):
        find_groups(gptj, "heads")
    llama = models.llama()
    llama.model.layers[0].mlp.up_proj = nn.Linear(48, 30, bias=False)
    with pytest.raises(TypeError, match="cannot be cut into neurons"):
        find_groups(llama, "neurons")
    mixtral = models.mixtral()
    mixtral.model.layers[0].mlp.gate.weight = nn.Parameter(torch.zeros(3, 32))
    with pytest.raises(TypeError, match="no weight with one row per expert"):
        find_groups(mixtral, "experts")


def test_options_of_the_choices_are_checked():
    with pytest.raises(TypeError, match="damping must be a Damping"):
        GroupOBS(damping=0.1)
    with pytest.raises(ValueError, match="curvature must be 'ggn' or 'hessian'"):
        GroupQuadratic(curvature="fisher")
    data = [
        {
            "input_ids": torch.zeros(2, 4, dtype=torch.long),
            "labels": torch.zeros(2, 4, dtype=torch.long),
        }
    ]
    with pytest.raises(ValueError, match="max_groups=8"):
        StructuredPruner(
            models.llama(), "neurons", 0.25, choice=MeasuredLoss(max_groups=8), data=data
        )
    with pytest.raises(TypeError, match="must be a lossprune.Criterion"):
        group_scores(models.llama(), find_groups(models.llama(), "heads"), "magnitude")


def test_a_non_finite_group_score_raises():
    model = models.llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite group score"):
        group_scores(model, find_groups(model, "neurons"), Magnitude())


def test_a_refit_without_a_gram_matrix_is_refused():
    model = models.opt()
    (group_set, *_) = find_groups(model, "neurons")
    moments = InputMoments(torch.ones(1, 40), None, 10)
    with pytest.raises(ValueError, match="needs its Gram matrix"):
        consumer_problem(model, group_set.consumers[0], moments, torch.float64)
