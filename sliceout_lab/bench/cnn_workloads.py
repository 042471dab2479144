"""CNN benchmark workloads: the paper's Wide ResNets and EfficientNet-B0 (Appendix F.2).

Both train with the Wide ResNet paper's SGD (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4) on
synthetic images (timing and saved bytes do not depend on pixel values). SliceOut variants use the
paper's best CNN setting, delayed normalisation (after the batch norm, before the next conv).

* ``wrn``: the baseline is the Wide ResNet with ``nn.Dropout(p)`` between the convolutions of every
  block; converting replaces each dropout by a channel slice shared by conv1, bn2 and conv2.
* ``efficientnet_b0``: torchvision's model has no dropout between convolutions, so the baseline is
  the model as built and the SliceOut sites are the MBConv expand convolutions (``sites="expand"``).
  Its classifier dropout stays as it is in every variant.

A ``sliceout-patch`` variant (Patch SliceOut, ``convert(..., scheme="patch")``) is offered when the
installed core's ``convert`` accepts ``scheme``. torchvision is imported only when an EfficientNet
workload is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .workloads import (
    BenchOptions,
    Workload,
    register_workload,
    sliceout_options,
    variant_factory,
)

__all__ = ["efficientnet_b0_workload", "make_sgd", "wrn_workload"]

CNN_PS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
_CLASSES = 10
_SGD = {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def make_sgd(params: Any, lr: float, options: BenchOptions) -> torch.optim.Optimizer:
    """The Wide ResNet paper's SGD (Table 11 of the SliceOut paper, with Nesterov momentum).

    ``options.fused_adam`` / ``options.foreach`` select SGD's fused / foreach implementation, the
    counterparts of the MLP workload's Adam switches.
    """
    kwargs: dict[str, Any] = {"lr": lr, **_SGD}
    if options.fused_adam:
        kwargs["fused"] = True
    elif options.foreach:
        kwargs["foreach"] = True
    return torch.optim.SGD(params, **kwargs)


def _optimizer_name(options: BenchOptions) -> str:
    impl = " (fused)" if options.fused_adam else " (foreach)" if options.foreach else ""
    return "SGD lr {lr}, Nesterov momentum 0.9, weight decay 5e-4" + impl


def _has_patch_scheme() -> bool:
    """Whether the core's ``convert`` takes ``scheme=`` (Patch SliceOut), checked at build time."""
    import sliceout_fx

    return "scheme" in inspect.signature(sliceout_fx.convert).parameters


def _image_size(options: BenchOptions, default: int) -> int:
    size = options.extra.get("image_size")
    if size is None:
        return default
    size = int(size)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {size}")
    return size


def _cnn_workload(
    name: str,
    p: float,
    options: BenchOptions,
    base: nn.Module,
    *,
    batch: int,
    image_size: int,
    baseline: tuple[str, str],
    convert_kwargs: dict[str, Any],
    info: dict[str, Any],
) -> Workload:
    """Baseline + SliceOut flow/prob + controlled (+ patch) variants of the CNN ``base``.

    ``convert_kwargs`` (e.g. ``sites="expand"``) are passed to every converted variant. Every
    variant is a deep copy of ``base`` (same initial weights) and trains on the same batches.
    ``base`` (built on the CPU) is moved to ``options.device``, where the batches are made too.
    """
    lr = options.lr if options.lr is not None else 0.1
    base = base.to(options.device)
    gen = torch.Generator().manual_seed(options.seed + 1)  # CPU generator: same data everywhere
    batches = [
        (
            torch.randn(batch, 3, image_size, image_size, generator=gen).to(options.device),
            torch.randint(0, _CLASSES, (batch,), generator=gen).to(options.device),
        )
        for _ in range(options.num_batches)
    ]
    example_inputs = (batches[0][0],)

    def sliceout(**kwargs: Any) -> Callable[[nn.Module], nn.Module]:
        import sliceout_fx

        merged = sliceout_options(options, {**convert_kwargs, **kwargs})
        return lambda m: sliceout_fx.convert(
            m, p, seed=options.seed, example_inputs=example_inputs, **merged
        )

    variants: dict[str, tuple[str, Callable[[nn.Module], nn.Module]]] = {
        baseline[0]: (baseline[1], lambda m: m),
        "sliceout-flow": (
            "Channel SliceOut, flow normalisation, delayed",
            sliceout(placement="delayed", normalisation="flow"),
        ),
        "sliceout-prob": (
            "Channel SliceOut, probabilistic normalisation, delayed",
            sliceout(placement="delayed", normalisation="probabilistic"),
        ),
        "controlled": (
            "controlled dropout: random channel set, gathered weights (flow, delayed)",
            sliceout(placement="delayed", normalisation="flow", mode="gather"),
        ),
    }
    if _has_patch_scheme():
        variants["sliceout-patch"] = (
            "Patch SliceOut (contiguous spatial window), flow normalisation",
            sliceout(scheme="patch", normalisation="flow"),
        )
    variants["sliceout-capturable"] = (
        "Channel SliceOut, flow, delayed, capturable=True (device-side offsets)",
        sliceout(placement="delayed", normalisation="flow", capturable=True),
    )

    factory = variant_factory(
        base, lambda params: make_sgd(params, lr, options), options.device, options
    )

    return Workload(
        name=name,
        p=p,
        baseline=baseline[0],
        factories={n: factory(n, fn, desc) for n, (desc, fn) in variants.items()},
        batches=batches,
        descriptions={n: desc for n, (desc, _) in variants.items()},
        info={
            **info,
            "batch_size": batch,
            "image_size": image_size,
            "num_classes": _CLASSES,
            "lr": lr,
            "optimizer": _optimizer_name(options).format(lr=lr),
            "convert_kwargs": dict(convert_kwargs),
            "parameters": sum(t.numel() for t in base.parameters()),
            "data": "synthetic: torch.randn images, uniform random labels",
        },
    )


def _no_hidden(name: str, options: BenchOptions, instead: str) -> None:
    if options.hidden is not None:
        raise ValueError(f"workload {name!r} has no hidden width (--hidden); {instead}")


# -------------------------------------------------------------------------------------------- wrn

_WRN_DEPTH, _WRN_WIDEN = 16, 8


def _wrn_shape(options: BenchOptions) -> tuple[int, int]:
    _no_hidden("wrn", options, "use --depth and --widen")
    depth = options.depth or _WRN_DEPTH
    widen = int(options.extra.get("widen") or _WRN_WIDEN)
    if widen < 1:
        raise ValueError(f"widen must be >= 1, got {widen}")
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40...), got {depth}")
    return depth, widen


def _wrn_model(p: float, options: BenchOptions) -> nn.Module:
    from sliceout_lab.models import WideResNet

    depth, widen = _wrn_shape(options)
    torch.manual_seed(options.seed)
    return WideResNet(depth, widen, p, num_classes=_CLASSES)


def _wrn_example(p: float, options: BenchOptions) -> tuple[nn.Module, tuple[Any, ...]]:
    model = _wrn_model(p, options).to(options.device)
    size = _image_size(options, 32)
    return model, (torch.randn(options.batch_size or 64, 3, size, size).to(options.device),)


@register_workload(
    "wrn",
    description=(
        "Wide ResNet (default WRN-16-8; --depth/--widen) with dropout between the convs of every "
        "block, 32x32 synthetic images, batch 64, SGD lr 0.1 Nesterov momentum 0.9 wd 5e-4 "
        "(Appendix F.2.1); SliceOut variants use delayed normalisation"
    ),
    default_ps=CNN_PS,
    example_model=_wrn_example,
)
def wrn_workload(p: float, options: BenchOptions) -> Workload:
    """Standard dropout vs Channel SliceOut (flow / prob, delayed) vs controlled dropout, WRN."""
    depth, widen = _wrn_shape(options)
    base = _wrn_model(p, options)
    return _cnn_workload(
        "wrn",
        p,
        options,
        base,
        batch=options.batch_size or 64,
        image_size=_image_size(options, 32),
        baseline=("dropout", f"standard dropout: WRN-{depth}-{widen} as built"),
        convert_kwargs={},
        info={"model": f"WRN-{depth}-{widen}", "depth": depth, "widen": widen},
    )


# -------------------------------------------------------------------------------- efficientnet_b0


def _torchvision_models() -> Any:
    """``torchvision.models``, or a one-line error saying how to get a working torchvision."""
    try:
        import torchvision.models
    # A torchvision built for another torch fails with RuntimeError (unregistered operators).
    except (ImportError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportError(
            f"the efficientnet_b0 workload needs a working torchvision ({first}); "
            "install torch==2.14.1 torchvision==0.29.1 (pip install 'sliceout-fx[vision]')"
        ) from exc
    return torchvision.models


def _efficientnet_model(options: BenchOptions) -> nn.Module:
    _no_hidden("efficientnet_b0", options, "its width is fixed")
    if options.depth is not None:
        raise ValueError("workload 'efficientnet_b0' has a fixed depth (--depth is for wrn/mlp)")
    models = _torchvision_models()
    torch.manual_seed(options.seed)
    return models.efficientnet_b0(weights=None, num_classes=_CLASSES)


def _efficientnet_example(p: float, options: BenchOptions) -> tuple[nn.Module, tuple[Any, ...]]:
    model = _efficientnet_model(options).to(options.device)
    size = _image_size(options, 96)
    return model, (torch.randn(options.batch_size or 32, 3, size, size).to(options.device),)


@register_workload(
    "efficientnet_b0",
    description=(
        "torchvision EfficientNet-B0 (10 classes, random init) on 96x96 synthetic images, batch "
        "32, SGD lr 0.1 Nesterov momentum 0.9 wd 5e-4 (Appendix F.2.2); baseline = the model as "
        "built (no dropout between convs), SliceOut on the MBConv expand convs, delayed"
    ),
    default_ps=CNN_PS,
    example_model=_efficientnet_example,
)
def efficientnet_b0_workload(p: float, options: BenchOptions) -> Workload:
    """The original EfficientNet-B0 vs SliceOut on its expand convolutions vs controlled dropout."""
    base = _efficientnet_model(options)
    return _cnn_workload(
        "efficientnet_b0",
        p,
        options,
        base,
        batch=options.batch_size or 32,
        image_size=_image_size(options, 96),
        baseline=(
            "original",
            "EfficientNet-B0 as built (no dropout between convs; classifier dropout 0.2)",
        ),
        convert_kwargs={"sites": "expand"},
        info={"model": "torchvision efficientnet_b0"},
    )
