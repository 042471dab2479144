"""The user's own model on the command line: ``sliceout-fx explain|draw MODEL``.

``MODEL`` names a model the way users already name them:

* ``package.module:factory`` - a callable that builds an ``nn.Module`` with no arguments
  (``torchvision.models:resnet50``; torchvision's builders default to random weights);
* ``timm:NAME`` - ``timm.create_model(NAME)`` with random weights;
* a local HuggingFace folder (``save_pretrained`` output: ``config.json`` and weights), loaded
  offline as the class its config names (``architectures``), else ``AutoModel``.

Weights are seeded (``seed``) so that two runs build the same model. ``input_shape`` is one
sample's shape; without it ``convert`` guesses a small batch from the model (its first layer, or
an HF config), as it does when ``example_inputs`` is left out.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelSpecError", "is_model_spec", "load_model", "example_batch"]


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable; the message says what to pass instead."""


FORMS = "package.module:factory (e.g. torchvision.models:resnet18), timm:NAME, or a local HF folder"


def is_model_spec(text: str) -> bool:
    """Whether ``text`` has the form of a user model spec (else it is a built-in workload)."""
    return ":" in text or Path(text).is_dir()


def load_model(spec: str, seed: int = 0) -> nn.Module:
    """Build the model ``spec`` names (see the module docstring), in train mode."""
    torch.manual_seed(seed)
    if Path(spec).is_dir():
        model = _huggingface_folder(Path(spec))
    elif spec.startswith("timm:"):
        model = _timm(spec.removeprefix("timm:"))
    elif ":" in spec:
        model = _factory(spec)
    else:
        raise ModelSpecError(f"{spec!r} is not a model spec; pass {FORMS}")
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} built a {type(model).__name__}, not an nn.Module")
    return model.train()


def example_batch(input_shape: tuple[int, ...], batch_size: int = 2) -> tuple[torch.Tensor]:
    """A random float batch of ``batch_size`` samples of ``input_shape`` (``(3, 224, 224)``)."""
    return (torch.randn(batch_size, *input_shape),)


def _factory(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelSpecError(f"{spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} ({exc}); is it installed?") from exc
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ModelSpecError(f"{module_name} has no {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelSpecError(f"{spec} is a {type(factory).__name__}, not a callable")
    return factory()


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError("timm:NAME needs timm (pip install timm)") from exc
    if not name:
        raise ModelSpecError("timm: needs a model name, e.g. timm:resnet18")
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ModelSpecError(f"timm has no model {name!r}: {exc}") from exc


def _huggingface_folder(path: Path) -> nn.Module:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSpecError(
            f"{path} is a folder without config.json; pass a save_pretrained() folder or "
            f"{FORMS}"
        )
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError("a HuggingFace folder needs transformers installed") from exc
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    cls = next(
        (getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    return cls.from_pretrained(path, local_files_only=True)
