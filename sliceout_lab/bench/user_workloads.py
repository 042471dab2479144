"""``sliceout-fx bench MODEL`` for the user's own model: dropout as built vs SliceOut.

The model comes from a spec (``package.module:factory``, ``timm:NAME``, a local HuggingFace
folder; see :mod:`sliceout_fx.model_specs`). Batches are synthetic, generated up front: float
inputs of ``--input-shape`` for a vision-style model, token ids (of ``--input-shape``, default 64
tokens) for a model whose config has a vocabulary. The loss is cross-entropy of the logits (a
``(batch, classes)`` output, or an output's ``.logits``) against random labels, which is all a
step-time and saved-memory ratio needs: the step's work does not depend on the data.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..harness import call_model, logits_of
from .workloads import (
    BenchOptions,
    Workload,
    make_adam,
    on_device,
    register_workload,
    sliceout_options,
    variant_factory,
)

__all__ = ["register_user_model"]

DEFAULT_TOKENS = 64


def register_user_model(
    spec: str, input_shape: tuple[int, ...] | None, sites: str = "auto"
) -> str:
    """Register a workload for the model ``spec`` names; returns its registry name (a file-safe
    form of the spec, also the results folder's name)."""
    name = re.sub(r"[^\w.-]+", "-", spec).strip("-.") or "model"

    def build(p: float, options: BenchOptions) -> Workload:
        return _user_workload(name, spec, input_shape, sites, p, options)

    register_workload(
        name,
        description=f"your model {spec}, synthetic batches, dropout as built vs SliceOut",
        default_ps=(0.1, 0.3, 0.5),
        replace=True,  # a second run of the same spec in one process
    )(build)
    return name


def _batches(
    model: nn.Module, input_shape: tuple[int, ...] | None, options: BenchOptions
) -> list[tuple[Any, torch.Tensor]]:
    """Synthetic ``(inputs, labels)`` pairs, the labels shaped like the logits without classes."""
    batch = options.batch_size or 8
    gen = torch.Generator().manual_seed(options.seed + 1)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None and input_shape is None:
        raise ValueError("bench of your own model needs --input-shape (one sample, e.g. 3,224,224)")
    found = []
    for _ in range(options.num_batches):
        if vocab is not None:
            shape = input_shape or (DEFAULT_TOKENS,)
            ids = torch.randint(1, vocab, (batch, *shape), generator=gen)
            inputs: Any = {"input_ids": ids.to(options.device)}
        else:
            inputs = torch.randn(batch, *input_shape, generator=gen).to(options.device)
        found.append(inputs)
    with torch.no_grad():
        logits = logits_of(call_model(model.eval(), found[0]))
    model.train()
    classes = logits.shape[-1]
    return [
        (x, torch.randint(0, classes, logits.shape[:-1], generator=gen).to(options.device))
        for x in found
    ]


def _user_workload(
    name: str,
    spec: str,
    input_shape: tuple[int, ...] | None,
    sites: str,
    p: float,
    options: BenchOptions,
) -> Workload:
    import sliceout_fx
    from sliceout_fx.model_specs import load_model

    base = on_device(load_model(spec, seed=options.seed), options.device)
    batches = _batches(base, input_shape, options)
    example = batches[0][0]

    def sliceout(m: nn.Module) -> nn.Module:
        inputs = example if isinstance(example, dict) else (example,)
        kwargs = sliceout_options(options, {"sites": sites})
        return sliceout_fx.convert(m, p, seed=options.seed, example_inputs=inputs, **kwargs)

    factory = variant_factory(
        base,
        lambda params: make_adam(params, options.lr or 1e-4, options),
        options.device,
        options,
    )
    descriptions = {
        "dropout": "the model as built (its own dropouts)",
        "sliceout-flow": f"SliceOut, flow normalisation, sites={sites!r}",
    }
    transforms = {"dropout": lambda m: m, "sliceout-flow": sliceout}
    return Workload(
        name=name,
        p=p,
        baseline="dropout",
        factories={n: factory(n, transforms[n], descriptions[n]) for n in transforms},
        batches=batches,
        descriptions=descriptions,
        info={
            "model": spec,
            "batch_size": options.batch_size or 8,
            "input_shape": list(input_shape) if input_shape else None,
            "sites": sites,
            "data": "synthetic: random inputs and labels",
        },
    )
