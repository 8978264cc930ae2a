"""Mixture-of-experts models: fused experts are pruned per expert matrix, routers stay dense.

Six transformers 5 families (tests/moe_models.py). Numbers in float64 against brute force: the
statistics every criterion reads (gradient, exact Fisher/GGN diagonal, Hessian-vector products,
SynFlow's flow gradient) and Wanda's per-expert input norms from a per-token loop.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossprune import (
    NM,
    OBD,
    Blocks,
    GraSP,
    LayerCollapseError,
    LinearModel,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
    SynFlow,
    Wanda,
    scores,
)
from lossprune.curvature import Statistic, compute_statistics, ggn_vp, hvp
from lossprune.curvature.expert_inputs import expert_input_sums
from lossprune.curvature.inputs import InputStatistics
from lossprune.selection import describe_prunable, is_nm, prunable_parameters, select_masks
from tests.moe_models import (
    EXPERTS,
    FAMILIES,
    HIDDEN,
    INTER,
    experts_of,
    tiny_moe,
    token_batch,
)
from tests.test_transformers_core import close, reference_ggn, reference_loss

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"


# --- what is pruned ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_pruned_per_matrix_and_routers_stay_dense(family):
    model = tiny_moe(family)
    rows = {row.name: row for row in describe_prunable(model).rows}
    assert rows[GATE_UP].pruned and rows[DOWN].pruned
    assert "one matrix per expert" in rows[GATE_UP].reason
    router = "model.layers.0.mlp.router.weight" if family == "gpt_oss" else (
        "model.layers.0.mlp.gate.weight"
    )  # fmt: skip
    assert not rows[router].pruned and "router or gate" in rows[router].reason
    if family == "qwen2_moe":
        gate = rows["model.layers.0.mlp.shared_expert_gate.weight"]
        assert not gate.pruned and "router or gate" in gate.reason
        assert rows["model.layers.0.mlp.shared_expert.gate_proj.weight"].pruned
    # "50%" prunes half of every prunable weight, the experts' included.
    params = prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.5, 1))
    pruner.run()
    assert pruner.num_pruned() == round(0.5 * total)
    assert experts_of(model).gate_up_proj.numel() + experts_of(model).down_proj.numel() < total
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert zeros == round(0.5 * total)


def test_the_router_comes_back_with_include():
    model = tiny_moe("mixtral")
    names = prunable_parameters(model, include=[r".*experts\..*", r".*mlp\.gate\.weight"])
    assert list(names) == ["model.layers.0.mlp.gate.weight", GATE_UP, DOWN]


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_criterion_and_structure_runs_on_the_experts(family):
    model = tiny_moe(family)
    batch = token_batch()
    for criterion in (Magnitude(), LinearModel(1e-3), QuadraticModel(1e-3), OBD(), GraSP(),
                      SynFlow(), Wanda()):  # fmt: skip
        result = scores(model, criterion, batch)
        assert result[GATE_UP].shape == experts_of(model).gate_up_proj.shape
        assert all(torch.isfinite(s).all() for s in result.values()), criterion
        # numbers, not functions of the parameters left out (GPT-OSS's expert biases)
        assert not any(s.requires_grad for s in result.values()), criterion
    Pruner(tiny_moe(family), QuadraticModel(1e-3), LinearSchedule(0.5, 1), data=batch).run()
    for scope in ("global", "layerwise", NM(2, 4), Blocks(2, 4, "layerwise")):
        model = tiny_moe(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random tiny models may disconnect units
            Pruner(model, Wanda(), LinearSchedule(0.5, 2), data=batch, scope=scope).run()
        for name in (GATE_UP, DOWN):
            weight = model.get_parameter(name)
            assert int((weight == 0).sum()) == weight.numel() // 2 or scope == "global"


# --- numbers: float64 against brute force ------------------------------------------------------


def _params(model, names=(GATE_UP, DOWN, "model.layers.0.self_attn.q_proj.weight")):
    return {k: model.get_parameter(k).detach() for k in names}


def _loss(model, params, batch):
    """The token-mean loss in float64 (the model's own upcasts its logits to float32)."""
    return reference_loss(model, params, batch)


@pytest.mark.filterwarnings("ignore:the exact Fisher:RuntimeWarning")
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_gradient_fisher_and_hessian_products_of_the_experts_match_brute_force(family):
    model = tiny_moe(family)
    params = _params(model)
    batch = token_batch()
    stats = compute_statistics(model, params, batch, None, [Statistic("fisher")])
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    grad = torch.autograd.grad(_loss(model, leaves, batch), list(leaves.values()))
    close(stats.grad, dict(zip(params, grad, strict=True)))
    # The exact Fisher/GGN diagonal: J^T H J per sequence, the softmax Hessian per token.
    mask = torch.ones_like(batch["labels"])
    ggn = reference_ggn(model, params, {**batch, "attention_mask": mask})
    offsets = [0, *torch.tensor([p.numel() for p in params.values()]).cumsum(0).tolist()]
    diagonal = ggn.diagonal()
    for (name, p), start, end in zip(params.items(), offsets, offsets[1:], strict=False):
        torch.testing.assert_close(stats[Statistic("fisher")][name], diagonal[start:end].view_as(p))
    # Hessian-vector products (GraSP's Hg) against double backward through the eager experts.
    vectors = {k: torch.randn(2, *p.shape, dtype=p.dtype) for k, p in params.items()}
    _, _, products = hvp(model, params, batch, None, vectors)
    loss = _loss(model, leaves, batch)
    with sdpa_kernel(SDPBackend.MATH):
        first = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    for row in range(2):
        dot = sum((g * vectors[k][row]).sum() for k, g in zip(params, first, strict=True))
        second = torch.autograd.grad(dot, list(leaves.values()), retain_graph=True)
        for name, expected in zip(params, second, strict=True):
            torch.testing.assert_close(products[name][row], expected)


def test_synflow_names_the_dtype_a_kernel_refuses():
    """The default experts kernel (grouped_mm) has no float64: SynFlow's float64 forward pass
    fails with the fix named, and runs in the model's own float32."""
    model = tiny_moe("mixtral", dtype=torch.float32)
    model.set_experts_implementation("grouped_mm")
    batch = token_batch()
    with pytest.raises(TypeError, match=r"pass SynFlow\(dtype=torch.float32\)"):
        scores(model, SynFlow(), batch)
    result = scores(model, SynFlow(dtype=torch.float32), batch)
    assert result[GATE_UP].abs().sum() > 0


def test_gauss_newton_products_through_the_grouped_mm_experts_take_reverse_mode():
    """grouped_mm has no forward-mode rule: the products fall back to reverse mode alone and
    equal those of the same model with the eager experts (float32: grouped_mm has no
    float64)."""
    model = tiny_moe("mixtral", dtype=torch.float32)
    params = _params(model)
    vectors = {k: torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(1))
               for k, p in params.items()}  # fmt: skip
    batch = token_batch()
    model.set_experts_implementation("eager")
    expected = ggn_vp(model, params, batch, None, vectors).products
    model.set_experts_implementation("grouped_mm")
    got = ggn_vp(model, params, batch, None, vectors).products
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)


def test_synflow_on_the_experts_matches_its_definition():
    model = tiny_moe("qwen2_moe")
    batch = token_batch(2, 5)
    result = scores(model, SynFlow(), batch)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    absolute = {k: v.detach().abs() if v.is_floating_point() else v for k, v in tensors.items()}
    prunable = {k: absolute[k].clone().requires_grad_(True) for k in result}
    ones = torch.ones(1, 5, HIDDEN, dtype=torch.float64)
    logits = functional_call(model, {**absolute, **prunable}, (), {"inputs_embeds": ones}).logits
    grads = torch.autograd.grad(logits.sum(), list(prunable.values()))
    for (name, leaf), g in zip(prunable.items(), grads, strict=True):
        torch.testing.assert_close(result[name], leaf.detach() * g)


def _routed_inputs(model, batch):
    """The experts module's (hidden_states, top_k_index) of one forward pass."""
    seen = []
    handle = experts_of(model).register_forward_pre_hook(lambda _, args: seen.append(args[:2]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen[0]


def _gated(family, experts, x, e):
    """Expert e's hidden units for one token, written out per family."""
    if family == "gpt_oss":  # transposed, bias, interleaved gate/up columns, clamped GLU
        both = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        limit = experts.limit
        gate, up = both[::2].clamp(max=limit), both[1::2].clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = (experts.gate_up_proj[e] @ x).chunk(2)
    return torch.nn.functional.silu(gate) * up


def _brute_force_sums(family, experts, hidden, index, counted):
    """Per token, per expert it is routed to: x² into the expert's sum, h² into down_proj's."""
    x_sq = torch.zeros(EXPERTS, HIDDEN, dtype=torch.float64)
    h_sq = torch.zeros(EXPERTS, INTER, dtype=torch.float64)
    rows = torch.zeros(EXPERTS, dtype=torch.long)
    with torch.no_grad():
        for t in range(hidden.shape[0]):
            if not counted[t]:
                continue
            for e in index[t].tolist():
                x_sq[e] += hidden[t].square()
                h_sq[e] += _gated(family, experts, hidden[t], e).square()
                rows[e] += 1
    return x_sq, h_sq, rows


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_wanda_input_norms_of_each_expert_are_those_of_its_routed_tokens(family):
    model = tiny_moe(family)
    batch = token_batch(3, 6, seed=1)
    hidden, index = _routed_inputs(model, batch)
    experts = experts_of(model)
    every = torch.ones(hidden.shape[0], dtype=torch.bool)
    x_sq, h_sq, rows = _brute_force_sums(family, experts, hidden, index, every)
    assert (rows > 0).sum() >= 2  # several experts were routed to
    params = _params(model, (GATE_UP, DOWN))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    statistics = InputStatistics(model, params, dtype=torch.float64)
    with statistics.recording():
        model(**inputs)
    norms = {k: m.sq_norms for k, m in statistics.means().items()}
    transposed = family == "gpt_oss"

    def shaped(sums):
        return sums[:, :, None] if transposed else sums[:, None, :]

    # A mean per expert, over the tokens routed to it (0 for an expert no token reached).
    per_expert = rows.clamp(min=1).to(torch.float64)[:, None]
    torch.testing.assert_close(norms[GATE_UP], shaped(x_sq / per_expert))
    torch.testing.assert_close(norms[DOWN], shaped(h_sq / per_expert))
    with pytest.raises(TypeError, match="no Gram matrix for the fused experts"):
        InputStatistics(model, params, gram=True)
    # Counted tokens only (padding left out), with each expert's number of tokens.
    counted = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(0)) < 0.6
    x_sq, h_sq, rows = _brute_force_sums(family, experts, hidden, index, counted)
    found = expert_input_sums(experts, (hidden, index, None), {}, ["gate_up_proj", "down_proj"],
                              torch.float64, counted=counted.reshape(3, 6))  # fmt: skip
    torch.testing.assert_close(found["gate_up_proj"].sq_sums, shaped(x_sq))
    torch.testing.assert_close(found["down_proj"].sq_sums, shaped(h_sq))
    assert torch.equal(found["down_proj"].rows, rows)
    with pytest.raises(TypeError, match="5 counted positions for the 18 tokens"):
        expert_input_sums(experts, (hidden, index, None), {}, ["down_proj"], torch.float64,
                          counted=counted[:5])  # fmt: skip


# --- structures per expert matrix ---------------------------------------------------------------


def test_layerwise_nm_and_blocks_treat_every_expert_matrix_as_a_layer():
    batch = token_batch()
    model = tiny_moe("mixtral")
    magnitude = {k: p.detach().abs() for k, p in prunable_parameters(model).items()}
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.3, 1), scope="layerwise")
    pruner.run()
    for name in (GATE_UP, DOWN):
        for e in range(EXPERTS):  # brute force: the round(0.3 n) smallest of each expert matrix
            piece = magnitude[name][e]
            expected = select_masks({"w": piece}, {"w": torch.ones_like(piece, dtype=torch.bool)},
                                    sparsity=0.3, scope="layerwise")["w"]  # fmt: skip
            assert torch.equal(pruner.masks[name][e], expected)
            assert int((~pruner.masks[name][e]).sum()) == round(0.3 * piece.numel())

    model = tiny_moe("gpt_oss")  # transposed: the input dimension is dim 1 of (E, in, out)
    pruner = Pruner(model, Wanda(), LinearSchedule(0.5, 1), data=batch, scope=NM(2, 4))
    pruner.run()
    assert is_nm(pruner.masks[GATE_UP], 2, 4, dim=1) and is_nm(pruner.masks[DOWN], 2, 4, dim=1)

    model = tiny_moe("mixtral")
    pruner = Pruner(model, QuadraticModel(), LinearSchedule(0.5, 1), data=batch,
                    scope=Blocks(2, 4, scope="layerwise"))  # fmt: skip
    pruner.run()
    for name in (GATE_UP, DOWN):
        for e in range(EXPERTS):
            rows, columns = pruner.masks[name][e].shape
            tiles = pruner.masks[name][e].reshape(rows // 2, 2, columns // 4, 4)
            per_tile = tiles.permute(0, 2, 1, 3).reshape(-1, 8).sum(-1)
            assert set(per_tile.tolist()) <= {0, 8}  # whole tiles, inside one expert
            assert int((per_tile == 0).sum()) == round(0.5 * per_tile.numel())


def test_tiles_that_would_span_two_experts_are_refused():
    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # down_proj is (4, 8, 4): 8 rows per expert, 32 stacked; 16-row tiles divide 32, not 8.
    with pytest.raises(ValueError, match=r"down_proj\[0\]'.*does not divide into 16 x 4 tiles"):
        Pruner(model, Magnitude(), LinearSchedule(0.5, 1), scope=Blocks(16, 4),
               include=[DOWN])  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_min_density_and_collapse_count_each_expert_matrix():
    model = tiny_moe("mixtral")
    with torch.no_grad():  # expert 0's down_proj is tiny: a global ranking would empty it
        experts_of(model).down_proj[0].mul_(1e-6)
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.3, 1), include=[DOWN], min_density=0.5)
    pruner.run()
    kept = pruner.masks[DOWN].flatten(1).sum(1)
    assert kept.min() == math.ceil(0.5 * HIDDEN * INTER)

    model = tiny_moe("mixtral")
    with torch.no_grad():
        experts_of(model).down_proj[0].mul_(1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, Magnitude(), LinearSchedule(0.3, 1), include=[DOWN],
                    on_collapse="raise")  # fmt: skip
    with pytest.raises(LayerCollapseError, match=r"down_proj\[0\]"):
        pruner.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_experts_called_another_way_are_refused_by_wanda():
    model = tiny_moe("mixtral")
    block = model.model.layers[0].mlp
    original = block.experts.forward

    def weights_first(hidden_states, top_k_weights, top_k_index):  # another calling convention
        return original(hidden_states, top_k_index, top_k_weights)

    def block_forward(hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, index = block.gate(flat)
        return block.experts(flat, weights, index).reshape(hidden_states.shape)

    block.experts.forward = weights_first
    block.forward = block_forward
    model(**token_batch())  # the model itself runs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="not called as .*hidden_states, top_k_index.*Magnitude"):
        scores(model, Wanda(), token_batch())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
