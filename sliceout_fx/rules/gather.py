"""``gather`` and ``repeat``: ops that pick or copy positions along an axis.

DeBERTa's disentangled attention gathers the relative-position scores of each query,
``gather(scores, -1, index)``, and copies the projected position embeddings once per batch
index, ``pos.repeat(B, 1, 1)``, with the heads folded into that batch axis. A gather keeps every
axis but the one it picks along, reading the same position of its index there; a repeat along an
axis holds one copy of the cut per repetition, a periodic coupling as in a view that folds heads
into the batch.
"""

from __future__ import annotations

from torch import fx

from .base import Axis, AxisRelations, OpRule, bind, input_of, rank_of, shape_of
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


class RepeatRule(OpRule):
    """``repeat`` / ``tile``: an axis repeated ``k`` times holds ``k`` periods of its cut."""

    name = "repeat"
    targets = dialects("repeat", "tile")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        src, dst = shape_of(x), shape_of(node)
        if src is None or dst is None or len(dst) < len(src):
            return AxisRelations(blocks="repeat with unknown shapes")
        offset = len(dst) - len(src)
        couplings, periodic = [], []
        for d, size in enumerate(src):
            pair = (Axis(x, d), Axis(node, d + offset))
            if dst[d + offset] == size:
                couplings.append(pair)
            elif size > 1:
                periodic.append(pair)
        return AxisRelations(
            couplings=couplings, periodic=periodic, blocks="repeat copies this axis"
        )


RULES = (GatherRule(), RepeatRule())
