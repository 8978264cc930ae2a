"""Channels found by tracing: batch norms, residual additions, concatenations, flattens and
depthwise convolutions follow the channel; anything without a rule keeps its channels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lossprune.structured import (
    find_groups,
    masked_state,
    parameter_count,
    parameters_removed,
    remove,
    trace_channels,
)

from .models import resnet


def _inputs(batch=3):
    return torch.randn(batch, 1, 8, 8, dtype=torch.float64)


def _masked_outputs(model, groups, removed, x):
    reference = copy.deepcopy(model)
    reference.load_state_dict(masked_state(reference, groups, removed), strict=False)
    with torch.no_grad():
        return reference(x)


def test_the_residual_network_is_cut_along_its_data_flow():
    model = resnet()
    trace = trace_channels(model, _inputs())
    by_name = {g.name: g for g in trace.groups}
    # The stem's channels run through both stage-1 blocks' additions (one residual stream).
    stream = {s.tensor for s in by_name["stem.0"].slices}
    assert {
        "stage1.0.conv2.weight",
        "stage1.1.bn2.running_var",
        "stage2.shortcut.0.weight",
    } <= stream
    assert {c.module for c in by_name["stem.0"].consumers} == {
        "stage1.0.conv1", "stage1.1.conv1", "stage2.conv1", "stage2.shortcut.0"
    }  # fmt: skip
    # Stage 2's output runs through the depthwise convolution into the head, spread over 2x2.
    head_columns = dict(by_name["stage2.conv2"].consumers)["head"]
    assert head_columns.tolist()[1] == [4, 5, 6, 7]
    # The concatenated side branch comes after the 8 depthwise channels: columns 32 + 4c + ...
    assert dict(by_name["side"].consumers)["head"].tolist()[0] == [32, 33, 34, 35]
    assert trace.blocked == {"head": "it reaches the model's output"}


def test_removed_channels_equal_the_masked_dense_network():
    model = resnet()
    x = _inputs()
    groups = find_groups(model, "channels", example_inputs=x)
    generator = torch.Generator().manual_seed(0)
    removed = {
        g.name: torch.randperm(g.size, generator=generator)[: g.size // 2].tolist() for g in groups
    }
    small = remove(model, groups, removed)
    with torch.no_grad():
        out = small(x)
    torch.testing.assert_close(out, _masked_outputs(model, groups, removed, x), rtol=0, atol=1e-10)
    saved = parameters_removed(model, groups, removed)
    assert parameter_count(model) - parameter_count(small) == saved
    assert small.stage2.conv2.out_channels == 4 and small.stage2.bn2.num_features == 4
    assert small.depthwise.groups == small.depthwise.in_channels == 4
    assert small.head.in_features == (4 + 2) * 4


class _InputResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.inner = nn.Conv2d(3, 5, 1)
        self.out = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.inner(self.conv(x) + x)))


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        sorted_a = torch.sort(self.a(x), dim=1).values  # mixes channels: no rule
        ratio = self.b(x) / 2.0  # division is not elementwise-safe under masking
        normed = nn.functional.group_norm(self.c(x), 2)
        return self.head(torch.cat([sorted_a, ratio, normed], dim=1))


def test_channels_without_a_rule_stay_and_say_why():
    trace = trace_channels(_InputResidual(), torch.randn(1, 3, 4, 4))
    assert [g.name for g in trace.groups] == ["inner"]
    assert "cannot be removed" in trace.blocked["conv"] or "stay" in trace.blocked["conv"]
    trace = trace_channels(_Unknown(), torch.randn(1, 3, 4, 4))
    assert not trace.groups
    assert "sort" in trace.blocked["a"]
    assert "truediv" in trace.blocked["b"]
    assert "group_norm" in trace.blocked["c"]


def test_a_sequential_mlp_is_cut_into_neurons_by_the_same_tracer():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 2))
    model = model.double()
    x = torch.randn(4, 5, dtype=torch.float64)
    groups = find_groups(model, "channels", example_inputs=x)
    assert [(g.name, g.size) for g in groups] == [("0", 7), ("2", 6)]
    removed = {"0": [1, 4], "2": [0]}
    small = remove(model, groups, removed)
    torch.testing.assert_close(
        small(x), _masked_outputs(model, groups, removed, x), rtol=0, atol=1e-12
    )
    assert [m.weight.shape for m in small if isinstance(m, nn.Linear)] == [(5, 5), (5, 5), (2, 5)]


class _Branching(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_a_model_torch_fx_cannot_trace_is_refused():
    with pytest.raises(TypeError, match="cannot trace"):
        find_groups(_Branching(), "channels", example_inputs=torch.randn(1, 2))
