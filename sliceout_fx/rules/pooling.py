"""Pooling and reductions: channels pass through, pooled or reduced axes do not.

Squeeze-excite pools the sliced feature map to one value per channel before its reduce conv, so the
channel axis of the pooled tensor must carry the same cut. Reductions (``x.mean((2, 3))``) couple
every axis they keep, renumbered when ``keepdim`` is false.
"""

from __future__ import annotations

from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, bind, input_of, rank_of
from .binding import dialects


class PoolRule(OpRule):
    """Spatial pooling of a batched ``(N, C, ...)`` tensor: batch and channel axes pass through."""

    name = "pool"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        if rank_of(x) is None or rank_of(x) != rank_of(node) or rank_of(x) < 3:
            return AxisRelations(blocks="pooling of an unbatched or unknown tensor")
        return AxisRelations(couplings=[(Axis(x, d), Axis(node, d)) for d in (0, 1)])


class ReductionRule(OpRule):
    """``mean``/``sum``/``amax``/``norm`` over explicit dims: the kept axes pass through (a
    global response norm's mean over channels blocks them, with that reason)."""

    name = "reduction"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a = bind(node)
        x, rank = a["input"], rank_of(a["input"])
        dims, keepdim = a.get("dim"), a.get("keepdim", False)
        if rank is None or dims is None or (isinstance(dims, (list, tuple)) and not dims):
            return AxisRelations(blocks="reduction over every axis")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not all(isinstance(d, int) for d in dims):
            return AxisRelations(blocks="reduction over non-constant axes")
        reduced = {d % rank for d in dims}
        couplings, out_dim = [], 0
        for d in range(rank):
            if d in reduced:
                out_dim += 1 if keepdim else 0
                continue
            couplings.append((Axis(x, d), Axis(node, out_dim)))
            out_dim += 1
        return AxisRelations(
            couplings=couplings,
            blocks="reduces over this axis, so the result depends on its full width",
        )


_POOL_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
)
_POOL_OPS = tuple(
    f"{kind}_pool{n}d"
    for kind in ("avg", "max", "adaptive_avg", "adaptive_max", "_adaptive_avg", "lp")
    for n in (1, 2, 3)
)
PoolRule.targets = (*_POOL_MODULES, *dialects(*_POOL_OPS))
ReductionRule.targets = dialects("mean", "sum", "amax", "amin", "norm", "linalg_vector_norm")
RULES = (PoolRule(), ReductionRule())
