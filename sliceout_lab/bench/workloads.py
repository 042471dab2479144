"""Benchmark workloads: for one dropout rate ``p``, a baseline and variants to compare with it.

A workload is registered under a name with :func:`register_workload`. Its builder takes ``p`` and
:class:`BenchOptions` and returns a :class:`Workload` whose variants are built lazily (so a single
variant can be built alone, e.g. in a fresh process for an RSS probe). Every variant starts from the
same initial weights and sees the same sequence of batches, so only the dropout scheme differs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..harness import Arm, Batch, cross_entropy

__all__ = [
    "BenchOptions",
    "Workload",
    "WorkloadSpec",
    "compiled_if_asked",
    "get_workload",
    "make_adam",
    "on_device",
    "register_workload",
    "resolve_device",
    "sliceout_options",
    "variant_factory",
    "workload_names",
]

DEFAULT_PS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def resolve_device(device: str | torch.device) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; check that a CUDA device exists.

    Returns the device as a string (it goes into the results JSON). A CUDA device that this
    process cannot use is a one-line ``ValueError`` saying what to do instead.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: choose auto, cpu or cuda") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise ValueError(
                f"device {str(dev)!r} requested but CUDA is not available: {why}; "
                "run with --device cpu (or --device auto), or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(dev)!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible; use --device cuda"
            )
    return str(dev)


@dataclass
class BenchOptions:
    """Knobs shared by workloads; ``None`` means "the workload's (paper) default"."""

    batch_size: int | None = None
    lr: float | None = None
    hidden: int | None = None
    """Width override (MLP hidden units); small values make quick tests."""
    depth: int | None = None
    fused_adam: bool = False
    foreach: bool = False
    seed: int = 0
    num_batches: int = 4
    """Synthetic batches generated up front and cycled: no data loading inside the timed step."""
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    """Where models, batches and steps live: ``"cpu"``, ``"cuda"`` (``"cuda:N"``) or ``"auto"``
    (CUDA when available); resolved and checked on construction (see :func:`resolve_device`)."""
    compile: bool = False
    """``torch.compile`` every variant, the baseline too (each is compared in the same mode)."""
    compile_mode: str | None = None
    """``torch.compile(mode=...)``, e.g. ``"reduce-overhead"`` (CUDA graphs); implies compile."""
    compile_backend: str = "inductor"
    capturable: bool = False
    """Convert the SliceOut variants with ``capturable=True`` (device-side slice offsets)."""

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.fused_adam and self.foreach:
            raise ValueError("choose at most one of fused Adam and foreach Adam")
        for name in ("batch_size", "hidden", "depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {self.num_batches}")
        if self.compile_mode is not None:
            self.compile = True


@dataclass
class Workload:
    """The variants of one workload at one dropout rate, built on demand, and their batches."""

    name: str
    p: float
    baseline: str
    factories: dict[str, Callable[[], Arm]]
    batches: list[Batch]
    """Generated up front and cycled by the bench: no data loading inside the timed step."""
    descriptions: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def variant_names(self) -> list[str]:
        return list(self.factories)

    def build(self, names: Sequence[str] | None = None) -> dict[str, Arm]:
        """Build the named variants (all by default); the baseline is always included, first."""
        wanted = self.variant_names if names is None else list(names)
        unknown = [n for n in wanted if n not in self.factories]
        if unknown:
            raise ValueError(
                f"unknown variant(s) {', '.join(unknown)} for workload {self.name!r}; "
                f"choose from {', '.join(self.variant_names)}"
            )
        ordered = [self.baseline] + [
            n for n in self.variant_names if n in wanted and n != self.baseline
        ]
        return {n: self.factories[n]() for n in ordered}


@dataclass(frozen=True)
class WorkloadSpec:
    """A registered workload: its builder plus what the CLI needs to present it."""

    name: str
    build: Callable[[float, BenchOptions], Workload]
    description: str
    default_ps: tuple[float, ...] = DEFAULT_PS
    example_model: Callable[[float, BenchOptions], tuple[nn.Module, tuple[Any, ...]]] | None = None
    """Builds the untransformed model and example inputs (used by ``sliceout-fx explain``)."""


_REGISTRY: dict[str, WorkloadSpec] = {}


def register_workload(
    name: str,
    *,
    description: str,
    default_ps: Iterable[float] = DEFAULT_PS,
    example_model: Callable[[float, BenchOptions], tuple[nn.Module, tuple[Any, ...]]] | None = None,
    replace: bool = False,
) -> Callable[
    [Callable[[float, BenchOptions], Workload]], Callable[[float, BenchOptions], Workload]
]:
    """Decorator registering a ``(p, options) -> Workload`` builder under ``name`` (``replace``:
    over one already registered, else that is an error)."""

    def decorate(
        fn: Callable[[float, BenchOptions], Workload],
    ) -> Callable[[float, BenchOptions], Workload]:
        if name in _REGISTRY and not replace:
            raise ValueError(f"workload {name!r} is already registered")
        _REGISTRY[name] = WorkloadSpec(
            name=name,
            build=fn,
            description=description,
            default_ps=tuple(default_ps),
            example_model=example_model,
        )
        return fn

    return decorate


def get_workload(name: str) -> WorkloadSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown workload {name!r}; choose from {', '.join(workload_names())}"
        ) from None


def workload_names() -> list[str]:
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- shared building blocks


def make_adam(
    params: Iterable[torch.Tensor], lr: float, options: BenchOptions
) -> torch.optim.Optimizer:
    """Adam with the paper's betas/eps (Table 4); implementation chosen by the options.

    The optimizer step touches every parameter whatever the dropout scheme, so its implementation
    (for-loop, foreach, fused) changes how much of the step SliceOut can save.
    """
    kwargs: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    if options.fused_adam:
        kwargs["fused"] = True
    elif options.foreach:
        kwargs["foreach"] = True
    return torch.optim.Adam(params, **kwargs)


def compiled_if_asked(model: nn.Module, options: BenchOptions | None) -> Callable[..., Any]:
    """What a variant's step calls: the model, or ``torch.compile(model)`` under ``--compile``.

    The optimizer keeps the model's own parameters either way.
    """
    if options is None or not options.compile:
        return model
    return torch.compile(model, mode=options.compile_mode, backend=options.compile_backend)


def sliceout_options(options: BenchOptions, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``convert`` keyword arguments with ``capturable`` added where the variant allows it.

    Controlled dropout's index sets and Patch SliceOut's windows are drawn on the host, so those
    variants stay as they are under ``--capturable``.
    """
    host_only = kwargs.get("mode") == "gather" or kwargs.get("scheme") == "patch"
    if options.capturable and not host_only:
        return {**kwargs, "capturable": True}
    return kwargs


def variant_factory(
    base: nn.Module,
    make_optimizer: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer],
    device: str | torch.device | None = None,
    options: BenchOptions | None = None,
    loss: Callable[[Callable[..., Any], Batch], torch.Tensor] = cross_entropy,
) -> Callable[[str, Callable[[nn.Module], nn.Module], str], Callable[[], Arm]]:
    """``factory(name, transform, description)`` -> a builder of that variant's :class:`Arm`.

    Each variant is ``transform`` applied to its own deep copy of ``base`` (so all start from the
    same weights), with its own optimizer. The transformed model is moved to ``device`` (default:
    where ``base``'s parameters are), see :func:`on_device`, and its forward is compiled when
    ``options.compile`` (see :func:`compiled_if_asked`).
    """
    if device is None:
        device = next((t.device for t in base.parameters()), torch.device("cpu"))

    def factory(
        name: str, transform: Callable[[nn.Module], nn.Module], description: str
    ) -> Callable[[], Arm]:
        def build() -> Arm:
            model = on_device(transform(copy.deepcopy(base)), device)
            model.train()
            return Arm(
                name=name,
                model=model,
                optimizer=make_optimizer(model.parameters()),
                loss=loss,
                forward=compiled_if_asked(model, options),
                description=description,
            )

        return build

    return factory


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model.to(device)``: a no-op for what is there already.

    ``convert`` of a model that is already on the GPU can leave tensors it creates itself (the
    probabilistic normalisation's ``1 / P(keep)`` buffers) on the CPU; moving the converted model
    puts them next to the weights.
    """
    return model.to(device)


def _convert(model: nn.Module, p: float, **kwargs: Any) -> nn.Module:
    """Call the core library's ``convert`` (imported late: the bench must load without it)."""
    import sliceout_fx

    return sliceout_fx.convert(model, p, **kwargs)


# ------------------------------------------------------------------------------------------- mlp

_MLP_IN, _MLP_CLASSES = 784, 10


def _mlp_model(p: float, options: BenchOptions) -> nn.Module:
    from sliceout_lab.models import paper_mlp

    return paper_mlp(
        p,
        hidden=options.hidden or 2048,
        depth=options.depth or 3,
        in_features=_MLP_IN,
        num_classes=_MLP_CLASSES,
    )


def _mlp_example(p: float, options: BenchOptions) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(options.seed)
    model = _mlp_model(p, options).to(options.device)
    return model, (torch.randn(options.batch_size or 256, _MLP_IN).to(options.device),)


@register_workload(
    "mlp",
    description=(
        "the paper's fully connected net (Appendix F.1): 784-2048-2048-2048-10, dropout after each "
        "hidden layer, batch 256, Adam lr 1e-4; synthetic inputs (timing does not depend on data)"
    ),
    example_model=_mlp_example,
)
def mlp_workload(p: float, options: BenchOptions) -> Workload:
    """Standard dropout vs SliceOut (flow / probabilistic) vs controlled dropout, paper MLP."""
    batch = options.batch_size or 256
    lr = options.lr if options.lr is not None else 1e-4
    torch.manual_seed(options.seed)
    # Built on the CPU (same initial weights whatever the device), then moved.
    base = _mlp_model(p, options).to(options.device)
    gen = torch.Generator().manual_seed(options.seed + 1)  # CPU generator: same data everywhere
    batches = [
        (
            torch.randn(batch, _MLP_IN, generator=gen).to(options.device),
            torch.randint(0, _MLP_CLASSES, (batch,), generator=gen).to(options.device),
        )
        for _ in range(options.num_batches)
    ]
    example_inputs = (batches[0][0],)

    factory = variant_factory(
        base, lambda params: make_adam(params, lr, options), options.device, options
    )

    def sliceout(**kwargs: Any) -> Callable[[nn.Module], nn.Module]:
        kwargs = sliceout_options(options, kwargs)
        return lambda m: _convert(m, p, seed=options.seed, example_inputs=example_inputs, **kwargs)

    variants = {
        "dropout": ("standard dropout (the model as built)", lambda m: m),
        "sliceout-flow": (
            "SliceOut, flow normalisation",
            sliceout(normalisation="flow"),
        ),
        "sliceout-prob": (
            "SliceOut, probabilistic normalisation",
            sliceout(normalisation="probabilistic"),
        ),
        "controlled": (
            "controlled dropout: random index set, gathered weights",
            sliceout(mode="gather"),
        ),
        "sliceout-capturable": (
            "SliceOut, flow, capturable=True (device-side offsets, gathered blocks)",
            sliceout(normalisation="flow", capturable=True),
        ),
    }
    return Workload(
        name="mlp",
        p=p,
        baseline="dropout",
        factories={name: factory(name, fn, desc) for name, (desc, fn) in variants.items()},
        batches=batches,
        descriptions={name: desc for name, (desc, _) in variants.items()},
        info={
            "batch_size": batch,
            "lr": lr,
            "hidden": options.hidden or 2048,
            "depth": options.depth or 3,
            "in_features": _MLP_IN,
            "num_classes": _MLP_CLASSES,
            "optimizer": "Adam"
            + (" (fused)" if options.fused_adam else "")
            + (" (foreach)" if options.foreach else ""),
            "data": "synthetic: torch.randn inputs, uniform random labels",
        },
    )


# The CNN workloads (wrn, efficientnet_b0) register themselves on import; torchvision is imported
# only when an EfficientNet workload is built.
from . import cnn_workloads, transformer_workloads  # noqa: E402, F401
