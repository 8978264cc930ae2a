"""Shapes, parameter counts and layouts of the reproduction's networks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lossprune.experiments.models import (
    MLP,
    MODEL_NAMES,
    VGG11,
    PreActResNet18,
    ResNet50,
    build_model,
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def _linear(f_in: int, f_out: int) -> int:
    return f_in * f_out + f_out


def _bn(channels: int) -> int:
    return 2 * channels


@pytest.fixture(scope="module")
def resnet50() -> ResNet50:
    torch.manual_seed(0)
    return ResNet50(classes=1000)


def test_mlp_counts_match_lenet_300_100() -> None:
    model = MLP()
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".weight"))
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert weights == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert biases == 300 + 100 + 10 == 410
    assert [type(m) for m in model.layers] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]


@pytest.mark.parametrize(
    ("make", "shape", "classes"),
    [
        (MLP, (2, 1, 28, 28), 10),
        (lambda: MLP(in_features=64, hidden=(7,), classes=3), (2, 1, 8, 8), 3),
        (VGG11, (2, 3, 32, 32), 10),
        (lambda: VGG11(classes=7, in_channels=1), (2, 1, 32, 32), 7),
        (PreActResNet18, (2, 3, 32, 32), 10),
        (lambda: PreActResNet18(classes=5, in_channels=1), (2, 1, 16, 16), 5),
    ],
    ids=["mlp", "mlp-digits", "vgg11", "vgg11-gray", "preact18", "preact18-small"],
)
def test_output_shapes(make: Callable[[], nn.Module], shape: tuple[int, ...], classes: int) -> None:
    out = make()(torch.randn(shape))
    assert out.shape == (shape[0], classes)
    assert torch.isfinite(out).all()


def test_vgg11_count_and_layout() -> None:
    model = VGG11()
    channels = [3, 64, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(_conv(a, b, 3, bias=True) for a, b in zip(channels[:-1], channels[1:], strict=True))
    classifier = _linear(512, 512) + _linear(512, 512) + _linear(512, 10)
    assert _count(model) == convs + classifier == 9_750_922
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {nn.BatchNorm2d, nn.Dropout}, "the paper's VGG11 has no BN and no dropout"
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 8


def test_preactresnet18_count() -> None:
    expected = _conv(3, 64, 3, bias=False)
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block_stride in (stride, 1):
            expected += _bn(in_planes) + _conv(in_planes, planes, 3, bias=False)
            expected += _bn(planes) + _conv(planes, planes, 3, bias=False)
            if block_stride != 1 or in_planes != planes:
                expected += _conv(in_planes, planes, 1, bias=False)
            in_planes = planes
    expected += _bn(512) + _linear(512, 10)
    assert _count(PreActResNet18()) == expected
    assert expected == pytest.approx(11.17e6, rel=1e-3)


def test_resnet50_matches_torchvision_layout(resnet50: ResNet50) -> None:
    # 25,557,032 is torchvision's resnet50 parameter count; the names follow its state dict.
    assert _count(resnet50) == 25_557_032
    names = dict(resnet50.named_parameters())
    assert names["conv1.weight"].shape == (64, 3, 7, 7)
    assert names["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert names["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert names["fc.weight"].shape == (1000, 2048)
    assert len(resnet50.layer3) == 6
    assert "layer1.0.downsample.1.running_mean" in resnet50.state_dict()


def test_resnet50_output_shape(resnet50: ResNet50) -> None:
    resnet50.eval()
    out = resnet50(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)


def test_models_are_deterministic_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = PreActResNet18(classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_names(name: str) -> None:
    in_shape = (3, 32, 32)
    model = build_model(name, in_shape=in_shape, classes=4)
    assert isinstance(model, nn.Module)
    # The last parameter of every model is the bias of its output layer.
    assert list(model.parameters())[-1].shape == (4,)


def test_build_mlp_follows_input_shape() -> None:
    model = build_model("MLP", in_shape=(1, 8, 8), classes=10)
    assert model.layers[0].in_features == 64
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_build_conv_model_uses_input_channels() -> None:
    model = build_model("vgg11", in_shape=(1, 32, 32), classes=10)
    assert model.features[0].in_channels == 1


def test_build_model_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model name 'lenet'") as info:
        build_model("lenet", in_shape=(1, 28, 28), classes=10)
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_build_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="channels, height, width"):
        build_model("vgg11", in_shape=(3072,), classes=10)
    with pytest.raises(ValueError, match="classes"):
        build_model("mlp", in_shape=(64,), classes=0)
    with pytest.raises(TypeError, match="name"):
        build_model(None, in_shape=(64,), classes=10)  # type: ignore[arg-type]
