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
import inspect
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from . import mha
from ._probe import untouched
from .adapters import is_lora_linear, lora_linear_forward
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


def specialised_defaults(
    model: nn.Module, example_inputs: Any, concrete_args: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """``concrete_args`` plus every ``forward`` argument that ``example_inputs`` leaves out (or
    passes as ``None``) and that has a constant default (``None``, a flag, a number, a string),
    and every flag, integer or string the example passes, at the value it passes.

    Traced as proxies, ``mask=None`` would take the ``if mask is not None`` branch (the graph
    would compute with a mask the model is never given) and ``is_causal=False`` could not be
    tested at all. Specialised, they take the branch the example takes; a later call that passes
    another value is seen by the conversion's guards (:class:`CapturedCall`) and captured again.
    Floats stay graph inputs: they are values to compute with, rarely switches.
    """
    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return concrete_args
    if isinstance(example_inputs, dict):
        values = dict(example_inputs)
    elif example_inputs is None:
        values = {params[0].name: _PROXIED} if params else {}
    else:
        values = {p.name: v for p, v in zip(params, example_inputs)}  # noqa: B905
    concrete = dict(concrete_args or {})
    for param in params:
        named = param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        if not named or param.name in concrete:
            continue
        value = values.get(param.name)
        if value is None:
            constant = param.default is None or isinstance(param.default, (bool, int, float, str))
            if constant:
                concrete[param.name] = param.default
        elif isinstance(value, (bool, int, str)) and type(value) is not float:
            concrete[param.name] = value
    return concrete or None


_PROXIED = object()  # the guessed first input: traced, whatever it is


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


#: ``GraphModule.meta`` key: whether the traced forward called ``torch.utils.checkpoint``,
#: whose recomputation a captured graph cannot keep (it is traced through).
CHECKPOINTED = "sliceout_checkpointed"
#: ``GraphModule.meta`` key: buffers the graph mutates.
MUTATED_BUFFERS = "sliceout_mutated_buffers"


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
            _buffer_assignments_recorded(tracer),
            _checkpoint_calls_noted() as checkpointed,
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
        _keep_in_place_methods(graph)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta[KEPT_WHOLE] = dict(tracer.kept_whole)
    gm.meta[CHECKPOINTED] = bool(checkpointed)
    gm.meta[MUTATED_BUFFERS] = sorted(mutable_buffers)
    return gm


def assign_buffer(buffer: torch.Tensor, value: Any) -> None:
    """``module.<buffer> = value`` as a graph op: the value is written into the buffer.

    Written in place, without autograd history (a buffer is state, not a graph input), so that
    the graph, which reads the buffer object, sees the new value at its next call.
    """
    if value is not buffer:
        with torch.no_grad():
            buffer.copy_(value)


def call_in_place(method: str, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``tensor.<method>(*args)`` for an in-place method: a graph op dead-code elimination keeps."""
    return getattr(tensor, method)(*args, **kwargs)


fx.node._side_effectful_functions.update({assign_buffer, call_in_place})


def _keep_in_place_methods(graph: fx.Graph) -> None:
    """In-place method calls become :func:`call_in_place`: their effect is the point."""
    for node in graph.nodes:
        method = str(node.target)
        if node.op == "call_method" and method.endswith("_") and not method.startswith("_"):
            node.op, node.target = "call_function", call_in_place
            node.args = (method, *node.args)


@contextlib.contextmanager
def _buffer_assignments_recorded(tracer: SliceOutTracer) -> Iterator[None]:
    """While tracing, ``module.<buffer> = <traced value>`` becomes an :func:`assign_buffer` node."""
    original = nn.Module.__setattr__

    def setattr_(module: nn.Module, name: str, value: Any) -> None:
        buffers = module.__dict__.get("_buffers")
        if isinstance(value, fx.Proxy) and buffers is not None and name in buffers:
            path = tracer.path_of_module(module)
            target = f"{path}.{name}" if path else name
            buffer = tracer.create_proxy("get_attr", target, (), {})
            tracer.create_proxy("call_function", assign_buffer, (buffer, value), {})
            return
        original(module, name, value)

    nn.Module.__setattr__ = setattr_  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__setattr__ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _checkpoint_calls_noted() -> Iterator[list[bool]]:
    """Note whether ``torch.utils.checkpoint`` runs, whichever way it is reached.

    Code calls ``torch.utils.checkpoint.checkpoint`` (looked up at call time), or a name it
    imported, which reaches the module's internal helpers; each entry point present in this
    version of torch is wrapped.
    """
    from torch.utils import checkpoint as module

    noted: list[bool] = []
    names = ("checkpoint", "_checkpoint_impl", "_checkpoint_without_reentrant_generator")
    originals = {name: getattr(module, name) for name in names if hasattr(module, name)}

    def noting(original: Any) -> Any:
        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            noted.append(True)
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(module, name, noting(original))
    try:
        yield noted
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


# --- the example call --------------------------------------------------------------------------


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []


def positional_inputs(
    model: nn.Module, example_inputs: Any, concrete_args: Mapping[str, Any] | None = None
) -> Any:
    """The example inputs as ``forward``'s positional arguments, in order, for the traced graph.

    A traced graph takes its inputs positionally (one placeholder per argument of ``forward``),
    so a dict of keyword inputs is put in order, and the ``concrete_args`` the example leaves out
    take their places with the values tracing specialised on (not the defaults, which the graph
    asserts against). Other arguments left out get their defaults. Inputs that cannot be put in
    order (a name ``forward`` cannot take by position, a required argument missing) are returned
    as they are: the example call reports them.
    """
    params = _forward_parameters(model)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    if isinstance(example_inputs, Mapping):
        values = dict(example_inputs)
    elif len(example_inputs) <= len(names):
        values = dict(zip(names, example_inputs, strict=False))
    else:
        return example_inputs
    placeholder = getattr(fx._symbolic_trace, "PH", None)
    for name, value in (concrete_args or {}).items():
        if name not in values and value is not placeholder:
            values[name] = value
    if not set(values) <= set(names):
        return example_inputs
    last = max((names.index(k) for k in values), default=-1)
    ordered = []
    for param in positional[: last + 1]:
        if param.name in values:
            ordered.append(values[param.name])
        elif param.default is not param.empty:
            ordered.append(param.default)
        else:
            return example_inputs
    return tuple(ordered)


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
        names = [p.name for p in _forward_parameters(model)]
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
        given = {p.name for p in _forward_parameters(model)[: len(args)]}
        kwargs = {}
    placeholder = getattr(fx._symbolic_trace, "PH", None)
    for name, value in concrete_args.items():
        if name not in given and value is not placeholder:
            kwargs[name] = value
    return args, kwargs


# --- what the traced graph was specialised on ------------------------------------------------


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "a tensor"
    return "None" if value is None else type(value).__name__


def _same_value(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)


@dataclass
class CapturedCall:
    """How a traced graph was specialised on the call it was captured from.

    ``torch.fx`` bakes the arguments in ``concrete`` (``mask=None``, ``scale=1.0``) into the
    graph, and traces the others as inputs of the kind they had (a tensor, a number). A later
    call that gives a specialised argument another value, or an input of another kind (a mask
    where ``None`` was captured), is not what the graph computes: :meth:`mismatch` says so, and
    the conversion captures again from that call. :meth:`graph_inputs` puts a call's arguments
    in the graph's positional order.
    """

    params: tuple[inspect.Parameter, ...]
    concrete: dict[str, Any]
    kinds: dict[str, str]  # traced argument -> the kind of value it was captured with
    positional: int  # how many positional arguments the captured call passed

    @classmethod
    def of(
        cls, model: nn.Module, inputs: Any, concrete: Mapping[str, Any] | None
    ) -> CapturedCall | None:
        """The call ``inputs`` (a tuple or a dict) as traced with ``concrete``; ``None`` for a
        ``forward(*args, **kwargs)`` whose arguments cannot be named."""
        params = tuple(_forward_parameters(model))
        if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return None
        placeholder = getattr(fx._symbolic_trace, "PH", None)
        fixed = {k: v for k, v in (concrete or {}).items() if v is not placeholder}
        if isinstance(inputs, Mapping):
            given, positional = dict(inputs), 0
        else:
            given = {p.name: v for p, v in zip(params, inputs, strict=False)}
            positional = len(inputs)
        kinds = {}
        for param in params:
            if param.name in fixed:
                continue
            value = given.get(param.name, param.default)
            kinds[param.name] = _kind(None if value is param.empty else value)
        return cls(params, fixed, kinds, positional)

    def mismatch(self, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
        """What in this call the graph was not captured for, or ``None``."""
        if not kwargs and len(args) == self.positional:
            values: Mapping[str, Any] = {p.name: v for p, v in zip(self.params, args)}  # noqa: B905
        else:
            try:
                values = self._bind(args, kwargs)
            except TypeError:
                return None  # the model's own error, raised by graph_inputs
        for param in self.params:
            value = values.get(param.name, param.default)
            if param.name in self.concrete:
                captured = self.concrete[param.name]
                if not _same_value(value, captured):
                    return (
                        f"argument {param.name!r} is {_kind(value)} ({_short(value)}); the "
                        f"training graph was captured with {captured!r}"
                    )
            elif param.name in self.kinds and _kind(value) != self.kinds[param.name]:
                return (
                    f"argument {param.name!r} is {_kind(value)}; the training graph was "
                    f"captured with {self.kinds[param.name]}"
                )
        return None

    def graph_inputs(self, model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        """The call's arguments in the traced graph's order (raises the model's TypeError)."""
        if not kwargs and len(args) == self.positional:
            return args
        return tuple(positional_inputs(model, self._bind(args, kwargs), self.concrete))

    def _bind(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        signature = inspect.Signature(list(self.params))
        return dict(signature.bind(*args, **kwargs).arguments)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return repr(value)
