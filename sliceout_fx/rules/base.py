"""What a rule is: how one op family couples channel axes, and how to slice it.

A rule answers two questions about an fx node:

* :meth:`OpRule.relations` - which of its axes must share a slice (*couplings*), which output axes
  it can make narrower by slicing its own parameters (*sources*), which input axes it can absorb by
  slicing its parameters (*sinks*), and which input axes it merely looks at without caring about
  their width (*passive*). Anything a rule does not mention blocks slicing of that axis.
* :meth:`OpRule.rewrite` - given the cuts of its sliced axes, emit the sliced computation.

The dependency graph, groups and rewrite stages are generic; everything op-specific lives here and
in the sibling modules, one op family per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

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
            or any(inp == axis for inp, _ in self.couplings)
        )

    def produces(self, axis: Axis) -> bool:
        """Whether this node can emit ``axis`` narrower (as a source or by coupling)."""
        return axis in self.sources or any(out == axis for _, out in self.couplings)


class OpRule:
    """Base class: one subclass per op family, registered in :mod:`sliceout_fx.rules`."""

    #: Short name used in reports.
    name: str = "op"

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        raise NotImplementedError

    def rewrite(self, node: fx.Node, ctx: RewriteContext) -> fx.Node | None:
        """Emit the sliced op and return it, or ``None`` if the node runs unchanged."""
        return None

    def flops(self, node: fx.Node, gm: fx.GraphModule) -> int:
        """Multiply-accumulates of this node at full width (0 for cheap ops)."""
        return 0


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


def bind_args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """A functional call's arguments by parameter name (positional, keyword, then defaults)."""
    bound = dict(defaults)
    bound.update(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def couple_all_dims(src: fx.Node, dst: fx.Node) -> list[tuple[Axis, Axis]]:
    """Couple every axis of ``src`` with the same axis of ``dst`` (shape-preserving ops)."""
    rank = rank_of(dst)
    if rank is None or shape_of(src) != shape_of(dst):
        return []
    return [(Axis(src, d), Axis(dst, d)) for d in range(rank)]


def aten_op(name: str) -> Any:
    """``"add.Tensor"`` -> ``torch.ops.aten.add.Tensor`` (how export records calls)."""
    packet, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, packet), overload)
