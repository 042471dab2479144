"""Ops that stop a group, with the reason reported, plus shape queries that may look at it.

Reshapes, flattens and concatenations mix a channel axis with others, so a cut on the axis no longer
maps to a contiguous range of the result; they block until a dedicated rule says how to carry a cut
through them. ``x.size(d)`` / ``x.dim()`` on another axis is harmless and passes.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, rank_of


class BoundaryRule(OpRule):
    """An op known to mix the channel axis with others."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        return AxisRelations(blocks=self.reason)


class SizeRule(OpRule):
    """``x.size(d)`` and ``x.dim()``: fine unless they ask for the width of a cut axis."""

    name = "size"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="size of an unknown tensor")
        if node.target == "dim":
            return AxisRelations(passive=[Axis(x, d) for d in range(rank)])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(dim, int):
            return AxisRelations(blocks="reads the whole shape, which would change with the cut")
        dim %= rank
        return AxisRelations(passive=[Axis(x, d) for d in range(rank) if d != dim])


class AttributeRule(OpRule):
    """``x.ndim``, ``x.dtype``, ``x.device``...: width-independent attributes pass; ``x.shape``
    does not (code could read the width of the cut axis from it)."""

    name = "getattr"
    _HARMLESS = frozenset({"ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"})

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x, attribute = node.args[0], node.args[1]
        rank = rank_of(x)
        if rank is None or attribute not in self._HARMLESS:
            return AxisRelations(blocks=f"reads x.{attribute}, which would change with the cut")
        return AxisRelations(passive=[Axis(x, d) for d in range(rank)])


_VIEW = BoundaryRule("reshape", "reshape/flatten mixes the channel axis with other axes")
_CAT = BoundaryRule("concat", "concatenation: the cut would land in the middle of the result")
_RESIDUAL = BoundaryRule("add", "residual add: both branches would need the same cut")

RULES = {
    nn.Flatten: _VIEW,
    torch.flatten: _VIEW,
    torch.reshape: _VIEW,
    "method:view": _VIEW,
    "method:reshape": _VIEW,
    "method:flatten": _VIEW,
    torch.cat: _CAT,
    torch.concat: _CAT,
    torch.stack: BoundaryRule("stack", "stack: a new axis is formed from several tensors"),
    "method:size": SizeRule(),
    getattr: AttributeRule(),
    "method:dim": SizeRule(),
    torch.ops.aten.sym_size.int: SizeRule(),
}
