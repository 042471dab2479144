"""``nn.BatchNorm1d/2d/3d``: couples its channel axis in and out; parameters and buffers are sliced.

Only the live channels contribute batch statistics and only their running statistics are updated,
so a channel that is not in this step's slice keeps exactly the state it had.
"""

from __future__ import annotations

from torch import fx, nn

from ..ops import sliced_batch_norm
from .base import Axis, AxisRelations, OpRule, shape_of


class BatchNormRule(OpRule):
    name = "batchnorm"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        if shape_of(node) is None or shape_of(x) != shape_of(node):
            return AxisRelations(blocks="batch norm with unknown shapes")
        # Only the channel axis is coupled: other axes are reduced over by the statistics.
        return AxisRelations(couplings=[(Axis(x, 1), Axis(node, 1))])

    def rewrite(self, node: fx.Node, ctx) -> fx.Node | None:
        cut = ctx.out_cut(node, 1)
        if cut is None:
            return None
        return ctx.call(sliced_batch_norm, (node.args[0], ctx.get_attr(str(node.target)), cut))


RULES = {
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.BatchNorm3d: BatchNormRule(),
}
