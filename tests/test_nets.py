import pytest
import torch

from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net


@pytest.mark.parametrize(
    "arch, shape, classes",
    [("lenet5", (1, 28, 28), 10), ("lenet5", (3, 32, 32), 100), ("resnet18", (3, 32, 32), 10),
     ("resnet18", (1, 28, 28), 26), ("vgg16_bn", (3, 32, 32), 10), ("small_cnn", (1, 28, 28), 10),
     ("small_cnn", (3, 32, 32), 100)],
)
def test_output_shape(arch, shape, classes):
    net = build_net(arch, shape, classes).eval()
    assert net(torch.rand(2, *shape)).shape == (2, classes)


def test_small_cnn_is_much_cheaper_than_lenet5():
    """The hash network runs on every query: its point is to cost a fraction of a LeNet-5 member."""
    def multiply_adds(arch: str) -> int:
        counts = []

        def count(layer, inputs, output):
            counts.append(output[0].numel() * layer.weight[0].numel())  # weights per output value

        net = build_net(arch, (1, 28, 28), 10)
        for layer in net.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.register_forward_hook(count)
        net(torch.zeros(1, 1, 28, 28))
        return sum(counts)

    assert multiply_adds("small_cnn") < multiply_adds("lenet5") / 2  # 150k vs 417k


def test_normalisation_is_the_first_layer():
    net = build_net("lenet5", (1, 28, 28), 10, mean=(0.5,), std=(0.25,))
    x = torch.full((1, 1, 28, 28), 0.75)
    assert torch.allclose(net[0](x), torch.ones_like(x))


def test_cifar_resnet_keeps_spatial_resolution_in_the_stem():
    net = build_net("resnet18", (3, 32, 32), 10)[1]
    assert net.conv1.stride == (1, 1) and isinstance(net.maxpool, torch.nn.Identity)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"arch": "alexnet"}, "Unknown architecture"), ({"mean": (0.1, 0.2)}, "one value per channel"),
     ({"input_shape": (28, 28)}, "channels, height, width")],
)
def test_bad_arguments(kwargs, message):
    args = {"arch": "lenet5", "input_shape": (1, 28, 28), "num_classes": 10} | kwargs
    with pytest.raises(ConfigError, match=message):
        build_net(**args)
