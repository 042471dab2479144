"""Stage 4, alignment groups and their sliceability.

An alignment group is a connected component of the dependency graph: every axis in it must be cut by
the same slice. A group is *sliceable* when each of its axes is produced by an op that can make it
narrower (a source, or an op coupling it to another axis of the group) and each consumer of each
axis either absorbs the cut (a sink), passes it on (coupled), or does not care (passive). Anything
else is a *blocker*, recorded with its reason so that ``explain`` can say why a site was skipped.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from .depgraph import DependencyGraph
from .rules import Axis
from .rules.base import shape_of


@dataclass
class AlignmentGroup:
    """Axes that share one slice, with what produces, consumes and blocks them."""

    id: int
    axes: list[Axis]
    sources: list[Axis]
    sinks: list[tuple[fx.Node, Axis]]  # (consumer node, the axis it absorbs)
    units: int  # the group is cut in units; axis of size n has n // units channels per unit
    blockers: list[str] = field(default_factory=list)
    # Sinks whose result flows back into the group (squeeze-excite's reduce conv) are internal;
    # the others are where the slice ends, and where delayed normalisation goes.
    exit_sinks: list[tuple[fx.Node, Axis]] = field(default_factory=list)
    # Adds that merge two tensors of the group: the group carries a residual stream.
    residual_adds: list[fx.Node] = field(default_factory=list)

    @property
    def sliceable(self) -> bool:
        return not self.blockers

    def size(self, axis: Axis) -> int:
        return int(shape_of(axis.node)[axis.dim])

    def scale(self, axis: Axis) -> int:
        """Channels per unit on ``axis``."""
        return self.size(axis) // self.units

    @property
    def primary(self) -> Axis:
        """The first source axis: widths and rates are quoted in its channels."""
        return self.sources[0]

    @property
    def nodes(self) -> list[fx.Node]:
        """Every op that touches the group: producers of its axes and the sinks."""
        seen = dict.fromkeys(a.node for a in self.axes)
        seen.update(dict.fromkeys(node for node, _ in self.sinks))
        return list(seen)

    def describe(self) -> str:
        return ", ".join(n.name for n in self.nodes)


def _unit_limits(dep: DependencyGraph) -> dict[Axis, int]:
    limits: dict[Axis, int] = {}
    for rel in dep.relations.values():
        for axis, limit in rel.unit_limits.items():
            limits[axis] = math.gcd(limits.get(axis, 0), limit)
    return limits


def _blockers(dep: DependencyGraph, axes: set[Axis]) -> tuple[list[str], list[tuple]]:
    blockers: list[str] = []
    sinks: list[tuple[fx.Node, Axis]] = []
    for axis in sorted(axes, key=dep.position):
        node = axis.node
        if node.op in ("placeholder", "get_attr"):
            blockers.append(f"{axis} is a model input or attribute, which cannot be cut")
        elif not dep.relation(node).produces(axis):
            why = dep.relation(node).blocks or "no rule for this axis"
            blockers.append(f"{axis} is produced by {node.name} ({dep.rule(node).name}): {why}")
        for user in node.users:
            if user.op == "output":
                blockers.append(f"{axis} reaches the model output (its full width is observable)")
                continue
            rel = dep.relation(user)
            if axis in rel.sinks:
                sinks.append((user, axis))
            elif not rel.accepts(axis):
                why = rel.blocks or "no rule for this axis"
                blockers.append(f"{axis} is used by {user.name} ({dep.rule(user).name}): {why}")
    dims_per_node: dict[fx.Node, int] = {}
    for axis in axes:
        dims_per_node[axis.node] = dims_per_node.get(axis.node, 0) + 1
    for node, count in dims_per_node.items():
        if count > 1:
            blockers.append(f"{node.name} would be cut along {count} axes at once")
    return list(dict.fromkeys(blockers)), sinks


def _exit_sinks(dep: DependencyGraph, axes: set[Axis], sinks: list[tuple]) -> list[tuple]:
    """The sinks from which no path leads back to a node of the group."""
    members = {a.node for a in axes}
    last = max(dep.order[n] for n in members)
    exits = []
    for sink, axis in sinks:
        frontier, seen, returns = list(sink.users), set(), False
        while frontier and not returns:
            node = frontier.pop()
            if node in seen or dep.order.get(node, last + 1) > last:
                continue  # past the group's last node: cannot lead back into it
            seen.add(node)
            returns = node in members
            frontier.extend(node.users)
        if not returns:
            exits.append((sink, axis))
    return exits


_ADDS = (operator.add, operator.iadd, operator.sub, torch.add, torch.sub, "add", "add_", "sub")


def _residual_adds(axes: set[Axis]) -> list[fx.Node]:
    """Additions whose two tensor operands both lie in the group."""
    by_node = {a.node for a in axes}
    found = []
    for node in by_node:
        if node.target in _ADDS and sum(a in by_node for a in node.all_input_nodes) >= 2:
            found.append(node)
    return found


def why_not_sliceable(dep: DependencyGraph, axis: Axis) -> list[str]:
    """The blockers of the component holding ``axis``, for axes outside every channel group."""
    if axis not in dep.graph:
        return [f"{axis} is not coupled to any op that has a rule"]
    return _blockers(dep, nx.node_connected_component(dep.graph, axis))[0]


def find_groups(dep: DependencyGraph) -> list[AlignmentGroup]:
    """The channel groups of the model: components that contain at least one source.

    Components without a source (the batch axis, spatial axes) can never be cut and are dropped.
    """
    limits = _unit_limits(dep)
    order = dep.position
    groups: list[AlignmentGroup] = []
    for component in nx.connected_components(dep.graph):
        sources = sorted((a for a in component if a in dep.relation(a.node).sources), key=order)
        if not sources:
            continue
        blockers, sinks = _blockers(dep, component)
        units = 0
        for axis in component:
            units = math.gcd(units, int(shape_of(axis.node)[axis.dim]), limits.get(axis, 0))
        groups.append(
            AlignmentGroup(
                id=-1,
                axes=sorted(component, key=order),
                sources=sources,
                sinks=sorted(sinks, key=lambda s: order(Axis(s[0], 0))),
                units=units,
                blockers=blockers,
                exit_sinks=_exit_sinks(dep, component, sinks),
                residual_adds=sorted(_residual_adds(component), key=dep.order.__getitem__),
            )
        )
    groups.sort(key=lambda g: order(g.primary))
    for i, group in enumerate(groups):
        group.id = i
    return groups
