"""Fused projections: one layer whose output features are taken apart into parts.

GPT-2's ``c_attn`` computes Q, K and V in one matmul and splits them (``split``/``chunk``);
Phi-3 slices parts of unequal size (``qkv[..., :q_size]``); Falcon views the features as heads
and takes the query heads by a slice and its one key and one value head by index
(``qkv.view(B, T, H + 2, d)[..., [-2], :]``). Each part is a width of its own (the query heads
are cut, the key head that every query head shares is not), so a part is a *source*: it is
recomputed from its own rows of the fused weight by the layer's rule
(:attr:`~.base.OpRule.fused_projection`). When any part is cut, every part is recomputed, so the
full-width product is left unused and dropped. The partition rules (split items, slices, index)
ask :func:`fused_projection` whether their input is such a layer's output.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..ops import live_size, scale_cut
from .base import bind, fetch, input_of, rank_of, shape_of
from .binding import dialects, matches, size_list

SPLITS = dialects("split", "split_with_sizes", "chunk")
_VIEWS = dialects("view", "reshape")
_UNSQUEEZES = dialects("unsqueeze")
_SLICES = (*dialects("slice", "narrow"),)
_INDEX = (torch.ops.aten.index,)
_CONSTANT_COPIES = dialects("lift_fresh_copy", "detach", "clone")


@dataclass
class Projection:
    """A fused layer and the views between its output and the tensor its parts are taken from."""

    node: fx.Node
    rule: Any
    views: list[fx.Node]  # views that keep the last axis (and unsqueezes), in order
    # A last view that splits the features into ``(..., parts, inner...)``: parts are then taken
    # along ``dim`` and each position of it holds ``inner`` features (Falcon's heads).
    head_view: fx.Node | None = None
    dim: int = -1
    inner: int = 1


def is_split(node: Any) -> bool:
    return matches(node, SPLITS)


def split_dim(node: fx.Node) -> int:
    """The axis a split/chunk cuts (its input may have been replaced while rewriting: the
    rank comes from the recorded item shapes then)."""
    rank = rank_of(input_of(node))
    if rank is None:
        items = node.meta.get("tensor_meta")
        rank = len(items[0].shape)
    return bind(node).get("dim", 0) % rank


def split_sizes(split: fx.Node) -> list[int]:
    """The sizes of a split's items along the split axis (from the recorded item shapes)."""
    items = split.meta.get("tensor_meta")
    dim = split_dim(split)
    if isinstance(items, (list, tuple)) and all(hasattr(m, "shape") for m in items):
        return [int(m.shape[dim]) for m in items]
    a = bind(split)
    total = shape_of(input_of(split))[dim]
    if "chunks" in a:
        size = -(-total // a["chunks"])
        return [min(size, total - start) for start in range(0, total, size)]
    size = a.get("split_size", a.get("split_sizes"))
    if isinstance(size, int):
        return [min(size, total - start) for start in range(0, total, size)]
    return list(size)


def constant_part(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int, int] | None:
    """``(dim, start, size)`` when ``node`` takes the constant positions ``start : start + size``
    of one axis of its input and keeps every other axis and the rank: ``aten.slice``,
    ``narrow``, ``x[..., a:b, :]``, and an index by consecutive constants (``x[..., [4], :]``,
    ``aten.index`` with a constant tensor)."""
    if not isinstance(node, fx.Node) or not (
        node.target is operator.getitem or matches(node, (*_SLICES, *_INDEX))
    ):
        return None
    x = input_of(node)
    rank = rank_of(x)
    if rank is None or rank_of(node) != rank:
        return None
    if node.target is operator.getitem:
        found = _one_indexed_axis(node.args[1], rank)
    elif matches(node, _SLICES):
        a = bind(node)
        start, dim = a.get("start"), a.get("dim", 0)
        end = a.get("end") if "length" not in a else _add(start, a["length"])
        found = (dim, slice(start, end, a.get("step", 1)))
    elif matches(node, _INDEX):
        found = _constant_index(bind(node).get("indices"), rank, gm)
    else:
        return None
    if found is None or not isinstance(found[0], int):
        return None
    dim, where = found[0] % rank, found[1]
    width = shape_of(x)[dim]
    if isinstance(where, slice):
        if where.step not in (1, None) or not all(
            v is None or isinstance(v, int) for v in (where.start, where.stop)
        ):
            return None
        start, stop, _ = where.indices(width)
        return (dim, start, stop - start) if stop > start else None
    positions = [int(p) % width for p in where]
    if not positions or positions != list(range(positions[0], positions[0] + len(positions))):
        return None
    return dim, positions[0], len(positions)


def _add(a: Any, b: Any) -> Any:
    return a + b if isinstance(a, int) and isinstance(b, int) else None


def _one_indexed_axis(index: Any, rank: int) -> tuple[int, slice | list[int]] | None:
    """``(dim, slice or positions)`` of ``x[index]`` that indexes one axis by a slice or a list
    of ints and leaves the others whole."""
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1 or any(i is None or isinstance(i, int) for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (rank - len(items) + 1) + items[at + 1 :]
    items += [slice(None)] * (rank - len(items))
    indexed = [(d, i) for d, i in enumerate(items) if i != slice(None)]
    if len(items) != rank or len(indexed) != 1:
        return None
    dim, item = indexed[0]
    if isinstance(item, slice):
        return dim, item
    if isinstance(item, (list, tuple)) and all(isinstance(p, int) for p in item):
        return dim, list(item)
    return None


def _constant_index(indices: Any, rank: int, gm: fx.GraphModule) -> tuple | None:
    """``aten.index(x, [None, ..., t])`` with one constant 1-D tensor ``t``: ``(dim, values)``."""
    if not isinstance(indices, (list, tuple)):
        return None
    given = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(given) != 1:
        return None
    dim, node = given[0]
    while isinstance(node, fx.Node) and matches(node, _CONSTANT_COPIES):
        node = input_of(node)
    value = fetch(gm, node)
    if value is None or value.dim() != 1 or value.dtype not in (torch.int64, torch.int32):
        return None
    return dim, value.tolist()


def is_unsqueeze(node: Any) -> bool:
    """``x.unsqueeze(d)`` before a split (GPT-BigCode's ``c_attn(x).unsqueeze(1)``)."""
    return matches(node, _UNSQUEEZES) and rank_of(node) is not None


def fused_projection(partition: fx.Node, gm: fx.GraphModule) -> Projection | None:
    """The fused layer whose output ``partition`` takes a part of, or ``None``.

    The layer's output reaches the partitioned tensor through views that keep its last axis
    and, last, a view that splits its features into positions of ``dim`` (Falcon's heads); the
    partitioned tensor is read only by partitions of ``dim``: one ``split``/``chunk``, or
    constant slices and indexes.
    """
    from . import rule_for

    if is_split(partition):
        dim = split_dim(partition)
    else:
        found = constant_part(partition, gm)
        if found is None:
            return None
        dim = found[0]
    x = input_of(partition)
    readers = list(x.users)
    if rank_of(x) is None or (is_split(partition) and len(readers) != 1):
        return None
    if not all(_takes_part(user, dim, gm) for user in readers):
        return None
    head_view, inner = None, 1
    if dim != rank_of(x) - 1:
        inner = _features_per_position(x, dim)
        if inner is None or len(input_of(x).users) != 1:
            return None
        head_view, x = x, input_of(x)
    views = []
    while (
        (matches(x, _VIEWS) or is_unsqueeze(x))
        and len(x.users) == 1
        and shape_of(x)[-1] == shape_of(input_of(x))[-1]
    ):
        views.insert(0, x)
        x = input_of(x)
    if not isinstance(x, fx.Node) or (views and len(x.users) != 1):
        return None
    rule = rule_for(x, gm)
    if not rule.fused_projection:
        return None
    return Projection(x, rule, views, head_view, dim, inner)


def _takes_part(node: fx.Node, dim: int, gm: fx.GraphModule) -> bool:
    if is_split(node):
        return split_dim(node) == dim
    found = constant_part(node, gm)
    return found is not None and found[0] == dim


def _features_per_position(view: fx.Node, dim: int) -> int | None:
    """Features per position of ``dim`` when ``view`` splits its input's last axis into
    ``(..., dim, inner...)`` and keeps the leading axes; else ``None``."""
    if not matches(view, _VIEWS):
        return None
    src, out = shape_of(input_of(view)), shape_of(view)
    if src is None or out is None or tuple(out[:dim]) != tuple(src[:-1]):
        return None
    if math.prod(out[dim:]) != src[-1]:
        return None
    return math.prod(out[dim + 1 :])


def any_part_is_cut(node: fx.Node, projection: Projection, ctx: Any) -> bool:
    """Whether a part taken alongside ``node`` is cut: every part is then recomputed, and an
    uncut one (multi-query attention's single key head) gets its own product instead of
    keeping the full-width one alive for it."""
    taken_from = node.args[0] if node.target is operator.getitem else input_of(node)
    key = ("cut parts", taken_from)
    if key not in ctx.memo:  # at the first part, before any part is replaced
        ctx.memo[key] = any(
            ctx.out_cut(user, projection.dim) is not None for user in taken_from.users
        )
    return ctx.memo[key]


def recompute_part(
    ctx: Any, projection: Projection, start: int, size: int, out_cut: Any
) -> fx.Node:
    """Positions ``start : start + size`` of the partitioned axis, recomputed from their own
    rows of the fused weight (cut by ``out_cut``, or whole when it is ``None``) and viewed as
    the partition saw them."""
    inner = projection.inner
    feature_cut = out_cut
    if out_cut is not None and inner > 1:
        feature_cut = ctx.call(scale_cut, (out_cut, inner))
    part = projection.rule.rewrite_part(
        projection.node, ctx, start * inner, size * inner, feature_cut
    )
    width = size * inner if out_cut is None else ctx.call(live_size, (feature_cut,))
    part = replay_views(projection.views, part, width, ctx)
    if projection.head_view is None:
        return part
    sizes = size_list(projection.head_view)
    sizes[projection.dim] = size if out_cut is None else ctx.call(live_size, (out_cut,))
    return ctx.graph.call_function(torch.reshape, (part, sizes))


def replay_views(views: list[fx.Node], x: fx.Node, width: Any, ctx: Any) -> fx.Node:
    """The views between a projection and its partition, on a narrower last axis (``width``):
    they keep that axis, so only its size changes."""
    for view in views:
        if is_unsqueeze(view):
            dim = bind(view)["dim"] % rank_of(view)
            x = ctx.graph.call_function(torch.unsqueeze, (x, dim - rank_of(view)))
        else:
            x = ctx.graph.call_function(torch.reshape, (x, [*size_list(view)[:-1], width]))
    return x
