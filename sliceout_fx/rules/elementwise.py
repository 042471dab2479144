"""Element-wise ops (activations, arithmetic): every axis passes straight through.

Applying them to the live part of a tensor is the same as applying them to the whole tensor and
keeping the live part, so they couple each input axis with the same output axis and need no rewrite.
With two tensor operands (``x * gate`` in squeeze-excite, a residual ``x + y``) each operand axis
that is not broadcast is coupled with the output axis it lines up with: both operands must then be
cut alike. An operand broadcast along an axis (size 1) needs no cut there.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, aten_op, couple_all_dims, shape_of, tensor_args


class ElementwiseRule(OpRule):
    name = "elementwise"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        tensors = tensor_args(node)
        out = shape_of(node)
        if not tensors or out is None:
            return AxisRelations(blocks="element-wise op with unknown shapes")
        if len(tensors) == 1 and shape_of(tensors[0]) == out:
            return AxisRelations(couplings=couple_all_dims(tensors[0], node))
        couplings = []
        for operand in tensors:
            shape = shape_of(operand)
            offset = len(out) - len(shape)
            if offset < 0:
                return AxisRelations(blocks="element-wise op with unknown broadcasting")
            couplings += [
                (Axis(operand, d), Axis(node, d + offset))
                for d in range(len(shape))
                if shape[d] == out[d + offset]
            ]
        return AxisRelations(couplings=couplings)


_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
    nn.PReLU,
    nn.Identity,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
)
_FUNCTIONS = (
    F.relu,
    F.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.sigmoid,
    F.tanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.mish,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    torch.clip,
    torch.abs,
    torch.exp,
    torch.neg,
    torch.square,
    torch.sqrt,
    torch.rsqrt,
    torch.erf,
    torch.sin,
    torch.cos,
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
)
_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "clamp",
    "clamp_",
    "clip",
    "abs",
    "exp",
    "neg",
    "pow",
    "sqrt",
    "rsqrt",
    "square",
    "erf",
    "sin",
    "cos",
    "add",
    "sub",
    "mul",
    "div",
    "contiguous",
    "float",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "detach",
    "clone",
)

# The same ops as ATen overloads, as torch.export records them.
_ATEN_NAMES = (
    "add.Tensor",
    "add.Scalar",
    "sub.Tensor",
    "sub.Scalar",
    "rsub.Scalar",
    "mul.Tensor",
    "mul.Scalar",
    "div.Tensor",
    "div.Scalar",
    "neg.default",
    "pow.Tensor_Scalar",
    "rsqrt.default",
    "sqrt.default",
    "exp.default",
    "tanh.default",
    "sigmoid.default",
    "relu.default",
    "gelu.default",
    "silu.default",
    "erf.default",
    "hardtanh.default",
    "clamp.default",
    "contiguous.default",
    "clone.default",
    "alias.default",
    "detach.default",
    "to.dtype",
    "to.dtype_layout",
    "_to_copy.default",
    "type_as.default",
    "where.self",
    "clamp_min.default",
    "clamp_max.default",
    "hardswish.default",
    "hardsigmoid.default",
    "leaky_relu.default",
    "elu.default",
    "mish.default",
    "softplus.default",
    # in-place forms (a module built with ``inplace=True``)
    "relu_.default",
    "silu_.default",
    "gelu_.default",
    "hardswish_.default",
    "hardsigmoid_.default",
    "hardtanh_.default",
    "leaky_relu_.default",
    "elu_.default",
    "mish_.default",
    "sigmoid_.default",
    "tanh_.default",
    "add_.Tensor",
    "mul_.Tensor",
    "div_.Tensor",
)
_ATEN = tuple(aten_op(name) for name in _ATEN_NAMES)

_RULE = ElementwiseRule()
RULES = {
    **{m: _RULE for m in _MODULES},
    **{f: _RULE for f in _ATEN},
    **{f: _RULE for f in _FUNCTIONS},
    **{f"method:{name}": _RULE for name in _METHODS},
}
