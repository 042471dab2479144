"""PEFT adapters: how capture sees a LoRA layer, and why an adapter is never a site by default.

A LoRA-wrapped linear computes ``base(x) + B(A(dropout(x))) * scaling``. Slicing the units the base
layer reads or writes slices ``A``'s inputs and ``B``'s outputs alike, so adapters train on the same
slice as the weights they adapt, and their gradients are the masked reference's. Two things are
left alone by default: the rank ``r`` between ``A`` and ``B`` (a few units whose slicing saves
nothing and changes what the adapter can learn) and the adapter's own dropout (it stays a dropout).
Naming them in ``sites=[...]`` slices them anyway.

Site names drop PEFT's ``.base_layer`` component, so a site is named as in the plain model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: Module-path components that belong to a PEFT adapter rather than to the adapted model.
ADAPTER_PARTS = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_dropout",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    }
)


def is_adapter_path(path: str) -> bool:
    """Whether a module path (or a site name) lies inside a PEFT adapter."""
    return not ADAPTER_PARTS.isdisjoint(path.split("."))


def plain_path(path: str) -> str:
    """The path as in the model without adapters: ``q_proj.base_layer`` -> ``q_proj``."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def is_lora_linear(module: nn.Module) -> bool:
    """A PEFT ``lora.Linear`` (checked without importing peft)."""
    cls = type(module)
    return cls.__name__ == "Linear" and cls.__module__.startswith("peft.tuners.lora")


def lora_linear_forward(layer: nn.Module, x: Any) -> Any:
    """What ``peft``'s ``lora.Linear.forward`` computes for plain LoRA, in traceable form.

    PEFT's own forward compares ``x.dtype`` with the adapter's dtype, which ``torch.fx`` cannot
    decide on a proxy. The ``.to`` here is a no-op when the dtypes agree, as they do in training.
    """
    result = layer.base_layer(x)
    if layer.disable_adapters or layer.merged:
        return result
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(
                f"LoRA variant {type(layer.lora_variant[name]).__name__} (DoRA...)"
            )
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        inner = layer.lora_dropout[name](x.to(lora_a.weight.dtype))
        result = result + lora_b(lora_a(inner)) * layer.scaling[name]
    return result
