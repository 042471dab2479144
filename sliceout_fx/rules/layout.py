"""Layout ops: views, flattens, transposes, indexing, concat and split, in both dialects.

Attention code splits the projection width into heads (``view(B, T, -1, d_head)``), moves axes
(``transpose(1, 2)``) and merges them back. A cut of the flat width that covers whole heads is a
cut of the head axis, so a reshape that splits an axis into ``(outer, inner)`` couples the flat axis
with ``outer`` (``inner`` is never cut), and a merge does the reverse. The group's unit then becomes
a whole head (the gcd of the coupled sizes), which keeps rotary embeddings and grouped-query
attention intact. A merge whose cut dim is the *inner* one, ``(B, H, T, d) -> (B*H, T, d)`` (BLOOM
and DeBERTa-v2 fold the heads into the batch for ``bmm``), is a *periodic* coupling: the merged
axis holds the cut once per batch index, and the split back to ``(B, H, ...)`` ends the period.
Shape arguments that name a cut axis are rewritten to its live size at run time.
Flattening ``(N, C, 1, 1)`` after global pooling keeps the channel axis whole, so the classifier
dropout of a CNN is a site like any other.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from ..ops import live_extent, live_parts, live_size
from .base import Axis, AxisRelations, OpRule, bind, couple_all_dims, input_of, rank_of, shape_of
from .binding import dialects, size_list
from .fused import (
    SPLITS,
    any_part_is_cut,
    constant_part,
    fused_projection,
    is_split,
    recompute_part,
    replay_views,
    split_dim,
    split_sizes,
)


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
    """``view`` / ``reshape`` / ``flatten`` / ``unflatten``: couples the outermost dim of each
    split or merged run (only the shapes matter, so every form shares one rule)."""

    name = "reshape"
    targets = (
        nn.Flatten,
        nn.Unflatten,
        *dialects("view", "reshape", "_unsafe_view", "flatten", "unflatten"),
        *dialects("view_as", "reshape_as"),
    )

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        src, dst = shape_of(x), shape_of(node)
        if src is None or dst is None or 0 in src:
            return AxisRelations(blocks="reshape with unknown shapes")
        couplings, periodic = [], []
        for ins, outs in _dim_groups(tuple(src), tuple(dst)):
            if ins and outs and (len(ins) == 1 or len(outs) == 1):
                # The outer dim of a pure split or merge carries a cut in units of the inner
                # block; a run regrouped on both sides (B, E) -> (B*H, d) couples nothing.
                couplings.append((Axis(x, ins[0]), Axis(node, outs[0])))
                # Its innermost dim is merged periodically: heads folded into the batch axis.
                if len(ins) > 1:
                    periodic.append((Axis(x, ins[-1]), Axis(node, outs[0])))
                elif len(outs) > 1:
                    periodic.append((Axis(x, ins[0]), Axis(node, outs[-1])))
        other = _shape_source(node)
        if other is not None:  # view_as(other): the result has other's shape, cut for cut
            couplings += couple_all_dims(other, node)
        return AxisRelations(
            couplings=couplings,
            periodic=periodic,
            blocks="reshape mixes this axis into an inner position of another",
        )

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        sizes = size_list(node)
        return None if sizes is None else _reemit_with_sizes(node, ctx, sizes)


def _shape_source(node: fx.Node) -> fx.Node | None:
    other = bind(node).get("other") if node.op != "call_module" else None
    return other if isinstance(other, fx.Node) else None


def _reemit_with_sizes(node: fx.Node, ctx: Any, sizes: list[Any]) -> fx.Node | None:
    """Re-emit a view/reshape/expand whose size list names a cut axis with its live size."""
    changed = False
    for dim in range(len(sizes)):
        cut = ctx.out_cut(node, dim)
        if cut is None or (isinstance(sizes[dim], int) and sizes[dim] == -1):
            continue
        sizes[dim] = ctx.call(live_extent, (sizes[dim], cut))
        changed = True
    if not changed:
        return None
    x = input_of(node)
    if node.op == "call_method":
        return ctx.graph.call_method(str(node.target), (x, *sizes))
    return ctx.graph.call_function(node.target, (x, sizes))


def _aligned_from_the_right(node: fx.Node) -> list[tuple[Axis, Axis, int, int]] | None:
    """``(input axis, output axis, input size, output size)`` of a copy along axes (``expand``,
    ``repeat``): the input's axes line up with the output's last ones."""
    x = input_of(node)
    src, dst = shape_of(x), shape_of(node)
    if src is None or dst is None or len(dst) < len(src):
        return None
    offset = len(dst) - len(src)
    return [
        (Axis(x, d), Axis(node, d + offset), size, dst[d + offset]) for d, size in enumerate(src)
    ]


class ExpandRule(OpRule):
    """``expand``: dims that keep their size are coupled; broadcast (size-1) dims are not."""

    name = "expand"
    targets = dialects("expand", "expand_as")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        aligned = _aligned_from_the_right(node)
        if aligned is None:
            return AxisRelations(blocks="expand with unknown shapes")
        couplings = [(a, b) for a, b, size, out in aligned if size == out]
        other = _shape_source(node)
        if other is not None:
            couplings += couple_all_dims(other, node)
        return AxisRelations(couplings=couplings)

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        sizes = size_list(node)
        return None if sizes is None else _reemit_with_sizes(node, ctx, sizes)


class RepeatRule(OpRule):
    """``repeat`` / ``tile``: an axis repeated ``k`` times holds ``k`` periods of its cut
    (DeBERTa copies its projected positions once per batch index, heads folded in)."""

    name = "repeat"
    targets = dialects("repeat", "tile")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        aligned = _aligned_from_the_right(node)
        if aligned is None:
            return AxisRelations(blocks="repeat with unknown shapes")
        return AxisRelations(
            couplings=[(a, b) for a, b, size, out in aligned if size == out],
            periodic=[(a, b) for a, b, size, out in aligned if size != out and size > 1],
            blocks="repeat copies this axis",
        )


class PermuteRule(OpRule):
    """``transpose`` / ``permute`` / ``t`` / ``swapaxes``: each axis moves, nothing mixes."""

    name = "permute"
    targets = dialects("transpose", "permute", "t", "swapaxes", "movedim")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a = bind(node)
        x = a["input"]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="permute with unknown shapes")
        order = list(range(rank))
        if "dims" in a:
            order = [d % rank for d in a["dims"]]
        elif "source" in a:  # movedim(source, destination)
            src, dst = a["source"], a["destination"]
            src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
            moved = dict(zip((d % rank for d in dst), (d % rank for d in src), strict=True))
            rest = iter(d for d in range(rank) if d not in moved.values())
            order = [moved[d] if d in moved else next(rest) for d in range(rank)]
        elif "dim0" in a or "axis0" in a:
            first, second = (a.get("dim0", a.get("axis0")), a.get("dim1", a.get("axis1")))
            first, second = first % rank, second % rank
            order[first], order[second] = order[second], order[first]
        else:  # t()
            order = order[::-1]
        return AxisRelations(
            couplings=[(Axis(x, src), Axis(node, d)) for d, src in enumerate(order)]
        )


class UnsqueezeRule(OpRule):
    """``unsqueeze`` / ``squeeze``: the other axes shift by one."""

    name = "unsqueeze"
    targets = dialects("unsqueeze", "squeeze")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a = bind(node)
        x = a["input"]
        src, dst = rank_of(x), rank_of(node)
        if src is None or dst is None:
            return AxisRelations(blocks="unsqueeze with unknown shapes")
        shape = shape_of(x)
        if dst > src:  # unsqueeze(dim): every input axis survives, shifted past the new one
            new = a["dim"] % dst
            kept, outs = list(range(src)), [d for d in range(dst) if d != new]
        else:  # squeeze(dims) removes the named size-1 axes (all of them without dims)
            dims = a.get("dim")
            named = [dims] if isinstance(dims, int) else (dims or range(src))
            gone = {d % src for d in named if shape[d % src] == 1}
            kept, outs = [d for d in range(src) if d not in gone], list(range(dst))
        return AxisRelations(
            couplings=[(Axis(x, a), Axis(node, b)) for a, b in zip(kept, outs, strict=True)]
        )


class NarrowRule(OpRule):
    """``aten.slice`` / ``narrow`` / ``select``: the indexed axis cannot also be cut; the others
    pass (``select`` removes its axis)."""

    name = "slice"
    targets = dialects("slice", "narrow", "select")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a = bind(node)
        x = a["input"]
        rank = rank_of(x)
        if rank is None or rank_of(node) is None:
            return AxisRelations(blocks="slice with unknown shapes")
        dim = a.get("dim", 0) % rank
        removed = rank_of(node) < rank
        kept = [d for d in range(rank) if d != dim]
        outs = [d - (removed and d > dim) for d in kept]
        # A slice of a fused projection's features (Phi-3's ``qkv[..., :q_size]``) is a part
        # recomputed from its own weight rows: its sliced axis is a source.
        part = self.is_layer_output(node, gm)
        return AxisRelations(
            couplings=[(Axis(x, d), Axis(node, o)) for d, o in zip(kept, outs, strict=True)],
            sources=[Axis(node, dim)] if part else [],
            blocks="indexes into this axis, so its positions must stay whole",
        )

    def is_layer_output(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return constant_part(node, gm) is not None and fused_projection(node, gm) is not None

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        return _rewrite_constant_part(node, ctx)


def _rewrite_constant_part(node: fx.Node, ctx: Any) -> fx.Node | None:
    """A slice or index of a fused projection, recomputed from its own weight rows when it or a
    part beside it is cut."""
    found = constant_part(node, ctx.gm)
    projection = None if found is None else fused_projection(node, ctx.gm)
    if projection is None:
        return None
    dim, start, size = found
    out_cut = ctx.out_cut(node, dim)
    cut_beside = any_part_is_cut(node, projection, ctx)  # asked at the first part, while all are
    if out_cut is None and not cut_beside:
        return None
    return recompute_part(ctx, projection, start, size, out_cut)


class IndexRule(OpRule):
    """``aten.index(x, [None, ..., t])``, the ATen form of ``x[..., t]``: by one constant tensor
    of consecutive positions it takes a part like a slice (Falcon's key head); any other index
    tensor blocks the axes it indexes."""

    name = "index"
    targets = (torch.ops.aten.index,)

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        found = constant_part(node, gm)
        x, rank = input_of(node), rank_of(node)
        if found is None or rank is None:
            return AxisRelations(blocks="indexes this axis with a tensor")
        dim = found[0]
        return AxisRelations(
            couplings=[(Axis(x, d), Axis(node, d)) for d in range(rank) if d != dim],
            sources=[Axis(node, dim)] if self.is_layer_output(node, gm) else [],
            blocks="indexes into this axis, so its positions must stay whole",
        )

    is_layer_output = NarrowRule.is_layer_output
    rewrite = NarrowRule.rewrite


class CatRule(OpRule):
    """Concatenation: the other axes of every operand line up; the concatenated axis blocks."""

    name = "concat"
    targets = dialects("cat", "concat", "concatenate")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a = bind(node)
        tensors = a["tensors"]
        rank = rank_of(node)
        if rank is None or not all(rank_of(t) == rank for t in tensors):
            return AxisRelations(blocks="concatenation with unknown shapes")
        dim = a.get("dim", 0) % rank
        couplings = [(Axis(t, d), Axis(node, d)) for t in tensors for d in range(rank) if d != dim]
        return AxisRelations(
            couplings=couplings,
            blocks="concatenation: the cut would land in the middle of the result",
        )


class StackRule(OpRule):
    """``stack``: the operands' axes line up and shift past the new axis (rotary embeddings
    interleave halves with ``stack(..., -1).flatten(-2)``); the new axis is never cut."""

    name = "stack"
    targets = dialects("stack")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a = bind(node)
        tensors, rank = a["tensors"], rank_of(node)
        if rank is None or not all(rank_of(t) == rank - 1 for t in tensors):
            return AxisRelations(blocks="stack with unknown shapes")
        new = a.get("dim", 0) % rank
        outs = [d for d in range(rank) if d != new]
        couplings = [
            (Axis(t, d), Axis(node, o)) for t in tensors for d, o in enumerate(outs)
        ]
        return AxisRelations(couplings=couplings)


class SplitRule(OpRule):
    """``split`` / ``chunk``: produces a tuple; its items are handled by :class:`GetItemRule`."""

    name = "split"
    targets = SPLITS

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = input_of(node)
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="split with unknown shapes")
        dim = split_dim(node)
        # The input's other axes continue in each item; the split axis is only ever cut through
        # a fused projection (see GetItemRule), never as a whole.
        return AxisRelations(
            passive=[Axis(x, d) for d in range(rank) if d != dim],
            blocks="split: each item covers a fixed range of this axis",
        )


class GetItemRule(OpRule):
    """``items[i]`` of a split, or ``x[index]`` of a tensor.

    An item of a split couples the non-split axes with ``x``. When ``x`` is the output of a fused
    projection read only by the split (GPT-2's ``c_attn`` computes Q, K and V in one matmul), each
    item's split axis is also a *source*: the item is recomputed from its own rows of the fused
    weight, which the projection rule knows how to cut. Indexing a tensor with full slices
    (``x[:, :, 1:-1]``) keeps the fully sliced axes, which pass; indexed axes block.
    """

    name = "getitem"
    targets = (operator.getitem,)

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        source, index = node.args[0], node.args[1]
        if is_split(source):
            return self._split_item(node, source, gm)
        if shape_of(source) is not None:
            relations = _index_relations(node, source, index)
            if self.is_layer_output(node, gm):  # see NarrowRule
                relations.sources.append(Axis(node, constant_part(node, gm)[0]))
            return relations
        return AxisRelations(blocks="no rule for function getitem")

    def _split_item(self, node: fx.Node, split: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x, dim = input_of(split), split_dim(split)
        rank = rank_of(node)
        if rank is None:
            return AxisRelations(blocks="split with unknown shapes")
        couplings = [(Axis(x, d), Axis(node, d)) for d in range(rank) if d != dim]
        sources = [Axis(node, dim)] if self.is_layer_output(node, gm) else []
        return AxisRelations(couplings=couplings, sources=sources)

    def is_layer_output(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        """An item of a fused projection's split, or a fused projection's ``[..., a:b]``."""
        source = node.args[0]
        if is_split(source):
            return fused_projection(source, gm) is not None
        return NarrowRule.is_layer_output(self, node, gm)

    def rewrite(self, node: fx.Node, ctx: Any) -> fx.Node | None:
        split = node.args[0]
        if not is_split(split):
            return _rewrite_constant_part(node, ctx)  # x[..., a:b] of a fused projection
        dim, sizes = split_dim(split), split_sizes(split)
        out_cut = ctx.out_cut(node, dim)
        unequal = len(set(sizes)) > 1
        projection = None if out_cut is None and not unequal else fused_projection(split, ctx.gm)
        if projection is None or (unequal and not any_part_is_cut(node, projection, ctx)):
            return None
        if unequal:  # each part is recomputed from its own weight rows, the uncut ones too
            index = node.args[1]
            return recompute_part(ctx, projection, sum(sizes[:index]), sizes[index], out_cut)
        key = ("fused", split)
        if key not in ctx.memo:  # the first item computes every part in one matmul
            parts = len(sizes)
            fused = projection.rule.rewrite_fused(projection.node, ctx, parts, out_cut)
            if projection.views:
                width = ctx.call(operator.mul, (ctx.call(live_size, (out_cut,)), parts))
                fused = replay_views(projection.views, fused, width, ctx)
            # One split of the live parts (backward: one cat), not a narrow per part (backward:
            # a zero-filled full-size gradient per part).
            ctx.memo[key] = ctx.call(live_parts, (fused, parts, out_cut))
        return ctx.call(operator.getitem, (ctx.memo[key], node.args[1]))


def _index_relations(node: fx.Node, x: fx.Node, index: Any) -> AxisRelations:
    """``x[index]`` with slices, ints, ``None``, ``...`` and one list of ints (which keeps its
    axis, as a slice does): full slices (``:``) pass."""
    rank, out_rank = rank_of(x), rank_of(node)
    items = list(index) if isinstance(index, tuple) else [index]
    positions = [i for i in items if isinstance(i, list) and all(isinstance(p, int) for p in i)]
    if out_rank is None or len(positions) > 1 or not all(
        i is None or i is Ellipsis or isinstance(i, (int, slice)) or i in positions for i in items
    ):
        return AxisRelations(blocks="indexes this axis with a tensor")
    explicit = sum(i is not None and i is not Ellipsis for i in items)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (rank - explicit) + items[at + 1 :]
    items += [slice(None)] * (rank - sum(i is not None for i in items))
    couplings, dim, out = [], 0, 0
    for item in items:
        if item is None:
            out += 1
            continue
        if item == slice(None):
            couplings.append((Axis(x, dim), Axis(node, out)))
        out += 0 if isinstance(item, int) else 1
        dim += 1
    return AxisRelations(
        couplings=couplings, blocks="indexes into this axis, so its positions must stay whole"
    )


RULES = (
    ReshapeRule(),
    ExpandRule(),
    RepeatRule(),
    PermuteRule(),
    UnsqueezeRule(),
    NarrowRule(),
    CatRule(),
    StackRule(),
    SplitRule(),
    GetItemRule(),
    IndexRule(),
)
