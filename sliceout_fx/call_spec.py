"""The call a traced graph was captured from: which arguments it fixed, and in what order.

``torch.fx`` traces ``forward``'s arguments as graph inputs, or fixes them to constants
(``concrete_args``). Which ones to fix (:func:`specialised_defaults`), how a call's arguments map
onto the graph's positional inputs (:func:`positional_inputs`) and whether a later call is one the
graph was captured for (:class:`CapturedCall`, one of the conversion's guards) live here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "CapturedCall",
    "bind_arguments",
    "forward_parameters",
    "positional_inputs",
    "specialised_defaults",
]


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


def forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
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
    params = forward_parameters(model)
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
        params = tuple(forward_parameters(model))
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
        return bind_arguments(self.params, args, kwargs)


def bind_arguments(
    params: Sequence[inspect.Parameter], args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """A call's given arguments by name, as ``forward`` (without ``self``) binds them.

    Raises:
        TypeError: the call does not fit the signature (the model's own error).
    """
    return dict(inspect.Signature(list(params)).bind(*args, **kwargs).arguments)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return repr(value)
