"""``explain``: a readable account of what a conversion found, sliced and skipped, and why."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx

from .config import SliceOutConfig
from .depgraph import DependencyGraph
from .groups import AlignmentGroup
from .rules.base import shape_of
from .sites import Site, SkippedSite


@dataclass
class Report:
    """The analysis of one model under one config. ``str(report)`` is the printable form.

    Attributes:
        model_name: The model's class name.
        config: The options the analysis ran with.
        groups: Every channel group found, sliceable or not (each with its blockers).
        sites: The groups that are sliced, with their rates and widths (:class:`Site`).
        skipped: Dropouts and named sites left as they are, each with its reason
            (:class:`SkippedSite`).
        flops_ratio: Expected multiply-accumulates of a sliced training step over full width.
        activation_ratio: Expected activation elements of a sliced step over full width.
    """

    model_name: str
    config: SliceOutConfig
    groups: list[AlignmentGroup]
    sites: list[Site]
    skipped: list[SkippedSite]
    flops_ratio: float  # expected multiply-accumulates of a sliced step / full width
    activation_ratio: float  # expected activation elements of a sliced step / full width

    def __deepcopy__(self, memo: dict) -> Report:
        # A report describes the analysis; its groups hold fx nodes, and copying a node copies
        # the whole linked list behind it (a RecursionError on deep models). Copies share it.
        return self

    def site(self, name: str) -> Site:
        """The sliced site called ``name`` (``KeyError`` listing the sites if there is none)."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {[s.name for s in self.sites]}")

    def __str__(self) -> str:
        c = self.config
        lines = [
            f"SliceOut plan for {self.model_name} (mode={c.mode}, normalisation={c.normalisation}, "
            f"placement={c.placement})",
            f"Sites: {len(self.sites)} sliced, {len(self.skipped)} skipped; "
            f"channel groups found: {len(self.groups)}",
        ]
        for s in self.sites:
            if s.patch is not None:
                window = "x".join(map(str, s.patch.window))
                size = "x".join(map(str, s.patch.size))
                lines.append(
                    f"  [{s.name}] {s.kind} site, p={s.p:.3g} -> window {window} of {size} "
                    f"(effective p={s.effective_p:.3f}) into "
                    + ", ".join(n.name for n in s.patch.sinks)
                )
                continue
            live, total = s.channels()
            lines.append(
                f"  [{s.name}] {s.kind} site, p={s.p:.3g} -> width {live}/{total} "
                f"(effective p={s.effective_p:.3f}, cut in {s.units} units), group {s.group.id}"
            )
            lines.append(f"      ops: {_member_list(s)}")
        for k in self.skipped:
            lines.append(f"  [{k.name}] SKIPPED: {k.reason}")
        unused = [g for g in self.groups if g.id not in {s.group.id for s in self.sites}]
        if unused:
            lines.append("Channel groups not sliced:")
            for g in unused:
                why = "; ".join(g.blockers) if g.blockers else "sliceable, but no site chose it"
                if g.sliceable and g.residual_adds:
                    why += f" (a residual stream through {g.residual_adds[0].name})"
                lines.append(f"  group {g.id} ({g.describe()}): {why}")
        lines.append(
            "Expected per training step vs full width: "
            f"multiply-accumulates x{self.flops_ratio:.3f}, "
            f"activation elements x{self.activation_ratio:.3f}"
        )
        return "\n".join(lines)

    __repr__ = __str__


def _member_list(site: Site) -> str:
    roles: dict[fx.Node, str] = {}
    for node in site.group.nodes:
        roles[node] = "coupled"
    for axis in site.group.sources:
        roles[axis.node] = "source"
    for node, _ in site.group.sinks:
        roles[node] = "sink"
    for node in site.dropouts:
        roles[node] = "replaced"
    return ", ".join(f"{n.name} ({r})" for n, r in roles.items())


def expected_ratios(dep: DependencyGraph, sites: list[Site]) -> tuple[float, float]:
    """Multiply-accumulate and activation-element ratios of a sliced step (a static estimate).

    An op's work shrinks by the keep fraction of every distinct site it touches (a linear layer
    between two sites by both); its output shrinks by the keep fraction of its sliced output axes.
    """
    out_sites: dict[fx.Node, set[Site]] = {}
    in_sites: dict[fx.Node, set[Site]] = {}
    for site in sites:
        if site.patch is not None:  # only the windowed convolutions shrink
            for node in site.patch.sinks:
                in_sites.setdefault(node, set()).add(site)
            continue
        for axis in site.group.axes:
            out_sites.setdefault(axis.node, set()).add(site)
        for node, _ in site.group.sinks:
            in_sites.setdefault(node, set()).add(site)
    full_flops = sliced_flops = full_act = sliced_act = 0.0
    for node, rule in dep.rules.items():
        outs = out_sites.get(node, set())
        keep = math.prod(1.0 - s.effective_p for s in outs | in_sites.get(node, set()))
        flops = rule.flops(node, dep.gm)
        full_flops += flops
        sliced_flops += flops * keep
        shape = shape_of(node)
        if shape is not None:
            full_act += math.prod(shape)
            sliced_act += math.prod(shape) * math.prod(1.0 - s.effective_p for s in outs)
    return (
        sliced_flops / full_flops if full_flops else 1.0,
        sliced_act / full_act if full_act else 1.0,
    )


def combine_reports(model_name: str, config: SliceOutConfig, reports: list[Report]) -> Report:
    """One report for a block-converted model: every block's sites, groups and skips.

    The expected ratios are the blocks' averages (the layers of one model are alike); they cover
    the converted blocks only, not embeddings or heads outside them.
    """
    n = max(len(reports), 1)
    return Report(
        f"{model_name} ({len(reports)} blocks converted)",
        config,
        [g for r in reports for g in r.groups],
        [s for r in reports for s in r.sites],
        [k for r in reports for k in r.skipped],
        sum(r.flops_ratio for r in reports) / n if reports else 1.0,
        sum(r.activation_ratio for r in reports) / n if reports else 1.0,
    )
