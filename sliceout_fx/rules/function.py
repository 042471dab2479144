"""Custom ``torch.autograd.Function`` calls, kept whole by the capture (:mod:`..functions`).

A Function is opaque: its forward and its own backward both run on whatever it is given. It
can be applied to the live part of a tensor exactly when both are element-wise, and that is
checked, not assumed: the Function runs once on small tensors of its call's ranks and dtypes
while every ATen op it dispatches, forward and backward, is recorded; if all carry
``torch.Tag.pointwise`` the call is element-wise (BLOOM's GeLU, a straight-through estimator).
Anything else keeps the tensors it touches whole, with the reason.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from ..functions import apply_function, resolve_function
from .base import AxisRelations, OpRule, shape_of, tensor_args
from .elementwise import ElementwiseRule

#: Ops that move no value between elements (autograd's own bookkeeping included).
_NEUTRAL = {
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.ones_like.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.empty_like.default,
}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func)
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=256)
def not_elementwise(name: str, signature: tuple[tuple[tuple[int, ...], torch.dtype], ...]) -> str:
    """Why the Function ``name`` is not element-wise on tensors of ``signature`` ((shape, dtype)
    per argument), or ``""`` if it is."""
    cls = resolve_function(name)
    inputs = [
        torch.rand(shape, dtype=dtype, requires_grad=dtype.is_floating_point)
        if dtype.is_floating_point or dtype.is_complex
        else torch.zeros(shape, dtype=dtype)
        for shape, dtype in signature
    ]
    with _Ops() as forward:
        out = cls.apply(*inputs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
    differentiable = [t for t in inputs if t.requires_grad]
    with _Ops() as backward:
        if differentiable and any(o.requires_grad for o in outs):
            wanted = [o for o in outs if o.requires_grad]
            torch.autograd.grad(
                wanted, differentiable, [torch.ones_like(o) for o in wanted], allow_unused=True
            )
    for phase, seen in (("forward", forward.seen), ("backward", backward.seen)):
        other = sorted(
            str(op) for op in seen if op not in _NEUTRAL and torch.Tag.pointwise not in op.tags
        )
        if other:
            return f"its {phase} is not element-wise ({', '.join(other[:3])})"
    return ""


def _small(shape: torch.Size) -> tuple[int, ...]:
    """A shape of the same rank and broadcasting, two entries per axis that is not 1."""
    return tuple(1 if d == 1 else 2 for d in shape)


class AutogradFunctionRule(OpRule):
    """A kept-whole Function call: element-wise when its forward and backward are."""

    name = "autograd Function"
    targets = (apply_function,)
    narrows_operands = True

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        name = str(node.args[0])
        short = name.rpartition(".")[2]
        args = node.args[1:]
        if node.kwargs or not args or len(tensor_args(node)) != len(args):
            return AxisRelations(blocks=f"autograd Function {short} with non-tensor arguments")
        signature = tuple((_small(shape_of(a)), a.meta["tensor_meta"].dtype) for a in args)
        try:
            why = not_elementwise(name, signature)
        except Exception as error:  # noqa: BLE001 - whatever stops the probe, the call stays whole
            why = f"it could not be probed ({type(error).__name__}: {error})"
        if why:
            return AxisRelations(blocks=f"autograd Function {short}: {why}")
        return ElementwiseRule().relations(node, gm)


RULES = (AutogradFunctionRule(),)
