"""``sliceout-fx bench MODEL`` for the user's own model: dropout as built vs SliceOut.

The model comes from a spec (``package.module:factory``, ``timm:NAME``, a local HuggingFace
folder; see :mod:`sliceout_fx.model_specs`). Batches are synthetic, generated up front: float
inputs of ``--input-shape`` for a vision-style model, token ids (of ``--input-shape``, default 64
tokens) for a model whose config has a vocabulary. The loss is cross-entropy of the logits (a
``(batch, classes)`` output, or an output's ``.logits``) against random labels, which is all a
step-time and saved-memory ratio needs: the step's work does not depend on the data.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .workloads import (
    BenchOptions,
    Variant,
    Workload,
    compiled_if_asked,
    make_adam,
    on_device,
    register_workload,
    sliceout_options,
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


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(
            "bench of your own model needs logits: a (batch, ..., classes) tensor output or an "
            "output with .logits"
        )
    return logits


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
        logits = _logits(_call(model.eval(), found[0]))
    model.train()
    classes = logits.shape[-1]
    return [
        (x, torch.randint(0, classes, logits.shape[:-1], generator=gen).to(options.device))
        for x in found
    ]


def _call(model: nn.Module | Callable[..., Any], inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


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

    def variant(variant_name: str, description: str, transform: Callable) -> Callable[[], Variant]:
        def build() -> Variant:
            model = on_device(transform(copy.deepcopy(base)), options.device).train()
            optimizer = make_adam(model.parameters(), options.lr or 1e-4, options)
            run = compiled_if_asked(model, options)
            batch_iter = itertools.cycle(batches)

            def step() -> None:
                x, y = next(batch_iter)
                optimizer.zero_grad(set_to_none=True)
                logits = _logits(_call(run, x))
                F.cross_entropy(logits.flatten(0, -2), y.flatten()).backward()
                optimizer.step()

            return Variant(
                variant_name, model, optimizer, step, list(model.parameters()), description
            )

        return build

    def sliceout(m: nn.Module) -> nn.Module:
        inputs = example if isinstance(example, dict) else (example,)
        kwargs = sliceout_options(options, {"sites": sites})
        return sliceout_fx.convert(m, p, seed=options.seed, example_inputs=inputs, **kwargs)

    descriptions = {
        "dropout": "the model as built (its own dropouts)",
        "sliceout-flow": f"SliceOut, flow normalisation, sites={sites!r}",
    }
    transforms = {"dropout": lambda m: m, "sliceout-flow": sliceout}
    return Workload(
        name=name,
        p=p,
        baseline="dropout",
        factories={n: variant(n, descriptions[n], transforms[n]) for n in transforms},
        descriptions=descriptions,
        info={
            "model": spec,
            "batch_size": options.batch_size or 8,
            "input_shape": list(input_shape) if input_shape else None,
            "sites": sites,
            "data": "synthetic: random inputs and labels",
        },
    )
