"""Stage 1, capture: turn a model into its training fx graph.

Python code that reads ``self.training`` (``F.dropout(x, p, self.training)``, stochastic depth) is
frozen into the graph at trace time, so the model is traced in training mode: that graph is
analysed and rewritten, and eval runs the model's own forward. Modules that symbolic tracing
cannot see through, or whose ``training``-dependent behaviour must stay live, can be kept as
leaves (called as a whole); a few are traced through a spelt-out forward instead
(:data:`TRACEABLE_FORWARDS`).
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from . import mha
from ._probe import untouched
from .adapters import is_lora_linear, lora_linear_forward
from .call_spec import forward_parameters
from .capture_effects import (
    CHECKPOINTED,
    buffer_assignments_recorded,
    checkpoint_calls_noted,
    keep_in_place_methods,
)
from .errors import ExampleInputsError, UntraceableModelError
from .functions import functions_kept_whole

LeafSpec = Iterable[type[nn.Module] | str]
#: ``GraphModule.meta`` key: the modules a traced call kept whole, though they can be spelt out.
KEPT_WHOLE = "sliceout_kept_whole"


@dataclass(frozen=True)
class TraceableForward:
    """A forward traced in place of a module's own (the module is passed first)."""

    matches: Callable[[nn.Module], bool]
    forward: Callable[..., Any]
    #: Whether one call (its proxies and constants) can be traced this way; else the module is
    #: kept whole for that call.
    accepts: Callable[[tuple, dict], bool] = lambda args, kwargs: True


#: Code ``torch.fx`` cannot trace (PEFT's LoRA layer reads dtypes) or keeps whole as a ``torch.nn``
#: leaf (``nn.MultiheadAttention`` and the ``nn.Transformer`` modules built of it, whose heads are
#: then cut; see :mod:`sliceout_fx.mha`).
TRACEABLE_FORWARDS = (
    TraceableForward(is_lora_linear, lora_linear_forward),
    TraceableForward(mha.is_decomposable, mha.multihead_attention_forward, mha.accepts_traced_call),
    TraceableForward(
        mha.is_encoder_layer, mha.encoder_layer_forward, mha.accepts_traced_layer_call
    ),
    TraceableForward(mha.is_encoder, mha.encoder_forward, mha.accepts_traced_encoder_call),
    TraceableForward(mha.is_decoder_layer, mha.decoder_layer_forward),
    TraceableForward(mha.is_decoder, mha.decoder_forward, mha.accepts_traced_decoder_call),
    TraceableForward(
        mha.is_transformer, mha.transformer_forward, mha.accepts_traced_transformer_call
    ),
)


def traceable_forward(module: nn.Module) -> TraceableForward | None:
    """The forward traced in place of ``module``'s, or ``None`` to trace the module itself."""
    return next((t for t in TRACEABLE_FORWARDS if t.matches(module)), None)


class SliceOutTracer(fx.Tracer):
    """A symbolic tracer that keeps chosen module types or qualified names as leaves.

    It also remembers which module it was inside when tracing fails, to say which one to make a
    leaf.
    """

    def __init__(self, leaf_modules: LeafSpec = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self.entered: list[tuple[str, type[nn.Module]]] = []  # modules being traced, innermost last
        self.kept_whole: dict[str, str] = {}  # module path -> class, of calls no forward accepted
        #: Buffers the forward mutates: traced as graph values so that the mutation is recorded.
        self.mutable_buffers: set[str] = set()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.mutable_buffers and isinstance(attr_val, torch.Tensor):
            for name, buffer in self.root.named_buffers():
                if buffer is attr_val and name in self.mutable_buffers:
                    if name not in parameter_proxy_cache:
                        parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                    return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _named_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._named_leaf(m, module_qualified_name):
            return True
        if traceable_forward(m) is not None:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        replacement = None if self._named_leaf(m, name) else traceable_forward(m)
        if replacement is not None:
            if not replacement.accepts(args, kwargs):  # this call keeps the module whole
                self.kept_whole[name] = type(m).__name__
                return self.create_proxy("call_module", name, args, kwargs)
            forward = functools.partial(replacement.forward, m)
        self.entered.append((name, type(m)))
        result = super().call_module(m, forward, args, kwargs)
        self.entered.pop()
        return result


def _failing_user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's line that could not be traced."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "<unknown location>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def trace(
    model: nn.Module,
    *,
    leaf_modules: LeafSpec = (),
    training: bool,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` in the given training mode, restoring its mode afterwards.

    Buffers the forward mutates in Python (a step counter, ``self.steps += 1``) are changed by
    symbolic tracing itself, once, and left out of the graph. So a first trace notes which
    buffers it changed and puts them back; if there are any, a second trace follows them as graph
    values and records each mutation as a node (:func:`assign_buffer`, in-place methods kept),
    so that every call of the graph mutates them as the model does. ``GraphModule.meta`` says
    whether the forward called ``torch.utils.checkpoint`` (:data:`CHECKPOINTED`).

    Raises:
        UntraceableModelError: with the failing source line and the module to keep as a leaf.
    """
    gm, mutated = _trace_noting_mutations(model, leaf_modules, training, concrete_args)
    return _trace(model, leaf_modules, training, concrete_args, mutated) if mutated else gm


def _trace_noting_mutations(
    model: nn.Module, leaf_modules: LeafSpec, training: bool, concrete_args: Any
) -> tuple[fx.GraphModule, set[str]]:
    """Trace once; also return the buffers that tracing changed, with their values restored."""
    before = {name: (b, b._version, b.detach().clone()) for name, b in model.named_buffers()}
    try:
        gm = _trace(model, leaf_modules, training, concrete_args, set())
    finally:
        mutated = set()
        for name, (buffer, version, value) in before.items():
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner)
            if module._buffers.get(attribute) is not buffer or buffer._version != version:
                mutated.add(name)
                module._buffers[attribute] = buffer
                with torch.no_grad():
                    buffer.copy_(value)
    return gm, mutated


def _trace(
    model: nn.Module,
    leaf_modules: LeafSpec,
    training: bool,
    concrete_args: dict[str, Any] | None,
    mutable_buffers: set[str],
) -> fx.GraphModule:
    was_training = model.training
    model.train(training)
    tracer = SliceOutTracer(leaf_modules)
    tracer.mutable_buffers = mutable_buffers
    try:
        with (
            functions_kept_whole("fx"),
            buffer_assignments_recorded(tracer),
            checkpoint_calls_noted() as checkpointed,
        ):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        inside = tracer.entered[-1] if tracer.entered else None
        if inside and inside[0]:
            name, cls = inside[0], inside[1].__name__
            hint = (
                f"It failed inside submodule '{name}' ({cls}); keep it whole with "
                f"convert(..., leaf_modules=[{cls}]) or leaf_modules=['{name}']."
            )
        else:
            hint = (
                "It failed in the top-level forward(); move the data-dependent code into a "
                "submodule and pass it in leaf_modules=[...]."
            )
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            f"  at {_failing_user_frame(exc)}\n  {hint}"
        ) from exc
    finally:
        model.train(was_training)
    if mutable_buffers:
        keep_in_place_methods(graph)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta[KEPT_WHOLE] = dict(tracer.kept_whole)
    gm.meta[CHECKPOINTED] = bool(checkpointed)
    return gm


# --- the example call --------------------------------------------------------------------------


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[list[str]]:
    """The qualified names of the submodules being called, innermost last.

    After a failed call the list still holds the modules the failure happened in: their
    forward hooks never ran. The hooks are removed when the block ends.
    """
    stack: list[str] = []
    handles = []

    def enter(name: str) -> Any:
        return lambda module, args: stack.append(name)

    def leave(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            while stack and stack.pop() != name:  # a failure caught inside the model
                pass

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name)))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def describe_inputs(model: nn.Module, example_inputs: Any) -> str:
    """``"x: (2, 10) float32, mask: None"``: each example input named by ``forward``'s argument."""
    if isinstance(example_inputs, Mapping):
        pairs = list(example_inputs.items())
    else:
        inputs = tuple(example_inputs)
        names = [p.name for p in forward_parameters(model)]
        names += [f"input {i}" for i in range(len(names), len(inputs))]
        pairs = list(zip(names, inputs, strict=False))
    return ", ".join(f"{name}: {_describe(value)}" for name, value in pairs) or "no inputs"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__name__


def _user_frame(error: BaseException) -> str | None:
    """The innermost traceback line outside torch below the probing call: the model's code.

    The first frame is the one that caught ``error`` (the probe's own call of the model).
    """
    frames = [
        f for f in traceback.extract_tb(error.__traceback__)[1:] if "/torch/" not in f.filename
    ]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {frame.line}"


def example_inputs_error(
    model: nn.Module, example_inputs: Any, error: BaseException, stack: list[str]
) -> ExampleInputsError:
    """The error to raise when ``model`` fails on ``example_inputs``: shapes, where, why, fix.

    ``stack`` is what :func:`module_stack` held at the failure.
    """
    where = ""
    if stack:
        module = model.get_submodule(stack[-1])
        where = f" in module '{stack[-1]}' ({type(module).__name__}({module.extra_repr()}))"
    line = _user_frame(error)
    if line:
        where += f" at {line}"
    cause = " ".join(str(error).split())  # fx and HF messages span lines
    name, inputs = type(model).__name__, describe_inputs(model, example_inputs)
    return ExampleInputsError(
        f"{name} fails on the example inputs ({inputs}){where}: {type(error).__name__}: {cause}\n"
        "  To fix it, pass example_inputs= that the model accepts: one small training batch "
        f"with the shapes and dtypes of real ones, as a tensor, a tuple of {name}.forward's "
        "positional arguments or a dict of its keyword arguments."
    )


def check_example_call(
    model: nn.Module, example_inputs: Any, concrete_args: Mapping[str, Any] | None = None
) -> None:
    """Run ``model`` once on ``example_inputs``; if it fails, say why in the model's own terms.

    Shape propagation runs the *traced graph*, whose failures read as fx interpreter text about
    graph nodes; the model's own code, run first, names the module and the line instead. The run
    is a probe (eval mode, no autograd, buffers and RNG restored, the root's hooks not called) and
    costs one forward of the small example. ``concrete_args`` the example does not give are
    passed by name, as tracing specialises on them.

    Raises:
        ExampleInputsError: naming the example's shapes, the failing module and line, and the
            underlying error.
    """
    args, kwargs = _example_call(model, example_inputs, concrete_args or {})
    with module_stack(model) as stack, untouched(model, training=False):
        try:
            model.forward(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure here is the example call's
            raise example_inputs_error(model, example_inputs, error, list(stack)) from error


def _example_call(
    model: nn.Module, example_inputs: Any, concrete_args: Mapping[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of the example call, with the concrete arguments it leaves out."""
    if isinstance(example_inputs, Mapping):
        given, args = set(example_inputs), ()
        kwargs = dict(example_inputs)
    else:
        args = tuple(example_inputs)
        given = {p.name for p in forward_parameters(model)[: len(args)]}
        kwargs = {}
    placeholder = getattr(fx._symbolic_trace, "PH", None)
    for name, value in concrete_args.items():
        if name not in given and value is not placeholder:
            kwargs[name] = value
    return args, kwargs


