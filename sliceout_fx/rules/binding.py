"""One op, every dialect: the targets an op has in fx and ATen graphs, and its bound arguments.

``torch.fx`` records an op as a module call, a ``torch``/``F`` function or a tensor method;
``torch.export`` records the ATen overload. A rule names its op once (:func:`dialects`) and reads
its arguments by parameter name through :func:`bind`, so it never depends on which front end built
the graph or on whether the model passed an argument by position, by keyword or not at all.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.operator_schemas import get_signature_for_torch_op

aten = torch.ops.aten

#: Parameter names that differ between a function and its ATen overload, mapped to one name.
_SYNONYMS = {
    "train": "training",
    "self": "input",
    "a": "input",
    "tensor": "input",  # torch.split(tensor, split_size_or_sections, dim)
    "split_size_or_sections": "split_size",
}


def dialects(*names: str) -> tuple[Any, ...]:
    """Every target of the ops ``names`` (ATen names): ATen packet, ``torch``, ``F``, method.

    ``dialects("conv2d")`` is ``(aten.conv2d, torch.conv2d, F.conv2d)``; ``dialects("flatten")``
    adds ``"method:flatten"``. Names without an ATen op (``"float"``) still give their method.
    """
    found: list[Any] = []
    for name in names:
        packet = getattr(aten, name, None)
        candidates = (
            packet if isinstance(packet, torch._ops.OpOverloadPacket) else None,
            getattr(torch, name, None),
            getattr(F, name, None),
        )
        for fn in candidates:
            if callable(fn) and not isinstance(fn, type) and fn not in found:
                found.append(fn)
        if hasattr(torch.Tensor, name):
            found.append(f"method:{name}")
    return tuple(found)


def registry_key(node: fx.Node) -> Any:
    """What a call is registered under: its function, its ATen packet, or ``"method:<name>"``."""
    if node.op == "call_method":
        return f"method:{node.target}"
    return node.target


def fallback_key(target: Any) -> Any:
    """An ATen overload (``aten.add.Tensor``) is also found under its packet (``aten.add``)."""
    return getattr(target, "overloadpacket", None)


def matches(node: Any, targets: tuple[Any, ...]) -> bool:
    """Whether ``node`` calls one of ``targets`` (functions, ATen packets, ``"method:<name>"``)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    key = registry_key(node)
    return key in targets or (fallback_key(key) or key) in targets


def is_in_place(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x += y``, ``aten.mul_.Tensor``: the call writes into its first operand."""
    if node.target in _IN_PLACE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", None) or str(node.target)
    name = name.split(".")[0]
    return name.endswith("_") and not name.startswith("_")


_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def bind(node: fx.Node) -> dict[str, Any]:
    """``node``'s arguments by parameter name, defaults filled in, in either dialect.

    The input tensor is always ``"input"`` (ATen calls it ``self``); a method's varargs sizes
    (``x.view(b, -1)``) are packed into the list parameter (``size=[b, -1]``), as ``aten.view``
    takes them. Raises ``TypeError`` when no known signature accepts the call.
    """
    args, kwargs = tuple(node.args), dict(node.kwargs)
    for signature in _signatures(node):
        bound = _try_bind(signature, args, kwargs)
        if bound is None and len(args) > 2 and node.op == "call_method":
            bound = _try_bind(signature, (args[0], list(args[1:])), kwargs)
        if bound is not None:
            return bound
    signatures = _signatures(node)
    if signatures:
        # A wrapper that takes more than its ATen op (F.max_pool2d's return_indices): positional
        # arguments by the first signature's names, keywords as given.
        names = [_SYNONYMS.get(p, p) for p in signatures[0].parameters]
        return {**dict(zip(names, args, strict=False)), **kwargs}
    raise TypeError(f"no signature of {node.format_node()} accepts its arguments")


def bound_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """One argument of ``node`` by name (``default`` if unknown or the call does not bind)."""
    try:
        return bind(node).get(name, default)
    except TypeError:
        return default


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Replace the argument ``name`` of a call, wherever the trace put it (position or keyword)."""
    for signature in _signatures(node):
        params = [_SYNONYMS.get(p, p) for p in signature.parameters]
        if name not in params or _try_bind(signature, tuple(node.args), dict(node.kwargs)) is None:
            continue
        index = params.index(name)
        if index < len(node.args):
            node.args = (*node.args[:index], value, *node.args[index + 1 :])
        else:
            keyword = list(signature.parameters)[index]
            node.kwargs = {**node.kwargs, keyword: value}
        return
    raise TypeError(f"{node.format_node()} has no argument {name!r}")


def _try_bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, value in arguments.items():
        # One size given to a list parameter (``x.view(-1)``): the list it stands for.
        if isinstance(value, (int, fx.Node)) and _is_list(signature.parameters[name]):
            arguments[name] = [value]
    return {_SYNONYMS.get(k, k): v for k, v in arguments.items()}


def _is_list(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("List[", "typing.List[", "list["))


def _signatures(node: fx.Node) -> list[inspect.Signature]:
    if node.op == "call_method":
        return _method_signatures(str(node.target))
    if node.op == "call_function":
        return _function_signatures(node.target)
    return []


@functools.cache
def _method_signatures(name: str) -> list[inspect.Signature]:
    """A tensor method has its ATen op's signatures, ``self`` first."""
    packet = getattr(aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return [_SELF_ONLY]
    found = []
    for overload in packet.overloads():
        found += get_signature_for_torch_op(getattr(packet, overload)) or []
    return found or [_SELF_ONLY]


_SELF_ONLY = inspect.Signature(
    [
        inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


def _function_signatures(target: Any) -> list[inspect.Signature]:
    try:
        return _cached_function_signatures(target)
    except TypeError:  # unhashable target
        return _lookup_function_signatures(target)


@functools.cache
def _cached_function_signatures(target: Any) -> list[inspect.Signature]:
    return _lookup_function_signatures(target)


def _lookup_function_signatures(target: Any) -> list[inspect.Signature]:
    if target in _OPERATOR_SIGNATURES:
        return [_OPERATOR_SIGNATURES[target]]
    try:
        found = get_signature_for_torch_op(target)
    except Exception:  # not a torch op: an arbitrary function
        found = None
    if found:
        return list(found)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    kinds = {p.kind for p in signature.parameters.values()}
    if kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        # A dispatching wrapper (F.max_pool2d): the ATen op of its name has the signature.
        packet = getattr(aten, getattr(target, "__name__", ""), None)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            return _method_signatures(packet.__name__.split(".")[-1])
    return [signature]


def _binary(*names: str) -> inspect.Signature:
    return inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names]
    )


_OPERATOR_SIGNATURES = {
    **{
        op: _binary("input", "other")
        for op in (
            operator.add,
            operator.iadd,
            operator.sub,
            operator.isub,
            operator.mul,
            operator.imul,
            operator.truediv,
            operator.itruediv,
            operator.pow,
            operator.matmul,
        )
    },
    operator.neg: _binary("input"),
    operator.getitem: _binary("input", "index"),
}


def size_list(node: fx.Node) -> list[Any] | None:
    """The explicit size list of a view/reshape/expand (``None`` for flatten and ``*_as``)."""
    if node.op == "call_module":
        return None
    a = bind(node)
    sizes = a.get("size", a.get("shape"))
    return list(sizes) if isinstance(sizes, (list, tuple)) else None
