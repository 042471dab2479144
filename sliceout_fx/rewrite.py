"""Stage 6, rewrite: turn the analysed train graph into the sliced training graph.

The graph gains, at its top, one call to the :class:`~sliceout_fx.sampling.SliceSampler` (one draw
per site) and one :func:`~sliceout_fx.ops.make_cut` per (site, channels-per-unit). Then, in graph
order, every op that touches a sliced axis is handed to its rule, which emits the sliced op;
replaced dropouts disappear; normalisation is inserted where the placement says; and in mask mode
every sliced tensor is multiplied by its mask so the reference zeroes exactly what slicing leaves
out.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .config import SliceOutConfig
from .depgraph import DependencyGraph
from .errors import UntraceableModelError
from .guards import hooked
from .ops import (
    make_cut,
    normalise,
    restrict,
    sliced_conv,
    sliced_conv_module,
    sliced_linear,
    take,
    widen,
)
from .patch import rewrite_patch_sites
from .rules import Axis, conversion_rules
from .rules.base import rank_of
from .sampling import SAMPLER_NAME, DrawSpec, SliceSampler, keep_probabilities
from .sites import Site


@dataclass
class RewriteContext:
    """What a rule sees while it rewrites one node."""

    gm: fx.GraphModule
    axis_site: dict[Axis, Site]
    cut_nodes: dict[tuple[int, int], fx.Node] = field(default_factory=dict)  # (group id, scale)
    alias: dict[fx.Node, fx.Node] = field(default_factory=dict)  # inserted node -> original node
    memo: dict[Any, fx.Node] = field(default_factory=dict)  # nodes a rule shares across calls

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
    if config.scheme == "patch":
        return SliceSampler([DrawSpec(0, 0, "patch", s.patch.starts) for s in sites], config.seed)
    sampler = SliceSampler(
        [
            DrawSpec(s.units, s.width, "gather" if config.mode == "gather" else "slice")
            for s in sites
        ],
        seed=config.seed,
        capturable=config.capturable,
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
    gm: fx.GraphModule,
    dep: DependencyGraph,
    sites: list[Site],
    config: SliceOutConfig,
    hooked_calls: dict[fx.Node, str] | None = None,
) -> fx.GraphModule:
    """Rewrite ``gm`` (the analysed train-mode trace) in place into the sliced training graph.

    ``gm`` must have a ``sliceout_sampler`` submodule built by :func:`build_sampler`.
    ``hooked_calls`` maps nodes that stand for one call of a module with hooks to that module's
    path in ``gm``: whatever op takes such a node's place fires the module's hooks
    (:func:`~sliceout_fx.guards.call_with_hooks`).
    """
    if config.scheme == "patch":
        rewrite_patch_sites(gm, sites, config.mode)
    else:
        with conversion_rules(config.rules):  # rules that look up another node's rule
            _Rewriter(gm, dep, sites, config, hooked_calls or {}).run()
        _fold_scales_into_sinks(gm.graph)
        # A fused projection recomputed part by part leaves its full-width matmul unused.
        gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


class _Rewriter:
    """One pass over the graph in topological order (see the module docstring)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        dep: DependencyGraph,
        sites: list[Site],
        config: SliceOutConfig,
        hooked_calls: dict[fx.Node, str],
    ) -> None:
        self.graph, self.dep, self.sites, self.config = gm.graph, dep, sites, config
        self.hooked_calls = hooked_calls
        axis_site = {axis: site for site in sites for axis in site.group.axes}
        self.ctx = RewriteContext(gm, axis_site)
        self.replaced_dropouts = {d for site in sites for d in site.dropouts}
        # Attention groups always scale where the heads leave (the values), never the queries.
        delayed = [s for s in sites if config.placement == "delayed" or s.group.attention]
        immediate = [s for s in sites if s not in delayed]
        # Sites without a dropout get their immediate scale right after their primary source
        # (not after a squeeze-excite expand conv, which also sources the group).
        self.bare_sources = {s.group.primary.node for s in immediate if not s.dropouts}
        self.immediate_dropouts = {d for s in immediate for d in s.dropouts}
        self.sink_sites = {(n, site) for site in delayed for n, _ in site.group.exit_sinks}
        self.scaled_inputs: dict[fx.Node, fx.Node] = {}  # delayed placement: value -> scaled
        self.entries: dict[fx.Node, list[tuple[fx.Node, int]]] = {}  # op -> full-width operands
        for site in sites:
            for op, operand, dim in site.group.entries:
                self.entries.setdefault(op, []).append((operand, dim))
        self.scale_buffers: dict[tuple[int, int], fx.Node] = {}

    def run(self) -> None:
        nodes = list(self.graph.nodes)
        first = next(n for n in nodes if n.op != "placeholder")
        with self.graph.inserting_before(first):
            self._insert_draws_and_cuts()
        for node in nodes:
            if node.op in ("call_module", "call_function", "call_method"):
                if self.sink_sites:
                    self._scale_sliced_inputs_of_sink(node)
                if node in self.entries and self.config.mode != "mask":
                    self._narrow_entries(node)
                self._rewrite(node)
            elif node.op == "output":
                self._widen_outputs(node)

    def _insert_draws_and_cuts(self) -> None:
        graph, config = self.graph, self.config
        probabilistic = config.normalisation == "probabilistic" and config.mode != "gather"
        draws = graph.call_module(SAMPLER_NAME, ())
        for i, site in enumerate(self.sites):
            draw = graph.call_function(operator.getitem, (draws, i))
            for scale in _scales(site):
                key = (site.group.id, scale)
                args = (draw, site.width * scale, site.units * scale, scale, config.mode)
                self.ctx.cut_nodes[key] = graph.call_function(make_cut, args)
                if probabilistic:
                    name = _scale_buffer_name(*key)
                    self.scale_buffers[key] = graph.get_attr(f"{SAMPLER_NAME}.{name}")

    def _normalise_args(self, value: fx.Node) -> tuple:
        """``(cut, dim, inv_keep_prob or None)`` for the sliced axis of ``value``."""
        dim = _sliced_dim(self.ctx, value)
        site, axis = self.ctx.site_of(value, dim)
        key = (site.group.id, site.group.size(axis) // site.units)
        return self.ctx.cut_nodes[key], _from_end(self.ctx, value, dim), self.scale_buffers.get(key)

    def _scale_sliced_inputs_of_sink(self, node: fx.Node) -> None:
        """Delayed placement: scale each sliced input of an exit sink once, where it is made."""
        ctx = self.ctx
        for arg in list(node.all_input_nodes):
            dims = _sliced_dims(ctx, arg)
            if not dims or (node, ctx.axis_site[Axis(ctx.original(arg), dims[0])]) not in (
                self.sink_sites
            ):
                continue
            if arg not in self.scaled_inputs:
                with self.graph.inserting_after(arg):
                    scaled = self.graph.call_function(normalise, (arg, *self._normalise_args(arg)))
                ctx.alias[scaled] = ctx.original(arg)
                self.scaled_inputs[arg] = scaled
            node.replace_input_with(arg, self.scaled_inputs[arg])

    def _widen_outputs(self, output: fx.Node) -> None:
        """Return sliced outputs (attention weights, see the groups stage) at full width."""
        ctx = self.ctx
        for value in list(output.all_input_nodes):
            dims = _sliced_dims(ctx, value)
            if not dims:
                continue
            widened = value
            with self.graph.inserting_before(output):
                for dim in dims:
                    cut = ctx.cut_for(value, dim)
                    widened = self.graph.call_function(
                        widen, (widened, cut, _from_end(ctx, value, dim))
                    )
            output.replace_input_with(value, widened)

    def _narrow_entries(self, node: fx.Node) -> None:
        """Narrow the full-width operands of ``node`` that its group reads, where it reads them.

        Mask mode keeps them whole: the masking after ``node`` zeroes what lies outside the cut.
        """
        for operand, dim in self.entries[node]:
            out_dim = next(
                out.dim
                for inp, out in self.dep.relation(node).couplings
                if inp == Axis(operand, dim) and out.node is node
            )
            cut = self.ctx.cut_for(node, out_dim)
            with self.graph.inserting_before(node):
                narrowed = self.graph.call_function(take, (operand, dim - rank_of(operand), cut))
            node.replace_input_with(operand, narrowed)

    def _rewrite(self, node: fx.Node) -> None:
        """Replace ``node`` by its sliced op, then mask (mask mode) and scale (immediate)."""
        ctx, graph = self.ctx, self.graph
        current = node
        hooked = self.hooked_calls.get(node)
        if node in self.replaced_dropouts:
            current = node.args[0] if node.args else node.kwargs["input"]
            if hooked is not None:  # its hooks still see the tensor it passed on
                with graph.inserting_before(node):
                    current = graph.call_function(passthrough, (current,))
                ctx.alias[current] = node
                _fire_hooks(graph, current, hooked)
        elif (rule := self.dep.rule(node)) is not None:
            with graph.inserting_before(node):
                new = rule.rewrite(node, ctx)
            if new is not None:
                ctx.alias[new] = node
                current = new
                if hooked is not None:
                    _fire_hooks(graph, new, hooked)
        if current is node and hooked is not None and node.op == "call_function":
            _fire_hooks(graph, node, hooked)  # an exported op left as it is

        appended: list[fx.Node] = []
        steps: list[tuple[Callable, tuple]] = []
        if self.config.mode == "mask" and node not in self.replaced_dropouts:
            steps += [
                (restrict, (ctx.cut_for(node, d), _from_end(ctx, node, d)))
                for d in _sliced_dims(ctx, node)
            ]
        if node in self.immediate_dropouts or node in self.bare_sources:
            steps.append((normalise, self._normalise_args(node)))
        for fn, args in steps:
            with graph.inserting_after(current):
                current = graph.call_function(fn, (current, *args))
            ctx.alias[current] = node
            appended.append(current)

        if current is not node:
            first_appended = appended[:1]
            node.replace_all_uses_with(current, delete_user_cb=lambda u: u not in first_appended)
            if not node.users:
                graph.erase_node(node)


def passthrough(x: Any) -> Any:
    """The op of a replaced dropout whose module has hooks: its hooks see the input unchanged."""
    return x


def _fire_hooks(graph: fx.Graph, op: fx.Node, path: str) -> None:
    """Turn ``op`` (standing for one call of the module at ``path``) into a hooked call.

    ``op(x, ...)`` becomes ``hooked(op)(module, lazy, x, ...)``: the module's hooks fire
    around it with ``x`` as the input (:func:`~sliceout_fx.guards.call_with_hooks`). Arguments
    the graph reads from the module itself (``get_attr`` of ``<path>.weight``) are read inside the
    call instead, after the forward-pre hooks ran (pruning recomputes the weight there).
    """
    if op.op != "call_function" or not op.args:
        raise UntraceableModelError(
            f"cannot fire the hooks of {path}: the op in its place is {op.format_node()}"
        )
    with graph.inserting_before(op):
        module = graph.get_attr(path)
    lazy, args = [], list(op.args)
    for index, arg in enumerate(args):
        if index and isinstance(arg, fx.Node) and arg.op == "get_attr":
            owner, _, attribute = str(arg.target).rpartition(".")
            if owner == path:
                lazy.append((index, attribute))
                args[index] = None
    op.args = (module, tuple(lazy), *args)
    op.target = hooked(op.target)


def _fold_scales_into_sinks(graph: fx.Graph) -> None:
    """Fold ``normalise(x, ...)`` into the linear and conv layers that read the scaled ``x``.

    Those layers are linear in their input, so the scale can ride on the computation instead of a
    scaled copy of ``x`` being allocated and saved for backward (a large share of the activation
    memory): a linear takes a flow scale as ``addmm(alpha=...)``; a conv takes a flow or
    per-channel scale on its input-channel weight slice, which it copies anyway. A per-unit scale
    on a linear would need a weight copy larger than the activation, so it stays where it is.
    """
    for node in list(graph.nodes):
        if node.target is not normalise:
            continue
        x, cut, _, per_unit = node.args
        readers = list(node.users)
        allowed = _CONV_SINKS if per_unit is not None else (*_CONV_SINKS, sliced_linear)
        if not readers or not all(
            u.target in allowed and u.args[0] is node and node not in u.args[1:] for u in readers
        ):
            continue
        _, width, size, _, _ = cut.args
        for user in readers:
            scale = (
                {"in_scale_per_channel": per_unit}
                if per_unit is not None
                else {"in_scale": size / width}
            )
            user.args = (x, *user.args[1:])
            user.kwargs = {**user.kwargs, **scale}
        graph.erase_node(node)


_CONV_SINKS = (sliced_conv, sliced_conv_module)


def _sliced_dims(ctx: RewriteContext, node: fx.Node) -> list[int]:
    return sorted(a.dim for a in ctx.axis_site if a.node is ctx.original(node))


def _from_end(ctx: RewriteContext, node: fx.Node, dim: int) -> int:
    """``dim`` of ``node``'s tensor counted from the end, as the runtime ops take it.

    The analysis numbers axes in the example input's rank; leading (batch) axes are what a
    training batch adds or drops (``(B, F)`` vs ``(B, T, F)``, a batched vs an unbatched image),
    and counting from the end names the same channel axis in either.
    """
    shape = getattr(ctx.original(node).meta.get("tensor_meta"), "shape", None)
    return dim if shape is None else dim - len(shape)


def _sliced_dim(ctx: RewriteContext, node: fx.Node) -> int:
    dims = _sliced_dims(ctx, node)
    assert len(dims) == 1, f"{node.name} is sliced along {dims}"
    return dims[0]
