"""Property-based: random small MLPs/CNNs, sparsities and schedules keep every invariant."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lossprune import (
    OBD,
    ExponentialSchedule,
    LinearModel,
    LinearSchedule,
    Magnitude,
    Pruner,
    QuadraticModel,
)

CRITERIA = [Magnitude(), LinearModel(1e-3), QuadraticModel(1e-2), OBD(1.0)]


@st.composite
def networks(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    classes = draw(st.integers(2, 4))
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
        layers, previous = [], 3
        for width in widths:
            layers += [nn.Linear(previous, width), nn.Tanh()]
            previous = width
        model = nn.Sequential(*layers, nn.Linear(previous, classes))
        inputs = torch.randn(draw(st.integers(1, 9)), 3)
    else:
        channels = draw(st.integers(1, 3))
        model = nn.Sequential(
            nn.Conv2d(2, channels, draw(st.sampled_from([1, 3])), padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * channels, classes),
        )
        inputs = torch.randn(draw(st.integers(1, 5)), 2, 4, 4)
    targets = torch.randint(0, classes, (len(inputs),))
    return model.double(), (inputs.double(), targets)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    network=networks(),
    sparsity=st.floats(0.0, 0.99),
    stages=st.integers(1, 5),
    exponential=st.booleans(),
    scope=st.sampled_from(["global", "layerwise"]),
    criterion=st.sampled_from(CRITERIA),
)
def test_pruning_invariants(network, sparsity, stages, exponential, scope, criterion):
    model, batch = network
    schedule = (ExponentialSchedule if exponential else LinearSchedule)(sparsity, stages)
    # Random tiny layers may legitimately be emptied here: collapse is not what is tested.
    pruner = Pruner(
        model,
        criterion,
        schedule,
        loss_fn=nn.CrossEntropyLoss(),
        data=batch,
        scope=scope,
        on_collapse="ignore",
    )
    sizes = {k: p.numel() for k, p in pruner.params.items()}
    previous = {k: m.clone() for k, m in pruner.masks.items()}
    for stage in range(1, stages + 1):
        report = pruner.step()
        target = schedule.sparsity(stage)
        if scope == "global":
            assert pruner.num_pruned() == round(sum(sizes.values()) * target)
        else:
            assert all(int((~m).sum()) == round(sizes[k] * target) for k, m in pruner.masks.items())
        for name, mask in pruner.masks.items():
            assert not (mask & ~previous[name]).any()  # monotone
            assert (pruner.params[name][~mask] == 0).all()  # zeros stay zero
        assert all(torch.isfinite(p).all() for p in model.parameters())
        for value in (report.loss_before, report.loss_after, report.predicted_delta):
            assert value is None or math.isfinite(value)  # no NaN, no ±inf
        previous = {k: m.clone() for k, m in pruner.masks.items()}
