"""The fx front end: the whole model captured by ``torch.fx`` into one sliced training graph.

The model object keeps its class (see :mod:`sliceout_fx.module`); this conversion holds the graphs
its training forward runs: the sliced graph and, when batch norms sit downstream of a slice, the
full-width refresh graph of :mod:`sliceout_fx.norm_stats`. Both are rooted on the model's own
children, so they read its current parameters on every call.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .call_spec import (
    CapturedCall,
    bind_arguments,
    forward_parameters,
    positional_inputs,
    specialised_defaults,
)
from .capture import check_example_call
from .capture_effects import CHECKPOINTED
from .config import SliceOutConfig
from .errors import SliceOutError
from .guards import hooked_modules, unhooked_calls, without_hooks_if_possible
from .module import Conversion, own_hook, replaced_modules
from .norm_stats import FullWidthStatistics, freeze_statistics_after_slices, refresh_graph
from .sampling import SAMPLER_NAME
from .sites import SkippedSite

if TYPE_CHECKING:
    from .api import Analysis
    from .report import Report


class WholeModelConversion(Conversion):
    """A model converted as one fx graph (torchvision, timm, plain modules, ``nn.Sequential``)."""

    kind = "whole"
    built_fields = ("analysis", "sliced_gm", "full_gm", "refresh", "call")

    def __init__(
        self,
        config: SliceOutConfig,
        original_class: type,
        example_inputs: Sequence[Any] | None = None,
        concrete_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(config, original_class)
        self.example_inputs = _detached(example_inputs)
        self.concrete_args = dict(concrete_args) if concrete_args else None
        self.analysis: Analysis | None = None
        self.sliced_gm: fx.GraphModule | None = None
        self.full_gm: fx.GraphModule | None = None
        self.refresh: FullWidthStatistics | None = None
        self.refresh_due = False
        self.refresh_calls = 0  # carried across rebuilds and copies
        self.call: CapturedCall | None = None  # what the graphs were specialised on

    # -- graphs ----------------------------------------------------------------------------------

    def build(self, module: nn.Module, args: tuple | None, kwargs: dict | None) -> None:
        from .api import analyse
        from .rewrite import build_sampler, rewrite_training_graph

        from_call = args is not None  # captured again from a training call
        if from_call:
            params = forward_parameters(module)
            inputs: Any = bind_arguments(params, args, kwargs) if kwargs else args
        else:
            inputs = self.example_inputs
        # Modules with hooks are kept whole (call_module nodes), so that their hooks can fire
        # around whatever op takes their place (see guards.call_with_hooks).
        hooked = hooked_modules(module)
        config = self.config
        if hooked:
            config = replace(config, leaf_modules=(*config.leaf_modules, *hooked))
        concrete = specialised_defaults(module, inputs, self.concrete_args)

        def capture() -> Analysis:
            if inputs is None:
                return analyse(module, config, None, concrete_args=concrete)
            # A failure is the model's own error on these inputs, not fx interpreter text.
            check_example_call(module, inputs, self.concrete_args)
            ordered = positional_inputs(module, inputs, concrete)  # the graph's order
            return analyse(module, config, ordered, concrete_args=concrete)

        analysis = without_hooks_if_possible(module, capture)
        if inputs is not None:
            inputs = positional_inputs(module, inputs, concrete)
        self._note_what_cannot_be_sliced(analysis, hooked)
        call = CapturedCall.of(
            module, inputs if inputs is not None else analysis.example_inputs, concrete
        )
        if not from_call or self.example_inputs is None:
            # kept for copies that rebuild before a training call; two rows of a batch will do
            self.example_inputs = _detached(analysis.example_inputs, rows=2 if from_call else None)
        full_gm = fx.GraphModule(analysis.train_gm, copy.deepcopy(analysis.train_gm.graph))
        sampler = build_sampler(analysis.sites, config).to(_device_of(module))
        analysis.train_gm.add_submodule(SAMPLER_NAME, sampler)
        hooked_calls = {
            n: str(n.target)
            for n in analysis.train_gm.graph.nodes
            if n.op == "call_module" and str(n.target) in hooked
        }
        sliced = rewrite_training_graph(
            analysis.train_gm, analysis.dep, analysis.sites, config, hooked_calls
        )
        unhooked = unhooked_calls(sliced, hooked_calls.values())
        if unhooked:
            self.fall_back(
                f"hooks are registered on {unhooked[:3]}, whose calls its sliced graph replaces "
                f"without firing them (scheme={config.scheme!r})"
            )
        refresh = None
        if config.bn_stats == "full_width" and analysis.sites:
            frozen = freeze_statistics_after_slices(sliced)
            if frozen:
                every = config.bn_refresh_every
                refresh = FullWidthStatistics(refresh_graph(full_gm, frozen, every), frozen, every)
                refresh.calls = self.refresh.calls if self.refresh else self.refresh_calls
        # fx copied each top-level child into a stub holding only the attributes the graph reads;
        # the stubs would go stale when a parameter object is replaced (load_state_dict with
        # assign=True). Point the graphs at the real children.
        for gm in (sliced, full_gm, *([refresh.graph] if refresh else [])):
            for name in list(gm._modules):
                if name in module._modules:
                    gm._modules[name] = module._modules[name]
        self.analysis, self.sliced_gm, self.full_gm, self.refresh, self.call = (
            analysis,
            sliced,
            full_gm,
            refresh,
            call,
        )
        self.use_sampler(module, sampler)
        if refresh is not None and not any(
            h is _count_training_call for h in module._forward_pre_hooks.values()
        ):
            module.register_forward_pre_hook(_count_training_call)
            if from_call:  # this call's pre-hooks ran before the counter existed (a fresh copy)
                _count_training_call(module, args)

    def _note_what_cannot_be_sliced(self, analysis: Analysis, hooked: dict[str, nn.Module]) -> None:
        """Hooked containers kept whole (in the report); checkpointing (trains at full width)."""
        analysis.report.skipped += [
            SkippedSite(
                name,
                "kept whole while it has hooks: they fire on a call of the module, so its "
                "inside is not traced (hooks on single layers fire around their sliced ops)",
            )
            for name, sub in hooked.items()
            if next(sub.children(), None) is not None
        ]
        if analysis.train_gm.meta.get(CHECKPOINTED):
            self.fall_back(
                "its forward calls torch.utils.checkpoint (gradient checkpointing is on), and "
                "the sliced graph, captured as one graph, would keep every activation the "
                "checkpoints free. Turn checkpointing off to slice, or convert with "
                "capture='blocks' (and example_inputs) so that each checkpointed block is "
                "converted on its own"
            )

    def extra_guards(self, module: nn.Module) -> list[Any]:
        call = self.call
        return [] if call is None else [call.mismatch]

    def run(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        # `.forward`, not `__call__`: the graph modules have no hooks of their own, and a small
        # training step is bound by host work per call.
        graph = self.refresh.graph if self.refresh_due else self.sliced_gm
        if self.call is not None:
            args, kwargs = self.call.graph_inputs(module, args, kwargs), {}
        try:
            return graph.forward(*args, **kwargs)
        except RuntimeError as error:
            if "DTensor" in str(error):
                raise _sharded_layer_error(self) from error
            raise

    @property
    def report(self) -> Report:
        return self.analysis.report

    @property
    def sliced_graph(self) -> fx.GraphModule:
        return self.sliced_gm

    @property
    def full_graph(self) -> fx.GraphModule:
        return self.full_gm

    # -- copies and resume -----------------------------------------------------------------------

    def draw_state(self) -> dict[str, Any] | None:
        state = super().draw_state()
        if state is not None:
            state = {**state, "refresh_calls": self.refresh.calls if self.refresh else 0}
        return state

    def load_draw_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        self.refresh_calls = int(state.get("refresh_calls", 0))
        if self.refresh is not None:
            self.refresh.calls = self.refresh_calls
        super().load_draw_state(state)

    def recipe(self) -> dict[str, Any]:
        return {
            **super().recipe(),
            "example_inputs": self.example_inputs,
            "concrete_args": self.concrete_args,
        }

    @classmethod
    def from_recipe(cls, original_class: type, recipe: dict[str, Any]) -> WholeModelConversion:
        state = cls(
            recipe["config"], original_class, recipe["example_inputs"], recipe["concrete_args"]
        )
        state.enabled = recipe["enabled"]
        state.load_draw_state(recipe["draws"])
        return state


@own_hook
@torch.compiler.disable
def _count_training_call(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: decide whether this training call refreshes batch-norm statistics.

    A hook kept out of compilation, not code in ``forward``: ``torch.compile(model)`` calls hooks
    outside the compiled forward frame, which then only reads a boolean (two compiled variants)
    instead of guarding on a step counter (a recompilation per step).
    """
    state = module.__dict__.get("_sliceout")
    if state is None:
        return
    refresh = state.refresh
    state.refresh_due = module.training and state.enabled and refresh is not None and refresh.tick()


def _sharded_layer_error(state: WholeModelConversion) -> SliceOutError:
    """FSDP2 sharded a layer on its own: its gather hook never runs for the sliced graph."""
    sliced = replaced_modules(state.sliced_gm, state.full_gm)
    return SliceOutError(
        "a layer the sliced graph reads directly is sharded on its own by FSDP2 (fully_shard): "
        "the sliced graph reads the weights of the layers it slices instead of calling them, so "
        "their per-module gather never runs. Apply fully_shard to a module that contains them "
        f"(the model itself, or each block) rather than to the sliced layers ({sliced[:6]}...)."
    )


def _detached(inputs: Any, rows: int | None = None) -> Any:
    """Example inputs without autograd history; with ``rows``, a small copy of a batch's rows."""

    def keep(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if rows is not None and value.dim() and value.shape[0] > rows:
            return value[:rows].detach().clone()
        return value.detach()

    if inputs is None:
        return None
    if isinstance(inputs, Mapping):
        return {k: keep(v) for k, v in inputs.items()}
    return tuple(keep(v) for v in inputs)


def _device_of(model: nn.Module) -> Any:
    """Where the model's parameters live: the sampler's scale buffers must live there too."""
    first = next(model.parameters(), None)
    return first.device if first is not None else "cpu"
