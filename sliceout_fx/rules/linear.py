"""``nn.Linear`` / ``F.linear`` / ``aten.linear`` (and GPT-2's ``addmm``): features out and in.

Output features are a source, input features a sink.

Slicing output features narrows weight rows and the bias (true views); slicing input features
narrows weight columns (a strided view that BLAS handles without a copy).
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from ..ops import sliced_fused_linear, sliced_linear
from .base import Axis, AxisRelations, OpRule, bind, fetch, input_of, rank_of, shape_of
from .binding import dialects, matches


class LinearRule(OpRule):
    name = "linear"
    targets = (nn.Linear, *dialects("linear"))
    is_layer = True
    fused_projection = True
    #: How the weight is stored: ``(out, in)`` as in ``nn.Linear``, or ``(in, out)``.
    layout = "out_in"

    def _input(self, node: fx.Node) -> fx.Node:
        return input_of(node)

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        x = self._input(node)
        rank = rank_of(node)
        if rank is None or rank_of(x) is None:
            return AxisRelations(blocks="linear with unknown shapes")
        return AxisRelations(sources=[Axis(node, rank - 1)], sinks=[Axis(x, rank_of(x) - 1)])

    def _params(self, node: fx.Node, ctx) -> tuple[fx.Node, fx.Node | None]:
        if node.op == "call_module":
            mod = ctx.gm.get_submodule(str(node.target))
            weight = ctx.get_attr(f"{node.target}.weight")
            bias = ctx.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            return weight, bias
        a = bind(node)
        return a["weight"], a.get("bias")

    def rewrite(self, node: fx.Node, ctx) -> fx.Node | None:
        x = self._input(node)
        out_cut = ctx.out_cut(node, rank_of(node) - 1)
        in_cut = ctx.in_cut(x, rank_of(ctx.original(x)) - 1)
        if out_cut is None and in_cut is None:
            return None
        weight, bias = self._params(node, ctx)
        args = (x, weight, bias, out_cut, in_cut)
        return ctx.graph.call_function(sliced_linear, args, self._layout_kwargs())

    def rewrite_fused(self, node: fx.Node, ctx, parts: int, out_cut) -> fx.Node:
        """All ``parts`` equal outputs of a fused projection, each cut by ``out_cut``."""
        x = self._input(node)
        in_cut = ctx.in_cut(x, rank_of(ctx.original(x)) - 1)
        weight, bias = self._params(node, ctx)
        args = (x, weight, bias, parts, out_cut, in_cut)
        return ctx.graph.call_function(sliced_fused_linear, args, self._layout_kwargs())

    def rewrite_part(self, node: fx.Node, ctx, offset: int, size: int, out_cut) -> fx.Node:
        """Features ``offset : offset + size`` of the projection's output, cut by ``out_cut``:
        one part of a fused projection whose parts differ in size (Phi-3's Q|K|V with fewer
        key/value heads), recomputed from its own rows of the weight."""
        x = self._input(node)
        in_cut = ctx.in_cut(x, rank_of(ctx.original(x)) - 1)
        weight, bias = self._params(node, ctx)
        rows = 0 if self.layout == "out_in" else 1
        weight = ctx.graph.call_function(torch.narrow, (weight, rows, offset, size))
        if bias is not None:
            bias = ctx.graph.call_function(torch.narrow, (bias, 0, offset, size))
        args = (x, weight, bias, out_cut, in_cut)
        return ctx.graph.call_function(sliced_linear, args, self._layout_kwargs())

    def _layout_kwargs(self) -> dict[str, str]:
        return {} if self.layout == "out_in" else {"layout": self.layout}

    def flops(self, node: fx.Node, gm: fx.GraphModule) -> int:
        shape = shape_of(node)
        x = shape_of(self._input(node))
        if shape is None or x is None:
            return 0
        return math.prod(shape) * x[-1]

    def weight(self, node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
        if node.op == "call_module":
            return gm.get_submodule(str(node.target)).weight
        return fetch(gm, bind(node)["weight"])


class AddmmRule(LinearRule):
    """``addmm(bias, x, W)`` with ``W`` stored ``(in, out)``: HF's ``Conv1D`` (GPT-2)."""

    name = "addmm"
    targets = dialects("addmm")
    layout = "in_out"

    def _input(self, node: fx.Node) -> fx.Node:
        return node.args[1]

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return AxisRelations(blocks="addmm with alpha/beta")
        if rank_of(node.args[0]) != 1 or node.args[2].op != "get_attr":
            return AxisRelations(blocks="addmm that is not a projection by a parameter")
        return super().relations(node, gm)

    def _params(self, node: fx.Node, ctx) -> tuple[fx.Node, fx.Node | None]:
        return node.args[2], node.args[0]

    def weight(self, node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
        return fetch(gm, node.args[2])

    def flops(self, node: fx.Node, gm: fx.GraphModule) -> int:
        shape, x = shape_of(node), shape_of(node.args[1])
        return 0 if shape is None or x is None else math.prod(shape) * x[-1]


class ParameterMatmulRule(LinearRule):
    """``x @ W.T`` or ``x @ W`` with a 2-D parameter ``W``: a linear layer written as a matmul
    (HF Falcon's ``FalconLinear``). Not registered by target: the matmul rule hands such calls
    here (:meth:`~.base.OpRule.specialise`); a bias added afterwards is an operand the group
    reads whole and narrows where it is added."""

    name = "linear (matmul)"
    targets = ()

    def __init__(self, layout: str) -> None:
        self.layout = layout  # "out_in": x @ W.T; "in_out": x @ W

    def _input(self, node: fx.Node) -> fx.Node:
        return node.args[0]

    def _params(self, node: fx.Node, ctx) -> tuple[fx.Node, fx.Node | None]:
        return parameter_operand(node, ctx.gm)[0], None

    def weight(self, node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
        found = parameter_operand(node, gm)
        return None if found is None else fetch(gm, found[0])

    def flops(self, node: fx.Node, gm: fx.GraphModule) -> int:
        shape, x = shape_of(node), shape_of(node.args[0])
        return 0 if shape is None or x is None else math.prod(shape) * x[-1]


_TRANSPOSES = dialects("t", "numpy_T", "transpose", "permute")


def parameter_operand(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, str] | None:
    """``(W's get_attr node, layout)`` when ``node`` is ``x @ W.T`` or ``x @ W`` for a 2-D
    parameter ``W``; ``None`` for any other matmul."""
    if len(node.args) < 2 or rank_of(node.args[0]) == 1:  # (a rewritten input has no rank)
        return None
    b = node.args[1]
    if _is_matrix(b, gm):
        return b, "in_out"
    source = _transposed(b)
    return (source, "out_in") if _is_matrix(source, gm) else None


def _transposed(node: object) -> object:
    """What ``node`` transposes: ``W.T``, ``W.t()``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``."""
    if not isinstance(node, fx.Node):
        return None
    if node.target is getattr:
        return node.args[0] if node.args[1] in ("T", "mT") else None
    if not matches(node, _TRANSPOSES):
        return None
    a = bind(node)
    if "dims" in a:
        swaps = [d % 2 for d in a["dims"]] == [1, 0]
    elif "dim0" in a:
        swaps = {a["dim0"] % 2, a["dim1"] % 2} == {0, 1}
    else:  # t, numpy_T
        swaps = True
    return a["input"] if swaps else None


def _is_matrix(node: object, gm: fx.GraphModule) -> bool:
    tensor = fetch(gm, node)
    return isinstance(tensor, nn.Parameter) and tensor.dim() == 2


#: The two spellings of a matmul by a parameter, which the matmul rule hands over.
PARAMETER_MATMULS = {
    "out_in": ParameterMatmulRule("out_in"),
    "in_out": ParameterMatmulRule("in_out"),
}

RULES = (LinearRule(), AddmmRule())
