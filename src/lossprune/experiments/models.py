"""The four networks of the reproduction (Laurent et al. 2020, arXiv:2006.12279, Sec. 5).

Pure torch, no torchvision: every architecture is written out here so that parameter names and
initialisations do not depend on an optional package. Only the ``.weight`` of ``Conv2d`` and
``Linear`` layers is pruned by the paper; the layouts below keep biases and batch-norm parameters
in separate tensors so that scoping by qualified name stays simple.

No model uses dropout or in-place activations: scoring calls the model functionally
(``torch.func``) and must be deterministic in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLP", "VGG11", "PreActResNet18", "ResNet50", "MODEL_NAMES", "build_model"]


class MLP(nn.Module):
    """Fully connected network with tanh activations: ``in_features-300-100-classes``.

    The LeNet-300-100 layout of LeCun et al. (1998, "Gradient-based learning applied to document
    recognition"), used with tanh by Laurent et al. (2020) on MNIST. The input is flattened, so any
    image shape works as long as ``prod(shape) == in_features``.

    Args:
        in_features: Number of input features after flattening (784 for MNIST, 64 for digits).
        hidden: Widths of the hidden layers.
        classes: Number of output logits.
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (300, 100), classes: int = 10
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        layers.append(nn.Linear(widths[-1], classes))
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, classes)``."""
        return self.layers(self.flatten(x))


# "M" is a 2x2 max-pool; integers are the output channels of a 3x3 convolution (padding 1).
_VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG11 (configuration "A") without batch norm, for 32x32 inputs.

    Simonyan & Zisserman (2015, "Very deep convolutional networks for large-scale image
    recognition"), CIFAR variant as in Laurent et al. (2020): eight 3x3 convolutions with ReLU and
    five max-pools reduce a 32x32 image to a 512-vector, followed by three linear layers
    ``512 -> 512 -> 512 -> classes``. No dropout, so eval and train mode compute the same function.

    Args:
        classes: Number of output logits.
        in_channels: Channels of the input image.
    """

    def __init__(self, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG11_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, classes)``; ``x`` must be ``(batch, in_channels, 32, 32)``."""
        return self.classifier(self.flatten(self.features(x)))


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    He et al. (2016, "Identity mappings in deep residual networks", Fig. 4e). When the shape
    changes, the shortcut is a strided 1x1 convolution applied to the pre-activated input.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (and of the shortcut).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, same batch size; channels ``planes``, spatial size divided by stride."""
        out = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + identity


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for CIFAR (He et al. 2016, "Identity mappings ...").

    A 3x3 stem convolution (no pooling), four stages of two :class:`PreActBlock` each with
    64/128/256/512 channels (stride 2 from the second stage on), a final BN + ReLU (the blocks leave
    their sum un-activated), global average pooling and one linear layer. About 11.17M parameters.

    Args:
        classes: Number of output logits.
        in_channels: Channels of the input image.
    """

    def __init__(self, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, classes)``."""
        out = self.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(self.flatten(self.pool(out)))


class Bottleneck(nn.Module):
    """ResNet bottleneck block ``1x1 -> 3x3 -> 1x1`` with 4x expansion (He et al. 2016).

    The stride sits on the 3x3 convolution ("ResNet v1.5", as in torchvision), and the projection
    shortcut is ``downsample = Sequential(1x1 conv, BN)`` so that parameter names match
    torchvision's ``resnet50`` state dict.

    Args:
        in_planes: Input channels.
        planes: Bottleneck width; the block outputs ``4 * planes`` channels.
        stride: Stride of the 3x3 convolution (and of the shortcut).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output with ``4 * planes`` channels, spatial size divided by stride."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 for ImageNet (He et al. 2016, "Deep residual learning for image recognition").

    torchvision's layout and names (``conv1``, ``bn1``, ``layer1``..``layer4`` of 3/4/6/3
    :class:`Bottleneck` blocks, ``fc``) and initialisation (Kaiming-normal fan-out convolutions,
    batch norm at weight 1 and bias 0). 25,557,032 parameters for 1000 classes.

    Args:
        classes: Number of output logits.
        in_channels: Channels of the input image.
    """

    def __init__(self, classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        for index, (planes, blocks, stride) in enumerate(
            ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1
        ):
            layer = [Bottleneck(in_planes, planes, stride)]
            in_planes = planes * Bottleneck.expansion
            layer += [Bottleneck(in_planes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, classes)``."""
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.flatten(self.avgpool(out)))


def _image_channels(name: str, in_shape: Sequence[int]) -> int:
    # Convolutional models need (channels, height, width); the MLP accepts any shape.
    if len(in_shape) != 3:
        raise ValueError(
            f"in_shape for {name!r} must be (channels, height, width), got {tuple(in_shape)}"
        )
    return int(in_shape[0])


_BUILDERS: dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    "mlp": lambda in_shape, classes: MLP(in_features=math.prod(in_shape), classes=classes),
    "vgg11": lambda in_shape, classes: VGG11(classes, _image_channels("vgg11", in_shape)),
    "preactresnet18": lambda in_shape, classes: PreActResNet18(
        classes, _image_channels("preactresnet18", in_shape)
    ),
    "resnet50": lambda in_shape, classes: ResNet50(classes, _image_channels("resnet50", in_shape)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by :func:`build_model`."""


def build_model(name: str, *, in_shape: Sequence[int], classes: int) -> nn.Module:
    """Build one of the paper's networks for inputs of shape ``in_shape`` (without batch).

    Args:
        name: One of :data:`MODEL_NAMES` (case-insensitive).
        in_shape: Shape of one input example, e.g. ``(1, 28, 28)`` or ``(3, 32, 32)``.
        classes: Number of output logits.

    Returns:
        A freshly initialised model (initialisation drawn from torch's global generator, so seed it
        with ``torch.manual_seed`` first for a reproducible network).

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: For an unknown name, a non-image ``in_shape`` for a convolutional model, or
            ``classes < 1``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; valid names are {', '.join(MODEL_NAMES)}")
    if int(classes) < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    return _BUILDERS[key](tuple(int(n) for n in in_shape), int(classes))
