"""Stage 1, capture: turn a model into fx graphs, once per training mode.

Python code that reads ``self.training`` (``F.dropout(x, p, self.training)``, stochastic depth) is
frozen into the graph at trace time, so we trace twice: the *train* graph is analysed and rewritten,
the *eval* graph is what inference runs. Modules that symbolic tracing cannot see through, or whose
``training``-dependent behaviour must stay live, can be kept as leaves (called as a whole).
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from .adapters import traceable_forward
from .errors import UntraceableModelError

LeafSpec = Iterable[type[nn.Module] | str]


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

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        replacement = traceable_forward(m)
        if replacement is not None and not self.is_leaf_module(m, name):
            forward = functools.partial(replacement, m)
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
    passes as ``None``) and that has a constant default (``None``, a flag, a number, a string).

    Traced as proxies, ``mask=None`` would take the ``if mask is not None`` branch (the graph
    would compute with a mask the model is never given) and ``is_causal=False`` could not be
    tested at all. Specialised, they take the branch the example takes, and a later call that
    passes another value fails with fx's own assertion.
    """
    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return concrete_args
    if isinstance(example_inputs, dict):
        given = {k for k, v in example_inputs.items() if v is not None}
    elif example_inputs is None:
        given = {params[0].name} if params else set()
    else:
        given = {p.name for p, v in zip(params, example_inputs) if v is not None}  # noqa: B905
    concrete = dict(concrete_args or {})
    for param in params:
        named = param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        constant = param.default is None or isinstance(param.default, (bool, int, float, str))
        if named and constant and param.name not in given and param.name not in concrete:
            concrete[param.name] = param.default
    return concrete or None


def trace(
    model: nn.Module,
    *,
    leaf_modules: LeafSpec = (),
    training: bool,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` in the given training mode, restoring its mode afterwards.

    Raises:
        UntraceableModelError: with the failing source line and the module to keep as a leaf.
    """
    was_training = model.training
    model.train(training)
    tracer = SliceOutTracer(leaf_modules)
    try:
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
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    return gm
