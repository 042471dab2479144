"""The public entry points: :func:`convert`, :func:`explain`, :func:`to_original`."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .capture import trace
from .config import Mode, Normalisation, Placement, Rate, Scheme, SitePolicy, SliceOutConfig
from .depgraph import DependencyGraph, build_dependency_graph
from .groups import AlignmentGroup, find_groups
from .module import SAMPLER_NAME, SliceOutModule
from .patch import assign_patches
from .report import Report, expected_ratios
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
    propagate_shapes(train_gm, example_inputs)
    dep = build_dependency_graph(train_gm)
    groups = find_groups(dep)
    sites, skipped = select_sites(dep, groups, config)
    if config.scheme == "patch":
        sites, not_patchable = assign_patches(sites, dep)
        skipped += not_patchable
    flops_ratio, act_ratio = expected_ratios(dep, sites)
    report = Report(type(model).__name__, config, groups, sites, skipped, flops_ratio, act_ratio)
    return Analysis(model, train_gm, dep, groups, sites, skipped, report)


def _config(**kwargs: Any) -> SliceOutConfig:
    leaf = kwargs.pop("leaf_modules", None)
    return SliceOutConfig(leaf_modules=tuple(leaf or ()), **kwargs)


def convert(
    model: nn.Module,
    p: Rate = 0.5,
    *,
    normalisation: Normalisation = "flow",
    placement: Placement = "immediate",
    sites: SitePolicy = "auto",
    mode: Mode = "slice",
    scheme: Scheme = "channel",
    seed: int | None = None,
    width_multiple: int | None = None,
    example_inputs: Sequence[Any] | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] | None = None,
    inplace: bool = False,
) -> SliceOutModule:
    """Convert ``model`` into a module that trains with SliceOut and evaluates at full width.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (see ``leaf_modules``).
        p: drop rate, a ``{site: rate}`` mapping, or ``None`` to reuse each dropout's own rate.
        normalisation: ``"flow"`` or ``"probabilistic"`` (see :class:`SliceOutConfig`).
        placement: ``"immediate"`` or ``"delayed"`` normalisation.
        sites: ``"auto"``, ``"dropout"``, ``"expand"`` or a list of site names (see ``explain``).
        mode: ``"slice"`` (SliceOut), ``"gather"`` (controlled dropout) or ``"mask"`` (reference).
        scheme: ``"channel"`` (Channel SliceOut) or ``"patch"`` (Patch SliceOut on convolutions).
        seed: seed of the slice sampler (``None``: draws come from the global torch RNG).
        width_multiple: round slice widths and starts to this many channels.
        example_inputs: inputs to learn tensor shapes from; guessed for simple MLPs and CNNs.
        leaf_modules: module types or qualified names to keep whole when tracing.
        inplace: share the given model's parameters instead of deep-copying the model first.

    Returns:
        A :class:`SliceOutModule` with the original ``state_dict`` keys. Sites that could not be
        sliced are left at full width and listed by ``result.explain()``.

    Raises:
        SliceOutConfigError: invalid ``p``, mode, site names...
        UntraceableModelError: the model cannot be traced; the message says which module to keep
            as a leaf.
    """
    config = _config(
        p=p,
        normalisation=normalisation,
        placement=placement,
        sites=sites,
        mode=mode,
        scheme=scheme,
        seed=seed,
        width_multiple=width_multiple,
        leaf_modules=leaf_modules,
    )
    if isinstance(model, SliceOutModule):
        raise TypeError("this model is already converted; convert model.to_original() instead")
    source = model if inplace else copy.deepcopy(model)
    analysis = analyse(source, config, example_inputs)
    if not analysis.sites:
        reasons = "; ".join(f"{k.name}: {k.reason}" for k in analysis.skipped) or (
            "the model has no dropout and no expand convolution"
        )
        warnings.warn(
            f"sliceout_fx.convert found no site to slice in {type(model).__name__} ({reasons}). "
            "The converted model trains and evaluates exactly like the original; see "
            "sliceout_fx.explain(model) for the groups it found.",
            stacklevel=2,
        )
    eval_gm = trace(source, leaf_modules=config.leaf_modules, training=False)
    full_train_gm = fx.GraphModule(analysis.train_gm, copy.deepcopy(analysis.train_gm.graph))
    sampler = build_sampler(analysis.sites, config)
    analysis.train_gm.add_submodule(SAMPLER_NAME, sampler)
    sliced = rewrite_training_graph(analysis.train_gm, analysis.dep, analysis.sites, config)
    return SliceOutModule(source, eval_gm, full_train_gm, sliced.graph, sampler, analysis.report)


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
    options.pop("inplace", None)
    return analyse(model, _config(p=p, **options), example_inputs).report


def to_original(model: nn.Module) -> nn.Module:
    """The plain full-width model (original class and structure) sharing the trained weights."""
    if isinstance(model, SliceOutModule):
        return model.to_original()
    return model
