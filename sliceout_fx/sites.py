"""Stage 5, sites: which alignment groups to slice, at which rate.

A *site* is a sliceable group chosen by a policy, with its rate and slice width. Policies:

* ``dropout`` - each existing dropout names the group flowing through it (a drop-in replacement: the
  dropout leaves the training graph);
* ``expand`` - every group produced by a 1x1 convolution that widens its input (an MBConv expand);
* ``auto`` - the dropout sites; without a dropout of a convolution, also the inner widths of blocks
  (expand convolutions, the inner convs of residual and dense blocks, Fire squeezes, MLP
  expansions: :func:`~sliceout_fx.groups.block_inner_groups`), never a residual stream;
* ``all`` - dropout sites, then every other sliceable group that is not a residual stream (e.g.
  the inner channels of every ResNet bottleneck);
* an explicit list of names: dropout module names / node names, or the name of a source op.

Anything a policy wanted but could not slice becomes a :class:`SkippedSite` with the reason,
and so does a site whose rate rounds to its full width (``p=0`` among them): a dropout it would
have replaced stays in the training graph.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .adapters import is_adapter_path, plain_path
from .config import SliceOutConfig
from .depgraph import DependencyGraph
from .errors import SliceOutConfigError
from .groups import AlignmentGroup, block_inner_groups, why_not_sliceable
from .rules import Axis
from .rules.base import rank_of
from .sampling import slice_width, validate_rate


@dataclass(eq=False)
class Site:
    """A group that will be sliced.

    Attributes:
        name: The module path the site is known by (``sites=[...]`` and ``p={...}`` use it).
        kind: Why it was chosen: ``"dropout"`` (it replaces a dropout), ``"expand"`` (an expand
            convolution), ``"inner"`` (a block's inner width), ``"group"`` (``sites="all"``) or
            ``"explicit"`` (named in ``sites=[...]``).
        group: The channel group that shares the slice.
        p: The requested rate.
        units: How many units the sampler cuts the width in (whole heads, conv groups...).
        width: Live units per training step; :attr:`effective_p` is the rate this gives.
        dropouts: The dropout nodes the site replaces.
        patch: The window plan under ``scheme="patch"``, else ``None``.
    """

    name: str
    kind: str  # "dropout" | "expand" | "inner" | "group" | "explicit"
    group: AlignmentGroup
    p: float
    units: int  # units the sampler cuts (the group's units, coarsened by width_multiple)
    width: int  # live units per step
    dropouts: list[fx.Node] = field(default_factory=list)  # dropouts this site replaces
    patch: Any = None  # a PatchPlan under scheme="patch"

    def channels(self, axis: Axis | None = None) -> tuple[int, int]:
        """``(live, total)`` channels on ``axis`` (default: the primary source axis)."""
        size = self.group.size(axis or self.group.primary)
        return self.width * size // self.units, size

    @property
    def effective_p(self) -> float:
        """The rate actually dropped: a whole number of units is kept."""
        if self.patch is not None:
            return 1.0 - self.patch.keep
        live, total = self.channels()
        return 1.0 - live / total


@dataclass
class SkippedSite:
    """A dropout or a named site left as it is, and why (the op that stops its group)."""

    name: str
    reason: str


def _site_name(node: fx.Node, by_node: bool = False) -> str:
    """The module path of the op (for a functional op, of the module whose forward called it).

    ``by_node``: functional dropouts are named by module and node, as one forward may call
    several of them.
    """
    if node.op == "call_module":
        return plain_path(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _ = next(reversed(stack.values()))
        if path:
            path = plain_path(path)
            return f"{path}.{node.name}" if by_node else path
    return node.name


def _part_name(node: fx.Node, dep: DependencyGraph) -> str | None:
    """A part of a fused projection is named after the projection (``layers.0.gate_up``)."""
    from .rules.fused import fused_projection, is_split

    item_of_split = node.target is operator.getitem and is_split(node.args[0])
    partition = node.args[0] if item_of_split else node
    try:
        projection = fused_projection(partition, dep.gm)
    except (KeyError, TypeError, AttributeError):  # not a partition of a projection
        return None
    return None if projection is None else _site_name(projection.node)


def _dropout_name(node: fx.Node) -> str:
    """A dropout module's path; a functional dropout's module path and node name."""
    if node.op == "call_module":
        return _site_name(node)
    stack = node.meta.get("nn_module_stack") or {}
    innermost = next(reversed(stack.values()), (None, None))[1]
    name = getattr(innermost, "__name__", str(innermost)).rsplit(".", 1)[-1]
    return _site_name(node, by_node="Dropout" not in name)


def _group_name(group: AlignmentGroup) -> str | None:
    """A group is named by its first source outside a PEFT adapter; ``None`` if it has none."""
    names = [_site_name(axis.node) for axis in (group.primary, *group.sources)]
    return next((n for n in names if not is_adapter_path(n)), None)


_ADAPTER_REASON = (
    "part of a PEFT adapter (its rank or its dropout), kept as it is; name it in sites=[...] to "
    "slice it anyway"
)


def _keeps_every_unit(p: float, units: int, replaces_dropout: bool) -> str:
    """Why a site whose slice would keep every unit is left out (its dropout, if any, stays).

    A slice is a whole number of units, so a rate below ``0.5 / units`` rounds to the full
    width: converting the site would remove its dropout and slice nothing.
    """
    kept = "its dropout stays in the training graph" if replaces_dropout else "nothing to slice"
    return (
        f"p={p:g} keeps all {units} units (a slice is a whole number of units: "
        f"round((1 - {p:g}) * {units}) = {units}), so {kept}; a rate above {0.5 / units:.3g} "
        "drops one unit"
    )


def _group_of(groups: list[AlignmentGroup], axis: Axis) -> AlignmentGroup | None:
    return next((g for g in groups if axis in g.axes), None)


def _dropout_candidates(dep: DependencyGraph, groups: list[AlignmentGroup]):
    """(dropout node, its channel group or None) for every dropout that is active in training."""
    for node, rel in dep.relations.items():
        if rel.site is None or rel.site.kind != "dropout":
            continue
        dims = [b.dim for _, b in rel.couplings if rel.site.dims is None or b.dim in rel.site.dims]
        found = [g for d in dims if (g := _group_of(groups, Axis(node, d))) is not None]
        yield node, rel.site.rate, (found[0] if found else None)


def _is_expand(node: fx.Node, dep: DependencyGraph) -> bool:
    """A pointwise layer that widens its input (its rule says: an MBConv expand conv)."""
    rule = dep.rule(node)
    return rule is not None and rule.is_expand(node, dep.gm)


def _units(group: AlignmentGroup, multiple: int | None, name: str) -> int:
    if multiple is None:
        return group.units
    size = group.size(group.primary)
    if size % multiple:
        warnings.warn(
            f"site {name}: width_multiple={multiple} does not divide {size} channels; ignored",
            stacklevel=4,
        )
        return group.units
    return math.gcd(group.units, size // multiple)


def select_sites(
    dep: DependencyGraph, groups: list[AlignmentGroup], config: SliceOutConfig
) -> tuple[list[Site], list[SkippedSite]]:
    """Apply the config's site policy and rates to the analysed groups."""
    sites: dict[int, Site] = {}
    skipped: list[SkippedSite] = []
    explicit = None if isinstance(config.sites, str) else list(config.sites)
    wanted = set(explicit or [])

    def add(
        group: AlignmentGroup, name: str, kind: str, own_rate: float | None, dropout: fx.Node | None
    ) -> None:
        if kind != "explicit" and is_adapter_path(name):
            skipped.append(SkippedSite(name, _ADAPTER_REASON))
            return
        if not group.sliceable:
            skipped.append(SkippedSite(name, "; ".join(group.blockers)))
            return
        if group.id in sites:  # a second dropout on the same group: it shares the first's slice
            if dropout is not None:
                sites[group.id].dropouts.append(dropout)
            return
        if own_rate is not None:
            own_rate = validate_rate(own_rate, f"the rate of dropout {name!r}")
        p = config.rate_for(name, own_rate)
        units = _units(group, config.width_multiple, name)
        width = slice_width(units, p, site=name)
        if width == units and config.scheme == "channel":
            skipped.append(SkippedSite(name, _keeps_every_unit(p, units, dropout is not None)))
            return
        sites[group.id] = Site(
            name, kind, group, p, units, width, [dropout] if dropout is not None else []
        )

    if config.sites in ("auto", "dropout", "all") or explicit:
        for node, rate, group in _dropout_candidates(dep, groups):
            name = _dropout_name(node)
            if explicit is not None and name not in wanted:
                continue
            wanted.discard(name)
            if explicit is None and is_adapter_path(name):
                skipped.append(SkippedSite(name, _ADAPTER_REASON))
            elif group is None:
                reasons = [
                    r
                    for d in range(1, rank_of(node) or 1)
                    for r in why_not_sliceable(dep, Axis(node, d))
                ]
                skipped.append(
                    SkippedSite(
                        name,
                        "no linear or convolution layer makes the tensor it drops narrower: "
                        + "; ".join(dict.fromkeys(reasons)),
                    )
                )
            else:
                add(group, name, "dropout" if explicit is None else "explicit", rate, node)

    # "auto" falls back to the inner widths of blocks (expand convolutions among them) when no
    # dropout inside a block could be sliced: a classifier dropout after pooling slices only the
    # head, which saves little in a CNN.
    inner = {g.id for g in block_inner_groups(dep, groups)} if config.sites == "auto" else set()
    fallback = config.sites == "auto" and not any(s.group.id in inner for s in sites.values())
    inner = inner if fallback else set()
    taken: set[str] = {s.name for s in sites.values()}
    for group in groups:
        source = group.primary.node
        name = _group_name(group) or _site_name(source)
        if name in taken:  # two groups sourced in one module's forward (a fused Q|K|V and MLP)
            name = _part_name(source, dep) or f"{name}.{source.name}"
        taken.add(name)
        if explicit is not None:
            if name in wanted:
                wanted.discard(name)
                add(group, name, "explicit", None, None)
        elif (config.sites == "expand" or fallback) and _is_expand(source, dep) and not (
            group.residual_adds  # a bottleneck's last 1x1 conv widens back into the stream
        ):
            add(group, name, "expand", None, None)
        elif group.id in inner:
            add(group, name, "inner", None, None)
        elif config.sites == "all" and group.sliceable and not group.residual_adds:
            # A residual stream is left alone unless named explicitly: slicing it would change
            # the width every block of the stage sees, not one block's inner channels.
            add(group, name, "group", None, None)

    if wanted:
        known = sorted(
            {_dropout_name(n) for n, _, _ in _dropout_candidates(dep, groups)}
            | {_group_name(g) or _site_name(g.primary.node) for g in groups}
        )
        raise SliceOutConfigError(f"unknown site name(s) {sorted(wanted)}; known sites: {known}")
    if isinstance(config.p, Mapping):
        unused = set(config.p) - {s.name for s in sites.values()} - {s.name for s in skipped}
        if unused:
            raise SliceOutConfigError(f"p mapping names unknown sites {sorted(unused)}")
    return sorted(sites.values(), key=lambda s: s.group.id), skipped
