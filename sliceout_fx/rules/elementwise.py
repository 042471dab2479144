"""Element-wise ops (activations, arithmetic): every axis passes straight through.

Applying them to the live part of a tensor is the same as applying them to the whole tensor and
keeping the live part, so they couple each input axis with the same output axis and need no rewrite.
With two tensor operands (``x * gate`` in squeeze-excite, a residual ``x + y``) each operand axis
that is not broadcast is coupled with the output axis it lines up with: both operands must then be
cut alike. An operand broadcast along an axis (size 1) needs no cut there.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from .base import Axis, AxisRelations, OpRule, couple_all_dims, shape_of, tensor_args
from .binding import dialects


class ElementwiseRule(OpRule):
    name = "elementwise"
    targets: tuple = ()  # set below, from the op names
    narrows_operands = True

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


class ResidualAddRule(ElementwiseRule):
    """``a + b`` / ``a - b``: element-wise, and a residual merge when both operands are in a group.

    The groups stage asks :attr:`residual_merge` to tell a residual stream (left whole unless
    named) from an inner width.
    """

    name = "add"
    residual_merge = True


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
# Op names: each stands for its ATen overloads, torch / F function and tensor method.
_NAMES = (
    *("relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_"),
    *("tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu"),
    *("hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_"),
    *("mish", "mish_", "softplus", "softsign", "logsigmoid", "log_sigmoid"),
    *("clamp", "clamp_", "clip", "clamp_min", "clamp_max", "abs", "exp", "neg", "square"),
    *("sqrt", "rsqrt", "erf", "sin", "cos", "pow", "mul", "mul_", "div", "div_", "rsub"),
    *("contiguous", "clone", "alias", "detach", "to", "_to_copy", "type_as", "where"),
    *("float", "half", "bfloat16", "double", "addcmul", "addcdiv", "lerp", "maximum", "minimum"),
    *("masked_fill", "masked_fill_"),
)
_OPERATORS = (operator.mul, operator.imul, operator.truediv, operator.itruediv, operator.neg)
_OPERATORS += (operator.pow,)
_ADD_NAMES = ("add", "add_", "sub", "sub_")
_ADD_OPERATORS = (operator.add, operator.iadd, operator.sub, operator.isub)

ElementwiseRule.targets = (*_MODULES, *dialects(*_NAMES), *_OPERATORS)
ResidualAddRule.targets = (*dialects(*_ADD_NAMES), *_ADD_OPERATORS)
RULES = (ElementwiseRule(), ResidualAddRule())
