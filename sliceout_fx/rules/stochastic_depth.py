"""Stochastic depth (torchvision's ``stochastic_depth``, timm's ``DropPath``): per-sample drops.

They zero whole samples of a residual branch, so every axis passes through unchanged and a cut
channel stays cut; they are never SliceOut sites (they drop samples, not units). The targets are
named by qualified name, so the rule needs neither torchvision nor timm to be imported.
"""

from __future__ import annotations

from torch import fx

from .base import AxisRelations, OpRule, couple_all_dims, input_of


class StochasticDepthRule(OpRule):
    name = "stochastic-depth"
    targets = (
        "torchvision.ops.stochastic_depth.stochastic_depth",
        "torchvision.ops.stochastic_depth.StochasticDepth",
        "timm.layers.drop.DropPath",
        "timm.layers.drop.drop_path",
    )

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        return AxisRelations(couplings=couple_all_dims(input_of(node), node))


RULES = (StochasticDepthRule(),)
