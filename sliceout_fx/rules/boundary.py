"""Shape queries that may look at a cut tensor.

``x.size(d)``, ``x.shape[d]`` and ``x.dim()`` on an axis that is not cut are harmless and pass;
reading the width of a cut axis blocks it (code could build something of that width).
:class:`BoundaryRule` is for user code that knows an op stops a group and wants to say why.
"""

from __future__ import annotations

import operator

from torch import fx

from .base import Axis, AxisRelations, OpRule, bind, input_of, rank_of
from .binding import dialects


class BoundaryRule(OpRule):
    """An op known to mix the channel axis with others."""

    def __init__(self, name: str, reason: str, targets: tuple = ()) -> None:
        self.name = name
        self.reason = reason
        self.targets = targets

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        return AxisRelations(blocks=self.reason)


def _dims_read(node: fx.Node, rank: int) -> set[int] | None:
    """The axes whose sizes the users of a whole-shape query read (``None``: unknown uses)."""
    read: set[int] = set()
    for user in node.users:
        index = user.args[1] if user.target is operator.getitem else None
        if isinstance(index, int):
            read.add(index % rank)
        elif isinstance(index, slice):  # ``b, t = x.shape[:2]``
            read.update(range(rank)[index])
        else:
            return None
    return read


class SizeRule(OpRule):
    """``x.size(d)``, ``x.size()[d]`` and ``x.dim()``: fine unless they read a cut axis's width."""

    name = "size"
    targets = (*dialects("size", "dim"), *dialects("sym_size"))

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="size of an unknown tensor")
        if node.target == "dim":
            return AxisRelations(passive=[Axis(x, d) for d in range(rank)])
        dim = bind(node).get("dim")
        read = {dim % rank} if isinstance(dim, int) else _dims_read(node, rank)
        if read is None:
            return AxisRelations(blocks="reads the whole shape, which would change with the cut")
        return AxisRelations(
            passive=[Axis(x, d) for d in range(rank) if d not in read],
            blocks="reads the width of this axis, which would change with the cut",
        )


class AttributeRule(OpRule):
    """``x.ndim``, ``x.dtype``, ``x.device``...: width-independent attributes pass; ``x.shape``
    passes on the axes its users do not index (``x.shape[0]``, ``x.shape[:2]``)."""

    name = "getattr"
    targets = (getattr,)
    _HARMLESS = frozenset({"ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"})

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x, attribute = node.args[0], node.args[1]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks=f"reads x.{attribute} of an unknown tensor")
        if attribute in self._HARMLESS:
            return AxisRelations(passive=[Axis(x, d) for d in range(rank)])
        read = _dims_read(node, rank) if attribute == "shape" else None
        if read is None:
            return AxisRelations(blocks=f"reads x.{attribute}, which would change with the cut")
        return AxisRelations(
            passive=[Axis(x, d) for d in range(rank) if d not in read],
            blocks="reads the width of this axis from x.shape, which would change with the cut",
        )


RULES = (SizeRule(), AttributeRule())
