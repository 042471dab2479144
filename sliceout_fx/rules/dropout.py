"""Dropout (modules, ``F.dropout*``, ``aten.dropout``): shape-preserving, and the natural sites.

The rule couples all axes like an element-wise op and tags the node as a site with its rate, so a
site policy can replace the dropout with a slice of the group that flows through it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from .attention import SOFTMAX_TARGETS
from .base import AxisRelations, OpRule, SiteHint, bind, couple_all_dims, input_of
from .binding import dialects, matches

# Dropout flavours that drop whole channels (dim 1) rather than single elements.
_CHANNEL_DROPOUTS = (
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    *dialects("feature_dropout"),
)


def _drops_attention_weights(x: fx.Node) -> bool:
    """Whether ``x`` is a softmax output (through dtype casts): attention-probability dropout.

    That dropout removes attention links, not units; it is left as it is, never a slice site.
    """
    while matches(x, _CASTS):
        x = x.args[0]
    return matches(x, SOFTMAX_TARGETS)


def _rate_and_training(node: fx.Node, gm: fx.GraphModule) -> tuple[float, bool]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return float(mod.p), True
    bound = bind(node)
    return float(bound["p"]), bool(bound["training"])


class DropoutRule(OpRule):
    name = "dropout"
    targets = (
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        *dialects("dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"),
    )

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        couplings = couple_all_dims(x, node)
        rate, training = _rate_and_training(node, gm)
        key = type(gm.get_submodule(str(node.target))) if node.op == "call_module" else node.target
        packet = getattr(key, "overloadpacket", None)
        dims = (1,) if key in _CHANNEL_DROPOUTS or packet in _CHANNEL_DROPOUTS else None
        is_site = training and not _drops_attention_weights(x)
        site = SiteHint("dropout", rate, dims) if is_site else None
        return AxisRelations(couplings=couplings, site=site)


_CASTS = dialects("to", "_to_copy", "float", "type_as")

RULES = (DropoutRule(),)
