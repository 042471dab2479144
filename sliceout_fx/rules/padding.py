"""Padding (``nn.ZeroPad2d``, ``nn.ConstantPad*``, reflection/replication, ``F.pad``, ATen pads).

Padding the trailing spatial axes leaves batch and channel axes as they are, so those pass straight
through (TF-"SAME" ports of EfficientNet pad before every strided depthwise conv). Padding that
reaches the channel axis would change its width and blocks.
"""

from __future__ import annotations

from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, bind, input_of, rank_of
from .binding import dialects


class PadRule(OpRule):
    name = "pad"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        rank = rank_of(x)
        if node.op == "call_module":
            pad = gm.get_submodule(str(node.target)).padding
        else:
            bound = bind(node)  # aten.reflection_pad2d calls it `padding`
            pad = bound.get("pad", bound.get("padding"))
        if rank is None or rank != rank_of(node) or not isinstance(pad, (tuple, list)):
            return AxisRelations(blocks="padding with unknown shapes or amounts")
        padded = len(pad) // 2  # F.pad order: last axis first, two numbers per axis
        return AxisRelations(couplings=[(Axis(x, d), Axis(node, d)) for d in range(rank - padded)])


_PAD_MODULES = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)
_PAD_OPS = ("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d")
_PAD_OPS += ("replication_pad1d", "replication_pad2d", "replication_pad3d")
PadRule.targets = (*_PAD_MODULES, *dialects(*_PAD_OPS))
RULES = (PadRule(),)
