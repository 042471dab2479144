"""Layer and RMS normalisation: they mix the normalised (trailing) axes, the others pass.

A transformer's residual stream goes through them, which is one reason its width is never cut: the
statistics of a narrower vector would differ from the full-width ones seen in eval.
"""

from __future__ import annotations

from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, bind, input_of, rank_of
from .binding import dialects


class LayerNormRule(OpRule):
    name = "layer-norm"
    targets = (nn.LayerNorm, nn.RMSNorm, *dialects("layer_norm", "rms_norm"))

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="normalisation with unknown shapes")
        if node.op == "call_module":
            normalized = len(gm.get_submodule(str(node.target)).normalized_shape)
        else:
            shape = bind(node).get("normalized_shape")
            normalized = len(shape) if isinstance(shape, (list, tuple)) else 1
        return AxisRelations(
            couplings=[(Axis(x, d), Axis(node, d)) for d in range(rank - normalized)],
            blocks="normalises over this axis, whose statistics depend on its full width",
        )


RULES = (LayerNormRule(),)
