"""``nn.BatchNorm1d/2d/3d``: couples its channel axis in and out; parameters and buffers are sliced.

Only the live channels contribute batch statistics and only their running statistics are updated,
so a channel that is not in this step's slice keeps exactly the state it had.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from ..ops import sliced_batch_norm, sliced_batch_norm_fn
from .base import Axis, AxisRelations, OpRule, bind_args, shape_of


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


#: ``F.batch_norm``'s parameters in order, and their defaults (shared with ``norm_stats``).
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
BATCH_NORM_DEFAULTS = {
    "weight": None,
    "bias": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
}


class FunctionalBatchNormRule(OpRule):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)``.

    Models that fuse norm and activation (timm's ``BatchNormAct2d``) call the functional form with
    their buffers and parameters; the same slicing applies to each of them.
    """

    name = "batchnorm"
    _NAMES = BATCH_NORM_ARGS
    _DEFAULTS = BATCH_NORM_DEFAULTS

    def _bound(self, node: fx.Node) -> dict:
        return bind_args(node, self._NAMES, self._DEFAULTS)

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a = self._bound(node)
        x = a["input"]
        if shape_of(node) is None or shape_of(x) != shape_of(node):
            return AxisRelations(blocks="batch norm with unknown shapes")
        if not all(isinstance(a[k], (bool, float, int)) for k in ("training", "momentum", "eps")):
            return AxisRelations(blocks="batch norm with non-constant training/momentum/eps")
        return AxisRelations(couplings=[(Axis(x, 1), Axis(node, 1))])

    def rewrite(self, node: fx.Node, ctx) -> fx.Node | None:
        cut = ctx.out_cut(node, 1)
        if cut is None:
            return None
        a = self._bound(node)
        return ctx.call(
            sliced_batch_norm_fn,
            tuple(a[k] for k in self._NAMES) + (cut,),
        )


RULES[F.batch_norm] = FunctionalBatchNormRule()
