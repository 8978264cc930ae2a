"""Physical removal: the smaller model computes what the masked dense model computes (float64),
counts exactly what was removed, and reloads through Hugging Face or the recorded route."""

from __future__ import annotations

import copy
import importlib
import types
from unittest import mock

import pytest
import torch

from lossprune.structured import (
    find_groups,
    load_removed,
    masked_state,
    parameter_count,
    parameters_removed,
    remove,
)

from . import models

transformers = pytest.importorskip("transformers")

HF_CASES = [(name, kind) for name in models.HF_MODELS for kind in ("heads", "neurons")] + [
    (name, "neurons") for name in models.NEURON_MODELS
]
BUILDERS = {**models.HF_MODELS, **models.NEURON_MODELS}
UNIFORM_RELOADS = [
    ("llama", "heads"), ("llama", "neurons"), ("qwen3", "heads"), ("qwen3", "neurons"),
    ("mistral", "heads"), ("mistral", "neurons"), ("gpt2", "neurons"), ("opt", "neurons"),
    ("bert", "neurons"), ("starcoder2", "heads"), ("starcoder2", "neurons"), ("phi", "neurons"),
    ("phi", "heads"),
    ("gpt_neox", "neurons"), ("falcon", "neurons"), ("gptj", "neurons"), ("stablelm", "neurons"),
]  # fmt: skip


def _auto(name: str):
    if name == "bert":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def _random_removal(groups, fraction=0.25, seed=0, uniform=True):
    generator = torch.Generator().manual_seed(seed)
    removed = {}
    for position, group_set in enumerate(groups):
        count = max(1, round(group_set.size * fraction)) if uniform else 1 + position % 2
        count = min(count, group_set.size - 1)
        removed[group_set.name] = torch.randperm(group_set.size, generator=generator)[
            :count
        ].tolist()
    return removed


def _masked(model, groups, removed):
    reference = copy.deepcopy(model)
    reference.load_state_dict(masked_state(reference, groups, removed), strict=False)
    return reference


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


@pytest.mark.parametrize("name, kind", HF_CASES)
def test_removed_model_equals_masked_dense_model(name, kind):
    model = BUILDERS[name]()
    groups = find_groups(model, kind)
    removed = _random_removal(groups, uniform=False)
    small = remove(model, groups, removed, hf_config="record")
    batch = models.token_batch()
    expected = models.logits(_masked(model, groups, removed), batch)
    torch.testing.assert_close(models.logits(small, batch), expected, rtol=0, atol=1e-10)
    saved = parameters_removed(model, groups, removed)
    assert parameter_count(model) - parameter_count(small) == saved
    assert saved > 0


def test_inplace_removal_modifies_the_model_and_a_copy_does_not():
    model = models.llama()
    before = _state(model)
    groups = find_groups(model, "neurons")
    small = remove(model, groups, {groups[0].name: [0, 3]}, hf_config="record")
    assert _same_state(_state(model), before)
    assert small.model.layers[0].mlp.down_proj.in_features == 38
    same = remove(model, groups, {groups[0].name: [0, 3]}, inplace=True, hf_config="record")
    assert same is model and model.model.layers[0].mlp.up_proj.out_features == 38


@pytest.mark.parametrize("name, kind", UNIFORM_RELOADS)
def test_uniform_removal_reloads_with_from_pretrained(name, kind, tmp_path):
    model = BUILDERS[name]()
    groups = find_groups(model, kind)
    small = remove(model, groups, {g.name: list(range(g.size // 4 or 1)) for g in groups})
    small.save_pretrained(tmp_path)
    again = _auto(name).from_pretrained(tmp_path, dtype=torch.float64)
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )
    assert parameter_count(again) == parameter_count(small)


def test_gqa_removal_keeps_whole_key_value_groups():
    model = models.llama(heads=8, kv_heads=4)
    (first, second) = find_groups(model, "heads")
    assert (first.size, first.heads_per_group) == (4, 2)
    small = remove(model, [first, second], {first.name: [2], second.name: [0]})
    config = small.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 3, 6)
    attention = small.model.layers[0].self_attn
    assert attention.q_proj.out_features == 36 and attention.k_proj.out_features == 18
    assert attention.num_key_value_groups == 2


@pytest.mark.parametrize(
    "name", ["gpt2", "opt", "bert", "gpt_neox", "gptj", "falcon", "gpt_bigcode", "gpt_neo"]
)
def test_heads_a_config_cannot_express_are_refused_and_nothing_changes(name):
    model = models.HF_MODELS[name]()
    before = _state(model)
    groups = find_groups(model, "heads")
    with pytest.raises(ValueError, match="cannot express removing heads.*hf_config='record'"):
        remove(model, groups, {g.name: [0] for g in groups}, inplace=True)
    assert _same_state(_state(model), before)


def test_an_mlp_width_no_config_field_holds_is_refused_and_names_the_record_route():
    model = models.bloom()  # 4 x hidden, derived in code
    before = _state(model)
    groups = find_groups(model, "neurons")
    with pytest.raises(ValueError, match="(?s)no config field of .*hf_config='record'"):
        remove(model, groups, {g.name: [0] for g in groups}, inplace=True)
    assert _same_state(_state(model), before)


def test_a_head_count_the_config_refuses_raises_and_says_what_to_do():
    model = models.llama(heads=12, kv_heads=4)  # 48 / 9 heads is no integer
    before = _state(model)
    groups = find_groups(model, "heads")
    with pytest.raises(ValueError, match="(?s)config refuses.*divide hidden_size"):
        remove(model, groups, {g.name: [0] for g in groups}, inplace=True)
    assert _same_state(_state(model), before)


def test_non_uniform_removal_is_refused_by_update_and_reloads_by_the_record(tmp_path):
    model = models.llama()
    before = _state(model)
    neurons = find_groups(model, "neurons")
    removed = _random_removal(neurons, uniform=False)
    with pytest.raises(ValueError, match="one size for every layer"):
        remove(model, neurons, removed, inplace=True)
    assert _same_state(_state(model), before)
    small = remove(model, neurons, removed, hf_config="record")
    heads = find_groups(small, "heads")
    small = remove(small, heads, {heads[1].name: [0]}, hf_config="record", inplace=True)
    with pytest.raises(ValueError, match="already records a removal"):
        remove(small, heads, {heads[0].name: [0]})
    small.save_pretrained(tmp_path)
    again = load_removed(transformers.AutoModelForCausalLM, tmp_path)
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )
    with pytest.raises(RuntimeError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["gpt_neox", "gptj"])
def test_fused_and_rotary_heads_are_removed_whole_and_reload_by_the_record(name, tmp_path):
    """GPT-NeoX's query_key_value holds each head's q, k, v as one run of rows; GPT-J rotates
    part of each head's features. Removing head 2 of every layer cuts exactly its rows and its
    output-map columns, and the model reloads from the record."""
    model = BUILDERS[name]()
    groups = find_groups(model, "heads")
    assert [g.size for g in groups] == [4, 4]
    small = remove(model, groups, {g.name: [2] for g in groups}, hf_config="record")
    attention = "gpt_neox.layers.0.attention" if name == "gpt_neox" else "transformer.h.0.attn"
    before, after = model.get_submodule(attention), small.get_submodule(attention)
    if name == "gpt_neox":
        kept = [r for r in range(96) if not 48 <= r < 72]  # head 2: rows 2·24 … 3·24 − 1
        torch.testing.assert_close(
            after.query_key_value.weight, before.query_key_value.weight[kept], rtol=0, atol=0
        )
        output = after.dense
    else:
        kept = [r for r in range(32) if not 16 <= r < 24]
        torch.testing.assert_close(after.k_proj.weight, before.k_proj.weight[kept], rtol=0, atol=0)
        output = after.out_proj
    columns = [c for c in range(32) if not 16 <= c < 24]
    reference = (before.dense if name == "gpt_neox" else before.out_proj).weight[:, columns]
    torch.testing.assert_close(output.weight, reference, rtol=0, atol=0)
    small.save_pretrained(tmp_path)
    again = load_removed(transformers.AutoModelForCausalLM, tmp_path)
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )


@pytest.mark.parametrize("name, kind", [("gpt_neox", "neurons"), ("mixtral", "experts")])
def test_the_record_route_reloads_models_saved_in_a_legacy_layout(name, kind, tmp_path):
    """save_pretrained writes GPT-NeoX's head as embed_out and Mixtral's fused experts as one
    tensor per expert; load_removed goes through from_pretrained, which converts them back."""
    model = {**BUILDERS, **models.MOE_MODELS}[name]()
    groups = find_groups(model, kind)
    small = remove(model, groups, {groups[0].name: [1]}, hf_config="record")  # one layer only
    small.save_pretrained(tmp_path)
    again = load_removed(  # float64 experts need the eager kernel, not grouped_mm
        transformers.AutoModelForCausalLM, tmp_path, experts_implementation="eager"
    )
    assert type(again) is type(small) and again.dtype == torch.float64
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "layout, groups, rows, kept_heads",
    [
        ("multi_query", 4, [r for r in range(48) if not 8 <= r < 16], 3),  # k, v rows stay
        ("per_head", 4, [r for r in range(96) if not 24 <= r < 48], 3),
        ("grouped", 2, [r for r in range(64) if not 32 <= r < 64], 2),  # q, q, k, v of group 1
    ],
)
def test_falcon_heads_follow_each_layout_of_its_fused_projection(
    layout, groups, rows, kept_heads, tmp_path
):
    model = models.falcon(layout)
    found = find_groups(model, "heads")
    assert [g.size for g in found] == [groups, groups]
    small = remove(model, found, {g.name: [1] for g in found}, hf_config="record")
    before = model.transformer.h[0].self_attention
    after = small.transformer.h[0].self_attention
    torch.testing.assert_close(
        after.query_key_value.weight, before.query_key_value.weight[rows], rtol=0, atol=0
    )
    assert after.num_heads == kept_heads and after.dense.in_features == kept_heads * 8
    small.save_pretrained(tmp_path)
    again = load_removed(transformers.AutoModelForCausalLM, tmp_path)
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )


@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode_heads_follow_its_fused_layout(multi_query, tmp_path):
    model = models.gpt_bigcode(multi_query)
    found = find_groups(model, "heads")
    small = remove(model, found, {g.name: [1] for g in found}, hf_config="record")
    before, after = model.transformer.h[0].attn, small.transformer.h[0].attn
    kept = (
        [r for r in range(48) if not 8 <= r < 16]  # query head 1; the shared k, v rows stay
        if multi_query
        else [r for r in range(96) if not 24 <= r < 48]
    )
    torch.testing.assert_close(after.c_attn.weight, before.c_attn.weight[kept], rtol=0, atol=0)
    assert (after.num_heads, after.embed_dim, after.c_proj.in_features) == (3, 24, 24)
    small.save_pretrained(tmp_path)
    again = load_removed(transformers.AutoModelForCausalLM, tmp_path)
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )


def test_a_config_whose_model_derives_another_size_is_refused_before_anything_changes(tmp_path):
    """StableLM's config has head_dim, but its attention derives the head size from
    hidden_size / num_attention_heads: the updated config would build other shapes."""
    model = models.stablelm()
    before = _state(model)
    heads = find_groups(model, "heads")
    with pytest.raises(ValueError, match="built from the updated config .* would not reload"):
        remove(model, heads, {g.name: [0] for g in heads}, inplace=True)
    assert _same_state(_state(model), before)
    small = remove(model, heads, {g.name: [0] for g in heads}, hf_config="record")
    small.save_pretrained(tmp_path)
    again = load_removed(transformers.AutoModelForCausalLM, tmp_path)
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )


def test_norms_with_parameters_per_head_are_refused():
    """StableLM's qk_layernorm holds one LayerNorm per head, paired with the heads by position."""
    with pytest.raises(TypeError, match="q_layernorm .* holds parameters of its own per head"):
        find_groups(models.stablelm(qk_layernorm=True), "heads")


def test_xglm_heads_keep_the_width_its_forward_reshapes_by():
    """XGLM reshapes its heads' outputs by its own embed_dim (float32: its masks overflow in
    float64)."""
    config = transformers.XGLMConfig(
        vocab_size=models.VOCAB, d_model=32, num_layers=2, attention_heads=4, ffn_dim=40,
        max_position_embeddings=models.SEQ,
    )  # fmt: skip
    model = models._perturbed(transformers.XGLMForCausalLM(config)).float()
    groups = find_groups(model, "heads")
    removed = {g.name: [1, 3] for g in groups}
    small = remove(model, groups, removed, hf_config="record")
    assert small.model.layers[0].self_attn.embed_dim == 16
    batch = models.token_batch()
    torch.testing.assert_close(
        models.logits(small, batch), models.logits(_masked(model, groups, removed), batch)
    )


VISION = {
    "vit": ("ViTConfig", "ViTForImageClassification"),
    "deit": ("DeiTConfig", "DeiTForImageClassification"),
    "beit": ("BeitConfig", "BeitForImageClassification"),
}


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_transformer_heads_are_removed_and_reload_with_from_pretrained(name, tmp_path):
    """ViT, DeiT and BEiT: q/k/v/o_proj heads with num_attention_heads, head_dim read from the
    config when it has one, so a uniform removal reloads without the record."""
    config_class, model_class = (getattr(transformers, n) for n in VISION[name])
    config = config_class(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        image_size=8, patch_size=4, num_labels=3,
    )  # fmt: skip
    model = models._perturbed(model_class(config))
    generator = torch.Generator().manual_seed(0)
    pixels = {"pixel_values": torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)}

    def logits(m):
        with torch.no_grad():
            return m(**pixels).logits

    groups = find_groups(model, "heads")
    assert [g.size for g in groups] == [4, 4]
    removed = {g.name: [1 + i] for i, g in enumerate(groups)}
    small = remove(model, groups, removed, hf_config="record")
    torch.testing.assert_close(
        logits(small), logits(_masked(model, groups, removed)), rtol=0, atol=1e-10
    )
    uniform = remove(model, groups, {g.name: [2] for g in groups})
    assert uniform.config.num_attention_heads == 3
    uniform.save_pretrained(tmp_path)
    again = model_class.from_pretrained(tmp_path, dtype=torch.float64).eval()
    # DeiT's logits move by an ulp from one process's memory layout to another's.
    torch.testing.assert_close(logits(again), logits(uniform), rtol=0, atol=1e-12)


def test_alibi_heads_are_refused():
    config = transformers.FalconConfig(
        vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        alibi=True,
    )  # fmt: skip
    with pytest.raises(TypeError, match="ALiBi attention"):
        find_groups(transformers.FalconForCausalLM(config), "heads")
    mpt = transformers.MptForCausalLM(
        transformers.MptConfig(vocab_size=models.VOCAB, d_model=32, n_layers=1, n_heads=4)
    )
    for model in (models.bloom(), mpt):  # layouts not covered, named by the reason
        with pytest.raises(ValueError, match="no removable heads \\(its attention adds ALiBi"):
            find_groups(model, "heads")


def test_load_removed_refuses_a_folder_without_a_record_or_with_other_weights(tmp_path):
    model = models.gpt2()
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="records no removal"):
        load_removed(transformers.AutoModelForCausalLM, tmp_path / "plain")
    groups = find_groups(model, "neurons")
    small = remove(model, groups, {groups[0].name: [1]}, hf_config="record")
    small.config.lossprune_removed = [{"kinds": ["neurons"], "removed": {groups[0].name: [1, 2]}}]
    small.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="do not match the replayed removal"):
        load_removed(transformers.AutoModelForCausalLM, tmp_path / "wrong")


def _router_masked_logits(model, groups, removed, batch):
    """The dense MoE model whose routers never pick the removed experts (logits -inf)."""
    rows = {id(model.get_submodule(f"{g.name}.gate").weight): removed[g.name] for g in groups}

    def linear(x, weight, bias=None):
        out = torch.nn.functional.linear(x, weight, bias)
        if id(weight) in rows:
            out = out.clone()
            out[..., rows[id(weight)]] = float("-inf")
        return out

    router = model.get_submodule(f"{groups[0].name}.gate")
    module = importlib.import_module(type(router).__module__)
    functional = types.SimpleNamespace(**vars(torch.nn.functional))
    functional.linear = linear
    with mock.patch.object(module, "F", functional):
        return models.logits(model, batch)


@pytest.mark.parametrize("name", list(models.MOE_MODELS))
def test_removing_experts_equals_routing_around_them_and_reloads(name, tmp_path):
    model = models.MOE_MODELS[name]()
    groups = find_groups(model, "experts")
    removed = {g.name: [1 + i] for i, g in enumerate(groups)}
    small = remove(model, groups, removed)
    batch = models.token_batch()
    expected = _router_masked_logits(model, groups, removed, batch)
    torch.testing.assert_close(models.logits(small, batch), expected, rtol=0, atol=1e-10)
    assert small.get_submodule(f"{groups[0].name}.experts").num_experts == 3
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, experts_implementation="eager"
    )
    torch.testing.assert_close(
        models.logits(again, batch), models.logits(small, batch), rtol=0, atol=0
    )


def test_fewer_experts_than_the_router_picks_are_refused():
    model = models.mixtral()
    before = _state(model)
    groups = find_groups(model, "experts")
    with pytest.raises(ValueError, match="router picks 2 per token"):
        remove(model, groups, {groups[0].name: [0, 1, 2]}, inplace=True)
    assert _same_state(_state(model), before)


def test_bad_removals_are_refused_before_anything_changes():
    model = models.opt()
    before = _state(model)
    groups = find_groups(model, "neurons")
    name = groups[0].name
    with pytest.raises(ValueError, match="not a group set"):
        remove(model, groups, {"nowhere": [0]}, inplace=True)
    with pytest.raises(ValueError, match="distinct group indices"):
        remove(model, groups, {name: [0, 0]}, inplace=True)
    with pytest.raises(ValueError, match="distinct group indices"):
        remove(model, groups, {name: [40]}, inplace=True)
    with pytest.raises(ValueError, match="removes all 40 groups"):
        remove(model, groups, {name: list(range(40))}, inplace=True)
    with pytest.raises(TypeError, match="must hold ints"):
        remove(model, groups, {name: [0.5]}, inplace=True)
    with pytest.raises(ValueError, match="hf_config must be one of"):
        remove(model, groups, {name: [0]}, hf_config="ignore")
    assert _same_state(_state(model), before)


def test_a_tied_tensor_is_never_cut():
    model = models.opt()
    groups = find_groups(model, "neurons")
    layer = model.model.decoder.layers
    layer[1].fc1.weight = layer[0].fc1.weight  # a tie the finder could not know about
    with pytest.raises(TypeError, match="is tied to"):
        remove(model, groups, {groups[0].name: [0]})


def test_find_groups_refuses_unknown_kinds_and_absent_groups():
    with pytest.raises(ValueError, match="kinds must be among"):
        find_groups(models.gpt2(), "rows")
    with pytest.raises(ValueError, match="has no removable experts"):
        find_groups(models.gpt2(), "experts")
    with pytest.raises(ValueError, match="pass example_inputs"):
        find_groups(models.resnet(), "channels")


def test_shapes_that_contradict_a_layout_are_refused():
    model = models.llama()
    attention = model.model.layers[0].self_attn
    attention.head_dim = 5  # 24 key rows are no whole number of 5-wide heads
    with pytest.raises(TypeError, match="do not match head_dim"):
        find_groups(model, "heads")


def test_the_parameters_one_group_owns_add_up_when_sets_do_not_share_tensors():
    model = models.llama()
    groups = find_groups(model, ["heads", "neurons"])
    removed = {g.name: [0] for g in groups}
    per_group = sum(g.parameters_per_group(model) for g in groups)
    assert parameters_removed(model, groups, removed) == per_group
    small = remove(model, groups, removed)
    assert parameter_count(model) - parameter_count(small) == per_group
