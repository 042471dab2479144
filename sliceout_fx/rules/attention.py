"""Attention: scaled-dot-product attention (fused) and its eager matmul-softmax-matmul form.

SliceOut cuts attention by whole heads: the head axis of Q, K, V and of the output share one
slice, so every kept head sees its full ``d_head`` and the ``1/sqrt(d_head)`` temperature stays
right (the paper's rule "temperature = the sliced dimension" with whole heads). With grouped-query
attention K and V have fewer heads; coupling Q's head axis with theirs makes the group's unit a
whole KV group. The head-dim contraction is never cut, so nothing inside attention needs scaling:
normalisation happens where the heads leave the group (the output projection), i.e. on the values.
"""

from __future__ import annotations

import operator

from torch import fx

from .base import Axis, AxisRelations, OpRule, bind, rank_of, shape_of
from .binding import dialects
from .linear import PARAMETER_MATMULS, parameter_operand


class AttentionRule(OpRule):
    """``scaled_dot_product_attention(q, k, v, mask, ...)`` on ``(B, H, T, d)`` tensors."""

    name = "attention"
    targets = dialects("scaled_dot_product_attention")
    is_attention = True
    narrows_operands = True  # each head reads the same head of q, k, v and mask

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        bound = bind(node)
        q, k, v, mask = bound["query"], bound["key"], bound["value"], bound["attn_mask"]
        if any(rank_of(t) != 4 for t in (q, k, v, node)):
            return AxisRelations(blocks="attention on tensors that are not (B, H, T, d)")
        # One key/value head shared by every query head (multi-query attention) is broadcast,
        # as a size-1 operand of an element-wise op: the query heads are cut, it is read whole.
        couplings = [(Axis(q, 1), Axis(node, 1))]
        couplings += [(Axis(t, 1), Axis(node, 1)) for t in (k, v) if shape_of(t)[1] != 1]
        if isinstance(mask, fx.Node) and rank_of(mask) == 4 and shape_of(mask)[1] != 1:
            couplings.append((Axis(mask, 1), Axis(node, 1)))  # a per-head mask is cut too
        # Sequence and head-dim axes are not mentioned: they are never cut.
        return AxisRelations(couplings=couplings)


class MatmulRule(OpRule):
    """``a @ b`` with batch dims: batch axes line up; rows of ``a`` and columns of ``b`` pass.

    The contracted axis is not coupled: cutting it would change every product (the eager
    attention ``q @ k^T`` contracts over ``d_head``, which SliceOut leaves whole).
    """

    name = "matmul"
    targets = (*dialects("matmul", "bmm"), operator.matmul)
    is_attention = True
    narrows_operands = True  # rows, columns and batch axes of the result read the same of a, b

    def specialise(self, node: fx.Node, gm: fx.GraphModule) -> OpRule:
        found = parameter_operand(node, gm)  # x @ W.T: a linear layer, not attention
        return self if found is None else PARAMETER_MATMULS[found[1]]

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        a, b = node.args[0], node.args[1]
        ra, rb, ro = rank_of(a), rank_of(b), rank_of(node)
        if None in (ra, rb, ro) or ra < 2 or rb < 2:
            return AxisRelations(blocks="matmul of vectors or unknown shapes")
        out = shape_of(node)
        couplings = [(Axis(a, ra - 2), Axis(node, ro - 2)), (Axis(b, rb - 1), Axis(node, ro - 1))]
        for t, r in ((a, ra), (b, rb)):
            shape = shape_of(t)
            for d in range(r - 2):  # broadcast batch dims, aligned from the right
                o = d + (ro - r)
                if shape[d] == out[o]:
                    couplings.append((Axis(t, d), Axis(node, o)))
        return AxisRelations(
            couplings=couplings,
            blocks="matmul contracts over this axis",
        )


class BatchMatmulAddRule(OpRule):
    """``baddbmm(bias, a, b) = beta * bias + alpha * (a @ b)`` on ``(B, n, m) @ (B, m, p)``: BLOOM
    adds its ALiBi bias to the attention scores in the same call. The product's axes are a batched
    matmul's; the bias's axes line up with the result where they are not broadcast."""

    name = "baddbmm"
    targets = dialects("baddbmm")
    is_attention = True
    narrows_operands = True

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        bound = bind(node)
        bias, a, b = bound["input"], bound["batch1"], bound["batch2"]
        if any(rank_of(t) != 3 for t in (a, b, node)) or rank_of(bias) is None:
            return AxisRelations(blocks="baddbmm with unknown shapes")
        out = shape_of(node)
        couplings = [(Axis(a, 0), Axis(node, 0)), (Axis(b, 0), Axis(node, 0))]
        couplings += [(Axis(a, 1), Axis(node, 1)), (Axis(b, 2), Axis(node, 2))]
        offset = 3 - rank_of(bias)
        couplings += [
            (Axis(bias, d), Axis(node, d + offset))
            for d, size in enumerate(shape_of(bias))
            if size == out[d + offset]
        ]
        return AxisRelations(couplings=couplings, blocks="baddbmm contracts over this axis")


class SoftmaxRule(OpRule):
    """``softmax(x, dim)``: normalises along ``dim``, which must stay whole; others pass."""

    name = "softmax"
    targets = dialects("softmax", "_softmax")

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = node.args[0]
        rank = rank_of(x)
        if rank is None:
            return AxisRelations(blocks="softmax with unknown shapes")
        dim = bind(node).get("dim")
        if not isinstance(dim, int):
            return AxisRelations(blocks="softmax over an implicit dim")
        dim %= rank
        return AxisRelations(
            couplings=[(Axis(x, d), Axis(node, d)) for d in range(rank) if d != dim],
            blocks="softmax normalises along this axis",
        )


#: Targets of softmax in torch-level and ATen graphs (the dropout rule looks for them too).
SOFTMAX_TARGETS = SoftmaxRule.targets

RULES = (AttentionRule(), MatmulRule(), BatchMatmulAddRule(), SoftmaxRule())
