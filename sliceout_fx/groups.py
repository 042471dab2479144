"""Stage 4, alignment groups and their sliceability.

An alignment group is a connected component of the dependency graph: every axis in it must be cut by
the same slice. A group is *sliceable* when each of its axes is produced by an op that can make it
narrower (a source, or an op coupling it to another axis of the group) and each consumer of each
axis either absorbs the cut (a sink), passes it on (coupled), or does not care (passive). Anything
else is a *blocker*, recorded with its reason so that ``explain`` can say why a site was skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import networkx as nx
from torch import fx

from .adapters import is_adapter_path
from .depgraph import DependencyGraph
from .rules import Axis
from .rules.base import shape_of
from .rules.binding import is_in_place


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
    # Full-width operands the group reads without computing them (a position bias, a mask, a
    # layer scale): ``(op, operand, operand's dim)``; the rewrite narrows them where ``op`` reads.
    entries: list[tuple[fx.Node, fx.Node, int]] = field(default_factory=list)
    # Whether the group passes through attention (it is cut in whole heads, scaled at the values).
    attention: bool = False
    # Axes that hold the cut once per outer index (heads folded into the batch axis, ``B*H``):
    # axis -> period, the size one copy of the cut lives in (see :func:`_through_merged_axes`).
    periods: dict[Axis, int] = field(default_factory=dict)
    # Axes made by a periodic coupling (the merge into such an axis, the split out of it).
    via_periodic: set[Axis] = field(default_factory=set)

    @property
    def sliceable(self) -> bool:
        return not self.blockers

    def size(self, axis: Axis) -> int:
        """The channels ``axis`` is cut in: its size, or its period when it holds several."""
        return self.periods.get(axis) or int(shape_of(axis.node)[axis.dim])

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


def _blockers(
    dep: DependencyGraph,
    axes: set[Axis],
    widens_outputs: bool = False,
    via_periodic: frozenset[Axis] | set[Axis] = frozenset(),
) -> tuple[list[str], list[tuple]]:
    """The reasons ``axes`` cannot be cut, and the sinks that absorb them.

    ``widens_outputs``: the group is attention heads, which may reach an output (the attention
    weights a layer returns beside its hidden states): the rewrite widens them back, dropped
    heads zero. Other widths may not: a caller would see the channels a step dropped.
    ``via_periodic``: axes whose producer makes them by a periodic coupling from the group.
    """
    blockers: list[str] = []
    sinks: list[tuple[fx.Node, Axis]] = []
    for axis in sorted(axes, key=dep.position):
        node = axis.node
        if node.op in ("placeholder", "get_attr"):
            blockers.append(f"{axis} is a model input or attribute, which cannot be cut")
        elif axis not in via_periodic and not dep.relation(node).produces(axis):
            why = dep.relation(node).blocks or "no rule for this axis"
            blockers.append(f"{axis} is produced by {node.name} ({dep.rule(node).name}): {why}")
        for user in node.users:
            if user.op == "output":
                if not widens_outputs:
                    blockers.append(
                        f"{axis} reaches the model output (its full width is observable)"
                    )
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


def _split_entries(
    dep: DependencyGraph, component: set[Axis], sources: list[Axis], flow: dict[Axis, list[Axis]]
) -> tuple[set[Axis], list[tuple[fx.Node, fx.Node, int]]]:
    """Split a component into the axes its sources compute and the *entries* read at full width.

    An attention score plus a relative-position bias, a masked fill, a layer-scale parameter, the
    one key head that multi-query attention broadcasts to every query head: the group's slice
    does not flow into them, so slicing their chain (a parameter, an embedding lookup, an index,
    an expand) is neither possible nor needed. Where every such operand meets the group at an op
    that can read a narrowed operand (element-wise ops, attention: see
    :attr:`~.rules.OpRule.narrows_operands`), the chain stays whole and the rewrite narrows it at
    that op. Otherwise the component is returned whole, and its input or attribute blocks it.
    """
    live, frontier = set(sources), list(sources)
    while frontier:  # the axes the cut flows into, op by op, from the sources
        for axis in flow.get(frontier.pop(), ()):
            if axis in component and axis not in live:
                live.add(axis)
                frontier.append(axis)
    if len(live) == len(component):
        return component, []
    entries = []
    live_nodes = {a.node for a in live}
    for axis in component - live:
        if axis.node in live_nodes:  # a tensor cut along one axis and read whole along another
            return component, []
        for user in axis.node.users:
            if not any(inp == axis and out in live for inp, out in dep.relation(user).couplings):
                continue  # read by the chain itself, or outside the group
            rule = dep.rule(user)
            in_place = is_in_place(user) and user.args[:1] == (axis.node,)
            if rule is None or not rule.narrows_operands or in_place:
                return component, []
            entries.append((user, axis.node, axis.dim))
    return live, sorted(set(entries), key=_entry_order(dep))


def _entry_order(dep: DependencyGraph) -> Callable[[tuple], tuple[int, int, int]]:
    return lambda e: (dep.order[e[0]], dep.order[e[1]], e[2])


@dataclass
class _Periodic:
    """What :func:`_through_merged_axes` adds to a group."""

    axes: set[Axis] = field(default_factory=set)  # contiguous axes it joins after a period ends
    periods: dict[Axis, int] = field(default_factory=dict)
    via_periodic: set[Axis] = field(default_factory=set)
    entries: list[tuple[fx.Node, fx.Node, int]] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    components: list[set[Axis]] = field(default_factory=list)  # the components it joins


def _through_merged_axes(
    dep: DependencyGraph, live: set[Axis], flow: dict[Axis, list[Axis]]
) -> _Periodic:
    """Follow the group's cut through axes that hold it periodically.

    BLOOM and DeBERTa-v2 fold the heads into the batch axis, ``(B, H, T, d) -> (B*H, T, d)``,
    for ``bmm``. With ``H`` cut, the merged axis holds ``B`` copies of the cut, one per period of
    ``H`` channels: ops that keep that axis (``bmm``'s batch axis, element-wise ops) pass it on,
    an operand the group does not compute (BLOOM's ALiBi bias, ``(B*H, 1, T)``) is narrowed
    period by period, and the split back to ``(B, H, ...)`` ends the period, joining the
    component that continues from there. Anything else that reads a periodic axis (a layer, a
    reduction over it, another merge) blocks the group.
    """
    found = _Periodic()
    size = _axis_size
    stack = _merges_from(dep, live)
    joined = set(live)
    while stack:
        axis, period = stack.pop()
        if axis in joined or found.periods.get(axis, period) != period:
            found.blockers.append(f"{axis} would hold the cut in two layouts")
            continue
        if axis in found.periods:
            continue
        found.periods[axis] = period
        found.via_periodic.add(axis)
        for user in axis.node.users:
            rel = dep.relation(user)
            ends = [out for inp, out in rel.periodic if inp == axis and size(out) == period]
            keeps = [o for i, o in rel.couplings if i == axis and size(o) == size(axis)]
            if user.op == "output" or axis in rel.sinks or axis in rel.sources:
                found.blockers.append(
                    f"{axis} holds the cut once per period and is read whole by {user.name}"
                )
            elif ends:  # the split back to (outer, period): a contiguous cut again
                for out in ends:
                    found.via_periodic.add(out)
                    live_part = _join_component(dep, out, flow, found)
                    joined |= live_part
                    stack += _merges_from(dep, live_part)
            elif keeps:
                stack += [(out, period) for out in keeps]
            elif axis not in rel.passive:
                why = rel.blocks or "no rule for this axis"
                found.blockers.append(
                    f"{axis} holds the cut once per period and is used by {user.name} "
                    f"({dep.rule(user).name if dep.rule(user) else 'no rule'}): {why}"
                )
    _periodic_entries(dep, found, joined | found.axes)
    return found


def _merges_from(dep: DependencyGraph, axes: set[Axis]) -> list[tuple[Axis, int]]:
    """``(merged axis, period)`` where a reshape or repeat merges one of ``axes`` (cut as a
    whole) into the inner position of a larger axis."""
    return [
        (merged, _axis_size(axis))
        for axis in axes
        for user in axis.node.users
        for inp, merged in dep.relation(user).periodic
        if inp == axis and _axis_size(merged) > _axis_size(axis)
    ]


def _join_component(
    dep: DependencyGraph, start: Axis, flow: dict[Axis, list[Axis]], found: _Periodic
) -> set[Axis]:
    """The part of ``start``'s component the cut flows into from ``start`` (see
    :func:`_split_entries`); a component with sources of its own is another group."""
    component = nx.node_connected_component(dep.graph, start) if start in dep.graph else {start}
    if any(a in dep.relation(a.node).sources for a in component):
        found.blockers.append(f"{start} joins another channel group")
        return set()
    live, entries = _split_entries(dep, component, [start], flow)
    found.axes |= live
    found.entries += entries
    found.components.append(component)
    return live


def _periodic_entries(dep: DependencyGraph, found: _Periodic, others: set[Axis]) -> None:
    """Operands an op on a periodic axis reads whole (BLOOM's ALiBi bias): narrowed period by
    period where the op reads them, if it can read a narrowed operand."""
    for axis in found.periods:
        node = axis.node
        for inp, out in dep.relation(node).couplings:
            if out != axis or inp in found.periods or inp in others:
                continue
            if _axis_size(inp) != _axis_size(out):  # the merge's outer dim: not the cut
                continue
            rule = dep.rule(node)
            if rule is None or not rule.narrows_operands or is_in_place(node):
                found.blockers.append(f"{inp} would be read whole by {node.name}")
            else:
                found.entries.append((node, inp.node, inp.dim))


def _axis_size(axis: Axis) -> int:
    return int(shape_of(axis.node)[axis.dim])


def _flow(dep: DependencyGraph) -> dict[Axis, list[Axis]]:
    """``input axis -> output axes`` of every coupling: the direction a cut travels in."""
    flow: dict[Axis, list[Axis]] = {}
    for node, rel in dep.relations.items():
        for inp, out in rel.couplings:
            if out.node is node:
                flow.setdefault(inp, []).append(out)
    return flow


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


def _residual_adds(dep: DependencyGraph, axes: set[Axis]) -> list[fx.Node]:
    """Residual merges in the group: adds (rules with ``residual_merge``) of two operands in the
    group that come from different sources, or of the group's output and the input its layers read.

    ``x + branch(x)`` merges the stream with a layer's output; ``x + 0.04 * x ** 3`` inside a
    GELU adds two functions of one source and is not a residual merge.
    """
    by_node = {a.node for a in axes}
    sources = {a.node for a in axes if a in dep.relation(a.node).sources}
    found = []
    for node in by_node:
        rule = dep.rule(node)
        operands = [a for a in node.all_input_nodes if a in by_node]
        if rule is None or not rule.residual_merge or len(operands) < 2:
            continue
        origins = [frozenset(_origins(op, by_node, sources)) for op in operands]
        if any(map(_is_adapter_update, origins)):
            continue
        computed = [o for o in origins if o]
        # An operand the group does not compute (no origin) is a stream entering the block when
        # the block's layers read it (``x + f(x)``); a bias or a mask is read by nothing else.
        layers = {src for c in computed for src in c}
        entering = [
            op for op, o in zip(operands, origins, strict=True) if not o and _feeds(op, layers)
        ]
        if len(set(computed)) > 1 or entering:
            found.append(node)
    return found


def _feeds(node: fx.Node, targets: set[fx.Node]) -> bool:
    """Whether any of ``targets`` is computed from ``node``."""
    return _reaches(list(node.users), targets, lambda n: n.users)


def _reaches(
    frontier: list[fx.Node], targets: set[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]
) -> bool:
    """Whether a walk from ``frontier`` by ``step`` (to users, or to inputs) meets ``targets``."""
    seen: set[fx.Node] = set()
    while frontier:
        current = frontier.pop()
        if current in targets:
            return True
        if current not in seen:
            seen.add(current)
            frontier.extend(step(current))
    return False


def _is_adapter_update(origins: frozenset[fx.Node]) -> bool:
    """Whether an operand comes from PEFT adapter layers only: LoRA adds ``B(A(x))`` to its
    base layer's output, which is one layer's output, not a residual merge."""
    return bool(origins) and all(is_adapter_path(_module_path(n)) for n in origins)


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()), ("", None))[0]


def _origins(node: fx.Node, members: set[fx.Node], sources: set[fx.Node]) -> set[fx.Node]:
    """The group's sources that ``node`` is computed from, walking back inside the group."""
    found, frontier, seen = set(), [node], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in sources:
            found.add(current)
            continue
        frontier.extend(n for n in current.all_input_nodes if n in members)
    return found


def why_not_sliceable(dep: DependencyGraph, axis: Axis) -> list[str]:
    """The blockers of the component holding ``axis``, for axes outside every channel group."""
    if axis not in dep.graph:
        return [f"{axis} is not coupled to any op that has a rule"]
    return _blockers(dep, nx.node_connected_component(dep.graph, axis))[0]


def find_groups(dep: DependencyGraph) -> list[AlignmentGroup]:
    """The channel groups of the model: components that contain at least one source.

    Components without a source (the batch axis, spatial axes) can never be cut and are dropped.
    Two components whose cuts meet on an axis that holds them periodically (DeBERTa's queries
    and its position keys, both folded into the batch axis for one ``bmm``) are one group.
    """
    limits = _unit_limits(dep)
    flow = _flow(dep)
    components = [
        frozenset(c)
        for c in nx.connected_components(dep.graph)
        if any(a in dep.relation(a.node).sources for a in c)
    ]
    built: dict[frozenset[Axis], AlignmentGroup] = {}
    while True:
        for component in components:
            if component not in built:
                built[component] = _build_group(dep, component, flow, limits)
        pair = _meeting(components, built)
        if pair is None:
            break
        first, second = pair
        components = [c for c in components if c not in pair] + [first | second]
    groups = sorted((built[c] for c in components), key=lambda g: dep.position(g.primary))
    for i, group in enumerate(groups):
        group.id = i
    return groups


def _meeting(
    components: list[frozenset[Axis]], built: dict[frozenset[Axis], AlignmentGroup]
) -> tuple[frozenset[Axis], frozenset[Axis]] | None:
    """Two components whose groups claim one axis: as their own, or one's as the other's entry
    (an operand read whole and narrowed: it must be the other group's cut, not a copy)."""
    owner: dict[Axis, frozenset[Axis]] = {}
    for component in components:
        for axis in built[component].axes:
            if owner.setdefault(axis, component) is not component:
                return owner[axis], component
    for component in components:
        for _, operand, dim in built[component].entries:
            other = owner.get(Axis(operand, dim))
            if other is not None and other is not component:
                return other, component
    return None


def _build_group(
    dep: DependencyGraph,
    component: frozenset[Axis],
    flow: dict[Axis, list[Axis]],
    limits: dict[Axis, int],
) -> AlignmentGroup:
    order = dep.position
    sources = sorted((a for a in component if a in dep.relation(a.node).sources), key=order)
    live, entries = _split_entries(dep, set(component), sources, flow)
    merged = _through_merged_axes(dep, live, flow)
    live |= merged.axes | set(merged.periods)
    attention = any(getattr(dep.rule(a.node), "is_attention", False) for a in live)
    blockers, sinks = _blockers(dep, live, attention, merged.via_periodic)
    whole = set().union(component, *merged.components)
    units = 0
    for axis in whole:
        units = math.gcd(units, _axis_size(axis), limits.get(axis, 0))
    for period in merged.periods.values():
        units = math.gcd(units, period)
    return AlignmentGroup(
        id=-1,
        axes=sorted(live, key=order),
        sources=sources,
        sinks=sorted(sinks, key=lambda s: order(Axis(s[0], 0))),
        units=units,
        blockers=blockers + list(dict.fromkeys(merged.blockers)),
        exit_sinks=_exit_sinks(dep, live, sinks),
        # On the whole component: ``x + branch`` is a residual merge even when the stream ``x``
        # enters as a block input.
        residual_adds=sorted(_residual_adds(dep, whole), key=dep.order.__getitem__),
        entries=sorted(set(entries + merged.entries), key=_entry_order(dep)),
        attention=attention,
        periods=merged.periods,
        via_periodic=merged.via_periodic,
    )


def block_inner_groups(dep: DependencyGraph, groups: list[AlignmentGroup]) -> list[AlignmentGroup]:
    """The inner widths of residual, dense and Fire blocks: the paper's places without dropout.

    A block is the code between a tensor and the merge that ends it: a residual add (ResNet,
    ConvNeXt, a transformer's MLP and attention) or a concatenation (DenseNet, Fire, Inception).
    A group is inner when every path from its first source reaches such a merge (the merge
    *post-dominates* the source), the group itself is no residual stream and only layers
    (linears, convolutions) produce it. A plain chain of convolutions (VGG) has no merge and no
    inner width; a squeeze-excite gate (a width at one spatial position) saves nothing and is
    left out.
    """
    cats = {n for n, rule in dep.rules.items() if rule.name == "concat"}
    adds = {
        n
        for n, rule in dep.rules.items()
        if rule.residual_merge and sum(shape_of(a) is not None for a in n.all_input_nodes) >= 2
    }
    merges = cats | adds
    if not merges:
        return []
    post_dominators = _immediate_post_dominators(dep.gm.graph)
    found = []
    for group in groups:
        if not group.sliceable or group.residual_adds:
            continue
        if not all(dep.rule(a.node).is_layer_output(a.node, dep.gm) for a in group.sources):
            continue
        if _is_gate_width(group):
            continue
        source = group.primary.node
        node = source
        while node in post_dominators and post_dominators[node] is not node:
            node = post_dominators[node]
            if node in merges and _inside_one_branch(source, node, residual=node not in cats):
                found.append(group)
                break
    return found


def _inside_one_branch(source: fx.Node, merge: fx.Node, residual: bool) -> bool:
    """Whether ``source`` feeds one operand of a residual ``merge`` only (a concat: any).

    The input of a block with a projection shortcut feeds both the branch and the shortcut: it
    is the stream entering the block, not the block's inner width.
    """
    if not residual:
        return True
    return sum(_depends_on(operand, source) for operand in merge.all_input_nodes) == 1


def _depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    return _reaches([node], {ancestor}, lambda n: n.all_input_nodes)


def _is_gate_width(group: AlignmentGroup) -> bool:
    shape = shape_of(group.primary.node)
    return len(shape) >= 3 and math.prod(shape[2:]) == 1


def _immediate_post_dominators(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """``node -> the nearest node every path from it to the output passes through``."""
    reverse = nx.DiGraph()
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for node in graph.nodes:
        reverse.add_node(node)
        for used in node.all_input_nodes:
            reverse.add_edge(node, used)  # reversed: from a user to what it uses
    return nx.immediate_dominators(reverse, output)
