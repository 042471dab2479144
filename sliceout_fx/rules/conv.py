"""Convolutions (``nn.Conv1d/2d/3d``, ``F.convNd``, ``aten.convNd``): channel SliceOut.

A plain convolution is a source on its output channels (dim 1) and a sink on its input channels. A
grouped convolution can only be cut in whole groups, and its input and output channels of one group
go together, so the rule *couples* its input and output channel axes and limits both to ``groups``
units; the depthwise convolution is the special case with one channel per group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from ..ops import sliced_conv, sliced_conv_module
from .base import Axis, AxisRelations, OpRule, bind, fetch, input_of, shape_of
from .binding import dialects


class ConvRule(OpRule):
    name = "conv"
    targets = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *dialects("conv1d", "conv2d", "conv3d"))
    is_layer = True

    def _groups(self, node: fx.Node, gm: fx.GraphModule) -> int:
        if node.op == "call_module":
            return gm.get_submodule(str(node.target)).groups
        groups = bind(node)["groups"]
        return groups if isinstance(groups, int) else 0  # 0: not a constant, cannot reason

    def _weight_shape(self, node: fx.Node, gm: fx.GraphModule) -> tuple[int, ...] | None:
        if node.op == "call_module":
            return tuple(gm.get_submodule(str(node.target)).weight.shape)
        shape = shape_of(bind(node)["weight"])
        return None if shape is None else tuple(shape)

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
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

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        x = input_of(node)
        out_cut, in_cut = ctx.out_cut(node, 1), ctx.in_cut(x, 1)
        if out_cut is None and in_cut is None:
            return None
        if node.op == "call_module":
            return ctx.call(
                sliced_conv_module, (x, ctx.get_attr(str(node.target)), out_cut, in_cut)
            )
        a = bind(node)  # a string padding ("same") is passed on as it is
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        return ctx.call(sliced_conv, (*(a[k] for k in names), out_cut, in_cut))

    def flops(self, node: fx.Node, gm: fx.GraphModule) -> int:
        out, x = shape_of(node), shape_of(input_of(node))
        weight = self._weight_shape(node, gm)
        if out is None or x is None or weight is None:
            return 0
        return math.prod(out) * math.prod(weight[1:])

    def weight(self, node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
        if node.op == "call_module":
            return gm.get_submodule(str(node.target)).weight
        return fetch(gm, bind(node)["weight"])

    def is_expand(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        shape = self._weight_shape(node, gm)
        if shape is None or self._groups(node, gm) != 1:
            return False
        out_channels, in_channels, *kernel = shape
        return all(k == 1 for k in kernel) and out_channels > in_channels


RULES = (ConvRule(),)
