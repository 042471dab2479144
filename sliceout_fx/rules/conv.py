"""``nn.Conv1d/2d/3d`` and ``F.conv1d/2d/3d``: channel SliceOut.

A plain convolution is a source on its output channels (dim 1) and a sink on its input channels. A
grouped convolution can only be cut in whole groups, and its input and output channels of one group
go together, so the rule *couples* its input and output channel axes and limits both to ``groups``
units; the depthwise convolution is the special case with one channel per group.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import fx, nn

from ..ops import sliced_conv, sliced_conv_module
from .base import Axis, AxisRelations, OpRule, bind_args, shape_of

_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _functional_args(node: fx.Node) -> dict:
    return bind_args(node, _NAMES, _DEFAULTS)


class ConvRule(OpRule):
    name = "conv"

    def _groups(self, node: fx.Node, gm: fx.GraphModule) -> int:
        if node.op == "call_module":
            return gm.get_submodule(str(node.target)).groups
        groups = _functional_args(node)["groups"]
        return groups if isinstance(groups, int) else 0  # 0: not a constant, cannot reason

    def _input(self, node: fx.Node) -> fx.Node:
        return node.args[0] if node.args else node.kwargs["input"]

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = self._input(node)
        if shape_of(node) is None or shape_of(x) is None:
            return AxisRelations(blocks="convolution with unknown shapes")
        groups = self._groups(node, gm)
        out_axis, in_axis = Axis(node, 1), Axis(x, 1)
        if groups == 1:
            return AxisRelations(sources=[out_axis], sinks=[in_axis])
        if groups == 0:
            return AxisRelations(blocks="convolution whose `groups` is not a constant")
        return AxisRelations(
            couplings=[(in_axis, out_axis)], unit_limits={in_axis: groups, out_axis: groups}
        )

    def rewrite(self, node: fx.Node, ctx) -> fx.Node | None:
        x = self._input(node)
        out_cut, in_cut = ctx.out_cut(node, 1), ctx.in_cut(x, 1)
        if out_cut is None and in_cut is None:
            return None
        if node.op == "call_module":
            return ctx.call(
                sliced_conv_module, (x, ctx.get_attr(str(node.target)), out_cut, in_cut)
            )
        a = _functional_args(node)
        return ctx.call(
            sliced_conv,
            (
                x,
                a["weight"],
                a["bias"],
                a["stride"],
                a["padding"],
                a["dilation"],
                a["groups"],
                out_cut,
                in_cut,
            ),
        )

    def flops(self, node: fx.Node, gm: fx.GraphModule) -> int:
        out, x = shape_of(node), shape_of(self._input(node))
        groups = self._groups(node, gm) or 1
        if out is None or x is None:
            return 0
        if node.op == "call_module":
            kernel = math.prod(gm.get_submodule(str(node.target)).kernel_size)
        else:
            weight = _functional_args(node)["weight"]
            kernel = math.prod(shape_of(weight)[2:]) if shape_of(weight) else 1
        return math.prod(out) * (x[1] // groups) * kernel


RULES = {
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    **{fn: ConvRule() for fn in _CONV_FUNCTIONS},
}
