"""Reference models used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = ["WideResNet", "paper_mlp", "wrn_16_8", "wrn_40_10"]


def paper_mlp(
    p: float = 0.5,
    hidden: int = 2048,
    depth: int = 3,
    in_features: int = 784,
    num_classes: int = 10,
) -> nn.Sequential:
    """Build the fully connected network of the SliceOut paper's MNIST/Fashion-MNIST experiments.

    Appendix F.1.1 of the paper: 784 input units (one per pixel, no input transformation), three
    hidden layers of 2048 units and 10 outputs, with dropout applied to each hidden layer. With
    the defaults this is::

        fc1 (784->2048) -> act1 (ReLU) -> drop1 -> fc2 (2048->2048) -> act2 -> drop2
        -> fc3 (2048->2048) -> act3 -> drop3 -> head (2048->10)

    The input is expected already flattened to ``(N, in_features)``, as returned by
    :func:`sliceout_lab.data.load_fashion_mnist`. Each ``Dropout`` is a natural SliceOut site:
    converting the model replaces it by slicing the hidden layer it follows, i.e. the output rows
    of the ``Linear`` before it and the input columns of the ``Linear`` after it (the paper's
    Algorithm 1). The layers get stable names so that state_dict keys and reports read naturally
    (``fc1.weight``, ``drop2``, ...).

    Args:
        p: dropout rate of every hidden layer (``nn.Dropout(p)``).
        hidden: width of each hidden layer.
        depth: number of hidden layers.
        in_features: input width (28 * 28 pixels).
        num_classes: number of output logits.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(width, hidden)
        layers[f"act{i}"] = nn.ReLU()
        layers[f"drop{i}"] = nn.Dropout(p)
        width = hidden
    layers["head"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


class WideBasicBlock(nn.Module):
    """The pre-activation block of Wide ResNets with dropout between its convolutions.

    ``BN -> ReLU -> conv3x3 -> Dropout -> BN -> ReLU -> conv3x3`` plus the identity (or a 1x1
    projection when the shape changes). The dropout sits between the two convolutions, so
    converting the network slices the first conv's output channels, the second BN and the second
    conv's input channels with one slice per block (the paper's Channel SliceOut on WRNs).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, p: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(p)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(self.relu1(self.bn1(x))))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for 32x32 images (Zagoruyko & Komodakis), as used in the paper.

    ``depth = 6 n + 4`` with ``n`` blocks per stage; stage widths ``16 k, 32 k, 64 k``.
    """

    def __init__(
        self,
        depth: int = 16,
        widen: int = 8,
        p: float = 0.3,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages = []
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, stride if j == 0 else 1, p))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
            setattr(self, f"stage{i + 1}", stages[-1])
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def wrn_16_8(p: float = 0.3, num_classes: int = 10) -> WideResNet:
    """WRN-16-8 (11 M parameters), the paper's smaller CIFAR Wide ResNet."""
    return WideResNet(16, 8, p, num_classes)


def wrn_40_10(p: float = 0.3, num_classes: int = 10) -> WideResNet:
    """WRN-40-10 (56 M parameters), the paper's larger CIFAR Wide ResNet."""
    return WideResNet(40, 10, p, num_classes)
