"""Block-wise conversion: slice each repeated layer of a model that cannot be converted whole.

A HuggingFace model is more than its forward: ``generate()``, ``save_pretrained()``, its config,
``Trainer`` and PEFT all expect the model object and its class. So instead of replacing the model
by a graph module, each repeated block (an entry of a ``ModuleList``/``Sequential`` of identical
layers: ``BertLayer``, ``GPT2Block``, ``LlamaDecoderLayer``...) is captured with ``torch.export``,
analysed and rewritten on its own, and the block object's class is swapped for a subclass whose
``forward`` runs the sliced graph in training and the block's own code otherwise (the mechanism of
:mod:`sliceout_fx.module`, which the fx front end uses for whole models). Parameter names,
``state_dict`` keys, the config and the model class are untouched, and eval runs the original code
(KV caches, attention masks and all).

A block graph is specialised on the structure of the call (which arguments are ``None``, flags)
and dynamic in every size. A call with a structure not seen at conversion (an attention mask that
was ``None`` in the example, say) is exported and rewritten on first use, with the same sites and
sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from ._probe import untouched
from .capture import example_inputs_error, module_stack
from .capture_export import INNER, ExportedCall, call_key, export_call, fill_leaves
from .config import SliceOutConfig
from .errors import SliceOutConfigError, UntraceableModelError
from .guards import hooked_modules, recording_reads
from .module import Conversion, install
from .options import is_huggingface_model
from .sampling import SAMPLER_NAME

logger = logging.getLogger(__name__)

#: Graphs one layer keeps for input sizes its export was specialised on (a recurrent layer's
#: loop unrolled for each sequence length); past that, the layer trains at full width.
RESIZED_LIMIT = 32

__all__ = [
    "BlockAnalysis",
    "BlockConversion",
    "analyse_blocks",
    "convert_blocks",
    "find_blocks",
    "is_huggingface_model",
]


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated layers: entries of a ``ModuleList``/``Sequential`` of one class with a layer
    (a Linear or a convolution).

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
        if len(kinds) != 1 or not any(_is_layer(m) for m in children[0][1].modules()):
            continue
        for child_name, child in children:
            path = f"{name}.{child_name}" if name else child_name
            found.append((path, child))
            inside.append(path)
    return found


def _is_layer(module: nn.Module) -> bool:
    """A module whose rule is a layer (a linear or a convolution), or HF's ``Conv1D``."""
    from .rules import module_rule

    # A subclass with its own forward (Falcon's FalconLinear) still marks a block of layers.
    rules = (module_rule(c) for c in type(module).__mro__ if issubclass(c, nn.Module))
    return any(r is not None and r.is_layer for r in rules) or _is_hf_conv1d(module)


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def record_calls(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], example_inputs: Any
) -> dict[str, tuple[tuple, dict[str, Any]]]:
    """Run ``model`` once in training mode and keep the first call of every block."""
    calls: dict[str, tuple[tuple, dict[str, Any]]] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, (args, kwargs))

        return hook

    # The user's hooks run in this real call (a sharding wrapper's gather is one of them).
    hooks = [
        block.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, block in blocks
    ]
    try:
        with module_stack(model) as stack, untouched(model, training=True):
            try:
                if isinstance(example_inputs, dict):
                    model(**example_inputs)
                else:
                    model(*example_inputs)
            except Exception as error:  # noqa: BLE001 - named with its module and line
                raise example_inputs_error(model, example_inputs, error, list(stack)) from error
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


class BlockConversion(Conversion):
    """A converted layer: its sampler, and one sliced graph per call structure seen in training.

    The graphs share the sites (and the sampler) of the first call's analysis; a call with a new
    structure is exported and rewritten on first use.
    """

    kind = "block"
    built_fields = ("analysis", "graphs", "resized")

    def __init__(
        self,
        config: SliceOutConfig,
        original_class: type,
        name: str,
        example_call: tuple[tuple, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(config, original_class, name)
        self.analysis: Any = None  # sliceout_fx.api.Analysis of the first call
        self.graphs: dict[tuple, _BlockGraph] = {}  # call_key -> its graph
        # (call_key, specialised sizes) -> graph, for calls whose sizes the first graph of their
        # structure was specialised on differently (a loop over the sequence unrolled)
        self.resized: dict[tuple, _BlockGraph] = {}
        self.example_call = example_call

    @property
    def sites(self) -> list:
        return self.analysis.sites

    @property
    def report(self) -> Any:
        return self.analysis.report

    @property
    def sliced_graph(self) -> fx.GraphModule:
        return next(iter(self.graphs.values())).gm

    @property
    def full_graph(self) -> fx.GraphModule | None:
        return None  # eval and full-width training run the layer's own forward

    # -- graphs ----------------------------------------------------------------------------------

    def build(self, module: nn.Module, args: tuple | None, kwargs: dict | None) -> None:
        if args is None:
            if self.example_call is None:
                raise UntraceableModelError(f"{self.name}: no call to export the layer from")
            args, kwargs = self.example_call
        exported = export_call(module, args, kwargs or {}, training=True)
        self.adopt(module, exported, _analyse(exported, self.name, module, self.config))

    def adopt(self, module: nn.Module, exported: ExportedCall, analysis: Any) -> None:
        """Take ``analysis`` of ``exported`` as the layer's sites; its sliced graph as the first."""
        from .rewrite import build_sampler

        self.analysis = analysis
        self.graphs, self.resized = {}, {}
        device = next(module.parameters()).device
        self.use_sampler(module, build_sampler(analysis.sites, self.config).to(device))
        self.graphs[exported.key] = self._sliced_graph(module, exported, analysis)
        if self.example_call is None:  # the conversion's small example, not a training batch
            self.example_call = _stored_call(exported)

    def _sliced_graph(
        self, module: nn.Module, exported: ExportedCall, analysis: Any = None
    ) -> _BlockGraph:
        """Analyse and rewrite one exported call with the layer's sites and sampler."""
        from .rewrite import rewrite_training_graph

        if analysis is None:
            analysis = _analyse(exported, self.name, module, self.config)
        ours = [(s.name, s.units, s.width) for s in analysis.sites]
        first = [(s.name, s.units, s.width) for s in self.sites]
        if ours != first:
            raise UntraceableModelError(
                f"{self.name}: a call with another structure gives other sites ({ours} vs "
                f"{first}); convert with example_inputs shaped like the training batches"
            )
        gm = analysis.train_gm
        gm.add_submodule(SAMPLER_NAME, self.sampler)
        hooked_calls, unhookable = _hooked_calls(gm, module, self.name)
        rewrite_training_graph(gm, analysis.dep, analysis.sites, self.config, hooked_calls)
        _share_children(gm, module, {path.split(".")[0] for path in hooked_calls.values()})
        if unhookable:
            self.fall_back(
                f"hooks are registered on {unhookable[:3]}, which its exported graph computes "
                "in more than one op, so they cannot fire around the sliced ops (hooks on a "
                "single layer - a Linear, a norm - or on the converted layer itself can)"
            )
        return _BlockGraph(gm, exported)

    def run(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        key, tensors = call_key(args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._graph_for_new_structure(module, args, kwargs)
        elif entry.call.specialised and not entry.call.fits(tensors):
            entry = self._graph_for_new_sizes(module, key, tensors, args, kwargs)
            if entry is None:
                return self.original_class.forward(module, *args, **kwargs)
        # `.forward`: the graph module has no hooks, and its generated code is what dynamo inlines.
        return entry.call.unflatten_output(entry.gm.forward(*tensors))

    def _graph_for_new_sizes(
        self, module: nn.Module, key: tuple, tensors: list, args: tuple, kwargs: dict
    ) -> _BlockGraph | None:
        """A graph for a call whose sizes the graph of its structure was specialised against.

        ``None`` past :data:`RESIZED_LIMIT` captures: the layer then trains at full width.
        """
        sized = (key, self.graphs[key].call.sizes(tensors))
        entry = self.resized.get(sized)
        if entry is None or not entry.call.fits(tensors):
            if len(self.resized) >= RESIZED_LIMIT:
                self.fall_back(
                    f"its exported graph is specialised on input sizes (a Python loop over the "
                    f"sequence, say), and {RESIZED_LIMIT} sizes have been captured already"
                )
                return None
            entry = self._graph_for_new_structure(module, args, kwargs)
            self.resized[(key, entry.call.sizes(tensors))] = entry
        self.graphs[key] = entry
        return entry

    @torch.compiler.disable
    def _graph_for_new_structure(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> _BlockGraph:
        """The graph of a call structure not seen yet: exported and rewritten on first use."""
        logger.info("sliceout_fx: exporting %s for a new call structure", self.name)
        with self.capturing(module):  # export must see the layer's own forward
            exported = export_call(module, args, kwargs, training=True)
        return self._sliced_graph(module, exported)

    # -- copies ----------------------------------------------------------------------------------

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), "example_call": self.example_call}

    @classmethod
    def from_recipe(cls, original_class: type, recipe: dict[str, Any]) -> BlockConversion:
        state = cls(recipe["config"], original_class, recipe["name"], recipe["example_call"])
        state.enabled = recipe["enabled"]
        state.load_draw_state(recipe["draws"])
        return state


def _stored_call(exported: ExportedCall) -> tuple[tuple, dict[str, Any]]:
    """The exported call's arguments, detached: what a copy of the layer is exported from."""
    tensors = [t.detach() for t in exported.example_inputs]
    args, kwargs = pytree.tree_unflatten(
        fill_leaves(exported.spec, tensors), exported.spec.treespec
    )
    return tuple(args), dict(kwargs)


def _share_children(gm: fx.GraphModule, block: nn.Module, also: set[str] = frozenset()) -> None:
    """Point the graph module at the block's real children, not fx's copied attribute stubs.

    ``also``: children the graph reads as modules (to fire their hooks) though it may hold no stub.
    """
    for name in [*gm._modules, *also]:
        if name in block._modules:
            gm._modules[name] = block._modules[name]


def _hooked_calls(
    gm: fx.GraphModule, block: nn.Module, prefix: str
) -> tuple[dict[fx.Node, str], list[str]]:
    """The op of each hooked submodule of ``block`` in its exported graph, by module path.

    Export inlines submodule calls; a node's ``nn_module_stack`` says which calls it belongs to.
    A submodule computed by exactly one op (a Linear, a norm) gets that op wrapped in its hooks;
    the paths of hooked submodules made of more ops are returned second.
    """
    hooked = hooked_modules(block)
    if not hooked:
        return {}, []
    ops: dict[str, list[fx.Node]] = {path: [] for path in hooked}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        for model_path, _ in (node.meta.get("nn_module_stack") or {}).values():
            path = model_path.removeprefix(prefix + ".") if model_path != prefix else ""
            if path in ops:
                ops[path].append(node)
    calls, unhookable = {}, []
    for path, nodes in ops.items():
        first = nodes[0].args[0] if len(nodes) == 1 and nodes[0].args else None
        if isinstance(first, fx.Node) and first.op != "get_attr":
            calls[nodes[0]] = path
        elif nodes:
            unhookable.append(path)
    return calls, unhookable


@dataclass
class BlockAnalysis:
    """One repeated block, its first training call as exported, and the analysis of that call."""

    name: str
    block: nn.Module
    exported: ExportedCall
    analysis: Any  # sliceout_fx.api.Analysis
    config: SliceOutConfig  # the model's config, its site names and rates narrowed to this block
    reads: Any = None  # what the block's forward read while it was exported (guards)


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
    configs = block_configs(config, [name for name, _ in blocks])
    calls = record_calls(model, blocks, example_inputs)
    found = []
    for name, block in blocks:
        with recording_reads(block, [(block, "gradient_checkpointing")]) as reads:
            exported = export_call(block, *calls[name], training=True)
        analysis = _analyse(exported, name, block, configs[name])
        found.append(BlockAnalysis(name, block, exported, analysis, configs[name], reads))
    return found


def block_configs(config: SliceOutConfig, names: Sequence[str]) -> dict[str, SliceOutConfig]:
    """``config`` for each block, with a site list and a rate mapping cut to that block's names.

    Site names are model paths (``model.layers.3.mlp.gate_proj``) but each block is analysed on
    its own, so a list naming sites of every layer is split up here; a name under no block is an
    error now rather than a site silently left out.
    """
    listed = None if isinstance(config.sites, str) else list(config.sites)
    rates = config.p if isinstance(config.p, Mapping) else None
    named = set(listed or ()) | set(rates or ())
    stray = sorted(n for n in named if not any(n.startswith(f"{b}.") for b in names))
    if stray:
        raise SliceOutConfigError(
            f"site name(s) {stray} are in none of the converted layers {_shorten(names)}; this "
            "model is converted layer by layer, so only sites inside those layers can be named "
            "(sliceout_fx.explain(model) lists them)"
        )
    out = {}
    for block in names:
        mine = {n for n in named if n.startswith(f"{block}.")}
        out[block] = replace(
            config,
            sites=config.sites if listed is None else [n for n in listed if n in mine],
            p=config.p if rates is None else {n: r for n, r in rates.items() if n in mine},
        )
    return out


def _shorten(names: Sequence[str]) -> str:
    return str(list(names)) if len(names) <= 3 else f"[{names[0]!r}, ..., {names[-1]!r}]"


def _analyse(exported: ExportedCall, name: str, block: nn.Module, config: SliceOutConfig) -> Any:
    from .api import analyse_graph

    rename_module_paths(exported.gm, name)
    return analyse_graph(exported.gm, config, exported.example_inputs, type(block).__name__)


def convert_blocks(
    model: nn.Module, config: SliceOutConfig, example_inputs: Any
) -> list[BlockConversion]:
    """Convert every repeated block of ``model`` in place; returns their conversions."""
    found = analyse_blocks(model, config, example_inputs)
    states = []
    for index, item in enumerate(found):
        # Each block draws its own slices: one seed for all would cut every layer alike.
        own = item.config
        own = own if own.seed is None else replace(own, seed=own.seed + index)
        state = BlockConversion(own, type(item.block), item.name)
        install(item.block, state)
        state.adopt(item.block, item.exported, item.analysis)
        state.captured(item.block, item.reads)
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


def example_inputs_for(model: nn.Module, batch: int = 2, length: int = 12) -> dict[str, Any]:
    """A small batch a HuggingFace model accepts, built from its config.

    The model's main input (``model.main_input_name``: token ids, ``pixel_values``, a speech
    model's ``input_features`` or ``input_values``), floats in the model's dtype and on its
    device; for an encoder-decoder also the decoder's token ids, which T5 and Whisper do not
    derive from the encoder's inputs (BART does, but a training batch passes them anyway).
    Drawn from a generator of its own: converting leaves the global RNG be.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise SliceOutConfigError("pass example_inputs: the model has no config to build them from")
    names = _forward_names(model)
    main = getattr(model, "main_input_name", None)
    if main not in names:
        main = "pixel_values" if "pixel_values" in names else "input_ids"
    device, dtype = _floating_placement(model)
    generator = torch.Generator().manual_seed(0)

    def floats(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    def token_ids(count: int) -> torch.Tensor:
        return torch.randint(0, _vocab_size(model), (batch, count), generator=generator).to(device)

    inputs: dict[str, Any] = {}
    if main == "input_ids":
        ids = token_ids(length)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding, so that attention masks are tensors as in real batches
        # No use_cache=: a training call (Trainer's, say) leaves it at the config's default, and
        # the example should reach the layers with the flags a training step passes them.
        inputs = {"input_ids": ids, "attention_mask": mask}
    elif main == "pixel_values":
        height, width = _pair(getattr(config, "image_size", 32))
        inputs[main] = floats(batch, getattr(config, "num_channels", 3), height, width)
    elif main == "input_features":
        inputs[main] = floats(*_speech_features_shape(model, batch, length))
    elif main == "input_values":  # raw audio: enough samples for `length` feature frames
        ratio = getattr(config, "inputs_to_logits_ratio", 320)
        inputs[main] = floats(batch, ratio * (length + 1))
    else:
        raise SliceOutConfigError(
            f"pass example_inputs: cannot guess {type(model).__name__}'s main input {main!r}"
        )
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in names:
        limit = getattr(config, "max_target_positions", None) or length
        inputs["decoder_input_ids"] = token_ids(min(length, limit))
    return inputs


def _floating_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's floating-point weights (HF's ``model.dtype``)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    first = next(model.parameters(), None)
    return (first.device if first is not None else torch.device("cpu")), torch.float32


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        text = getattr(config, "text_config", None) or getattr(config, "decoder", None)
        vocab = getattr(text, "vocab_size", None)
    if vocab is None:
        raise SliceOutConfigError(
            f"pass example_inputs: {type(model).__name__}'s config has no vocab_size to draw "
            "token ids from"
        )
    return int(vocab)


def _pair(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (size, size)


def _speech_features_shape(model: nn.Module, batch: int, length: int) -> tuple[int, ...]:
    """The shape of a speech encoder's ``input_features``: Whisper's or Speech2Text's layout.

    Whisper reads ``(batch, mel bins, frames)`` and insists on exactly two frames per encoder
    position (its two convolutions halve the length once); Speech2Text reads ``(batch, frames,
    features)`` and subsamples by two per convolution.
    """
    config = model.config
    if hasattr(config, "num_mel_bins"):
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return (batch, config.num_mel_bins, frames)
    if hasattr(config, "input_feat_per_channel"):
        features = config.input_feat_per_channel * getattr(config, "input_channels", 1)
        convs = len(getattr(config, "conv_kernel_sizes", (5, 5)))
        return (batch, length * 2**convs, features)
    raise SliceOutConfigError(
        f"pass example_inputs: cannot tell the shape of {type(model).__name__}'s input_features"
    )


def _forward_names(model: nn.Module) -> Sequence[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)
