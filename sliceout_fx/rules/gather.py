"""``gather``: picks positions along one axis by an index tensor.

DeBERTa's disentangled attention gathers the relative-position scores of each query,
``gather(scores, -1, index)``, with the heads folded into the batch axis. A gather keeps every
axis but the one it picks along, reading the same position of its index there, so those axes
pass and the index is narrowed with the group's cut where it is read.
"""

from __future__ import annotations

from torch import fx

from .base import Axis, AxisRelations, OpRule, bind, rank_of, shape_of
from .binding import dialects


class GatherRule(OpRule):
    """``gather(x, dim, index)``: the result has ``index``'s shape; off ``dim`` it reads ``x`` and
    ``index`` at its own position, so those axes pass where ``x`` is not broadcast."""

    name = "gather"
    targets = dialects("gather")
    narrows_operands = True  # the index is read at the position of the result

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        bound = bind(node)
        x, index = bound["input"], bound["index"]
        rank = rank_of(node)
        if rank is None or rank_of(x) != rank or rank_of(index) != rank:
            return AxisRelations(blocks="gather with unknown shapes")
        dim = bound["dim"] % rank
        out = shape_of(node)
        couplings = [
            (Axis(t, d), Axis(node, d))
            for t in (x, index)
            for d in range(rank)
            if d != dim and shape_of(t)[d] == out[d]
        ]
        return AxisRelations(couplings=couplings, blocks="gather picks positions along this axis")


RULES = (GatherRule(),)
