"""Pictures of the analysis: the fx graph with each sliced alignment group in its own colour.

``explain`` says in words which ops share one slice; a picture shows it at a glance, like the
figures of the SliceOut paper. :func:`draw` renders the traced training graph top to bottom:

* every op is a box (module path or node name, then its type and channel width);
* an op whose output is cut by a site's slice is filled with that site's colour, and its box says
  ``live/total`` channels; an op that only *reads* the slice (a sink: its weight's input columns
  are cut) gets a band of the colour along its top edge;
* arrows that carry a sliced tensor are drawn thick in the site's colour;
* the site itself (the dropout it replaces, or the expand conv that produces the group) gets a
  star and a thick border; a site that was wanted but skipped gets a hollow star;
* an op that stops a channel group (a reshape, an op without a rule, the model output) is hatched
  grey, and the legend says why.

Only matplotlib is used (no graphviz): the layered layout is computed here (longest-path layers;
each chain of ops one straight column; an edge that skips layers runs down a column of its own).
Large models are drawn one block at a time with ``only="features.2.1"``: ops outside the prefix
are shown as dashed stubs where they connect.

A transformer (a HuggingFace model, a model converted block by block, or any model drawn with
``capture="blocks"``) is drawn one layer at a time, as ``convert`` sees it: the layer's
``torch.export`` graph from :func:`sliceout_fx.analyse_blocks`. There every op is an ATen op; an op
that reads a module's weights is named after that module (``self_attn.q_proj``), the layer's
inputs are named after the arguments of its call (``hidden_states``, ``attention_mask``), and the
parameters and shape arithmetic of the graph are left out.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .api import Analysis, analyse, analyse_blocks, to_original
from .blocks import example_inputs_for, find_blocks, record_calls
from .capture_export import _exportable
from .config import Rate, SitePolicy
from .errors import UntraceableModelError
from .groups import AlignmentGroup
from .module import _STATE, conversions_in
from .options import front_end, resolve
from .rules.base import shape_of
from .sites import Site, _site_name

__all__ = ["FORMATS", "PALETTE", "draw", "output_format"]

#: File suffixes :func:`draw` can write, and the matplotlib format of each.
FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf"}

#: (fill, line) colours of the sliced groups, in site order: light fills keep black labels
#: readable, the dark twin draws the arrows and the site's border. Grey is kept for blockers.
PALETTE: tuple[tuple[str, str], ...] = (
    ("#aec7e8", "#1f77b4"),
    ("#ffbb78", "#ff7f0e"),
    ("#98df8a", "#2ca02c"),
    ("#ff9896", "#d62728"),
    ("#c5b0d5", "#9467bd"),
    ("#f7b6d2", "#e377c2"),
    ("#dbdb8d", "#bcbd22"),
    ("#9edae5", "#17becf"),
    ("#c49c94", "#8c564b"),
)

_BLOCKED_FILL, _BLOCKED_LINE = "#e0e0e0", "#7f7f7f"
_STUB_LINE = "#9a9a9a"

# Layout, in inches (the axes map one data unit to one inch, so text sizes stay true).
_FONT = 8.0
_CHAR_W = 0.064  # average width of one character at _FONT points
_BOX_H = 0.42
_ROW = 0.72
_GAP = 0.28
_DUMMY_W = 0.12
_LEGEND_WRAP = 56
_MARGIN = 0.15  # room for the site stars on the left edge


class _Same:
    """Sentinel: "not given" (``p=None`` already means "reuse each dropout's rate")."""

    def __repr__(self) -> str:
        return "<convert's default>"


_SAME: Any = _Same()


def output_format(path: str | Path) -> str:
    """The matplotlib format for ``path``'s suffix, or a ``ValueError`` naming the fix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot tell the picture format of {str(path)!r}: give a file name ending in "
            + ", ".join(FORMATS)
        )
    return FORMATS[suffix]


def draw(
    model_or_analysis: nn.Module | Analysis,
    path: str | Path,
    *,
    p: Rate = _SAME,
    sites: SitePolicy = _SAME,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] | None = None,
    only: str | None = None,
    title: str | None = None,
    max_nodes: int = 120,
    **options: Any,
) -> Path:
    """Render the model's graph with its SliceOut sites and alignment groups to ``path``.

    Args:
        model_or_analysis: a model (analysed here as ``convert`` would, nothing is modified), an
            :class:`~sliceout_fx.Analysis` from :func:`sliceout_fx.analyse` or
            :func:`sliceout_fx.analyse_blocks`, or a converted model (a
            :class:`~sliceout_fx.SliceOutModule` or a block-converted HuggingFace model: a copy
            of its original is re-analysed with its config; the model itself is untouched). A
            HuggingFace model, a block-converted one, or a model given ``capture="blocks"`` is
            drawn one layer at a time (see ``only``).
        path: output file; ``.svg``, ``.png`` or ``.pdf`` (the suffix picks the format).
        p: drop rate, as for :func:`sliceout_fx.convert` (default: convert's). This and the
            other analysis options are refused with an Analysis or a converted module, which
            already fix them.
        sites: site policy or site names, as for ``convert`` (default: ``"auto"``).
        example_inputs: inputs to learn tensor shapes from, as for ``convert`` (a dict of
            keyword arguments for a HuggingFace model; guessed from its config when left out).
        leaf_modules: module types or names to keep whole when tracing, as for ``convert``.
        only: draw only the ops whose module path is this prefix or lies under it (one block
            of a large model, e.g. ``"features.2.1"``); connections to the rest are stubs. For a
            model drawn layer by layer: the layer of this name (``"model.layers.3"``), a part
            of one (``"model.layers.3.mlp"``) or a parent of layers (its first layer); the first
            layer when left out.
        title: figure title (default: the model name, rate and site policy).
        max_nodes: refuse to draw more ops than this (the error lists prefixes for ``only``):
            a figure of hundreds of boxes is unreadable.
        **options: the other options of ``convert`` (``normalisation``, ``placement``,
            ``scheme``, ``width_multiple``, ``capture``...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown suffix, ``only`` matching nothing, or too many nodes.
        TypeError: analysis options given with an Analysis or a converted module.
    """
    path = Path(path)
    fmt = output_format(path)
    kwargs = {"p": p, "sites": sites, "example_inputs": example_inputs,
              "leaf_modules": leaf_modules, **options}  # fmt: skip
    if _by_layers(model_or_analysis, options.get("capture", "auto")):
        analysis, only, default = _layer_analysis(model_or_analysis, only, **kwargs)
    else:
        analysis = _analysis(model_or_analysis, **kwargs)
        default = _default_title(analysis, only)
    scene = _Scene.build(analysis, only, max_nodes)
    figure = _render(scene, title or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    # Text stays text in SVG: searchable, selectable, and a fraction of the size of glyph paths.
    # No date stamp and fixed ids: drawing the same analysis twice gives the same file.
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sliceout-fx"}):
        figure.savefig(
            path, format=fmt, dpi=150, bbox_inches="tight", pad_inches=0.15, metadata=metadata
        )
    return path


# ----------------------------------------------------------------------------------- analysis


def _analysis(model: nn.Module | Analysis, **kwargs: Any) -> Analysis:
    given = {k: v for k, v in kwargs.items() if v is not _SAME and v is not None}
    if isinstance(model, Analysis):
        if given:
            raise TypeError(
                f"draw() got an Analysis and {sorted(given)}: these are fixed by the analysis; "
                "pass the model instead to analyse it with other options"
            )
        return model
    if isinstance(model, nn.Module) and _STATE in model.__dict__:
        if given:
            raise TypeError(
                f"draw() got a converted model and {sorted(given)}: draw its original instead, "
                "sliceout_fx.to_original(model)"
            )
        return analyse(_original_copy(model), model.__dict__[_STATE].config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"draw() needs an nn.Module or an Analysis, got {type(model).__name__}")
    example_inputs = kwargs.pop("example_inputs")
    options = {k: v for k, v in kwargs.items() if v is not _SAME}
    options.pop("inplace", None)
    if options.pop("capture", "auto") not in ("auto", "fx"):
        raise ValueError("draw() pictures the whole traced graph: use capture='fx' or leave it out")
    _, config = resolve(model, "fx", **options)
    return analyse(model, config, example_inputs)


def _default_title(analysis: Analysis, only: str | None, model: str | None = None) -> str:
    config = analysis.report.config
    rate = "dropout rates" if config.p is None else f"p={config.p}"
    if not isinstance(config.p, (int, float, type(None))):
        rate = "p per site"
    where = f", {only}" if only else ""
    name = analysis.report.model_name
    if model is not None:  # one layer of a model: "GPT2LMHeadModel, transformer.h.0 (GPT2Block)"
        name, where = model, f"{where} ({name})"
    policy = config.sites if isinstance(config.sites, str) else "named sites"
    scheme = ", patch" if config.scheme == "patch" else ""
    return f"{name}{where}: SliceOut sites ({policy}, {rate}{scheme})"


# ------------------------------------------------------------------- one layer of a transformer


def _by_layers(model: Any, capture: Any) -> bool:
    """Drawn one exported layer at a time, as ``convert`` would convert it?"""
    if not isinstance(model, nn.Module) or _STATE in model.__dict__:
        return False
    if conversions_in(model):
        return True
    return front_end(model, capture or "auto") == "blocks"


def _layer_analysis(model: nn.Module, only: str | None, **kwargs: Any) -> tuple[Analysis, str, str]:
    """The analysis of the layer to draw, the prefix to draw under, and the default title."""
    options = {k: v for k, v in kwargs.items() if v is not _SAME}
    example_inputs = options.pop("example_inputs", None)
    options.pop("capture", None)
    options.pop("inplace", None)
    states = [state for _, state in conversions_in(model)]
    if states:
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise TypeError(
                f"draw() got a converted model and {given}: these are fixed by its conversion; "
                "draw the original model instead to analyse it with other options"
            )
        config = states[0].config
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        model = _original_copy(model)
    layers = [name for name, _ in find_blocks(model)]
    if not layers:
        raise UntraceableModelError(
            f"{type(model).__name__}: found no ModuleList of repeated layers to draw layer by "
            "layer; draw it with capture='fx'"
        )
    name = _pick_layer(type(model).__name__, layers, only)  # before the (slower) analysis
    inputs = example_inputs if example_inputs is not None else example_inputs_for(model)
    analysis = analyse_blocks(model, options.pop("p", 0.5), example_inputs=inputs, **options)[name]
    _name_inputs(model, name, analysis, inputs)
    within = only if only is not None and _under(only, name) else name
    return analysis, within, _default_title(analysis, within, type(model).__name__)


def _original_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a converted model (copies hold no graphs); the model stays converted."""
    return to_original(copy.deepcopy(model))


def _pick_layer(model: str, names: list[str], only: str | None) -> str:
    """The layer ``only`` names or lies in; else the first layer under ``only``; else the first."""
    if only is None:
        return names[0]
    inside = [n for n in names if _under(only, n)] or [n for n in names if _under(n, only)]
    if inside:
        return inside[0]
    shown = ", ".join(names[:3]) + (f" ... {names[-1]}" if len(names) > 3 else "")
    raise ValueError(
        f"no layer of {model} is, contains or lies under {only!r}; its layers are: {shown}"
    )


_INPUT_NAME = "sliceout_draw_name"


def _name_inputs(model: nn.Module, name: str, analysis: Analysis, inputs: Any) -> None:
    """Name the layer graph's placeholders after the arguments of the layer's call.

    The exported graph's inputs are the call's flattened tensors (``tensors_0``...); the call
    itself tells which argument each one is: ``hidden_states``, ``position_embeddings[0]``...
    """
    block = model.get_submodule(name)
    args, kwargs = record_calls(model, [(name, block)], inputs)[name]
    positional = [
        p.name
        for p in inspect.signature(block.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    call = (_exportable(tuple(args)), {k: _exportable(kwargs[k]) for k in sorted(kwargs)})
    labels = []
    for key_path, leaf in pytree.tree_flatten_with_path(call)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        where, first, *rest = key_path
        if getattr(where, "idx", None) == 0:  # a positional argument
            index = first.idx
            base = positional[index] if index < len(positional) else f"args[{index}]"
        else:
            base = str(first.key)
        labels.append(base + pytree.keystr(tuple(rest)))
    placeholders = [n for n in analysis.train_gm.graph.nodes if n.op == "placeholder"]
    if len(labels) == len(placeholders):
        for node, label in zip(placeholders, labels, strict=True):
            node.meta[_INPUT_NAME] = label


def _module_path(node: fx.Node) -> str:
    """The module a node belongs to: its target for a module call, else the calling module."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _ = next(reversed(stack.values()))
        return str(path)
    return ""


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


@dataclass
class _Box:
    """What one drawn op looks like; computed from the analysis before any layout."""

    key: Any  # the fx node, or ("in"|"out", fx node) for a stub
    lines: list[str]
    fill: str = "white"
    line: str = "#333333"
    band: str | None = None  # colour of the sink band along the top edge
    hatched: bool = False
    star: str | None = None  # colour of a site star
    hollow_star: bool = False
    stub: bool = False

    @property
    def width(self) -> float:
        return max(len(t) for t in self.lines) * _CHAR_W * (0.9 if self.stub else 1.0) + 0.22


@dataclass
class _Scene:
    """The boxes and edges to draw, and the legend entries that explain them."""

    boxes: dict[Any, _Box]
    edges: list[tuple[Any, Any, str | None]]  # (from key, to key, colour of a sliced tensor)
    sites: list[tuple[Site, tuple[str, str]]]
    skipped: list[tuple[str, str]]
    blockers: list[tuple[str, str]]
    more_blockers: int = 0
    has_band: bool = False
    sources: dict[Any, float] = field(default_factory=dict)  # fx order, for stable layouts

    @classmethod
    def build(cls, analysis: Analysis, only: str | None, max_nodes: int) -> _Scene:
        graph = analysis.train_gm.graph
        hidden = _hidden(graph)
        visible = [n for n in graph.nodes if n not in hidden]
        nodes = [n for n in visible if only is None or _under(_module_path(n), only)]
        if only is not None:
            nodes = [n for n in nodes if n.op not in ("placeholder", "output")]
        if not nodes:
            raise ValueError(
                f"no op of {analysis.report.model_name} lies under {only!r}; prefixes there are: "
                f"{_prefix_hint(visible, only)}"
            )
        if len(nodes) > max_nodes:
            where = f" under {only!r}" if only else ""
            raise ValueError(
                f"{len(nodes)} ops to draw{where} (max_nodes={max_nodes}): draw one block with "
                f"only=PREFIX (--only), e.g. {_prefix_hint(visible, only, max_nodes)}; "
                "or raise max_nodes"
            )
        drawn = set(nodes)
        order = {n: i for i, n in enumerate(graph.nodes)}
        # Colours in the order of the drawn sites: a one-block picture starts with the first.
        shown = [s for s in analysis.sites if any(n in drawn for n in s.group.nodes)]
        colours = {s.group.id: PALETTE[i % len(PALETTE)] for i, s in enumerate(shown)}
        site_of = {s.group.id: s for s in shown}

        boxes: dict[Any, _Box] = {}
        for node in nodes:
            boxes[node] = _Box(node, _labels(node, analysis, only, site_of))

        # Sliced groups: fill what they cut, band what reads them, colour their tensors.
        sliced_out: dict[fx.Node, str] = {}
        for site in shown:
            fill, line = colours[site.group.id]
            anchors = site.dropouts or [site.group.primary.node]
            for node in anchors:
                if node in boxes:
                    boxes[node].star = boxes[node].line = line
            if site.patch is not None:  # Patch SliceOut: only these convs see a window
                for node in site.patch.sinks:
                    if node in boxes:
                        boxes[node].fill, boxes[node].line = fill, line
                continue
            for axis in site.group.axes:
                if axis.node in boxes:
                    boxes[axis.node].fill = fill
                    boxes[axis.node].line = line
                sliced_out.setdefault(axis.node, line)
            for sink, _ in site.group.sinks:
                if sink in boxes and not any(a.node is sink for a in site.group.axes):
                    boxes[sink].band = fill

        # Stubs where the drawn part connects to the rest of the graph.
        edges: list[tuple[Any, Any, str | None]] = []
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg in hidden:
                    continue
                src = arg if arg in drawn else ("in", arg)
                if arg not in drawn and src not in boxes:
                    boxes[src] = _Box(src, [f"from {_stub_name(arg)}"], stub=True)
                    boxes[src].line = _STUB_LINE
                edges.append((src, node, sliced_out.get(arg)))
            outside = [u for u in node.users if u not in drawn and u not in hidden]
            if outside:
                names = [_stub_name(u) for u in outside]
                text = ", ".join(names[:2]) + (f" +{len(names) - 2}" if len(names) > 2 else "")
                key = ("out", node)
                boxes[key] = _Box(key, [f"to {text}"], stub=True, line=_STUB_LINE)
                edges.append((node, key, sliced_out.get(node)))

        # Skipped sites: a hollow star where they are, the reason in the legend.
        skipped_names = {k.name: _reason(k.reason, graph) for k in analysis.skipped}
        skipped: list[tuple[str, str]] = []
        for node in nodes:
            name = _site_name(node)
            if name in skipped_names and boxes[node].star is None:
                boxes[node].hollow_star = True
                skipped.append((name, skipped_names.pop(name)))

        # Blockers of the groups that touch the drawing.
        blockers: dict[tuple[str, str], None] = {}
        touching = [g for g in analysis.groups if g.blockers and _touches(g, boxes)]
        for group in touching:
            for node, reason, producer in _blocking_nodes(analysis, group):
                # The op itself, or the stub that stands for it outside the drawn module.
                keys = [node, ("in", node), ("out", producer)]
                key = next((k for k in keys if k in boxes), None)
                if key is None:
                    continue
                boxes[key].hatched = True
                blockers[(_short(node, only), reason)] = None
        listed = list(blockers)[:10]
        sites = [(s, colours[s.group.id]) for s in shown]
        return cls(
            boxes=boxes,
            edges=edges,
            sites=sites,
            skipped=skipped,
            blockers=listed,
            more_blockers=len(blockers) - len(listed),
            has_band=any(b.band for b in boxes.values()),
            sources={k: _order_key(k, order) for k in boxes},
        )


def _reason(reason: str, graph: fx.Graph) -> str:
    """A skipped site's reason, short enough for the legend of a layer's ATen graph.

    There the reason lists every blocked axis of the group (of the residual stream: the layer's
    input, each layer norm, the output), which the picture hatches anyway: the legend keeps the
    first, with the input's argument name. Reasons in an fx graph's picture are kept whole.
    """
    if not any(_is_aten(n) for n in graph.nodes):
        return reason
    first, *others = reason.split("; ")
    for node in graph.nodes:
        if node.op == "placeholder" and _INPUT_NAME in node.meta:
            first = re.sub(rf"\b{re.escape(node.name)}\b", node.meta[_INPUT_NAME], first)
    more = f" (+{len(others)} more, see explain())" if others else ""
    return first + more


def _order_key(key: Any, order: dict[fx.Node, int]) -> float:
    if isinstance(key, tuple):
        kind, node = key
        return order[node] + (0.5 if kind == "out" else -0.5)
    return float(order[key])


def _touches(group: AlignmentGroup, boxes: dict[Any, _Box]) -> bool:
    return any(n in boxes for n in group.nodes)


def _hidden(graph: fx.Graph) -> set[fx.Node]:
    """Nodes of an ATen (``torch.export``) graph that a picture leaves out.

    Parameters (``get_attr``: a module call of an fx graph does not show them either), shape
    arithmetic (``sym_size`` and other nodes whose value is a number) and unused inputs. An fx
    graph is drawn whole.
    """
    if not any(_is_aten(n) for n in graph.nodes):
        return set()
    return {
        n
        for n in graph.nodes
        if n.op == "get_attr" or (n.op == "placeholder" and not n.users) or _is_shape_arithmetic(n)
    }


def _is_shape_arithmetic(node: fx.Node) -> bool:
    """``sym_size`` and the integer arithmetic on it that dynamic-shape exports record: calls
    whose value is no tensor (shape propagation recorded none)."""
    return node.op == "call_function" and "tensor_meta" not in node.meta


def _is_aten(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)


def _prefix_hint(nodes: Iterable[fx.Node], prefix: str | None, max_nodes: int | None = None) -> str:
    """Module paths below ``prefix`` (or its nearest existing parent) with their op counts.

    With ``max_nodes``, descends into a child too large to draw, so that the hint names prefixes
    that can actually be drawn.
    """
    paths = [p for p in map(_module_path, nodes) if p]
    while prefix is not None and not any(_under(p, prefix) for p in paths):
        prefix = prefix.rpartition(".")[0] or None
    while True:
        depth = 0 if prefix is None else prefix.count(".") + 1
        counts: dict[str, int] = {}
        for path in paths:
            parts = path.split(".")
            if len(parts) > depth and (prefix is None or _under(path, prefix)):
                child = ".".join(parts[: depth + 1])
                counts[child] = counts.get(child, 0) + 1
        big = [k for k, v in counts.items() if max_nodes is not None and v > max_nodes]
        if len(big) != 1:
            break
        prefix = big[0]
    shown = [f"{k} ({v} op{'s' if v > 1 else ''})" for k, v in list(counts.items())[:8]]
    return ", ".join(shown) + (" ..." if len(counts) > 8 else "") or "(no module paths)"


def _blocking_nodes(
    analysis: Analysis, group: AlignmentGroup
) -> list[tuple[fx.Node, str, fx.Node]]:
    """The ops that keep ``group`` from being sliced: ``(op, reason, op producing the axis)``.

    The same checks as :func:`sliceout_fx.groups.find_groups`, but keeping the node, so that the
    picture can mark it (the group's ``blockers`` are sentences for ``explain``).
    """
    dep = analysis.dep
    found: list[tuple[fx.Node, str, fx.Node]] = []
    per_node: dict[fx.Node, int] = {}
    for axis in group.axes:
        node = axis.node
        per_node[node] = per_node.get(node, 0) + 1
        if node.op in ("placeholder", "get_attr"):
            found.append((node, "a model input or attribute cannot be cut", node))
        elif axis not in group.via_periodic and not dep.relation(node).produces(axis):
            found.append((node, dep.relation(node).blocks or "no rule for this axis", node))
        for user in node.users:
            if user.op == "output":
                found.append((user, "the model output: its full width is observable", node))
                continue
            rel = dep.relation(user)
            if axis not in rel.sinks and not rel.accepts(axis):
                found.append((user, rel.blocks or "no rule for this axis", node))
    found += [(n, f"would be cut along {c} axes at once", n) for n, c in per_node.items() if c > 1]
    return list(dict.fromkeys(found))


def _stub_name(node: fx.Node) -> str:
    """The full name of an op outside the drawing: module path, and the node for a function."""
    path = _module_path(node)
    if node.op == "call_module" or not path:
        return _short(node, None)
    return f"{node.name} ({path})"


def _short(node: fx.Node, only: str | None) -> str:
    """A short name: the module path (relative to ``only``) for a module call, else the node.

    In an ATen graph, an op that reads a module's parameters stands for that module (the linear
    of ``q_proj``, the ``layer_norm`` of ``ln_1``), so it is named like a module call; a layer's
    input is named after its argument.
    """
    if node.op == "call_module":
        path = str(node.target)
        if only and path.startswith(only + "."):
            return path[len(only) + 1 :]
        return path
    if node.op == "output":
        return "output"
    if node.op == "placeholder":
        return str(node.meta.get(_INPUT_NAME, node.name))
    if _is_aten(node) and any(a.op == "get_attr" for a in node.all_input_nodes):
        path = _module_path(node)
        if only and path.startswith(only + "."):
            return path[len(only) + 1 :]
        if path and not only:
            return path
    return node.name


def _labels(
    node: fx.Node, analysis: Analysis, only: str | None, site_of: dict[int, Site]
) -> list[str]:
    """Two lines: the op's name, then its kind and channel width (``live/total`` when cut)."""
    if node.op == "call_module":
        module = analysis.train_gm.get_submodule(str(node.target))
        kind = type(module).__name__
        if isinstance(module, nn.modules.conv._ConvNd):
            kind += " " + "x".join(map(str, module.kernel_size))
            if module.groups > 1:
                kind += " dw" if module.groups == module.in_channels else f" g{module.groups}"
    elif _is_aten(node):
        kind = node.target._overloadpacket.__name__  # "linear", not "linear.default"
    elif node.op == "call_function":
        kind = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method":
        kind = f".{node.target}()"
    elif node.op == "placeholder":
        kind = "input"
    elif node.op == "output":
        return ["output"]
    else:
        kind = node.op
    name = _short(node, only)
    shape = shape_of(node)
    if shape is not None and len(shape) >= 2:
        # The shape without the batch axis; the axis a site cuts reads "live/total".
        dims = [str(int(n)) for n in shape]
        for site in site_of.values():
            for axis in site.group.axes:
                if axis.node is node and site.patch is None:
                    live, total = site.channels(axis)
                    dims[axis.dim] = f"{live}/{total}"
        kind += " · " + "×".join(dims[1:])
    if node.op in ("call_function", "call_method") and (
        name == kind.split(" ")[0] or name.startswith(kind.split(" ")[0] + "_")
    ):
        return [name + kind[kind.find(" ") :] if " " in kind else name]  # add_2 · 256×8×8
    return [name, kind]


# ------------------------------------------------------------------------------------- layout


def _layout(
    scene: _Scene,
) -> tuple[dict[Any, tuple[float, float]], dict[tuple, list], float, float]:
    """Node centres (inches), the bend points of each edge, the drawing's width and height.

    Layers are longest paths from the top. Every op then gets a column: the column of its
    nearest predecessor when that cell is free (so a chain of ops is one straight column), else
    the next free one to the right (a side branch). An edge that skips layers runs straight down
    one column of its own, free of boxes over its whole span; shorter edges are routed first, so
    they stay inside the longer ones and no two of them cross.
    """
    dag = nx.DiGraph()
    dag.add_nodes_from(scene.boxes)
    dag.add_edges_from((a, b) for a, b, _ in scene.edges)
    rank = scene.sources
    topo = list(nx.lexicographical_topological_sort(dag, key=lambda k: rank[k]))
    layer: dict[Any, int] = {}
    for key in topo:
        layer[key] = max((layer[p] + 1 for p in dag.predecessors(key)), default=0)
    for key in reversed(topo):  # inputs and stubs sit just above their first consumer
        if dag.in_degree(key) == 0 and dag.out_degree(key):
            layer[key] = min(layer[s] for s in dag.successors(key)) - 1

    taken: dict[tuple[int, int], Any] = {}
    column: dict[Any, int] = {}
    for key in sorted(scene.boxes, key=lambda k: (layer[k], rank[k])):
        preds = sorted(dag.predecessors(key), key=lambda p: (layer[key] - layer[p], rank[p]))
        wanted = [column[p] for p in preds] or [0]
        free = [c for c in wanted if (layer[key], c) not in taken]
        col = free[0] if free else wanted[0] + 1
        while (layer[key], col) in taken:
            col += 1
        column[key] = col
        taken[(layer[key], col)] = key

    routes: dict[tuple, int] = {}
    long_edges = [(a, b) for a, b, _ in scene.edges if layer[b] - layer[a] > 1]
    for a, b in sorted(long_edges, key=lambda e: (layer[e[1]] - layer[e[0]], rank[e[0]])):
        span = range(layer[a] + 1, layer[b])
        candidates = [column[a], column[b]]
        for d in range(1, len(scene.boxes) + len(long_edges) + 2):
            candidates += [column[a] + d, column[a] - d]
        col = next(c for c in candidates if all((lvl, c) not in taken for lvl in span))
        routes[(a, b)] = col
        taken.update({(lvl, col): (a, b) for lvl in span})

    # Column widths from the boxes they hold (a column of edges only is narrow).
    widths: dict[int, float] = {}
    for (_, col), item in taken.items():
        w = scene.boxes[item].width if item in scene.boxes else _DUMMY_W
        widths[col] = max(widths.get(col, 0.0), w)
    centre_x: dict[int, float] = {}
    cursor = _MARGIN
    for col in sorted(widths):
        centre_x[col] = cursor + widths[col] / 2
        cursor += widths[col] + _GAP
    levels = max(layer.values()) + 1
    height = levels * _ROW

    def y(level: int) -> float:
        return height - (level + 0.5) * _ROW

    centres = {k: (centre_x[column[k]], y(layer[k])) for k in scene.boxes}
    bends: dict[tuple, list] = {(a, b): [] for a, b, _ in scene.edges}
    for (a, b), col in routes.items():
        # Turn into the column in the gap below the source, out of it in the gap above the target.
        top, bottom = y(layer[a] + 1) + _BOX_H / 2, y(layer[b] - 1) - _BOX_H / 2
        bends[(a, b)] = [(centre_x[col], top), (centre_x[col], bottom)]
    return centres, bends, cursor - _GAP + _MARGIN, height


# ------------------------------------------------------------------------------------ drawing


def _render(scene: _Scene, title: str) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle
    from matplotlib.path import Path as MPath

    centres, bends, width, height = _layout(scene)
    fig = Figure(figsize=(max(width, 1.5), height))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, max(width, 1.5))
    ax.set_ylim(0, height)
    ax.set_axis_off()
    fig.suptitle(title, x=0.0, y=1.0, ha="left", va="bottom", fontsize=_FONT + 2)

    half = _BOX_H / 2
    for a, b, colour in scene.edges:
        (xa, ya), (xb, yb) = centres[a], centres[b]
        points = [(xa, ya - half), *bends[(a, b)], (xb, yb + half)]
        verts, codes = [points[0]], [MPath.MOVETO]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            mid = (y0 + y1) / 2
            verts += [(x0, mid), (x1, mid), (x1, y1)]
            codes += [MPath.CURVE4] * 3
        ax.add_patch(
            FancyArrowPatch(
                path=MPath(verts, codes),
                arrowstyle="-|>",
                mutation_scale=9,
                color=colour or "#555555",
                linewidth=2.2 if colour else 0.9,
                zorder=1,
            )
        )

    for key, box in scene.boxes.items():
        x, y = centres[key]
        w = box.width
        patch = FancyBboxPatch(
            (x - w / 2, y - half),
            w,
            _BOX_H,
            boxstyle="round,pad=0,rounding_size=0.05",
            facecolor=_BLOCKED_FILL if box.hatched and box.fill == "white" else box.fill,
            edgecolor=_BLOCKED_LINE if box.hatched and box.fill == "white" else box.line,
            linewidth=2.6 if box.star else 0.9,
            linestyle="--" if box.stub else "-",
            hatch="////" if box.hatched else None,
            zorder=2,
        )
        ax.add_patch(patch)
        if box.band:
            band = Rectangle((x - w / 2, y + half - 0.09), w, 0.09, facecolor=box.band, zorder=2.5)
            band.set_clip_path(patch)
            ax.add_patch(band)
        text = "\n".join(box.lines)
        ax.text(
            x,
            y,
            text,
            ha="center",
            va="center",
            fontsize=_FONT * (0.9 if box.stub else 1.0),
            color="#555555" if box.stub else "black",
            zorder=3,
            linespacing=1.15,
            bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 0.6}
            if box.hatched
            else None,
        )
        if box.star or box.hollow_star:
            ax.plot(
                [x - w / 2],
                [y + half],
                marker="*",
                markersize=13,
                markerfacecolor="white" if box.hollow_star else box.star,
                markeredgecolor="black",
                markeredgewidth=0.7,
                zorder=4,
                clip_on=False,
            )

    handles: list[Any] = []
    labels: list[str] = []

    def entry(handle: Any, text: str) -> None:
        handles.append(handle)
        labels.append(textwrap.fill(text, _LEGEND_WRAP))

    for site, (fill, line) in scene.sites:
        entry(Patch(facecolor=fill, edgecolor=line, linewidth=1.5), _site_text(site))
    if scene.sites:
        entry(
            Line2D([], [], marker="*", color="none", markerfacecolor="#777777",
                   markeredgecolor="black", markersize=11),
            "site: the dropout it replaces, or the op that produces its group",
        )  # fmt: skip
    if any(colour for _, _, colour in scene.edges):
        entry(Line2D([], [], color="#777777", linewidth=2.2), "thick arrow: a sliced tensor")
    if scene.has_band:
        entry(
            _BandHandle(),
            "top band: reads the slice (a sink: only its input channels are cut)",
        )
    for name, reason in scene.skipped:
        entry(
            Line2D([], [], marker="*", color="none", markerfacecolor="white",
                   markeredgecolor="black", markersize=11),
            f"skipped site {name}: {reason}",
        )  # fmt: skip
    for name, reason in scene.blockers:
        entry(
            Patch(facecolor=_BLOCKED_FILL, edgecolor=_BLOCKED_LINE, hatch="////"),
            f"{name} stops a group: {reason}",
        )
    if scene.more_blockers:
        entry(Patch(alpha=0), f"... {scene.more_blockers} more blockers: see explain()")
    entry(Patch(facecolor="white", edgecolor="#333333"), "white: full width (not sliced)")
    if any(b.stub for b in scene.boxes.values()):
        entry(
            Patch(facecolor="white", edgecolor=_STUB_LINE, linestyle="--"),
            "dashed: ops outside the drawn module",
        )
    fig.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.0 + 0.25 / max(width, 1.5), 1.0),
        fontsize=_FONT,
        frameon=False,
        handler_map={_BandHandle: _BandHandler()},
        labelspacing=0.8,
    )
    return fig


def _site_text(site: Site) -> str:
    if site.patch is not None:
        window = "x".join(map(str, site.patch.window))
        size = "x".join(map(str, site.patch.size))
        return f"{site.name} ({site.kind} site, patch): window {window} of {size}, p={site.p:.3g}"
    live, total = site.channels()
    unit = total // site.units
    cut = f" in units of {unit} channels" if unit > 1 else ""
    return (
        f"{site.name} ({site.kind} site, group {site.group.id}): keeps {live}/{total} "
        f"channels{cut}, p={site.p:.3g}"
    )


class _BandHandle:
    """Legend proxy for the sink band (a white box with a coloured top edge)."""


class _BandHandler:
    def legend_artist(self, legend: Any, orig_handle: Any, fontsize: float, handlebox: Any) -> Any:
        from matplotlib.patches import Rectangle

        x0, y0 = handlebox.xdescent, handlebox.ydescent
        w, h = handlebox.width, handlebox.height
        box = Rectangle((x0, y0), w, h, facecolor="white", edgecolor="#333333",
                        transform=handlebox.get_transform())  # fmt: skip
        band = Rectangle((x0, y0 + h * 0.7), w, h * 0.3, facecolor="#aaaaaa",
                         edgecolor="#333333", transform=handlebox.get_transform())  # fmt: skip
        handlebox.add_artist(box)
        handlebox.add_artist(band)
        return box
