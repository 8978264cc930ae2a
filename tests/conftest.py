import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_mlp(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
    ).to(dtype)


def make_cnn(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).to(dtype)


@pytest.fixture
def mlp():
    return make_mlp()


@pytest.fixture
def cnn():
    return make_cnn()


@pytest.fixture
def mlp_batch():
    return torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))


@pytest.fixture
def cnn_batch():
    return torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
