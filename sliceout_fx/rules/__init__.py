"""The rule registry: one op family per module, looked up by module type, function or method.

To teach the pass a new op, write an :class:`OpRule` in its own module, give it a ``RULES`` mapping
and add the module to ``_FAMILIES`` below (or call :func:`register_rule` from user code).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from . import (
    attention,
    batchnorm,
    boundary,
    conv,
    dropout,
    elementwise,
    layernorm,
    layout,
    linear,
    padding,
    pooling,
)
from .base import Axis, AxisRelations, OpRule, SiteHint

__all__ = ["Axis", "AxisRelations", "OpRule", "SiteHint", "register_rule", "rule_for", "UnknownOp"]

_FAMILIES = (
    linear,
    conv,
    batchnorm,
    layernorm,
    elementwise,
    pooling,
    padding,
    dropout,
    attention,
    layout,
    boundary,
)
_REGISTRY: dict[Any, OpRule] = {}
for _family in _FAMILIES:
    _REGISTRY.update(_family.RULES)


class UnknownOp(OpRule):
    """Any op without a rule: it blocks every axis that reaches it."""

    def __init__(self, what: str) -> None:
        self.name = what

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        return AxisRelations(blocks=f"no rule for {self.name}")


def register_rule(key: Any, rule: OpRule) -> None:
    """Register ``rule`` for a module class, a function, or ``"method:<name>"``."""
    _REGISTRY[key] = rule


def _describe(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, str]:
    if node.op == "call_module":
        cls = type(gm.get_submodule(str(node.target)))
        return cls, f"module {cls.__name__}"
    if node.op == "call_method":
        return f"method:{node.target}", f"method .{node.target}()"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return node.target, f"function {name}"
    return None, node.op


def rule_for(node: fx.Node, gm: fx.GraphModule) -> OpRule:
    """The registered rule of a node, or :class:`UnknownOp`.

    A module subclass inherits its base class's rule only if it keeps the base ``forward``: a
    subclass that overrides ``forward`` (a conv with its own padding, say) computes something else.
    """
    key, what = _describe(node, gm)
    if isinstance(key, type):
        for cls in key.__mro__:
            if cls in _REGISTRY and key.forward is cls.forward:
                return _REGISTRY[cls]
    elif key is not None and key in _REGISTRY:
        return _REGISTRY[key]
    return UnknownOp(what)
