"""The ONE case table of the curvature tests: model x loss x parameter subset, crossed with devices.

Every layer type of :data:`lossprune.curvature.layers.RULES` appears in some model here
(``tests/test_curvature.py::test_every_registered_layer_has_a_brute_force_case`` enforces it), so
both fast paths are checked against :mod:`tests.brute_force` for each rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

DTYPE = torch.float64
CLASSES = 3

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class TwoLayer(nn.Module):
    """A non-Sequential chain (traced), like the experiments' MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.flatten(x))


class Residual(nn.Module):
    """Not a chain: the chain path must fall back; the contraction path proves the layout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(x + torch.tanh(self.fc1(x)))


class Tied(nn.Module):
    """One Linear applied twice: its weight gets two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class WeightReuse(nn.Module):
    """A Linear whose weight is also used outside its own call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x)) + 0.1 * (x @ self.fc.weight.T)
        return self.out(h)


class Sequence(nn.Module):
    """A Linear applied over a sequence dimension (per-example sums over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.fc(x.view(-1, 2, 3))).flatten(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, stride=1, bias=False),
        nn.Tanh(),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, dilation=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    )


def every_layer_1d() -> nn.Module:
    """Every 1-d rule of the table, dropout layers in eval mode (identity)."""
    return nn.Sequential(
        nn.Conv1d(2, 3, 2, padding=1),
        nn.Sigmoid(),
        nn.MaxPool1d(2),
        nn.AvgPool1d(1),
        nn.AdaptiveAvgPool1d(2),
        nn.Dropout1d(0.5),
        nn.AlphaDropout(0.5),
        nn.FeatureAlphaDropout(0.5),
        nn.Flatten(),
        nn.Identity(),
        nn.Dropout(0.5),
        nn.Linear(6, 3),
    ).eval()


def every_layer_2d() -> nn.Module:
    """Every 2-d rule of the table, dropout in eval mode."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Dropout2d(0.5),
        nn.Dropout3d(0.5),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()


def grouped_conv() -> nn.Module:
    """A grouped convolution: the contractions take it, the chain's rule does not."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 2, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)
    )


def bias_free() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))


def batch_norm() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


#: name -> (builder, shape of one example)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (6,)),
    "traced": (TwoLayer, (2, 3)),
    "cnn": (cnn, (2, 4, 4)),
    "conv1d": (conv1d, (2, 4)),
    "every_layer_1d": (every_layer_1d, (2, 7)),
    "every_layer_2d": (every_layer_2d, (2, 3, 3)),
    "grouped_conv": (grouped_conv, (2, 3, 3)),
    "bias_free": (bias_free, (6,)),
    "batch_norm": (batch_norm, (6,)),
    "residual": (Residual, (6,)),
    "tied": (Tied, (6,)),
    "weight_reuse": (WeightReuse, (6,)),
    "sequence": (Sequence, (6,)),
}

#: name -> (loss, targets of N examples)
LOSSES: dict[str, tuple[nn.Module, Callable[[int], Tensor]]] = {
    "ce": (nn.CrossEntropyLoss(), lambda n: torch.randint(0, CLASSES, (n,))),
    "ce_options": (
        nn.CrossEntropyLoss(
            weight=torch.tensor([0.5, 1.5, 1.0], dtype=DTYPE), ignore_index=1, label_smoothing=0.1
        ),
        lambda n: torch.arange(n) % CLASSES,
    ),
    "mse": (nn.MSELoss(), lambda n: torch.randn(n, CLASSES, dtype=DTYPE)),
}


class Case(NamedTuple):
    """One row of the table: a model, a loss and which parameters are differentiated."""

    model: str
    loss: str
    subset: bool  # only the weights (biases held fixed)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.loss}" + ("-weights" if self.subset else "")


CASES = [
    Case(model, loss, subset)
    for model in MODELS
    for loss in LOSSES
    for subset in (False, True)
    if not subset or loss == "ce"
]


class Built(NamedTuple):
    model: nn.Module
    params: dict[str, Tensor]
    batch: tuple[Tensor, Tensor]
    loss_fn: nn.Module


def build(case: Case, device: str = "cpu", n: int = 7, seed: int = 0) -> Built:
    """The model (float64, on ``device``), its differentiated parameters, a batch and the loss."""
    torch.manual_seed(seed)
    builder, shape = MODELS[case.model]
    model = builder().to(device=device, dtype=DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    if case.subset:
        params = {k: v for k, v in params.items() if k.endswith("weight")}
    loss_fn, targets = LOSSES[case.loss]
    x = torch.randn(n, *shape, dtype=DTYPE)
    return Built(model, params, (x.to(device), targets(n).to(device)), loss_fn.to(device))


def case_params(cases: list[Case] = CASES):
    """``pytest.mark.parametrize`` over ``cases`` crossed with :data:`DEVICES`."""
    return pytest.mark.parametrize(
        ("case", "device"),
        [(c, d) for c in cases for d in DEVICES],
        ids=[f"{c.id}-{d}" for c in cases for d in DEVICES],
    )
