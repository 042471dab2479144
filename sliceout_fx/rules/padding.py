"""Padding (``nn.ZeroPad2d``, ``nn.ConstantPad*``, reflection/replication, ``F.pad``).

Padding the trailing spatial axes leaves batch and channel axes as they are, so those pass straight
through (TF-"SAME" ports of EfficientNet pad before every strided depthwise conv). Padding that
reaches the channel axis would change its width and blocks.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, rank_of


class PadRule(OpRule):
    name = "pad"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0] if node.args else node.kwargs["input"]
        rank = rank_of(x)
        if node.op == "call_module":
            pad = gm.get_submodule(str(node.target)).padding
        else:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if rank is None or rank != rank_of(node) or not isinstance(pad, (tuple, list)):
            return AxisRelations(blocks="padding with unknown shapes or amounts")
        padded = len(pad) // 2  # F.pad order: last axis first, two numbers per axis
        return AxisRelations(couplings=[(Axis(x, d), Axis(node, d)) for d in range(rank - padded)])


_RULE = PadRule()
RULES = {
    **{
        m: _RULE
        for m in (
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
    },
    F.pad: _RULE,
}
