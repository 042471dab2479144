"""Layer and RMS normalisation: they mix the normalised (trailing) axes, the others pass.

A transformer's residual stream goes through them, which is one reason its width is never cut: the
statistics of a narrower vector would differ from the full-width ones seen in eval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, rank_of


class LayerNormRule(OpRule):
    name = "layer-norm"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0] if node.args else node.kwargs["input"]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="normalisation with unknown shapes")
        if node.op == "call_module":
            normalized = len(gm.get_submodule(str(node.target)).normalized_shape)
        else:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            normalized = len(shape) if isinstance(shape, (list, tuple)) else 1
        return AxisRelations(
            couplings=[(Axis(x, d), Axis(node, d)) for d in range(rank - normalized)],
            blocks="normalises over this axis, whose statistics depend on its full width",
        )


_RULE = LayerNormRule()
RULES = {
    nn.LayerNorm: _RULE,
    nn.RMSNorm: _RULE,
    F.layer_norm: _RULE,
    F.rms_norm: _RULE,
    torch.ops.aten.layer_norm.default: _RULE,
    torch.ops.aten.rms_norm.default: _RULE,
}
