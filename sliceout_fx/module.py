"""Stage 7, the converted module: sliced and full-width graphs over one set of weights.

:class:`SliceOutModule` registers the original model's children, parameters and buffers under their
original names, so ``state_dict`` keys and shapes are the original's and checkpoints move freely in
both directions. The three graph modules it runs (sliced training, full-width training, evaluation)
are plain ``fx.GraphModule`` objects that reference those same submodules; they are kept out of the
module tree so they add no state of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .sampling import SAMPLER_NAME, SliceSampler

if TYPE_CHECKING:
    from .norm_stats import FullWidthStatistics
    from .report import Report


class SliceOutModule(nn.Module):
    """Runs the sliced graph in ``train()`` mode and the original computation in ``eval()`` mode.

    Use :func:`sliceout_fx.convert` to build one. ``slicing_enabled = False`` (or
    :meth:`full_width`) trains the full-width original graph, e.g. for the last steps of training as
    in the paper; :meth:`to_original` returns the original model structure for deployment.
    With batch norms downstream of a slice, one training call in ``bn_refresh.every`` runs the
    full-width refresh graph instead (see :mod:`sliceout_fx.norm_stats`).
    """

    sliceout_sampler: SliceSampler

    def __init__(
        self,
        source: nn.Module,
        eval_graph: fx.GraphModule,
        full_train_graph: fx.GraphModule,
        sliced_graph: fx.Graph,
        sampler: SliceSampler,
        report: Report,
        bn_refresh: FullWidthStatistics | None = None,
    ) -> None:
        super().__init__()
        for name, param in source._parameters.items():
            self.register_parameter(name, param)
        for name, buf in source._buffers.items():
            self.register_buffer(
                name, buf, persistent=name not in source._non_persistent_buffers_set
            )
        for name, child in source._modules.items():
            self.add_module(name, child)
        self.add_module(SAMPLER_NAME, sampler)
        self.slicing_enabled = True
        # Unregistered on purpose: they share every submodule with `self`.
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_eval_gm", eval_graph)
        object.__setattr__(self, "_full_train_gm", full_train_graph)
        sliced_gm = fx.GraphModule(self, sliced_graph, "SlicedTrainGraph")
        # fx copies a `get_attr` target such as "fc1.weight" into a fresh stub `fc1` holding only
        # that tensor; the stub would go stale when the parameter object is replaced
        # (load_state_dict(assign=True), parametrizations). Point the graph at the real children.
        graphs = [sliced_gm] + ([bn_refresh.graph] if bn_refresh is not None else [])
        for gm in graphs:
            for name in list(gm._modules):
                if name in self._modules:
                    gm._modules[name] = self._modules[name]
        object.__setattr__(self, "_sliced_gm", sliced_gm)
        object.__setattr__(self, "report", report)
        self.bn_refresh = bn_refresh
        self._refresh_due = False
        if bn_refresh is not None:
            self.register_forward_pre_hook(_count_training_call)
        self.train(source.training)

    # -- running ------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # `.forward`, not `__call__`: the graph modules have no hooks of their own, and a small
        # training step is bound by host work per call.
        if self._refresh_due and self.training and self.slicing_enabled:
            return self.bn_refresh.graph.forward(*args, **kwargs)
        return self.active_graph.forward(*args, **kwargs)

    @property
    def active_graph(self) -> fx.GraphModule:
        """The graph module a call runs in the current mode."""
        if not self.training:
            return self._eval_gm
        return self._sliced_gm if self.slicing_enabled else self._full_train_gm

    @property
    def sliced_graph(self) -> fx.GraphModule:
        return self._sliced_gm

    @property
    def full_graph(self) -> fx.GraphModule:
        """The full-width training graph (the original model's training computation)."""
        return self._full_train_gm

    @property
    def eval_graph(self) -> fx.GraphModule:
        return self._eval_gm

    def train(self, mode: bool = True) -> SliceOutModule:
        super().train(mode)
        self._source.training = mode
        return self

    @contextlib.contextmanager
    def full_width(self) -> Iterator[SliceOutModule]:
        """Train at full width inside the ``with`` block (original dropouts included)."""
        previous = self.slicing_enabled
        self.slicing_enabled = False
        try:
            yield self
        finally:
            self.slicing_enabled = previous

    def to_original(self) -> nn.Module:
        """The original model structure, sharing this module's parameters and buffers."""
        self._source.train(self.training)
        return self._source

    def explain(self) -> Report:
        """The analysis report of this conversion (sites, groups, skipped groups and reasons)."""
        return self.report

    def extra_repr(self) -> str:
        sites = ", ".join(f"{s.name}: p={s.effective_p:.3g}" for s in self.report.sites)
        return f"sites=[{sites}], mode={self.report.config.mode!r}"


@torch.compiler.disable
def _count_training_call(module: SliceOutModule, args: Any) -> None:
    """Forward pre-hook: decide whether this training call refreshes batch-norm statistics.

    A hook kept out of compilation, not code in ``forward``: ``torch.compile(model)`` calls hooks
    outside the compiled forward frame, which then only reads a boolean (two compiled variants)
    instead of guarding on a step counter (a recompilation per step).
    """
    module._refresh_due = module.training and module.slicing_enabled and module.bn_refresh.tick()
