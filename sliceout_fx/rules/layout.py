"""Layout ops of the ATen graphs ``torch.export`` records: views, transposes, slices, concat.

Attention code splits the projection width into heads (``view(B, T, -1, d_head)``), moves axes
(``transpose(1, 2)``) and merges them back. A cut of the flat width that covers whole heads is a
cut of the head axis, so a reshape that splits an axis into ``(outer, inner)`` couples the flat axis
with ``outer`` (``inner`` is never cut), and a merge does the reverse. The group's unit then becomes
a whole head (the gcd of the coupled sizes), which keeps rotary embeddings and grouped-query
attention intact. Shape arguments that name a cut axis are rewritten to its live size at run time.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..ops import live_parts, live_size
from .base import Axis, AxisRelations, OpRule, rank_of, shape_of

aten = torch.ops.aten


def _dim_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products (size-1 dims stand alone)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        a, b = [i], [j]
        pa, pb = src[i], dst[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= src[i]
                a.append(i)
                i += 1
            else:
                pb *= dst[j]
                b.append(j)
                j += 1
        groups.append((a, b))
    return groups


class ReshapeRule(OpRule):
    """``view`` / ``reshape``: couples the outermost dim of each split or merged run."""

    name = "reshape"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        src, dst = shape_of(x), shape_of(node)
        if src is None or dst is None or 0 in src:
            return AxisRelations(blocks="reshape with unknown shapes")
        couplings = []
        for ins, outs in _dim_groups(tuple(src), tuple(dst)):
            if ins and outs and (len(ins) == 1 or len(outs) == 1):
                # The outer dim of a pure split or merge carries a cut in units of the inner
                # block; a run regrouped on both sides (B, E) -> (B*H, d) couples nothing.
                couplings.append((Axis(x, ins[0]), Axis(node, outs[0])))
        return AxisRelations(
            couplings=couplings,
            blocks="reshape mixes this axis into an inner position of another",
        )

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        return _rewrite_size_list(node, ctx, list(node.args[1]))


def _rewrite_size_list(node: fx.Node, ctx: Any, sizes: list[Any]) -> fx.Node | None:
    """Re-emit a view/reshape/expand whose size list names a cut axis with its live size."""
    changed = False
    for dim in range(len(sizes)):
        cut = ctx.out_cut(node, dim)
        if cut is None or (isinstance(sizes[dim], int) and sizes[dim] == -1):
            continue
        sizes[dim] = ctx.call(live_size, (cut,))
        changed = True
    if not changed:
        return None
    return ctx.graph.call_function(node.target, (node.args[0], sizes, *node.args[2:]), node.kwargs)


class ExpandRule(OpRule):
    """``expand``: dims that keep their size are coupled; broadcast (size-1) dims are not."""

    name = "expand"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        src, dst = shape_of(x), shape_of(node)
        if src is None or dst is None:
            return AxisRelations(blocks="expand with unknown shapes")
        offset = len(dst) - len(src)
        couplings = [
            (Axis(x, d), Axis(node, d + offset))
            for d in range(len(src))
            if src[d] == dst[d + offset]
        ]
        return AxisRelations(couplings=couplings)

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        return _rewrite_size_list(node, ctx, list(node.args[1]))


class PermuteRule(OpRule):
    """``transpose`` / ``permute`` / ``t``: each axis moves, nothing mixes."""

    name = "permute"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="permute with unknown shapes")
        order = list(range(rank))
        if node.target is aten.permute.default:
            order = [d % rank for d in node.args[1]]
        elif node.target is aten.t.default:
            order = order[::-1]
        else:
            a, b = (d % rank for d in node.args[1:3])
            order[a], order[b] = order[b], order[a]
        return AxisRelations(
            couplings=[(Axis(x, src), Axis(node, d)) for d, src in enumerate(order)]
        )


class UnsqueezeRule(OpRule):
    """``unsqueeze`` / ``squeeze``: the other axes shift by one."""

    name = "unsqueeze"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        src, dst = rank_of(x), rank_of(node)
        if src is None or dst is None:
            return AxisRelations(blocks="unsqueeze with unknown shapes")
        shape = shape_of(x)
        if dst > src:  # unsqueeze(dim): every input axis survives, shifted past the new one
            new = node.args[1] % dst
            kept, outs = list(range(src)), [d for d in range(dst) if d != new]
        else:  # squeeze(dims) removes the named size-1 axes (all of them without dims)
            dims = node.args[1] if len(node.args) > 1 else None
            named = [dims] if isinstance(dims, int) else (dims or range(src))
            gone = {d % src for d in named if shape[d % src] == 1}
            kept, outs = [d for d in range(src) if d not in gone], list(range(dst))
        return AxisRelations(
            couplings=[(Axis(x, a), Axis(node, b)) for a, b in zip(kept, outs, strict=True)]
        )


class NarrowRule(OpRule):
    """``x[..., a:b]`` (``aten.slice``): the sliced axis cannot also be cut; the others pass."""

    name = "slice"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="slice with unknown shapes")
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        return AxisRelations(
            couplings=[(Axis(x, d), Axis(node, d)) for d in range(rank) if d != dim],
            blocks="indexes into this axis, so its positions must stay whole",
        )


class CatRule(OpRule):
    """Concatenation: the other axes of every operand line up; the concatenated axis blocks."""

    name = "concat"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        tensors = node.args[0]
        rank = rank_of(node)
        if rank is None or not all(rank_of(t) == rank for t in tensors):
            return AxisRelations(blocks="concatenation with unknown shapes")
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
        couplings = [(Axis(t, d), Axis(node, d)) for t in tensors for d in range(rank) if d != dim]
        return AxisRelations(
            couplings=couplings,
            blocks="concatenation: the cut would land in the middle of the result",
        )


class SplitRule(OpRule):
    """``split``: produces a tuple; its items are handled by :class:`SplitItemRule`."""

    name = "split"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="split with unknown shapes")
        dim = split_dim(node)
        # The input's other axes continue in each item; the split axis is only ever cut through
        # a fused projection (see SplitItemRule), never as a whole.
        return AxisRelations(
            passive=[Axis(x, d) for d in range(rank) if d != dim],
            blocks="split: each item covers a fixed range of this axis",
        )


def split_dim(node: fx.Node) -> int:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return dim % rank_of(node.args[0])


class SplitItemRule(OpRule):
    """``split(x)[i]``: couples the non-split axes with ``x``.

    When ``x`` is the output of a fused projection read only by the split (GPT-2's ``c_attn``
    computes Q, K and V in one matmul), each item's split axis is also a *source*: the item is
    recomputed from its own rows of the fused weight, which the projection rule knows how to cut.
    """

    name = "split-item"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        split = node.args[0]
        if not _is_split(split):
            return AxisRelations(blocks="no rule for function getitem")
        x, dim = split.args[0], split_dim(split)
        rank = rank_of(node)
        if rank is None:
            return AxisRelations(blocks="split with unknown shapes")
        couplings = [(Axis(x, d), Axis(node, d)) for d in range(rank) if d != dim]
        sources = [Axis(node, dim)] if fused_projection(split) is not None else []
        return AxisRelations(couplings=couplings, sources=sources)

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        split = node.args[0]
        if not _is_split(split):
            return None
        out_cut = ctx.out_cut(node, split_dim(split))
        if out_cut is None:
            return None
        key = ("fused", split)
        if key not in ctx.memo:  # the first item computes every part in one matmul
            projection = fused_projection(split)
            parts = len(split_sizes(split))
            fused = projection.rule.rewrite_fused(projection.node, ctx, parts, out_cut)
            if projection.views:
                width = ctx.call(operator.mul, (ctx.call(live_size, (out_cut,)), parts))
            for view in projection.views:  # the views between projection and split
                sizes = [*view.args[1][:-1], width]
                fused = ctx.graph.call_function(view.target, (fused, sizes))
            # One split of the live parts (backward: one cat), not a narrow per part (backward:
            # a zero-filled full-size gradient per part).
            ctx.memo[key] = ctx.call(live_parts, (fused, parts, out_cut))
        return ctx.call(operator.getitem, (ctx.memo[key], node.args[1]))


SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


def _is_split(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and any(node.target is op for op in SPLITS)
    )


def split_sizes(split: fx.Node) -> list[int]:
    total = shape_of(split.args[0])[split_dim(split)]
    size = split.args[1]
    if isinstance(size, int):
        return [min(size, total - start) for start in range(0, total, size)]
    return list(size)


@dataclass
class _Projection:
    node: fx.Node
    rule: Any
    views: list[fx.Node]  # views from the projection's output to the split, in order


def fused_projection(split: fx.Node) -> _Projection | None:
    """The linear/addmm whose output (through dim-preserving views) only this split reads."""
    from . import linear

    x, views = split.args[0], []
    while (
        isinstance(x, fx.Node)
        and x.target in (aten.view.default, aten.reshape.default)
        and len(x.users) == 1
        and shape_of(x)[-1] == shape_of(x.args[0])[-1]
    ):
        views.insert(0, x)
        x = x.args[0]
    sizes = split_sizes(split)
    if (
        not isinstance(x, fx.Node)
        or len(x.users) != 1
        or split_dim(split) != rank_of(split.args[0]) - 1
        or len(set(sizes)) != 1
    ):
        return None
    rule = linear.RULES.get(x.target)
    if rule is None or not hasattr(rule, "rewrite_fused"):
        return None
    return _Projection(x, rule, views)


_RESHAPE = ReshapeRule()
RULES = {
    aten.view.default: _RESHAPE,
    aten.reshape.default: _RESHAPE,
    aten._unsafe_view.default: _RESHAPE,
    aten.expand.default: ExpandRule(),
    aten.transpose.int: PermuteRule(),
    aten.permute.default: PermuteRule(),
    aten.t.default: PermuteRule(),
    aten.unsqueeze.default: UnsqueezeRule(),
    aten.squeeze.dim: UnsqueezeRule(),
    aten.squeeze.dims: UnsqueezeRule(),
    aten.slice.Tensor: NarrowRule(),
    aten.cat.default: CatRule(),
    aten.split.Tensor: SplitRule(),
    aten.split_with_sizes.default: SplitRule(),
    operator.getitem: SplitItemRule(),
}
