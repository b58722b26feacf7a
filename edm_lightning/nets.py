"""Plain ``nn.Module`` architectures, built by name so configs and checkpoints only carry a string.

Every net starts with the dataset's normalisation, so callers (data loaders, oracles, attacks) pass
images in [0, 1]. ResNet-18 and VGG-16-BN are torchvision's definitions with the stem adapted to
small (32x32) inputs, as is usual for CIFAR, rather than re-typed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision import models
from torchvision.transforms import v2
from typing_extensions import override

from edm_lightning.errors import ConfigError
from edm_lightning.registry import Registry

__all__ = ["ARCHITECTURES", "LeNet5", "build_net", "cifar_resnet18", "cifar_vgg16_bn", "small_cnn"]


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, the EDM paper's MNIST/FashionMNIST target."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((image_size // 2) - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
        )

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def small_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Two strided 5x5 convolutions and one linear layer: the neural router's cheap hash network.

    The hash network runs on every query, so its cost adds to the victim's; a LeNet-5 hash costs
    about as much as a LeNet-5 member (serving at 0.51x of one member), this one about a fifth of it.
    Any input size works (adaptive pooling to 4x4).

    Returns:
        The net, images to logits ``(N, num_classes)``.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(6, 16, 5, stride=2, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * 4, num_classes),
    )


def cifar_resnet18(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs."""
    net = models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def cifar_vgg16_bn(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Torchvision's VGG-16-BN with a single 512 -> classes head, the usual CIFAR variant."""
    net = models.vgg16_bn(num_classes=num_classes)
    if in_channels != 3:
        net.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(512, num_classes))
    return net


#: Architectures by config name: ``(input_shape, num_classes) -> nn.Module`` returning logits.
ARCHITECTURES: Registry[Callable[[tuple[int, int, int], int], nn.Module]] = Registry("architecture")


@ARCHITECTURES.register("lenet5")
def _lenet5(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    if height != width or height < 12:
        raise ConfigError(f"lenet5 needs square inputs of at least 12x12, got {height}x{width}")
    return LeNet5(channels, num_classes, height)


@ARCHITECTURES.register("small_cnn")
def _small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return small_cnn(input_shape[0], num_classes)


@ARCHITECTURES.register("resnet18")
def _resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return cifar_resnet18(input_shape[0], num_classes)


@ARCHITECTURES.register("vgg16_bn")
def _vgg16_bn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if min(input_shape[1:]) < 32:  # five 2x2 max-pools: a 28x28 image is 0x0 before the last one
        raise ConfigError(f"vgg16_bn needs inputs of at least 32x32 (five 2x2 max-pools), got "
                          f"{input_shape[1]}x{input_shape[2]}: use lenet5, small_cnn or resnet18 for 28x28 data")
    return cifar_vgg16_bn(input_shape[0], num_classes)


def build_net(
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> nn.Sequential:
    """``Normalize(mean, std)`` followed by architecture ``arch``: images in [0, 1] in, logits out.

    Returns:
        ``nn.Sequential(Normalize, net)``.

    Raises:
        ConfigError: an unknown ``arch`` (the known ones listed), or a shape or statistics it cannot take.
    """
    build = ARCHITECTURES.get(arch)
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (channels, height, width), got {input_shape}")
    channels = input_shape[0]
    mean = tuple(mean) if mean is not None else (0.5,) * channels
    std = tuple(std) if std is not None else (0.5,) * channels
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"mean/std need one value per channel ({channels}), got mean={mean}, std={std}")
    return nn.Sequential(v2.Normalize(list(mean), list(std)), build(tuple(input_shape), num_classes))
