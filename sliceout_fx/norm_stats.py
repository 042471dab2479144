"""Batch-norm running statistics as the full-width network sees them.

A batch norm downstream of a slice sees, in a sliced step, a tensor the full-width network never
produces: the sum a layer computes over a slice of its inputs, rescaled by ``n / w``, has the
right mean only on average over slices and a larger variance (the variance shift dropout causes
before a batch norm). Training itself does not care - a batch norm in train mode normalises with
the batch's own statistics - but the running statistics it accumulates are the ones eval mode uses
at full width. Measured on a pretrained EfficientNet-Lite0 fine-tuned 100 steps at ``p = 0.3``,
the batch norm after each MBConv projection ended with running variances 0.7-0.8x (immediate
placement) or 1.2-1.4x (delayed) of the full-width ones and means 0.2-0.4 standard deviations off:
eval accuracy 41-45% against 84% for dropout (``docs/batch-norm.md`` has the table).

The default answer (``bn_stats="full_width"``): in sliced steps every batch norm downstream of a
slice normalises with batch statistics and leaves its running statistics alone; every
``bn_refresh_every``-th training call runs a full-width *refresh graph* instead - the original
training graph whose batch norms downstream of a slice update with the momentum raised to
``1 - (1 - m) ** k``, so that the running statistics forget old batches over the same number of
steps as the original model's. They are then always an average of the full-width network's batch
statistics, whatever the placement or normalisation. Batch norms upstream of every slice keep
updating in every step, as before.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, fx, nn

from .ops import sliced_batch_norm, sliced_batch_norm_fn
from .rules.batchnorm import FUNCTIONAL_TARGETS
from .rules.binding import bind, set_arg
from .sampling import SAMPLER_NAME

__all__ = [
    "FullWidthStatistics",
    "batch_norm_batch_stats",
    "batch_norm_refresh",
    "freeze_statistics_after_slices",
    "refresh_graph",
    "refresh_momentum",
]

_FUNCTIONAL = (*FUNCTIONAL_TARGETS, sliced_batch_norm_fn)


def _is_functional(node: fx.Node) -> bool:
    target = node.target
    return target in _FUNCTIONAL or getattr(target, "overloadpacket", None) in _FUNCTIONAL


def batch_norm_batch_stats(x: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``bn(x)`` in train mode, normalised by batch statistics, running statistics untouched."""
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def refresh_momentum(momentum: float | None, every: int) -> float | None:
    """The momentum that, applied once in ``every`` steps, forgets as fast as ``momentum`` each."""
    if momentum is None:
        return None  # a cumulative average counts every update alike
    return 1.0 - (1.0 - momentum) ** every


def batch_norm_refresh(x: Tensor, bn: nn.modules.batchnorm._BatchNorm, every: int) -> Tensor:
    """``bn(x)`` in train mode, updating its running statistics with the refresh momentum."""
    if bn.momentum is None:
        return bn(x)
    bn.num_batches_tracked.add_(1)
    momentum = refresh_momentum(bn.momentum, every)
    return F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps
    )


def _downstream_of_sampler(graph: fx.Graph) -> set[fx.Node]:
    """Every node whose value depends on a slice draw."""
    reached: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "call_module" and node.target == SAMPLER_NAME) or any(
            a in reached for a in node.all_input_nodes
        ):
            reached.add(node)
    return reached


def _module_bn(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The target of a tracking batch-norm module ``node`` calls (or passes to a sliced op)."""
    if node.op == "call_module":
        target = str(node.target)
    elif node.target is sliced_batch_norm and node.args[1].op == "get_attr":
        target = str(node.args[1].target)
    else:
        return None
    bn = gm.get_submodule(target)
    tracks = isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
    return target if tracks and bn.running_mean is not None else None


def _functional_buffers(node: fx.Node) -> tuple[str, str] | None:
    """The running-statistics targets of a train-mode functional batch norm with constants."""
    if node.op != "call_function" or not _is_functional(node):
        return None
    a = bind(node)
    mean, var = a.get("running_mean"), a.get("running_var")
    if a["training"] is not True or not all(
        isinstance(t, fx.Node) and t.op == "get_attr" for t in (mean, var)
    ):
        return None
    if not (a["momentum"] is None or isinstance(a["momentum"], float | int)):
        return None
    return str(mean.target), str(var.target)


def freeze_statistics_after_slices(gm: fx.GraphModule) -> set[str]:
    """Rewrite ``gm`` so that no batch norm downstream of a slice updates its running statistics.

    Returns the frozen batch norms (module targets, and running-mean targets of functional calls)
    for :func:`refresh_graph`. A functional batch norm whose ``training`` flag or buffers are not
    constants of the graph is left as it is.
    """
    downstream = _downstream_of_sampler(gm.graph)
    frozen: set[str] = set()
    for node in list(gm.graph.nodes):
        if node not in downstream:
            continue
        if (target := _module_bn(gm, node)) is not None:
            frozen.add(target)
            if node.op == "call_module":
                with gm.graph.inserting_before(node):
                    module = gm.graph.get_attr(target)
                    new = gm.graph.call_function(batch_norm_batch_stats, (node.args[0], module))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            else:
                node.kwargs = {**node.kwargs, "track_running_stats": False}
        elif (buffers := _functional_buffers(node)) is not None:
            frozen.add(buffers[0])
            set_arg(node, "running_mean", None)
            set_arg(node, "running_var", None)
    gm.graph.lint()
    gm.recompile()
    return frozen


def refresh_graph(full: fx.GraphModule, frozen: set[str], every: int) -> fx.GraphModule:
    """A copy of the full-width training graph whose ``frozen`` batch norms refresh."""
    graph = copy.deepcopy(full.graph)
    gm = fx.GraphModule(full, graph, "BatchNormRefreshGraph")
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) in frozen:
            with graph.inserting_before(node):
                module = graph.get_attr(str(node.target))
                new = graph.call_function(batch_norm_refresh, (node.args[0], module, every))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif (buffers := _functional_buffers(node)) is not None and buffers[0] in frozen:
            momentum = bind(node)["momentum"]
            set_arg(node, "momentum", refresh_momentum(momentum, every))
    graph.lint()
    gm.recompile()
    return gm


class FullWidthStatistics:
    """Counts training calls; every ``every``-th one runs the refresh graph.

    The counting happens in a forward pre-hook, outside any ``torch.compile`` frame, so that a
    compiled model only reads a boolean (two compiled variants, no recompilation per step).
    """

    def __init__(self, graph: fx.GraphModule, frozen: set[str], every: int) -> None:
        self.graph = graph
        self.frozen = frozen
        self.every = every
        self.calls = 0

    def tick(self) -> bool:
        """Count one training call; whether it is a refresh call."""
        self.calls += 1
        return self.calls % self.every == 0
