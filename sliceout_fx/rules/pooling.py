"""Pooling and reductions: channels pass through, pooled or reduced axes do not.

Squeeze-excite pools the sliced feature map to one value per channel before its reduce conv, so the
channel axis of the pooled tensor must carry the same cut. Reductions (``x.mean((2, 3))``) couple
every axis they keep, renumbered when ``keepdim`` is false.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, rank_of


class PoolRule(OpRule):
    """Spatial pooling of a batched ``(N, C, ...)`` tensor: batch and channel axes pass through."""

    name = "pool"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0] if node.args else node.kwargs["input"]
        if rank_of(x) is None or rank_of(x) != rank_of(node) or rank_of(x) < 3:
            return AxisRelations(blocks="pooling of an unbatched or unknown tensor")
        return AxisRelations(couplings=[(Axis(x, d), Axis(node, d)) for d in (0, 1)])


class ReductionRule(OpRule):
    """``mean``/``sum``/``amax`` over explicit dims: the kept axes pass through."""

    name = "reduction"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0] if node.args else node.kwargs["input"]
        rank = rank_of(x)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if rank is None or dims is None:
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
        return AxisRelations(couplings=couplings)


_POOL = PoolRule()
_REDUCE = ReductionRule()
RULES = {
    **{
        m: _POOL
        for m in (
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
        )
    },
    **{
        f: _POOL
        for f in (
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
        )
    },
    **{f"method:{m}": _REDUCE for m in ("mean", "sum", "amax", "amin")},
    torch.mean: _REDUCE,
    torch.sum: _REDUCE,
    torch.amax: _REDUCE,
    torch.ops.aten.mean.dim: _REDUCE,
    torch.ops.aten.sum.dim_IntList: _REDUCE,
    torch.ops.aten.amax.default: _REDUCE,
}
