"""What a rule is: how one op family couples channel axes, and how to slice it.

A rule answers two questions about an fx node:

* :meth:`OpRule.relations` - which of its axes must share a slice (*couplings*), which output axes
  it can make narrower by slicing its own parameters (*sources*), which input axes it can absorb by
  slicing its parameters (*sinks*), and which input axes it merely looks at without caring about
  their width (*passive*). Anything a rule does not mention blocks slicing of that axis.
  A reshape that merges a cut axis into the inner position of another (attention heads folded
  into the batch, ``(B, H, T, d) -> (B*H, T, d)``) states it as a *periodic* coupling: the merged
  axis then holds one copy of the cut per outer index (see :mod:`sliceout_fx.groups`).
* :meth:`OpRule.rewrite` - given the cuts of its sliced axes, emit the sliced computation. The
  same code serves the three modes: the ops it emits take a :class:`~sliceout_fx.ops.Cut` whose
  mode is "slice" (narrow views), "gather" (index vectors, for compiled steps) or "mask" (full
  width: parameters stay whole and the rewriter zeroes the dropped channels after the op).

A rule declares the ops it serves in :attr:`OpRule.targets` - module classes, ``torch``/``F``
functions, ``"method:<name>"`` and ATen overloads or packets (:func:`~.binding.dialects` lists them
all for an op name), so the ``torch.fx`` and ``torch.export`` front ends see the same rule - and
its capabilities as class attributes, which the generic stages ask instead of keeping op lists of
their own. It reads a call's arguments through :func:`~.binding.bind`, by parameter name.

The dependency graph, groups and rewrite stages are generic; everything op-specific lives here and
in the sibling modules, one op family per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .binding import bind

if TYPE_CHECKING:
    from ..rewrite import RewriteContext


@dataclass(frozen=True)
class Axis:
    """One dimension of the tensor produced by an fx node."""

    node: fx.Node
    dim: int

    def __repr__(self) -> str:
        return f"{self.node.name}:{self.dim}"


@dataclass(frozen=True)
class SiteHint:
    """Marks a node that is a natural SliceOut site (an existing dropout)."""

    kind: str  # "dropout"
    rate: float
    dims: tuple[int, ...] | None = None  # axes the op drops along (None: any channel axis)


@dataclass
class AxisRelations:
    """The axis facts one rule states about one node (see module docstring)."""

    couplings: list[tuple[Axis, Axis]] = field(default_factory=list)
    sources: list[Axis] = field(default_factory=list)
    sinks: list[Axis] = field(default_factory=list)
    passive: list[Axis] = field(default_factory=list)
    # (a, merged): the merged axis holds ``a`` as its innermost factor, ``outer x a`` (a merge),
    # or the reverse (a split). A cut of ``a`` repeats in every period of ``merged``.
    periodic: list[tuple[Axis, Axis]] = field(default_factory=list)
    # Axis -> the largest number of equal units it may be cut into (e.g. conv groups).
    unit_limits: dict[Axis, int] = field(default_factory=dict)
    # Why this op blocks its input axes, when it knowingly does (view, concat, residual add...).
    blocks: str | None = None
    site: SiteHint | None = None

    def accepts(self, axis: Axis) -> bool:
        """Whether this node knows what to do with a narrower ``axis`` among its inputs."""
        return (
            axis in self.sinks
            or axis in self.passive
            or any(inp == axis for inp, _ in (*self.couplings, *self.periodic))
        )

    def produces(self, axis: Axis) -> bool:
        """Whether this node can emit ``axis`` narrower (as a source or by coupling)."""
        return axis in self.sources or any(out == axis for _, out in self.couplings)


class OpRule:
    """Base class: one subclass per op family, registered in :mod:`sliceout_fx.rules`."""

    #: Short name used in reports.
    name: str = "op"
    #: What the rule is registered for (see the module docstring).
    targets: tuple[Any, ...] = ()
    #: Adds two tensors elementwise: when both operands lie in one group it is a residual merge.
    residual_merge: bool = False
    #: Part of attention: groups through it scale where the heads leave, never in between.
    is_attention: bool = False
    #: Can recompute the equal parts of its output separately (``rewrite_fused``): a fused QKV.
    fused_projection: bool = False
    #: A layer with a weight that widens or narrows channels (a linear or a convolution).
    is_layer: bool = False
    #: Computes each coupled output channel from the same channel of each operand and needs no
    #: rewrite for it, so an operand the group does not compute (a bias, a mask, a cached key)
    #: can be read narrowed to the cut (element-wise ops, attention).
    narrows_operands: bool = False

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        raise NotImplementedError

    def specialise(self, node: fx.Node, gm: fx.GraphModule) -> OpRule:
        """The rule that serves this particular call: ``self``, or a more specific rule when one
        op covers two families (``x @ W.T`` with a parameter ``W`` is a linear layer, ``q @ k``
        is attention)."""
        return self

    def rewrite(self, node: fx.Node, ctx: RewriteContext) -> fx.Node | None:
        """Emit the sliced op and return it, or ``None`` if the node runs unchanged."""
        return None

    def flops(self, node: fx.Node, gm: fx.GraphModule) -> int:
        """Multiply-accumulates of this node at full width (0 for cheap ops)."""
        return 0

    def weight(self, node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
        """A layer's weight tensor, when it is a parameter the graph holds (else ``None``)."""
        return None

    def is_layer_output(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        """Whether ``node`` is a layer's output: a linear's or a convolution's, or one part of a
        fused projection. Only such widths are a block's inner width (``sites="auto"``)."""
        return self.is_layer

    def is_expand(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        """Whether this node is an expand layer: a pointwise layer that widens its input, the
        paper's site in networks without dropout (MobileNet/EfficientNet expand convs)."""
        return False


# --- small helpers shared by the rules ---------------------------------------------------------


def shape_of(node: Any) -> torch.Size | None:
    """The propagated output shape of a node, or ``None`` for non-tensors."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def rank_of(node: Any) -> int | None:
    shape = shape_of(node)
    return None if shape is None else len(shape)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The positional and keyword arguments of ``node`` that are tensor-producing nodes."""
    found = [a for a in node.args if isinstance(a, fx.Node) and shape_of(a) is not None]
    found += [a for a in node.kwargs.values() if isinstance(a, fx.Node) and shape_of(a) is not None]
    return found


def input_of(node: fx.Node) -> Any:
    """The main input of a call: a module's first argument, or the bound ``input``."""
    if node.op == "call_module":
        return node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return bind(node).get("input")


def fetch(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node names, or ``None`` for anything else."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def couple_all_dims(src: fx.Node, dst: fx.Node) -> list[tuple[Axis, Axis]]:
    """Couple every axis of ``src`` with the same axis of ``dst`` (shape-preserving ops)."""
    rank = rank_of(dst)
    if rank is None or shape_of(src) != shape_of(dst):
        return []
    return [(Axis(src, d), Axis(dst, d)) for d in range(rank)]
