"""The public entry points: :func:`convert`, :func:`explain`, :func:`to_original` and friends."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from . import blocks
from .blocks import convert_blocks, example_inputs_for
from .call_spec import specialised_defaults
from .capture import KEPT_WHOLE, trace
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
from .module import conversions_in, converted_parts, install, uninstall
from .options import DEFAULT_RATE, check_example_inputs, resolve, traced_root
from .patch import assign_patches
from .report import Report, combine_reports, expected_ratios
from .rules import OpRule, conversion_rules
from .shapes import propagate_shapes
from .sites import Site, SkippedSite, select_sites
from .whole import WholeModelConversion


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
    example_inputs: Any = None  # the inputs shapes were propagated with


def analyse(
    model: nn.Module,
    config: SliceOutConfig,
    example_inputs: Sequence[Any] | None = None,
    *,
    concrete_args: Mapping[str, Any] | None = None,
) -> Analysis:
    """Capture -> shapes -> dependency graph -> groups -> sites, on ``model`` (not modified)."""
    concrete = specialised_defaults(model, example_inputs, concrete_args)
    train_gm = trace(model, leaf_modules=config.leaf_modules, training=True, concrete_args=concrete)
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
    with conversion_rules(config.rules):
        used = propagate_shapes(train_gm, example_inputs)
        dep = build_dependency_graph(train_gm)
        groups = find_groups(dep)
        sites, skipped = select_sites(dep, groups, config)
    skipped += [
        SkippedSite(
            name,
            f"{cls} is called with a mask or the causal hint, whose dtype torch.fx cannot read, "
            "so it is kept whole with its heads and units; convert with capture='blocks' to "
            "slice it",
        )
        for name, cls in train_gm.meta.get(KEPT_WHOLE, {}).items()
    ]
    if config.scheme == "patch":
        sites, not_patchable = assign_patches(sites, dep)
        skipped += not_patchable
    flops_ratio, act_ratio = expected_ratios(dep, sites)
    report = Report(model_name, config, groups, sites, skipped, flops_ratio, act_ratio)
    return Analysis(model or train_gm, train_gm, dep, groups, sites, skipped, report, used)


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
    options.pop("inplace", None)
    options.pop("capture", None)
    _, config = resolve(model, "blocks", p=p, **options)
    inputs = check_example_inputs(example_inputs, model)
    inputs = inputs if inputs is not None else example_inputs_for(model)
    return {b.name: b.analysis for b in blocks.analyse_blocks(model, config, inputs)}


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
    example_inputs: Any = None,
    concrete_args: Mapping[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] | None = None,
    capture: Capture = "auto",
    inplace: bool = False,
    capturable: bool = False,
    bn_stats: BatchNormStats = "full_width",
    bn_refresh_every: int = 8,
    rules: Sequence[OpRule] = (),
) -> nn.Module:
    """Convert ``model`` so that it trains with SliceOut and evaluates at full width.

    The result is the model itself (a deep copy unless ``inplace``), of a generated subclass
    ``SliceOut<Cls>`` of its own class: every method and attribute, ``state_dict`` keys and
    ``isinstance`` checks are the model's. Its training forward runs a sliced graph; in eval,
    and at full width, it runs the model's own code.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (see ``leaf_modules``), or a
            HuggingFace model (bare or wrapped by PEFT), whose layers are exported one by one.
        p: drop rate, a ``{site: rate}`` mapping, or ``None`` to reuse each dropout's own rate.
            A site whose rate keeps every unit (``p=0``, or 0.1 of 3 heads) is skipped, its
            dropout left in place.
        normalisation: ``"flow"`` or ``"probabilistic"`` (see :class:`SliceOutConfig`).
        placement: ``"delayed"`` (default) scales the slice where it is read (just before the
            linear or conv that sums over it, after any batch norm); ``"immediate"`` scales
            where the dropout was or right after the slicing op (attention always delays).
        sites: ``"auto"``, ``"dropout"``, ``"expand"``, ``"all"`` or a list of site names (see
            ``explain``). ``"auto"`` is the dropout sites (else the expand convolutions) of a
            traced model and every sliceable group of an exported layer.
        mode: ``"slice"`` (SliceOut), ``"gather"`` (controlled dropout) or ``"mask"`` (reference).
        scheme: ``"channel"`` (Channel SliceOut) or ``"patch"`` (Patch SliceOut on convolutions).
        seed: seed of the slice sampler (``None``: draws come from the global torch RNG).
        width_multiple: round slice widths and starts to this many channels.
        example_inputs: inputs to learn tensor shapes from: a tensor, a tuple of positional
            inputs, or a dict of keyword arguments (a HuggingFace batch); guessed for simple
            MLPs, CNNs and HuggingFace configs.
        concrete_args: arguments to specialise the traced forward on, as in
            ``torch.fx.symbolic_trace`` (e.g. ``{"mask": None}``). Arguments with a ``None``
            default that ``example_inputs`` does not give are specialised to ``None``.
        leaf_modules: module types or qualified names to keep whole when tracing.
        capture: ``"fx"`` traces the whole model; ``"blocks"`` exports each repeated layer with
            ``torch.export``; ``"auto"`` picks ``"blocks"`` for HuggingFace models.
        inplace: convert the given model object instead of a deep copy of it.
        capturable: draw slices on the device and slice by device-side offsets, for
            ``torch.compile(fullgraph=True)`` and CUDA-graph capture of a whole training step
            (see :class:`SliceOutConfig` and the "Compiling and CUDA graphs" page).
        bn_stats: ``"full_width"`` (default) keeps the running statistics of batch norms
            downstream of a slice those of the full-width network, refreshing them in one
            full-width training call out of ``bn_refresh_every``; ``"sliced"`` updates them from
            the sliced tensors (see :class:`SliceOutConfig`).
        bn_refresh_every: training calls per full-width refresh call (default 8).
        rules: :class:`~sliceout_fx.rules.OpRule` objects for ops of this model that the
            built-in rules do not know (or that the model computes differently); they apply to
            this conversion only (``register_rule`` makes one global).

    Returns:
        The converted model. Sites that could not be sliced are left at full width and listed
        by ``sliceout_fx.explain(result)``. ``sliceout_fx.to_original(result)`` restores the
        original class in place.

    Raises:
        SliceOutConfigError: invalid ``p``, mode, site names, example inputs...
        UntraceableModelError: the model cannot be traced; the message says which module to keep
            as a leaf.
    """
    if conversions_in(model):
        raise TypeError("this model is already converted; convert to_original(model) instead")
    end, config = resolve(
        model,
        capture,
        p=p,
        normalisation=normalisation,
        placement=placement,
        sites=sites,
        mode=mode,
        scheme=scheme,
        seed=seed,
        width_multiple=width_multiple,
        leaf_modules=leaf_modules,
        capturable=capturable,
        bn_stats=bn_stats,
        bn_refresh_every=bn_refresh_every,
        rules=tuple(rules),
    )
    inputs = check_example_inputs(example_inputs, model)
    target = model if inplace else copy.deepcopy(model)
    try:
        root = traced_root(target)  # the model inside a PEFT wrapper: sites named as without
        if end == "blocks":
            convert_blocks(root, config, inputs if inputs is not None else example_inputs_for(root))
        else:
            state = WholeModelConversion(config, type(root), inputs, concrete_args)
            install(root, state)
            state.ensure_built(root)
    except BaseException:
        to_original(target)  # an in-place conversion that failed leaves the model as it was
        raise
    report = explain(target)
    _warn_if_nothing_sliced(model, report.sites, report.skipped)
    return target


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


def explain(
    model: nn.Module,
    p: Rate = DEFAULT_RATE,
    *,
    example_inputs: Any = None,
    **options: Any,
) -> Report:
    """The analysis report of ``convert(model, p, **options)`` without converting anything.

    ``p`` is 0.5 unless given. For an already converted model, returns its own report: options
    (``p`` included) and ``example_inputs`` must then be left out, or a
    :class:`SliceOutConfigError` says so.
    """
    converted = conversions_in(model)
    if converted:
        given = (["p"] if p is not DEFAULT_RATE else []) + list(options)
        given += ["example_inputs"] if example_inputs is not None else []
        if given:
            raise SliceOutConfigError(
                f"explain() got a converted {type(model).__name__} and {given}: the report of a "
                "converted model is its own conversion's, returned without options. To try other "
                "options, explain the unconverted model: the model you converted, or "
                "sliceout_fx.to_original(copy.deepcopy(model)) (to_original alone restores this "
                "model in place)"
            )
        if converted[0][1].kind == "whole":
            converted[0][1].ensure_built(converted[0][0])
            return converted[0][1].report
        for module, state in converted:
            state.ensure_built(module)
        return combine_reports(
            type(model).__name__, converted[0][1].config, [s.report for _, s in converted]
        )
    p = float(p) if p is DEFAULT_RATE else p  # a plain 0.5 in the config and the report
    options.pop("inplace", None)
    concrete_args = options.pop("concrete_args", None)
    end, config = resolve(model, options.pop("capture", "auto"), p=p, **options)
    inputs = check_example_inputs(example_inputs, model)
    if end == "blocks":
        root = traced_root(model)
        inputs = inputs if inputs is not None else example_inputs_for(root)
        reports = [b.analysis.report for b in blocks.analyse_blocks(root, config, inputs)]
        return combine_reports(type(model).__name__, config, reports)
    return analyse(traced_root(model), config, inputs, concrete_args=concrete_args).report


def to_original(model: nn.Module) -> nn.Module:
    """Restore the plain model in place (original classes, same parameters) and return it."""
    for module, _ in conversions_in(model):
        uninstall(module)
    return model


def set_slicing(model: nn.Module, enabled: bool) -> None:
    """Switch a converted model's training between sliced (``True``) and full width (``False``).

    The persistent form of :func:`full_width`, for schedules that switch at a given step.
    """
    for _, state in converted_parts(model):
        state.enabled = bool(enabled)


@contextlib.contextmanager
def full_width(model: nn.Module) -> Iterator[nn.Module]:
    """Train ``model`` at full width inside the block, e.g. for the last steps as in the paper."""
    states = [state for _, state in converted_parts(model)]
    previous = [s.enabled for s in states]
    for s in states:
        s.enabled = False
    try:
        yield model
    finally:
        for s, was in zip(states, previous, strict=True):
            s.enabled = was
