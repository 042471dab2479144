"""Stage 2, shapes: run the traced graph once on example inputs to learn every tensor's shape.

Rules need ranks and channel sizes to line up axes (``Linear`` produces the last axis,
``BatchNorm1d``
reads axis 1: the same axis only when the tensor is 2-D). Propagation runs under ``no_grad`` on the
eval-mode graph so it cannot move batch-norm statistics or consume dropout randomness.
When no example inputs are given, a small batch is synthesised from the first layer that reads the
model input (an ``in_features`` or ``in_channels`` tells us its shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from ._probe import untouched
from .errors import ShapeInferenceError

#: Spatial size used when synthesising an image-like input for a convolutional model.
DEFAULT_SPATIAL = 32


def synthesize_example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """A batch of 2 for a single-input model whose first consumer is a Linear or a Conv."""
    # a placeholder with a default (an argument specialised at capture) needs no input
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
    if len(placeholders) != 1:
        raise ShapeInferenceError(
            f"the model takes {len(placeholders)} inputs; pass example_inputs=(...) to convert()"
        )
    frontier, seen = list(placeholders[0].users), set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        weight = _first_layer_weight(node, gm)
        if weight is not None:
            like = {"dtype": weight.dtype, "device": weight.device}
            if weight.dim() == 2:  # linear: (out, in)
                return (_example((2, weight.shape[1]), **like),)
            groups = gm.get_submodule(str(node.target)).groups if node.op == "call_module" else 1
            spatial = (DEFAULT_SPATIAL,) * (weight.dim() - 2)
            return (_example((2, weight.shape[1] * groups, *spatial), **like),)
        frontier.extend(node.users)
    raise ShapeInferenceError(
        "cannot guess the input shape of this model; pass example_inputs=(tensor, ...) to convert()"
    )


def _example(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random example input from a generator of its own: converting leaves the global RNG be."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return values.to(dtype=dtype, device=device)


def _first_layer_weight(node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
    """The weight of a layer (its rule's ``weight``), whatever the dialect."""
    from .rules import rule_for

    rule = rule_for(node, gm)
    return rule.weight(node, gm) if rule.is_layer else None


def propagate_shapes(
    gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None
) -> tuple[Any, ...]:
    """Record ``node.meta['tensor_meta']`` on every node of ``gm``; returns the inputs used."""
    inputs = tuple(example_inputs) if example_inputs is not None else synthesize_example_inputs(gm)
    try:
        # The train-mode graph may hold functional batch norms with training=True baked in (timm's
        # BatchNormAct2d) or a functional dropout: running it must leave buffers and RNG alone.
        with untouched(gm, training=False):
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # noqa: BLE001
        raise ShapeInferenceError(
            f"running the traced model on example inputs failed ({type(exc).__name__}: {exc}); "
            "pass example_inputs=(...) that the model accepts"
        ) from exc
    return inputs
