"""Custom ``torch.autograd.Function`` calls stay one call, their own backward included.

Both captures trace *through* a Function: ``torch.fx`` and ``torch.export`` record the ops of its
``forward`` and drop its ``backward``, so autograd would derive another backward from those ops.
A straight-through estimator (``round`` forward, identity backward) would train with a zero
gradient; BLOOM's GeLU, which saves its input and recomputes the rest in backward, would save
every intermediate. While a model is captured (:func:`functions_kept_whole`), ``Function.apply``
is intercepted: the call becomes one graph node, :func:`apply_function` with the Function's
import name, which at run time applies the Function itself.

Functions defined inside torch are left to torch (checkpointing, for one, has its own handling).
Under ``torch.export`` a Function is kept whole when every argument is a tensor and it returns
one tensor or a tuple of tensors (a custom op stands in for it while exporting); others are traced
through as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["apply_function", "function_name", "functions_kept_whole", "resolve_function"]

#: Functions that cannot be imported by name (defined inside a function), by the name given to
#: them here: they are found in this process only.
_UNIMPORTABLE: dict[str, type[torch.autograd.Function]] = {}
_RESOLVED: dict[str, type[torch.autograd.Function]] = {}
_APPLY = torch.autograd.Function.__dict__["apply"]  # a classmethod (descriptor), restored after


def _original_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    return _APPLY.__get__(None, cls)(*args, **kwargs)

#: Set while a Function runs for real inside a capture (the export stand-in's fake kernel).
_PASS_THROUGH: contextvars.ContextVar[bool] = contextvars.ContextVar("sliceout_fn", default=False)


def function_name(cls: type[torch.autograd.Function]) -> str:
    """``"package.module.Name"``; a Function that import cannot find is remembered under it."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    if "<locals>" in cls.__qualname__:
        _UNIMPORTABLE[name] = cls
    return name


def resolve_function(name: str) -> type[torch.autograd.Function]:
    """The Function class :func:`function_name` named."""
    cls = _RESOLVED.get(name) or _UNIMPORTABLE.get(name)
    if cls is None:
        module, _, qualname = name.rpartition(".")
        while module and cls is None:  # a nested class: the module part is shorter
            try:
                value: Any = importlib.import_module(module)
            except ImportError:
                module, _, head = module.rpartition(".")
                qualname = f"{head}.{qualname}"
                continue
            for part in qualname.split("."):
                value = getattr(value, part)
            cls = value
        if cls is None:
            raise ImportError(f"cannot find the autograd Function {name}")
        _RESOLVED[name] = cls
    return cls


def apply_function(name: str, *args: Any) -> Any:
    """``Function.apply(*args)`` of the Function named ``name``: what a captured call runs."""
    return resolve_function(name).apply(*args)


def _kept(cls: type) -> bool:
    """Functions of user code and libraries are kept whole; torch's own are traced as torch
    intends (``torch.utils.checkpoint`` and friends)."""
    module = getattr(cls, "__module__", "") or ""
    return not (module == "torch" or module.startswith(("torch.", "sliceout_fx.")))


# --------------------------------------------------------------------------------- torch.fx


def _fx_apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
    proxies = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)]
    if not proxies or kwargs or not _kept(cls) or _PASS_THROUGH.get():
        return _original_apply(cls, *args, **kwargs)
    tracer = proxies[0].tracer
    return tracer.create_proxy(
        "call_function", apply_function, (function_name(cls), *args), {}, name=cls.__name__
    )


# ----------------------------------------------------------------------------- torch.export

_LIBRARY = "sliceout"
_OP = "autograd_function"


def _define_stand_in() -> Any:
    """The custom op that holds a Function's place while exporting (its fake kernel runs the
    Function's forward on fake tensors for the output shapes)."""

    @torch.library.custom_op(f"{_LIBRARY}::{_OP}", mutates_args=())
    def stand_in(name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise RuntimeError("the export stand-in of an autograd Function is never run")

    @stand_in.register_fake
    def _(name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        token = _PASS_THROUGH.set(True)
        try:
            with torch.no_grad():
                out = resolve_function(name).apply(*tensors)
        finally:
            _PASS_THROUGH.reset(token)
        _RETURNS_TUPLE[name] = isinstance(out, tuple)
        outs = list(out) if isinstance(out, tuple) else [out]
        # A custom op's outputs may not alias its inputs.
        return [o.clone() if any(o is t for t in tensors) else o for o in outs]

    return stand_in


_STAND_IN: Any = None
#: Whether a Function returns a tuple (else one tensor), as its first export found out.
_RETURNS_TUPLE: dict[str, bool] = {}


def stand_in_op() -> Any:
    """The ``sliceout::autograd_function`` overload (defined on first use)."""
    global _STAND_IN
    if _STAND_IN is None:
        _define_stand_in()
        _STAND_IN = getattr(getattr(torch.ops, _LIBRARY), _OP).default
    return _STAND_IN


def _export_apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
    plain = not kwargs and args and all(isinstance(a, torch.Tensor) for a in args)
    if not plain or not _kept(cls) or _PASS_THROUGH.get():
        return _original_apply(cls, *args, **kwargs)
    name = function_name(cls)
    outs = stand_in_op()(name, list(args))  # the fake kernel records the return structure
    return tuple(outs) if _RETURNS_TUPLE[name] else outs[0]


def replace_stand_ins(gm: fx.GraphModule) -> None:
    """Turn every export stand-in of ``gm`` into an :func:`apply_function` call (in place).

    The stand-in returns a list, read by ``getitem`` nodes; the call returns what the Function
    returns, so for a single tensor the ``getitem(.., 0)`` goes.
    """
    if _STAND_IN is None:
        return
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _STAND_IN:
            continue
        name, tensors = node.args
        with gm.graph.inserting_before(node):
            call = gm.graph.create_node(
                "call_function", apply_function, (name, *tensors), name=name.rpartition(".")[2]
            )
        call.meta = dict(node.meta)
        for user in list(node.users):
            if not _RETURNS_TUPLE[name] and user.target is operator.getitem:
                user.replace_all_uses_with(call)
                gm.graph.erase_node(user)
            else:
                user.replace_input_with(node, call)
        gm.graph.erase_node(node)


@contextlib.contextmanager
def functions_kept_whole(capture: str) -> Iterator[None]:
    """Within the block, custom Function calls are captured whole by ``capture`` ("fx" or
    "export"); ``Function.apply`` is restored after it."""
    patched = _fx_apply if capture == "fx" else _export_apply
    torch.autograd.Function.apply = classmethod(patched)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.autograd.Function.apply = _APPLY  # type: ignore[method-assign]
