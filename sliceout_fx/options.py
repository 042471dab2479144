"""Conversion options: their defaults in one place, and the front end that captures a model.

``convert``, ``explain``, ``analyse_blocks``, ``draw`` and the CLI all resolve their options here,
so ``explain(model, **options)`` always describes what ``convert(model, **options)`` does.

Two front ends capture a model. ``"fx"`` traces the whole model with ``torch.fx`` (torchvision,
timm, plain modules); ``"blocks"`` exports each repeated layer with ``torch.export`` (HuggingFace
models, whose code fx cannot trace). They differ in one default: ``sites="auto"`` means the
dropout sites (else the expand convolutions) of a whole model, but every sliceable group (heads,
FFN) of an exported layer, whose dropouts are mostly attention-probability dropouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal

from torch import nn

from .config import SliceOutConfig
from .errors import SliceOutConfigError, UnsupportedModelError

FrontEnd = Literal["fx", "blocks"]

#: What ``None`` (or ``"auto"`` for ``sites``) means, per front end.
FRONT_END_DEFAULTS: dict[str, dict[str, Any]] = {
    "fx": {"placement": "delayed", "sites": "auto"},
    "blocks": {"placement": "delayed", "sites": "all"},
}

_CONFIG_FIELDS = {f.name for f in fields(SliceOutConfig)}
#: Options whose ``None`` is a value (dropouts' own rates, the global RNG, no rounding); any other
#: ``None`` means "the default".
_NONE_MEANS_SOMETHING = ("p", "seed", "width_multiple")


class _DefaultRate(float):
    """The ``p`` that ``explain`` takes when none is given: 0.5, told apart (by identity) from a
    ``p=0.5`` the caller passed, which a converted model's ``explain`` refuses."""


#: ``explain``'s default rate (a float equal to 0.5).
DEFAULT_RATE: float = _DefaultRate(0.5)


def is_huggingface_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel``, bare or inside a PEFT wrapper (no imports needed)."""
    return any(
        _is_class(cls, "PreTrainedModel", "transformers") for cls in type(model).__mro__
    ) or (is_peft_model(model) and is_huggingface_model(model.get_base_model()))


def is_peft_model(model: nn.Module) -> bool:
    return any(_is_class(cls, "PeftModel", "peft") for cls in type(model).__mro__)


def _is_class(cls: type, name: str, package: str) -> bool:
    return cls.__name__ == name and cls.__module__.startswith(package)


def traced_root(model: nn.Module) -> nn.Module:
    """What is captured and converted: the model, or the model inside a PEFT wrapper.

    ``PeftModel.forward(*args, **kwargs)`` has no signature to trace; the wrapped model has, its
    layers are named as without PEFT, and converting it in place leaves the wrapper
    (``merge_and_unload``, ``save_pretrained``) intact.
    """
    return model.get_base_model() if is_peft_model(model) else model


def check_model(model: nn.Module) -> None:
    """Refuse, before anything is copied or changed, a model that wraps the model to convert.

    ``DataParallel`` and ``DistributedDataParallel`` replicate (or synchronise) the module they
    wrap, and ``torch.compile`` compiles it: convert that module, then wrap or compile the
    converted model. A TorchScript module (``torch.jit.script`` / ``torch.jit.trace``) has no
    Python code left to trace or rewrite: convert the eager module it was made from.
    """
    import torch

    kind = type(model).__name__
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        raise UnsupportedModelError(
            f"sliceout_fx cannot analyse or convert a {kind} wrapper: convert the module it wraps "
            f"(its .module) first, then wrap the converted model: "
            f"{kind}(sliceout_fx.convert(model, p=...))"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"sliceout_fx cannot analyse or convert a TorchScript module ({kind}, made by "
            "torch.jit.script or torch.jit.trace); TorchScript is not supported as input: convert "
            "the eager nn.Module it was made from (and torch.compile the converted model to "
            "compile it)"
        )
    if _is_class(type(model), "OptimizedModule", "torch._dynamo"):
        raise UnsupportedModelError(
            "sliceout_fx cannot analyse or convert a torch.compile wrapper (OptimizedModule): "
            "convert the module it compiles (its ._orig_mod) first, then compile the converted "
            "model: torch.compile(sliceout_fx.convert(model, p=...))"
        )


def front_end(model: nn.Module, capture: str = "auto") -> FrontEnd:
    """``"blocks"`` for HuggingFace models (and ``capture="blocks"``), else ``"fx"``."""
    if capture not in ("auto", "fx", "blocks"):
        raise SliceOutConfigError(f"capture must be 'auto', 'fx' or 'blocks', got {capture!r}")
    if capture == "auto":
        return "blocks" if is_huggingface_model(model) else "fx"
    return capture  # type: ignore[return-value]


def resolve(
    model: nn.Module, capture: str = "auto", **options: Any
) -> tuple[FrontEnd, SliceOutConfig]:
    """The front end for ``model`` and the validated config of ``options`` under it.

    ``options`` are :class:`SliceOutConfig` fields; ``None`` (and ``sites="auto"``) take the
    front end's default. Unknown names are an error that lists the known ones; a model that is
    a wrapper (``DataParallel``, ``torch.compile``, TorchScript) is refused (:func:`check_model`).
    """
    check_model(model)
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise SliceOutConfigError(
            f"unknown conversion options {unknown}; the options are {sorted(_CONFIG_FIELDS)}"
        )
    end = front_end(model, capture)
    defaults = FRONT_END_DEFAULTS[end]
    resolved = {k: v for k, v in options.items() if v is not None or k in _NONE_MEANS_SOMETHING}
    for name, value in defaults.items():
        if resolved.get(name) is None or (name == "sites" and resolved.get(name) == "auto"):
            resolved[name] = value
    leaf = resolved.pop("leaf_modules", None)
    return end, SliceOutConfig(leaf_modules=tuple(leaf or ()), **resolved)


def check_example_inputs(example_inputs: Any, model: nn.Module) -> Any:
    """``example_inputs`` as the pipeline takes them: a tuple of positional inputs or a dict.

    A bare tensor is one positional input. Anything else is a clear error now rather than a
    failure deep inside capture.
    """
    import torch

    if example_inputs is None or isinstance(example_inputs, Mapping):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise SliceOutConfigError(
            f"example_inputs must be a tensor, a tuple of {type(model).__name__}.forward's "
            f"positional inputs or a dict of keyword inputs, got {type(example_inputs).__name__}"
        )
    return example_inputs
