"""Block-wise conversion: slice each repeated layer of a model that cannot be converted whole.

A HuggingFace model is more than its forward: ``generate()``, ``save_pretrained()``, its config,
``Trainer`` and PEFT all expect the model object and its class. So instead of replacing the model
by a graph module, each repeated block (an entry of a ``ModuleList``/``Sequential`` of identical
layers: ``BertLayer``, ``GPT2Block``, ``LlamaDecoderLayer``...) is captured with ``torch.export``,
analysed and rewritten on its own, and the block object's class is swapped for a subclass whose
``forward`` runs the sliced graph in training and the block's own code otherwise. Parameter names,
``state_dict`` keys, the config and the model class are untouched, and eval runs the original code
(KV caches, attention masks and all).

A block graph is specialised on the structure of the call (which arguments are ``None``, flags)
and dynamic in every size. A call with a structure not seen at conversion (an attention mask that
was ``None`` in the example, say) is exported and rewritten on first use, with the same sites and
sampler.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from ._probe import untouched
from .capture_export import INNER, ExportedCall, call_key, export_call
from .config import SliceOutConfig
from .errors import SliceOutConfigError, UntraceableModelError
from .sampling import SAMPLER_NAME

logger = logging.getLogger(__name__)

__all__ = [
    "BlockAnalysis",
    "BlockState",
    "analyse_blocks",
    "convert_blocks",
    "find_blocks",
    "is_huggingface_model",
    "restore_blocks",
]

_STATE = "_sliceout_block"


def is_huggingface_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(model).__mro__
    )


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated layers: entries of a ``ModuleList``/``Sequential`` of one class with a Linear.

    Nested lists (a layer list inside a layer) are not searched again below a found block.
    """
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module.named_children())
        kinds = {type(child) for _, child in children}
        if len(kinds) != 1 or not any(
            isinstance(m, nn.Linear) or _is_hf_conv1d(m) for m in children[0][1].modules()
        ):
            continue
        for child_name, child in children:
            path = f"{name}.{child_name}" if name else child_name
            found.append((path, child))
            inside.append(path)
    return found


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def record_calls(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], example_inputs: Any
) -> dict[str, tuple[tuple, dict[str, Any]]]:
    """Run ``model`` once in training mode and keep the first call of every block."""
    calls: dict[str, tuple[tuple, dict[str, Any]]] = {}
    hooks = []
    for name, block in blocks:

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            calls.setdefault(name, (args, kwargs))

        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with untouched(model, training=True):
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(*example_inputs)
    except Exception as error:
        raise UntraceableModelError(
            f"the example forward of {type(model).__name__} failed ({type(error).__name__}: "
            f"{error}); pass example_inputs= the arguments of one training batch "
            "(a dict of keyword arguments for a HuggingFace model)"
        ) from error
    finally:
        for h in hooks:
            h.remove()
    missing = [name for name, _ in blocks if name not in calls]
    if missing:
        raise UntraceableModelError(
            f"blocks {missing[:3]} were not called by the example forward; pass example_inputs "
            "that run every layer"
        )
    return calls


@dataclass
class _BlockGraph:
    gm: fx.GraphModule
    call: ExportedCall


@dataclass
class BlockState:
    """What a converted block carries (in its ``__dict__``, so ``state_dict`` is unchanged)."""

    name: str
    config: SliceOutConfig
    original_class: type
    analysis: Any  # sliceout_fx.api.Analysis of the first call
    graphs: dict[tuple, _BlockGraph] = field(default_factory=dict)  # call_key -> its graph
    enabled: bool = True

    @property
    def sites(self) -> list:
        return self.analysis.sites


def _sliced_graph(
    block: nn.Module, state: BlockState, exported: ExportedCall, analysis: Any = None
) -> _BlockGraph:
    """Analyse and rewrite one exported call of ``block`` with the block's sites and sampler."""
    from .rewrite import rewrite_training_graph

    if analysis is None:
        analysis = _analyse(exported, state.name, block, state.config)
    ours = [(s.name, s.units, s.width) for s in analysis.sites]
    first = [(s.name, s.units, s.width) for s in state.sites]
    if ours != first:
        raise UntraceableModelError(
            f"{state.name}: a call with another structure gives other sites ({ours} vs {first}); "
            "convert with example_inputs shaped like the training batches"
        )
    gm = analysis.train_gm
    gm.add_submodule(SAMPLER_NAME, getattr(block, SAMPLER_NAME))
    rewrite_training_graph(gm, analysis.dep, analysis.sites, state.config)
    _share_children(gm, block)
    return _BlockGraph(gm, exported)


def _share_children(gm: fx.GraphModule, block: nn.Module) -> None:
    """Point the graph module at the block's real children, not fx's copied attribute stubs."""
    for name in list(gm._modules):
        if name in block._modules:
            gm._modules[name] = block._modules[name]


def _run_sliced(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    state: BlockState = block.__dict__[_STATE]
    key, tensors = call_key(args, kwargs)
    entry = state.graphs.get(key)
    if entry is None:
        entry = state.graphs[key] = _graph_for_new_structure(block, state, args, kwargs)
    # `.forward`: the graph module has no hooks, and its generated code is what dynamo inlines.
    return entry.call.unflatten_output(entry.gm.forward(*tensors))


@torch.compiler.disable
def _graph_for_new_structure(
    block: nn.Module, state: BlockState, args: tuple, kwargs: dict[str, Any]
) -> _BlockGraph:
    """The graph of a call structure not seen yet: exported and rewritten on first use."""
    logger.info("sliceout_fx: exporting %s for a new call structure", state.name)
    state.enabled = False  # export must see the block's own forward
    try:
        exported = export_call(block, args, kwargs, training=True)
    except UntraceableModelError as error:
        if getattr(block, "gradient_checkpointing", False):
            raise UntraceableModelError(
                f"{state.name}: a call structure first seen under gradient checkpointing "
                "cannot be exported there; run one training step before enabling "
                "gradient checkpointing, or convert with example_inputs shaped like the "
                "training batches"
            ) from error
        raise
    finally:
        state.enabled = True
    return _sliced_graph(block, state, exported)


_SUBCLASSES: dict[type, type] = {}


def _sliced_class(cls: type) -> type:
    """``SliceOut<Cls>``: the block's class with a forward that slices in training."""
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: BlockState = self.__dict__[_STATE]
        if self.training and state.enabled:
            return _run_sliced(self, args, kwargs)
        return cls.forward(self, *args, **kwargs)

    subclass = type(
        f"SliceOut{cls.__name__}",
        (cls,),
        {
            "forward": forward,
            "__doc__": f"{cls.__name__} whose training forward runs a SliceOut graph.",
            "__module__": __name__,
        },
    )
    _SUBCLASSES[cls] = subclass
    return subclass


@dataclass
class BlockAnalysis:
    """One repeated block, its first training call as exported, and the analysis of that call."""

    name: str
    block: nn.Module
    exported: ExportedCall
    analysis: Any  # sliceout_fx.api.Analysis


def analyse_blocks(
    model: nn.Module, config: SliceOutConfig, example_inputs: Any
) -> list[BlockAnalysis]:
    """Find the repeated blocks, record one training call of each, export and analyse it."""
    blocks = find_blocks(model)
    if not blocks:
        raise UntraceableModelError(
            f"{type(model).__name__}: found no ModuleList of repeated layers to convert block by "
            "block; convert a submodule that torch.fx can trace instead"
        )
    calls = record_calls(model, blocks, example_inputs)
    found = []
    for name, block in blocks:
        exported = export_call(block, *calls[name], training=True)
        found.append(BlockAnalysis(name, block, exported, _analyse(exported, name, block, config)))
    return found


def _analyse(exported: ExportedCall, name: str, block: nn.Module, config: SliceOutConfig) -> Any:
    from .api import analyse_graph

    rename_module_paths(exported.gm, name)
    return analyse_graph(exported.gm, config, exported.example_inputs, type(block).__name__)


def convert_blocks(
    model: nn.Module, config: SliceOutConfig, example_inputs: Any
) -> list[BlockState]:
    """Convert every repeated block of ``model`` in place; returns their states."""
    from .rewrite import build_sampler

    found = analyse_blocks(model, config, example_inputs)
    states = []
    for index, item in enumerate(found):
        block = item.block
        if _STATE in block.__dict__:
            raise SliceOutConfigError(f"block {item.name} is already converted")
        state = BlockState(item.name, config, type(block), item.analysis)
        device = next(block.parameters()).device
        # Each block draws its own slices: one seed for all would cut every layer alike.
        own = config if config.seed is None else replace(config, seed=config.seed + index)
        block.add_module(SAMPLER_NAME, build_sampler(item.analysis.sites, own).to(device))
        block.__dict__[_STATE] = state
        state.graphs[item.exported.key] = _sliced_graph(block, state, item.exported, item.analysis)
        block.__class__ = _sliced_class(type(block))
        states.append(state)
    return states


def rename_module_paths(gm: fx.GraphModule, prefix: str) -> None:
    """Module paths in node metadata, relative to the model (site names are built from them)."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        node.meta["nn_module_stack"] = {
            key: (_model_path(path, prefix), kind) for key, (path, kind) in stack.items()
        }


def _model_path(path: str, prefix: str) -> str:
    inner = path.removeprefix(INNER).lstrip(".") if path.startswith(INNER) else ""
    return f"{prefix}.{inner}" if inner else prefix


def block_states(model: nn.Module) -> list[BlockState]:
    return [m.__dict__[_STATE] for m in model.modules() if _STATE in m.__dict__]


def restore_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_blocks` in place: original classes, no sampler, no graphs."""
    for module in model.modules():
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        module.__class__ = state.original_class
        if SAMPLER_NAME in module._modules:
            del module._modules[SAMPLER_NAME]
    return model


@contextlib.contextmanager
def blocks_full_width(model: nn.Module) -> Iterator[None]:
    states = block_states(model)
    previous = [s.enabled for s in states]
    for s in states:
        s.enabled = False
    try:
        yield
    finally:
        for s, was in zip(states, previous, strict=True):
            s.enabled = was


def example_inputs_for(model: nn.Module, batch: int = 2, length: int = 12) -> dict[str, Any]:
    """A small batch a HuggingFace model accepts, built from its config."""
    config = getattr(model, "config", None)
    if config is None:
        raise SliceOutConfigError("pass example_inputs: the model has no config to build them from")
    device = next(model.parameters()).device
    if "pixel_values" in _forward_names(model):
        size = getattr(config, "image_size", 32)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, size, size, device=device)}
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise SliceOutConfigError("pass example_inputs: cannot tell what this model reads")
    ids = torch.randint(0, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding, so that attention masks are tensors as in real batches
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "use_cache" in _forward_names(model):
        inputs["use_cache"] = False
    return inputs


def _forward_names(model: nn.Module) -> Sequence[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)
