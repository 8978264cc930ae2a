"""Group scores at the network's scale against brute force, and the pruner's refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lossprune import OBD, Magnitude, QuadraticModel, SynFlow, Wanda
from lossprune.curvature import Statistic, compute_statistics
from lossprune.structured import (
    GroupOBS,
    GroupQuadratic,
    StructuredPruner,
    find_groups,
    group_scores,
)

from . import models


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def _data():
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(16, 4, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=generator),
    )


def test_quadratic_model_scores_a_neuron_as_one_step():
    model, data = _mlp(), _data()
    (neurons,) = find_groups(model, "channels", example_inputs=data[0])
    criterion = QuadraticModel(lam=0.1)
    got = group_scores(model, [neurons], criterion, data, loss_fn=nn.CrossEntropyLoss())["0"]
    params = dict(model.named_parameters())
    statistics = compute_statistics(
        model, params, data, nn.CrossEntropyLoss(), [Statistic("fisher")]
    )
    fisher = statistics[Statistic("fisher")]
    for i in range(5):
        entries = [("0.weight", (i, slice(None))), ("0.bias", (i,)), ("2.weight", (slice(None), i))]
        change = sum(
            (
                -statistics.grad[k][ix] * params[k][ix] + 0.5 * fisher[k][ix] * params[k][ix] ** 2
            ).sum()
            for k, ix in entries
        )
        squares = sum(params[k][ix].square().sum() for k, ix in entries)
        assert float(got[i]) == pytest.approx(float(change.abs() + 0.05 * squares), rel=1e-10)


def test_magnitude_and_obd_are_sums_over_every_entry_of_the_group():
    model = models.llama()
    groups = find_groups(model, "heads")
    scores = group_scores(model, groups, Magnitude())
    attention = model.model.layers[0].self_attn
    head_dim, ratio = attention.head_dim, attention.num_key_value_groups
    q = slice(ratio * head_dim, 2 * ratio * head_dim)
    kv = slice(head_dim, 2 * head_dim)
    entries = [
        attention.q_proj.weight[q], attention.q_proj.bias[q], attention.k_proj.weight[kv],
        attention.k_proj.bias[kv], attention.v_proj.weight[kv], attention.v_proj.bias[kv],
        attention.o_proj.weight[:, q],
    ]  # fmt: skip
    expected = 0.5 * sum(float(e.square().sum()) for e in entries)
    assert float(scores[groups[0].name][1]) == pytest.approx(expected, rel=1e-12)


def test_group_quadratic_is_the_exact_second_order_change_of_removing_a_group():
    model, data = _mlp(), _data()
    (neurons,) = find_groups(model, "channels", example_inputs=data[0])
    loss_fn = nn.CrossEntropyLoss()
    got = GroupQuadratic(curvature="hessian", chunk=2).scores(model, [neurons], data, loss_fn)["0"]
    names = list(dict(model.named_parameters()))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss(vector):
        chunks, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            chunks[name] = vector[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return loss_fn(torch.func.functional_call(model, chunks, (data[0],)), data[1])

    gradient = torch.func.grad(loss)(flat)
    hessian = torch.func.hessian(loss)(flat)
    for i in range(5):
        step = torch.zeros_like(flat)
        masks = dict.fromkeys(names)
        offset = 0
        for name, shape in zip(names, shapes, strict=True):
            mask = torch.zeros(shape, dtype=torch.bool)
            if name == "0.weight":
                mask[i] = True
            elif name == "0.bias":
                mask[i] = True
            elif name == "2.weight":
                mask[:, i] = True
            masks[name] = mask
            step[offset : offset + shape.numel()][mask.reshape(-1)] = -flat[
                offset : offset + shape.numel()
            ][mask.reshape(-1)]
            offset += shape.numel()
        expected = abs(float(gradient @ step + 0.5 * step @ hessian @ step))
        assert float(got[i]) == pytest.approx(expected, rel=1e-9)


def test_synflow_has_no_group_form_and_wanda_scores_weight_matrices():
    model, data = _mlp(), _data()
    groups = find_groups(model, "channels", example_inputs=data[0])
    with pytest.raises(TypeError, match="SynFlow"):
        group_scores(model, groups, SynFlow())
    scores = group_scores(model, groups, Wanda(), data, loss_fn=nn.CrossEntropyLoss())["0"]
    assert scores.shape == (5,) and bool((scores > 0).all())
    assert group_scores(model, groups, OBD(), data, loss_fn=nn.CrossEntropyLoss())["0"].shape == (
        5,
    )


def test_the_pruner_refuses_bad_requests_before_anything_changes():
    model = models.gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [
        {
            "input_ids": torch.zeros(2, 4, dtype=torch.long),
            "labels": torch.zeros(2, 4, dtype=torch.long),
        }
    ]
    with pytest.raises(ValueError, match="cannot express removing heads"):
        StructuredPruner(model, "heads", 0.25, data=data, inplace=True)
    with pytest.raises(ValueError, match="need data"):
        StructuredPruner(model, "neurons", 0.25)
    with pytest.raises(TypeError, match="choice must be"):
        StructuredPruner(model, "neurons", 0.25, choice="magnitude", data=data)
    with pytest.raises(ValueError, match="amount must satisfy"):
        StructuredPruner(model, "neurons", 1.0, data=data)
    with pytest.raises(TypeError, match="amount must be a fraction or a Schedule"):
        StructuredPruner(model, "neurons", "half", data=data)
    with pytest.raises(ValueError, match="matches no group set"):
        StructuredPruner(model, "neurons", 0.25, data=data, include="decoder")
    with pytest.raises(TypeError, match="model must be"):
        StructuredPruner("gpt2", "neurons", 0.25, data=data)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        StructuredPruner(model, "neurons", 0.25, data=data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_experts_are_removed_alone_and_in_one_stage():
    model = models.mixtral()
    data = [
        {
            "input_ids": torch.zeros(2, 4, dtype=torch.long),
            "labels": torch.zeros(2, 4, dtype=torch.long),
        }
    ]
    with pytest.raises(ValueError, match="experts are removed in one stage and on their own"):
        StructuredPruner(model, ["experts", "heads"], 0.25, data=data)
    with pytest.raises(ValueError, match="has no consumer"):
        StructuredPruner(model, "experts", 0.25, choice=GroupOBS(), data=data).run()
    report = StructuredPruner(model, "experts", 0.25, refit=False).run()
    assert report.model.config.num_local_experts == 3
