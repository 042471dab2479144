"""Patch SliceOut (paper §3.4, Fig. 2c): convolve a contiguous spatial window instead of channels.

For each site the convolution where the site's slice would end (the WRN block's second conv, the
MBConv projection) sees only a random window of its input, covering a fraction ``1 - p`` of the
positions; its output is computed on the window alone and zero-padded back to full size, so the
residual add and everything after it keep their shapes. Starts are aligned to the conv's stride so
the window's output is exactly the matching window of the full output, and there are a fixed number
of eligible starts per axis so every step has the same shapes. Activations are flow-normalised.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from torch import fx, nn

from .depgraph import DependencyGraph
from .ops import patch_conv
from .rules.base import shape_of
from .sampling import SAMPLER_NAME
from .sites import Site, SkippedSite


@dataclass(frozen=True)
class PatchPlan:
    """The window of one site, in input positions, shared by its exit convolutions."""

    sinks: tuple[fx.Node, ...]
    stride: tuple[int, ...]
    size: tuple[int, ...]  # spatial input size
    window: tuple[int, ...]  # window size, a multiple of the stride on each axis
    starts: tuple[int, ...]  # number of eligible starts per axis (in stride steps)

    @property
    def keep(self) -> float:
        return math.prod(self.window) / math.prod(self.size)


def _conv_module(node: fx.Node, dep: DependencyGraph) -> nn.Module | None:
    """The convolution module a sink calls (its rule says it is one), else ``None``."""
    rule = dep.rule(node)
    if node.op != "call_module" or rule is None or rule.name != "conv":
        return None
    return dep.gm.get_submodule(str(node.target))


def plan_patch(site: Site, dep: DependencyGraph) -> PatchPlan | str:
    """The window of ``site``, or the reason it cannot take one."""
    sinks = tuple(dict.fromkeys(node for node, _ in site.group.exit_sinks))
    plans = set()
    for sink in sinks:
        conv = _conv_module(sink, dep)
        if conv is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return f"patch slicing needs nn.ConvNd modules with numeric zero padding ({sink.name})"
        plans.add((tuple(shape_of(sink.args[0])[2:]), tuple(conv.stride)))
    if len(plans) != 1:
        return "patch slicing needs one exit convolution (or several with one input size)"
    ((size, stride),) = plans
    side = (1.0 - site.p) ** (1.0 / len(size))
    window = tuple(
        min(n - n % s or s, max(s, round(side * n / s) * s))
        for n, s in zip(size, stride, strict=True)
    )
    starts = tuple((n - w) // s + 1 for n, w, s in zip(size, window, stride, strict=True))
    return PatchPlan(sinks, stride, size, window, starts)


def assign_patches(sites: list[Site], dep: DependencyGraph) -> tuple[list[Site], list[SkippedSite]]:
    """Attach a :class:`PatchPlan` to each site that can take one; skip the others with a reason."""
    kept, skipped = [], []
    for site in sites:
        plan = plan_patch(site, dep)
        if isinstance(plan, str):
            skipped.append(SkippedSite(site.name, plan))
        else:
            site.patch = plan
            kept.append(site)
    return kept, skipped


def rewrite_patch_sites(gm: fx.GraphModule, sites: list[Site], mode: str) -> None:
    """Drop the sites' dropouts and replace their exit convolutions by :func:`patch_conv`."""
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        draws = graph.call_module(SAMPLER_NAME, ())
    anchor = draws
    for i, site in enumerate(sites):
        plan = site.patch
        with graph.inserting_after(anchor):
            draw = anchor = graph.call_function(operator.getitem, (draws, i))
        for dropout in site.dropouts:
            dropout.replace_all_uses_with(dropout.args[0])
            graph.erase_node(dropout)
        for sink in plan.sinks:
            out_size = tuple(shape_of(sink)[2:])
            with graph.inserting_before(sink):
                module = graph.get_attr(str(sink.target))
                new = graph.call_function(
                    patch_conv,
                    (sink.args[0], module, draw, plan.window, out_size, 1.0 / plan.keep, mode),
                )
            sink.replace_all_uses_with(new)
            graph.erase_node(sink)
