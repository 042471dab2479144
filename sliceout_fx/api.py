"""The public entry points: :func:`convert`, :func:`explain`, :func:`to_original`."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from . import blocks
from .blocks import (
    block_states,
    blocks_full_width,
    convert_blocks,
    example_inputs_for,
    is_huggingface_model,
    restore_blocks,
)
from .capture import trace
from .config import (
    BatchNormStats,
    Capture,
    Mode,
    Normalisation,
    Placement,
    Rate,
    Scheme,
    SitePolicy,
    SliceOutConfig,
)
from .depgraph import DependencyGraph, build_dependency_graph
from .errors import SliceOutConfigError
from .groups import AlignmentGroup, find_groups
from .module import SAMPLER_NAME, SliceOutModule
from .norm_stats import FullWidthStatistics, freeze_statistics_after_slices, refresh_graph
from .patch import assign_patches
from .report import Report, combine_reports, expected_ratios
from .rewrite import build_sampler, rewrite_training_graph
from .shapes import propagate_shapes
from .sites import Site, SkippedSite, select_sites


@dataclass
class Analysis:
    """Everything the pipeline learned about one model, before anything is rewritten."""

    model: nn.Module
    train_gm: fx.GraphModule
    dep: DependencyGraph
    groups: list[AlignmentGroup]
    sites: list[Site]
    skipped: list[SkippedSite]
    report: Report


def analyse(
    model: nn.Module, config: SliceOutConfig, example_inputs: Sequence[Any] | None = None
) -> Analysis:
    """Capture -> shapes -> dependency graph -> groups -> sites, on ``model`` (not modified)."""
    train_gm = trace(model, leaf_modules=config.leaf_modules, training=True)
    return analyse_graph(train_gm, config, example_inputs, type(model).__name__, model)


def analyse_graph(
    train_gm: fx.GraphModule,
    config: SliceOutConfig,
    example_inputs: Sequence[Any] | None,
    model_name: str,
    model: nn.Module | None = None,
) -> Analysis:
    """Shapes -> dependency graph -> groups -> sites on an already captured training graph.

    ``model`` is what the graph was captured from (default: the graph module itself).
    """
    propagate_shapes(train_gm, example_inputs)
    dep = build_dependency_graph(train_gm)
    groups = find_groups(dep)
    sites, skipped = select_sites(dep, groups, config)
    if config.scheme == "patch":
        sites, not_patchable = assign_patches(sites, dep)
        skipped += not_patchable
    flops_ratio, act_ratio = expected_ratios(dep, sites)
    report = Report(model_name, config, groups, sites, skipped, flops_ratio, act_ratio)
    return Analysis(model or train_gm, train_gm, dep, groups, sites, skipped, report)


def analyse_blocks(
    model: nn.Module,
    p: Rate = 0.5,
    *,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Analysis]:
    """The analysis of every repeated block, as ``convert(..., capture="blocks")`` would see it.

    Nothing is converted: each block's training call is exported and analysed (for ``explain``
    and ``draw`` of one transformer layer).
    """
    config = _config(p=p, **_block_defaults(options))
    inputs = example_inputs if example_inputs is not None else example_inputs_for(model)
    return {b.name: b.analysis for b in blocks.analyse_blocks(model, config, inputs)}


def _block_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """Block conversion slices every sliceable group (heads, FFN), normalised where it ends."""
    options = dict(options)
    if options.get("placement") is None:
        options["placement"] = "delayed"
    if options.get("sites", "auto") == "auto":
        options["sites"] = "all"
    return options


def _config(**kwargs: Any) -> SliceOutConfig:
    leaf = kwargs.pop("leaf_modules", None)
    return SliceOutConfig(leaf_modules=tuple(leaf or ()), **kwargs)


def convert(
    model: nn.Module,
    p: Rate = 0.5,
    *,
    normalisation: Normalisation = "flow",
    placement: Placement | None = None,
    sites: SitePolicy = "auto",
    mode: Mode = "slice",
    scheme: Scheme = "channel",
    seed: int | None = None,
    width_multiple: int | None = None,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] | None = None,
    capture: Capture = "auto",
    inplace: bool = False,
    capturable: bool = False,
    bn_stats: BatchNormStats = "full_width",
    bn_refresh_every: int = 8,
) -> nn.Module:
    """Convert ``model`` into a module that trains with SliceOut and evaluates at full width.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (see ``leaf_modules``).
        p: drop rate, a ``{site: rate}`` mapping, or ``None`` to reuse each dropout's own rate.
        normalisation: ``"flow"`` or ``"probabilistic"`` (see :class:`SliceOutConfig`).
        placement: ``"delayed"`` (default) scales the slice where it is read (just before the
            linear or conv that sums over it, after any batch norm); ``"immediate"`` scales
            where the dropout was or right after the slicing op (attention always delays).
        sites: ``"auto"``, ``"dropout"``, ``"expand"`` or a list of site names (see ``explain``).
        mode: ``"slice"`` (SliceOut), ``"gather"`` (controlled dropout) or ``"mask"`` (reference).
        scheme: ``"channel"`` (Channel SliceOut) or ``"patch"`` (Patch SliceOut on convolutions).
        seed: seed of the slice sampler (``None``: draws come from the global torch RNG).
        width_multiple: round slice widths and starts to this many channels.
        example_inputs: inputs to learn tensor shapes from (a dict of keyword arguments for a
            HuggingFace model); guessed for simple MLPs, CNNs and HuggingFace configs.
        leaf_modules: module types or qualified names to keep whole when tracing.
        capture: ``"fx"`` traces the whole model into a :class:`SliceOutModule`; ``"blocks"``
            exports each repeated layer with ``torch.export`` and converts it in place, keeping
            the model object and class; ``"auto"`` picks ``"blocks"`` for HuggingFace models.
        inplace: share the given model's parameters instead of deep-copying the model first.
        capturable: draw slices on the device and slice by device-side offsets, for
            ``torch.compile(fullgraph=True)`` and CUDA-graph capture of a whole training step
            (see :class:`SliceOutConfig` and the "Compiling and CUDA graphs" page).
        bn_stats: ``"full_width"`` (default) keeps the running statistics of batch norms
            downstream of a slice those of the full-width network, refreshing them in one
            full-width training call out of ``bn_refresh_every``; ``"sliced"`` updates them from
            the sliced tensors (see :class:`SliceOutConfig`).
        bn_refresh_every: training calls per full-width refresh call (default 8).

    Returns:
        With ``capture="fx"``, a :class:`SliceOutModule` with the original ``state_dict`` keys.
        With ``capture="blocks"``, the model itself (a copy unless ``inplace``), of its own class,
        whose layers slice in training. Sites that could not be sliced are left at full width
        and listed by ``sliceout_fx.explain(result)``.

    Raises:
        SliceOutConfigError: invalid ``p``, mode, site names...
        UntraceableModelError: the model cannot be traced; the message says which module to keep
            as a leaf.
    """
    if isinstance(model, SliceOutModule) or block_states(model):
        raise TypeError("this model is already converted; convert to_original(model) instead")
    options = {
        "p": p,
        "normalisation": normalisation,
        "placement": placement,
        "sites": sites,
        "mode": mode,
        "scheme": scheme,
        "seed": seed,
        "width_multiple": width_multiple,
        "leaf_modules": leaf_modules,
        "capturable": capturable,
        "bn_stats": bn_stats,
        "bn_refresh_every": bn_refresh_every,
    }
    by_blocks = _by_blocks(model, capture)
    if by_blocks:
        options = _block_defaults(options)
    elif placement is None:
        options["placement"] = "delayed"
    config = _config(**options)
    source = model if inplace else copy.deepcopy(model)
    if by_blocks:
        inputs = example_inputs if example_inputs is not None else example_inputs_for(source)
        states = convert_blocks(source, config, inputs)
        report = combine_reports(type(model).__name__, config, [s.analysis.report for s in states])
        source.__dict__[_REPORT] = report
        _warn_if_nothing_sliced(model, report.sites, report.skipped)
        return source
    analysis = analyse(source, config, example_inputs)
    _warn_if_nothing_sliced(model, analysis.sites, analysis.skipped)
    eval_gm = trace(source, leaf_modules=config.leaf_modules, training=False)
    full_train_gm = fx.GraphModule(analysis.train_gm, copy.deepcopy(analysis.train_gm.graph))
    sampler = build_sampler(analysis.sites, config).to(_device_of(source))
    analysis.train_gm.add_submodule(SAMPLER_NAME, sampler)
    sliced = rewrite_training_graph(analysis.train_gm, analysis.dep, analysis.sites, config)
    refresh = None
    if config.bn_stats == "full_width" and analysis.sites:
        frozen = freeze_statistics_after_slices(sliced)
        if frozen:
            every = config.bn_refresh_every
            graph = refresh_graph(full_train_gm, frozen, every)
            refresh = FullWidthStatistics(graph, frozen, every)
    return SliceOutModule(
        source, eval_gm, full_train_gm, sliced.graph, sampler, analysis.report, refresh
    )


def _device_of(model: nn.Module) -> Any:
    """Where the model's parameters live: the sampler's scale buffers must live there too."""
    first = next(model.parameters(), None)
    return first.device if first is not None else "cpu"


def _warn_if_nothing_sliced(model: nn.Module, sites: list, skipped: list) -> None:
    if sites:
        return
    reasons = "; ".join(f"{k.name}: {k.reason}" for k in skipped) or (
        "the model has no dropout and no expand convolution"
    )
    warnings.warn(
        f"sliceout_fx.convert found no site to slice in {type(model).__name__} ({reasons}). "
        "The converted model trains and evaluates exactly like the original; see "
        "sliceout_fx.explain(model) for the groups it found.",
        stacklevel=3,
    )


def _by_blocks(model: nn.Module, capture: str) -> bool:
    if capture not in ("auto", "fx", "blocks"):
        raise SliceOutConfigError(f"capture must be 'auto', 'fx' or 'blocks', got {capture!r}")
    return capture == "blocks" or (capture == "auto" and is_huggingface_model(model))


def explain(
    model: nn.Module,
    p: Rate = 0.5,
    *,
    example_inputs: Sequence[Any] | None = None,
    **options: Any,
) -> Report:
    """The analysis report of ``convert(model, p, **options)`` without converting anything.

    For an already converted model, returns its own report.
    """
    if isinstance(model, SliceOutModule):
        return model.report
    if _REPORT in model.__dict__:
        return model.__dict__[_REPORT]
    options.pop("inplace", None)
    if _by_blocks(model, options.pop("capture", "auto")):
        analyses = analyse_blocks(model, p, example_inputs=example_inputs, **options)
        config = next(iter(analyses.values())).report.config
        reports = [a.report for a in analyses.values()]
        return combine_reports(type(model).__name__, config, reports)
    return analyse(model, _config(p=p, **options), example_inputs).report


def to_original(model: nn.Module) -> nn.Module:
    """The plain full-width model (original class and structure) sharing the trained weights.

    A block-converted model (HuggingFace) is restored in place and returned.
    """
    if isinstance(model, SliceOutModule):
        return model.to_original()
    model.__dict__.pop(_REPORT, None)
    return restore_blocks(model)


def set_slicing(model: nn.Module, enabled: bool) -> None:
    """Switch a converted model's training between sliced (``True``) and full width (``False``).

    The persistent form of :func:`full_width`, for schedules that switch at a given step.
    """
    if isinstance(model, SliceOutModule):
        model.slicing_enabled = bool(enabled)
        return
    states = block_states(model)
    if not states:
        raise TypeError(
            f"{type(model).__name__} is not a converted model: convert it with sliceout_fx.convert"
        )
    for state in states:
        state.enabled = bool(enabled)


@contextlib.contextmanager
def full_width(model: nn.Module) -> Iterator[nn.Module]:
    """Train ``model`` at full width inside the block, e.g. for the last steps as in the paper."""
    if isinstance(model, SliceOutModule):
        with model.full_width():
            yield model
    else:
        with blocks_full_width(model):
            yield model


_REPORT = "sliceout_report"
