"""Dropout modules and ``F.dropout``: shape-preserving, and the natural SliceOut sites.

The rule couples all axes like an element-wise op and tags the node as a site with its rate, so a
site policy can replace the dropout with a slice of the group that flows through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import SOFTMAX_TARGETS
from .base import AxisRelations, OpRule, SiteHint, bind_args, couple_all_dims

aten = torch.ops.aten

# Dropout flavours that drop whole channels (dim 1) rather than single elements.
_CHANNEL_DROPOUTS = (
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
)


def _drops_attention_weights(x: fx.Node) -> bool:
    """Whether ``x`` is a softmax output (through dtype casts): attention-probability dropout.

    That dropout removes attention links, not units; it is left as it is, never a slice site.
    """
    while isinstance(x, fx.Node) and x.target in _CASTS:
        x = x.args[0]
    return isinstance(x, fx.Node) and x.target in SOFTMAX_TARGETS


def _rate_and_training(node: fx.Node, gm: fx.GraphModule) -> tuple[float, bool]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return float(mod.p), True
    bound = bind_args(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True})
    return float(bound["p"]), bool(bound["training"])


class DropoutRule(OpRule):
    name = "dropout"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0] if node.args else node.kwargs["input"]
        couplings = couple_all_dims(x, node)
        rate, training = _rate_and_training(node, gm)
        key = type(gm.get_submodule(str(node.target))) if node.op == "call_module" else node.target
        dims = (1,) if key in _CHANNEL_DROPOUTS else None
        is_site = training and not _drops_attention_weights(x)
        site = SiteHint("dropout", rate, dims) if is_site else None
        return AxisRelations(couplings=couplings, site=site)


_CASTS = (aten.to.dtype, aten._to_copy.default, "to", "float", "type_as")

_RULE = DropoutRule()
RULES = {
    aten.dropout.default: _RULE,
    nn.Dropout: _RULE,
    nn.Dropout1d: _RULE,
    nn.Dropout2d: _RULE,
    nn.Dropout3d: _RULE,
    F.dropout: _RULE,
    F.dropout1d: _RULE,
    F.dropout2d: _RULE,
    F.dropout3d: _RULE,
}
