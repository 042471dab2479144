"""The rule registry: one op family per module, each rule declaring the targets it serves.

A target is a module class, a function, an ATen overload or packet, ``"method:<name>"``, or the
qualified name of a class or function (``"timm.layers.drop.DropPath"``) that the rule need not
import. To teach the pass a new op, write an :class:`OpRule` with its ``targets`` and either pass
it to one conversion (``convert(model, rules=[MyRule()])``), register it for a block of code
(``with registered_rules(MyRule()): ...``) or register it for the process (:func:`register_rule`).
A rule passed or registered later takes precedence over the built-in one for the same target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from torch import fx

from . import (
    attention,
    batchnorm,
    boundary,
    conv,
    dropout,
    elementwise,
    function,
    gather,
    layernorm,
    layout,
    linear,
    padding,
    pooling,
    stochastic_depth,
)
from .base import Axis, AxisRelations, OpRule, SiteHint
from .binding import dialects, fallback_key, registry_key

__all__ = [
    "Axis",
    "AxisRelations",
    "OpRule",
    "SiteHint",
    "UnknownOp",
    "conversion_rules",
    "dialects",
    "register_rule",
    "module_rule",
    "registered_rules",
    "rule_for",
    "rule_table",
]

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
    gather,
    boundary,
    stochastic_depth,
    function,
)


def rule_table(rules: Iterable[OpRule]) -> dict[Any, OpRule]:
    """``{target: rule}`` for ``rules``, from each rule's declared ``targets``."""
    table: dict[Any, OpRule] = {}
    for rule in rules:
        if not rule.targets:
            raise ValueError(f"rule {type(rule).__name__} declares no targets")
        for target in rule.targets:
            table[target] = rule
    return table


_REGISTRY: dict[Any, OpRule] = rule_table(r for family in _FAMILIES for r in family.RULES)


class UnknownOp(OpRule):
    """Any op without a rule: it blocks every axis that reaches it."""

    def __init__(self, what: str) -> None:
        self.name = what

    def relations(self, node: fx.Node, gm: fx.GraphModule) -> AxisRelations:
        return AxisRelations(blocks=f"no rule for {self.name}")


def register_rule(rule: OpRule | Any, legacy_rule: OpRule | None = None) -> None:
    """Register ``rule`` for every target it declares, for the rest of the process.

    ``register_rule(target, rule)`` registers it for one extra target (a module class, a
    function, an ATen overload or ``"method:<name>"``).
    """
    if legacy_rule is not None:
        _REGISTRY[rule] = legacy_rule
        return
    _REGISTRY.update(rule_table([rule]))


@contextlib.contextmanager
def registered_rules(*rules: OpRule) -> Iterator[None]:
    """Register ``rules`` inside the ``with`` block only; the registry is restored after it."""
    saved = dict(_REGISTRY)
    try:
        _REGISTRY.update(rule_table(rules))
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def _describe(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, str]:
    if node.op == "call_module":
        cls = type(gm.get_submodule(str(node.target)))
        return cls, f"module {cls.__name__}"
    if node.op == "call_method":
        return registry_key(node), f"method .{node.target}()"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return node.target, f"function {name}"
    return None, node.op


def qualified_name(target: Any) -> str | None:
    """``"package.module.Name"``: how a rule names a target it does not import."""
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else None


def _lookup(table: dict[Any, OpRule], key: Any) -> OpRule | None:
    if isinstance(key, type):
        for cls in key.__mro__:
            # A subclass inherits its base class's rule only if it keeps the base ``forward``: a
            # subclass that overrides it (a conv with its own padding, say) computes something
            # else.
            forward = getattr(key, "forward", None)  # a namedtuple called as a function: none
            if forward is None or getattr(cls, "forward", None) is not forward:
                continue
            found = table.get(cls) or table.get(qualified_name(cls))
            if found is not None:
                return found
        return None
    try:
        found = table.get(key)
        if found is None and (packet := fallback_key(key)) is not None:
            found = table.get(packet)
    except TypeError:  # an unhashable target
        return None
    if found is None and not isinstance(key, str):
        found = table.get(qualified_name(key))
    return found


def module_rule(cls: type) -> OpRule | None:
    """The registered rule of a module class (inherited as :func:`rule_for` inherits it)."""
    return _lookup(_REGISTRY, cls)


#: The rules one conversion was given (``convert(rules=...)``), while it is analysed and rewritten.
_CONVERSION_RULES: ContextVar[dict[Any, OpRule] | None] = ContextVar("sliceout_rules", default=None)


@contextlib.contextmanager
def conversion_rules(rules: Iterable[OpRule]) -> Iterator[None]:
    """Within the block, :func:`rule_for` sees ``rules`` first: a conversion's own rules reach
    every stage that looks a rule up (shapes, the dependency graph, a rule asking about its
    input, the rewrite), not only the one they were passed to."""
    token = _CONVERSION_RULES.set({**(_CONVERSION_RULES.get() or {}), **rule_table(rules)})
    try:
        yield
    finally:
        _CONVERSION_RULES.reset(token)


def rule_for(
    node: fx.Node, gm: fx.GraphModule, extra: dict[Any, OpRule] | None = None
) -> OpRule:
    """The rule of a node (``extra`` first, then the conversion's rules, then the registry), or
    :class:`UnknownOp`."""
    key, what = _describe(node, gm)
    if key is None:
        return UnknownOp(what)
    for table in (extra or {}, _CONVERSION_RULES.get() or {}, _REGISTRY):
        found = _lookup(table, key)
        if found is not None:
            return found.specialise(node, gm)
    return UnknownOp(what)
