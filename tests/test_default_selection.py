"""The default selection: heads, poolers, front-ends and routers dense; frozen, tied and
parametrized weights handled explicitly (issue 18)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune import LinearSchedule, Magnitude, Pruner, Wanda
from lossprune.selection import describe_prunable, prunable_parameters
from tests.hf_families import tiny_roberta, tiny_t5, tiny_vit, tiny_whisper
from tests.hf_models import tiny_bert, tiny_gpt2, tiny_llama
from tests.moe_models import tiny_moe


def _kept(model) -> dict[str, str]:
    """Name to reason of every weight matrix left dense for a reason other than its kind."""
    return {
        row.name: row.reason
        for row in describe_prunable(model).rows
        if not row.pruned and "not the weight matrix" not in row.reason
    }


@pytest.mark.parametrize(
    "build,expected",
    [
        (tiny_bert, {"bert.pooler.dense.weight": "pooler", "classifier.weight": "task head"}),
        (
            tiny_roberta,
            {"classifier.dense.weight": "task head", "classifier.out_proj.weight": "task head"},
        ),
        (
            tiny_vit,
            {
                "vit.embeddings.patch_embeddings.projection.weight": "input front-end",
                "classifier.weight": "task head",
            },
        ),
        (
            tiny_whisper,
            {
                "model.encoder.conv1.weight": "input front-end",
                "model.encoder.conv2.weight": "input front-end",
            },
        ),  # fmt: skip
        (tiny_t5, {}),
        (tiny_gpt2, {}),
        (tiny_llama, {}),
        (
            lambda: tiny_moe("qwen2_moe"),
            {
                "model.layers.0.mlp.gate.weight": "router or gate",
                "model.layers.0.mlp.shared_expert_gate.weight": "router or gate",
                "lm_head.weight": "output head",
            },
        ),  # fmt: skip
    ],
    ids=["bert", "roberta", "vit", "whisper", "t5", "gpt2", "llama", "qwen2_moe"],
)
def test_heads_poolers_front_ends_and_gates_stay_dense_and_say_why(build, expected):
    model = build()
    kept = {k: v for k, v in _kept(model).items() if "embedding '" not in v}  # tables: as before
    assert kept.keys() == expected.keys()
    for name, what in expected.items():
        assert what in kept[name] and "include=" in kept[name], kept[name]
    # Everything else that is a weight matrix of the model's layers is pruned.
    assert prunable_parameters(model)


def test_include_brings_heads_poolers_and_front_ends_back():
    bert = tiny_bert()
    names = prunable_parameters(bert, include=[r".*\.weight"], exclude=[r".*embeddings.*"])
    assert "classifier.weight" in names and "bert.pooler.dense.weight" in names
    vit = tiny_vit()
    patch = "vit.embeddings.patch_embeddings.projection.weight"
    assert patch in prunable_parameters(vit, include=[patch, r".*q_proj\.weight"])


def test_wanda_leaves_berts_classifier_dense_so_outputs_still_depend_on_the_input():
    torch.manual_seed(0)
    model = tiny_bert()
    ids = torch.randint(0, 64, (8, 6))
    batch = {"input_ids": ids, "labels": torch.randint(0, 3, (8,))}
    classifier = model.classifier.weight.detach().clone()
    Pruner(model, Wanda(), LinearSchedule(0.5, 1), data=batch, on_collapse="ignore").run()
    assert torch.equal(model.classifier.weight, classifier)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, logits[:1].expand_as(logits))


# --- frozen, tied and parametrized weights ------------------------------------------------------


def test_a_frozen_parameter_named_in_include_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"include pattern '0\.weight' names only frozen .*"
                                         r"requires_grad_\(True\)"):  # fmt: skip
        prunable_parameters(model, include=["0.weight", "1.weight"])
    # A pattern that also matches trainable parameters skips the frozen ones, as by default.
    assert list(prunable_parameters(model, include=r".*\.weight")) == ["1.weight"]
    rows = {row.name: row.reason for row in describe_prunable(model, include=r".*weight").rows}
    assert rows["0.weight"] == "frozen (requires_grad=False)"


def test_targets_accept_a_tied_weights_other_name():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.Linear(10, 6))
    model[1].weight = model[0].weight
    pruner = Pruner(
        model, Magnitude(), LinearSchedule(0.5, 1), include=[r"0\.weight", r"2\.weight"],
        scope={r"1\.weight": 0.25},  # the head's name of the embedding
    )  # fmt: skip
    pruner.run()
    assert int((~pruner.masks["0.weight"]).sum()) == round(0.25 * 40)
    assert int((~pruner.masks["2.weight"]).sum()) == round(0.5 * 60)


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "wrap,source",
    [
        (nn.utils.parametrizations.weight_norm, "1.parametrizations.weight.original1"),
        (nn.utils.parametrizations.spectral_norm, "1.parametrizations.weight.original"),
        (nn.utils.weight_norm, "1.weight_v"),
        (nn.utils.spectral_norm, "1.weight_orig"),
    ],
    ids=["weight_norm", "spectral_norm", "weight_norm-hook", "spectral_norm-hook"],
)
def test_norm_reparametrised_layers_are_refused_not_silently_left_out(wrap, source):
    model = nn.Sequential(nn.Linear(4, 4), wrap(nn.Linear(4, 3)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'1\.weight' is computed by .* exclude="):
        Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert source in {row.name for row in describe_prunable(model).rows}
    # Left dense on purpose, or its own parameter pruned: both are the user's explicit choice.
    assert list(prunable_parameters(model, exclude=source)) == ["0.weight"]
    assert list(prunable_parameters(model, include=["0.weight", source])) == ["0.weight", source]
