"""Stage 1, capture: turn a model into fx graphs, once per training mode.

Python code that reads ``self.training`` (``F.dropout(x, p, self.training)``, stochastic depth) is
frozen into the graph at trace time, so we trace twice: the *train* graph is analysed and rewritten,
the *eval* graph is what inference runs. Modules that symbolic tracing cannot see through, or whose
``training``-dependent behaviour must stay live, can be kept as leaves (called as a whole).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

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


def trace(model: nn.Module, *, leaf_modules: LeafSpec = (), training: bool) -> fx.GraphModule:
    """Symbolically trace ``model`` in the given training mode, restoring its mode afterwards.

    Raises:
        UntraceableModelError: with the failing source line and the module to keep as a leaf.
    """
    was_training = model.training
    model.train(training)
    tracer = SliceOutTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
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
