"""What a symbolic trace must not lose: buffers the forward mutates, and checkpoint calls.

``torch.fx`` runs the forward on proxies and records the tensor ops it sees. Two things the
forward does happen *beside* those ops and would silently vanish from the graph:

* a buffer the forward mutates in Python (``self.steps += 1``, a running mean updated in place)
  is changed once, during tracing, and never by the graph; :func:`buffer_assignments_recorded`
  and :func:`keep_in_place_methods` turn such mutations into graph ops that run at every call;
* ``torch.utils.checkpoint`` is traced through: the graph keeps every activation the checkpoints
  were meant to free; :func:`checkpoint_calls_noted` lets the front end see that it happened.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "CHECKPOINTED",
    "assign_buffer",
    "buffer_assignments_recorded",
    "call_in_place",
    "checkpoint_calls_noted",
    "keep_in_place_methods",
]

#: ``GraphModule.meta`` key: whether the traced forward called ``torch.utils.checkpoint``,
#: whose recomputation a captured graph cannot keep (it is traced through).
CHECKPOINTED = "sliceout_checkpointed"


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


def keep_in_place_methods(graph: fx.Graph) -> None:
    """In-place method calls become :func:`call_in_place`: their effect is the point."""
    for node in graph.nodes:
        method = str(node.target)
        if node.op == "call_method" and method.endswith("_") and not method.startswith("_"):
            node.op, node.target = "call_function", call_in_place
            node.args = (method, *node.args)


@contextlib.contextmanager
def buffer_assignments_recorded(tracer: fx.Tracer) -> Iterator[None]:
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
def checkpoint_calls_noted() -> Iterator[list[bool]]:
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
