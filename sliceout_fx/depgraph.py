"""Stage 3, dependency graph: which channel axes must share one slice.

Vertices are :class:`~sliceout_fx.rules.Axis` objects (a node's output tensor and one of its
dimensions); an edge joins two axes that a rule couples (the input and output channels of a batch
norm, say). Connected components of this graph are the alignment groups of the next stage. The
per-node :class:`~sliceout_fx.rules.AxisRelations` are kept alongside, because sliceability and the
rewrite need to know the sources, sinks and blockers, not only the edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
from torch import fx

from .rules import Axis, AxisRelations, OpRule, rule_for, rule_table

_COMPUTE_OPS = ("call_module", "call_function", "call_method")


@dataclass
class DependencyGraph:
    gm: fx.GraphModule
    graph: nx.Graph
    rules: dict[fx.Node, OpRule]
    relations: dict[fx.Node, AxisRelations]
    order: dict[fx.Node, int]  # topological position of each node, for stable reports

    def position(self, axis: Axis) -> tuple[int, int]:
        return (self.order[axis.node], axis.dim)

    def rule(self, node: fx.Node) -> OpRule | None:
        return self.rules.get(node)

    def relation(self, node: fx.Node) -> AxisRelations:
        return self.relations.get(node, _NO_RELATIONS)


_NO_RELATIONS = AxisRelations()


def build_dependency_graph(
    gm: fx.GraphModule, rules: Sequence[OpRule] = ()
) -> DependencyGraph:
    """Ask every node's rule for its axis relations and join coupled axes (needs shapes).

    ``rules`` (a conversion's own) take precedence over the registered ones.
    """
    extra = rule_table(rules)
    graph = nx.Graph()
    rules: dict[fx.Node, OpRule] = {}
    relations: dict[fx.Node, AxisRelations] = {}
    for node in gm.graph.nodes:
        if node.op not in _COMPUTE_OPS:
            continue
        rule = rule_for(node, gm, extra)
        rel = rule.relations(node, gm)
        rules[node], relations[node] = rule, rel
        for axis in (*rel.sources, *rel.sinks):
            graph.add_node(axis)
        for a, b in rel.couplings:
            graph.add_edge(a, b, op=node.name)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return DependencyGraph(gm, graph, rules, relations, order)
