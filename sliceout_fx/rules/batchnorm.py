"""Batch norm (``nn.BatchNorm1d/2d/3d``, ``F.batch_norm``, ``aten.batch_norm``).

It couples its channel axis in and out; its parameters and buffers are sliced. Only the live
channels contribute batch statistics and only their running statistics are updated, so a channel
that is not in this step's slice keeps exactly the state it had. Models that fuse norm and
activation (timm's ``BatchNormAct2d``) call the functional form with their own buffers and
parameters; the same slicing applies to each of them.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..ops import sliced_batch_norm, sliced_batch_norm_fn
from .base import Axis, AxisRelations, OpRule, bind, input_of, shape_of
from .binding import dialects

#: ``F.batch_norm``'s parameters in order: the argument order of ``sliced_batch_norm_fn``.
BATCH_NORM_ARGS = (
    "input",
    "running_mean",
    "running_var",
    "weight",
    "bias",
    "training",
    "momentum",
    "eps",
)
#: Every functional batch norm target (``norm_stats`` rewrites their statistics too).
FUNCTIONAL_TARGETS = dialects("batch_norm")


class BatchNormRule(OpRule):
    name = "batchnorm"
    targets = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, *FUNCTIONAL_TARGETS)

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        if shape_of(node) is None or shape_of(x) != shape_of(node):
            return AxisRelations(blocks="batch norm with unknown shapes")
        if node.op != "call_module":
            a = bind(node)
            constants = (bool, float, int)
            if not all(isinstance(a[k], constants) for k in ("training", "momentum", "eps")):
                return AxisRelations(blocks="batch norm with non-constant training/momentum/eps")
        # Only the channel axis is coupled: other axes are reduced over by the statistics.
        return AxisRelations(couplings=[(Axis(x, 1), Axis(node, 1))])

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        cut = ctx.out_cut(node, 1)
        if cut is None:
            return None
        if node.op == "call_module":
            module = ctx.get_attr(str(node.target))
            return ctx.call(sliced_batch_norm, (input_of(node), module, cut))
        a = bind(node)
        return ctx.call(sliced_batch_norm_fn, (*(a[k] for k in BATCH_NORM_ARGS), cut))


RULES = (BatchNormRule(),)
