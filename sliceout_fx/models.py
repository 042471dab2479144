"""Reference models used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["paper_mlp"]


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
    :func:`sliceout_fx.data.load_fashion_mnist`. Each ``Dropout`` is a natural SliceOut site:
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
