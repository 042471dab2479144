"""Stage 6, rewrite: turn the analysed train graph into the sliced training graph.

The graph gains, at its top, one call to the :class:`~sliceout_fx.sampling.SliceSampler` (one draw
per site) and one :func:`~sliceout_fx.ops.make_cut` per (site, channels-per-unit). Then, in graph
order, every op that touches a sliced axis is handed to its rule, which emits the sliced op; replaced
dropouts disappear; normalisation is inserted where the placement says; and in mask mode every
sliced tensor is multiplied by its mask so the reference zeroes exactly what slicing leaves out.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .config import SliceOutConfig
from .depgraph import DependencyGraph
from .ops import make_cut, normalise, restrict, sliced_linear
from .rules import Axis
from .sampling import SAMPLER_NAME, DrawSpec, SliceSampler, keep_probabilities
from .sites import Site


@dataclass
class RewriteContext:
    """What a rule sees while it rewrites one node."""

    gm: fx.GraphModule
    mode: str
    axis_site: dict[Axis, Site]
    cut_nodes: dict[tuple[int, int], fx.Node] = field(default_factory=dict)  # (group id, scale)
    alias: dict[fx.Node, fx.Node] = field(default_factory=dict)  # inserted node -> original node

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def original(self, node: Any) -> Any:
        while node in self.alias:
            node = self.alias[node]
        return node

    def site_of(self, node: Any, dim: int) -> tuple[Site, Axis] | None:
        axis = Axis(self.original(node), dim)
        site = self.axis_site.get(axis)
        return None if site is None else (site, axis)

    def cut_for(self, node: Any, dim: int) -> fx.Node | None:
        found = self.site_of(node, dim)
        if found is None:
            return None
        site, axis = found
        return self.cut_nodes[(site.group.id, site.group.size(axis) // site.units)]

    # Rules ask for the cut of their output axis and of their input axes by the same lookup.
    out_cut = cut_for
    in_cut = cut_for

    def get_attr(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)

    def call(self, fn: Callable, args: tuple) -> fx.Node:
        return self.graph.call_function(fn, args)


def _scale_buffer_name(group_id: int, scale: int) -> str:
    return f"inv_keep_g{group_id}_x{scale}"


def build_sampler(sites: list[Site], config: SliceOutConfig) -> SliceSampler:
    """The sampler of these sites, holding the ``1 / P(keep)`` vectors they normalise with."""
    sampler = SliceSampler(
        [DrawSpec(s.units, s.width, "gather" if config.mode == "gather" else "slice")
         for s in sites],
        seed=config.seed,
    )
    if config.normalisation == "probabilistic" and config.mode != "gather":
        for site in sites:
            inv = 1.0 / keep_probabilities(site.units, site.width)
            for scale in _scales(site):
                values = inv.repeat_interleave(scale).float()
                sampler.add_scale_buffer(_scale_buffer_name(site.group.id, scale), values)
    return sampler


def _scales(site: Site) -> list[int]:
    return sorted({site.group.size(a) // site.units for a in site.group.axes})


def rewrite_training_graph(
    gm: fx.GraphModule, dep: DependencyGraph, sites: list[Site], config: SliceOutConfig
) -> fx.GraphModule:
    """Rewrite ``gm`` (the analysed train-mode trace) in place into the sliced training graph.

    ``gm`` must have a ``sliceout_sampler`` submodule built by :func:`build_sampler`.
    """
    graph = gm.graph
    axis_site = {axis: site for site in sites for axis in site.group.axes}
    ctx = RewriteContext(gm, config.mode, axis_site)
    nodes = list(graph.nodes)
    first = next(n for n in nodes if n.op != "placeholder")

    with graph.inserting_before(first):
        draws = graph.call_module(SAMPLER_NAME, ())
        for i, site in enumerate(sites):
            draw = graph.call_function(operator.getitem, (draws, i))
            for scale in _scales(site):
                size = site.units * scale
                ctx.cut_nodes[(site.group.id, scale)] = graph.call_function(
                    make_cut, (draw, site.width * scale, size, scale, config.mode)
                )

    replaced_dropouts = {d: site for site in sites for d in site.dropouts}
    sources = {a.node: site for site in sites for a in site.group.sources}
    sink_sites = {(n, site) for site in sites for n, _ in site.group.sinks}
    delayed_cache: dict[fx.Node, fx.Node] = {}

    scale_buffers: dict[tuple[int, int], fx.Node] = {}
    if config.normalisation == "probabilistic" and config.mode != "gather":
        with graph.inserting_before(first):
            for site in sites:
                for scale in _scales(site):
                    target = f"{SAMPLER_NAME}.{_scale_buffer_name(site.group.id, scale)}"
                    scale_buffers[(site.group.id, scale)] = graph.get_attr(target)

    def scale_buffer(value: fx.Node, dim: int) -> fx.Node | None:
        """The ``1 / P(keep)`` vector of ``value``'s sliced axis; ``None`` means flow scaling."""
        site, axis = ctx.site_of(value, dim)
        return scale_buffers.get((site.group.id, site.group.size(axis) // site.units))

    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        # Delayed normalisation: scale each sliced input of a sink once, right after it is made.
        if config.placement == "delayed":
            for arg in list(node.all_input_nodes):
                dims = _sliced_dims(ctx, arg)
                if dims and (node, ctx.axis_site[Axis(ctx.original(arg), dims[0])]) in sink_sites:
                    if arg not in delayed_cache:
                        dim = _sliced_dim(ctx, arg)
                        args = (arg, ctx.cut_for(arg, dim), dim, scale_buffer(arg, dim))
                        with graph.inserting_after(arg):
                            delayed_cache[arg] = graph.call_function(normalise, args)
                        ctx.alias[delayed_cache[arg]] = ctx.original(arg)
                    node.replace_input_with(arg, delayed_cache[arg])

        current = node
        if node in replaced_dropouts:
            current = node.args[0] if node.args else node.kwargs["input"]
        elif (rule := dep.rule(node)) is not None:
            with graph.inserting_before(node):
                new = rule.rewrite(node, ctx)
            if new is not None:
                ctx.alias[new] = node
                current = new

        # Post-processing on the value that now stands for `node`: mask, then scale.
        chain: list[fx.Node] = []

        def then(fn: Callable, *args: Any) -> None:
            nonlocal current
            with graph.inserting_after(current):
                current = graph.call_function(fn, (current, *args))
            ctx.alias[current] = node
            chain.append(current)

        if config.mode == "mask" and node not in replaced_dropouts:
            for dim in _sliced_dims(ctx, node):
                then(restrict, ctx.cut_for(node, dim), dim)
        if config.placement == "immediate" and (
            node in replaced_dropouts or (node in sources and not sources[node].dropouts)
        ):
            dim = _sliced_dim(ctx, node)
            then(normalise, ctx.cut_for(node, dim), dim, scale_buffer(node, dim))
        if current is not node:
            node.replace_all_uses_with(current, delete_user_cb=lambda user: user not in chain[:1])
            if not node.users:
                graph.erase_node(node)
    _fold_flow_scales_into_linears(graph)
    graph.lint()
    gm.recompile()
    return gm


def _fold_flow_scales_into_linears(graph: fx.Graph) -> None:
    """Fold ``normalise(x, cut, dim, None)`` into the ``in_scale`` of the linears that read it.

    Flow scaling is a constant ``size / width`` and a linear layer is linear in its input, so the
    scale can ride on the matmul (``addmm(alpha=...)``): the scaled copy of ``x`` is then never
    allocated nor saved for backward - a large share of the activation memory of an MLP.
    """
    for node in list(graph.nodes):
        if node.target is not normalise or node.args[3] is not None:
            continue
        x, cut, dim, _ = node.args
        readers = list(node.users)
        if not readers or not all(
            u.target is sliced_linear and u.args[0] is node and node not in u.args[1:]
            for u in readers
        ):
            continue
        _, width, size, _, _ = cut.args
        for user in readers:
            user.args = (x, *user.args[1:5], size / width)
        graph.erase_node(node)


def _sliced_dims(ctx: RewriteContext, node: fx.Node) -> list[int]:
    return sorted(a.dim for a in ctx.axis_site if a.node is ctx.original(node))


def _sliced_dim(ctx: RewriteContext, node: fx.Node) -> int:
    dims = _sliced_dims(ctx, node)
    assert len(dims) == 1, f"{node.name} is sliced along {dims}"
    return dims[0]
