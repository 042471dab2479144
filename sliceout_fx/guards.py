"""What a capture assumed about the model, and the cheap check every sliced training call makes.

A sliced training graph is captured once, from one call, and then replayed. Whatever the capture
read from the model in Python - a flag, a rate, which hooks exist, which optional arguments were
given, how long an input was when a Python loop ran over it - is baked into that graph. If the
user (or the model itself) changes any of it later, replaying the graph would train something the
model no longer computes, silently. So, like ``torch.compile``'s guards, each capture records its
assumptions in a :class:`CaptureGuards`, and every training call of a converted module checks
them before it runs the graph. A check that fails sends the conversion back to its front end,
which re-captures (or re-uses an earlier capture whose guards hold), or - where the new behaviour
cannot be sliced - trains at full width with the model's own forward, after one warning naming
the cause.

What is guarded, and how cheaply:

* **Hooks.** Forward, forward-pre and backward hooks of the modules inside the converted one (the
  converted module's own hooks run on its own call anyway). Registering any hook anywhere bumps
  :attr:`torch.utils.hooks.RemovableHandle.next_id`, so the step compares one integer and walks
  the module tree only after some hook was registered. The sliced graph fires the hooks of the
  modules it replaces with sliced ops (:func:`call_with_hooks`), so hooks see the tensors that
  are really computed: sliced widths.
* **Attributes the forward read.** While a model is captured, reads of plain values (flags,
  numbers, strings) from its modules' instance dictionaries are recorded (:func:`recording_reads`):
  gradient-checkpointing switches, adapter switches, dropout rates, cache flags (and plain values
  the forward read from the module's class, which an instance attribute can shadow later). The
  step compares each recorded value with the current one.
* **The call.** Front ends add what their graph was specialised on: the argument structure and
  constant arguments (fx), the input sizes an exported loop was unrolled for (export).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

__all__ = [
    "CaptureGuards",
    "call_with_hooks",
    "hooked",
    "hook_serial",
    "hooked_modules",
    "hooks_suppressed",
    "unhooked_calls",
    "without_hooks_if_possible",
    "recording_reads",
]

_MISSING = object()

#: ``nn.Module``'s own bookkeeping, and what a conversion stores: never a user's setting.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {
    "training",
    "forward",
    "_sliceout",
    "sliceout_sampler",
}

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
#: Marks a hook as the conversion's own (see :func:`sliceout_fx.module.own_hook`).
OWN_HOOK = "_sliceout_hook"


# -- hooks ------------------------------------------------------------------------------------


def hook_serial() -> int:
    """A number that changes whenever a hook is registered anywhere (module, global or tensor)."""
    return RemovableHandle.next_id


def _user_hooks(hooks: Mapping[int, Any]) -> bool:
    return any(not getattr(h, OWN_HOOK, False) for h in hooks.values())


def global_hooks_present() -> bool:
    """Whether a global module hook (``register_module_forward_hook``...) is registered."""
    return any(getattr(torch_module, name) for name in _GLOBAL_HOOK_DICTS)


def hooked_modules(root: nn.Module) -> dict[str, nn.Module]:
    """The modules strictly inside ``root`` that have hooks of the user's, by qualified name.

    With a global module hook registered, every module inside ``root`` counts as hooked.
    """
    every = global_hooks_present()
    return {
        name: module
        for name, module in root.named_modules()
        if name and (every or any(_user_hooks(getattr(module, d)) for d in _HOOK_DICTS))
    }


@contextlib.contextmanager
def hooks_suppressed(root: nn.Module) -> Iterator[None]:
    """Inside the block the modules inside ``root`` have no hooks (for a capture).

    A capture runs the forward on proxies or fake tensors: a hook that logs a value
    (``out.norm().item()``) would fail there, and one that changes the output would be baked into
    the graph once instead of running at every step. The sliced graph calls the hooks itself.
    """
    saved = []
    for name, module in root.named_modules():
        if not name:
            continue
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr)
            if hooks:
                saved.append((hooks, dict(hooks)))
                for key in [k for k, h in hooks.items() if not getattr(h, OWN_HOOK, False)]:
                    del hooks[key]
    globals_saved = [
        (getattr(torch_module, name), dict(getattr(torch_module, name)))
        for name in _GLOBAL_HOOK_DICTS
    ]
    for hooks, _ in globals_saved:
        hooks.clear()
    try:
        yield
    finally:
        for hooks, items in (*saved, *globals_saved):
            hooks.clear()
            hooks.update(items)


def without_hooks_if_possible(root: nn.Module, run: Any) -> Any:
    """``run()`` with the hooks inside ``root`` suppressed, or, if it fails so, with them.

    Capturing runs the model on example inputs; the user's hooks (logging, monitoring) should not
    see those calls. Some hooks are part of the computation, though - FSDP2 gathers a sharded
    layer's weights in its forward-pre hook - and without them the model cannot run: then the
    capture runs with every hook, as the model's own call would.
    """
    if not hooked_modules(root):
        return run()
    try:
        with hooks_suppressed(root):
            return run()
    except Exception:  # noqa: BLE001 - retried with the hooks, which raises the real error
        return run()


@torch.compiler.disable
def call_with_hooks(
    module: nn.Module, op: Any, lazy: tuple[tuple[int, str], ...], *args: Any, **kwargs: Any
) -> Any:
    """``op(*args, **kwargs)`` run as ``module``'s call: its hooks fire around it.

    The sliced graph replaces a module's call by a sliced op; this runs that op through the
    module's own ``__call__`` (with the op in place of ``forward``), so every hook PyTorch would
    run - global and per-module, forward-pre hooks that replace the input, forward hooks that
    replace the output, full backward hooks - runs as for the real call, on the tensors the
    sliced graph computes. The first argument is the module's input; ``lazy`` names the op's
    arguments (index, attribute) read from the module *after* the pre-hooks ran, such as a weight
    that ``torch.nn.utils.prune`` recomputes in its pre-hook.
    """
    inputs, rest = args[:1], list(args[1:])

    def forward(*given: Any) -> Any:
        values = [*given, *rest]
        for index, name in lazy:
            values[index] = getattr(module, name)
        return op(*values, **kwargs)

    own = module.__dict__
    previous = own.get("forward", _MISSING)  # an instance forward of someone else's (accelerate)
    own["forward"] = forward
    try:
        return module(*inputs)
    finally:
        if previous is _MISSING:
            del own["forward"]
        else:
            own["forward"] = previous


@functools.cache
def hooked(op: Any) -> Any:
    """``op`` as a module's call: ``hooked(op)(module, lazy, x, ...)`` (a graph target).

    A graph cannot hold a function as an argument, so each op gets its own target.
    """

    def call(module: nn.Module, lazy: tuple[tuple[int, str], ...], *args: Any, **kw: Any) -> Any:
        return call_with_hooks(module, op, lazy, *args, **kw)

    name = getattr(op, "__name__", "op")
    call.__name__ = call.__qualname__ = f"hooked_{name}"
    call.fires_hooks = True  # type: ignore[attr-defined]
    return call


def unhooked_calls(gm: Any, paths: Iterable[str]) -> list[str]:
    """Of the hooked modules at ``paths``, those whose hooks no op of the graph ``gm`` fires.

    A call kept as a ``call_module`` fires them itself; a replaced one through :func:`hooked`.
    A rewrite that replaced a hooked call some other way would drop its hooks silently: the
    front end refuses that capture instead.
    """
    fired = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            fired.add(str(node.target))
        elif node.op == "call_function" and getattr(node.target, "fires_hooks", False):
            fired.add(str(node.args[0].target))
    return [path for path in paths if path not in fired]


# -- attribute reads --------------------------------------------------------------------------

_GUARDABLE = (bool, int, float, str, type(None), enum.Enum)


def _guardable(value: Any) -> bool:
    if isinstance(value, _GUARDABLE):
        return True
    return isinstance(value, tuple) and len(value) <= 8 and all(_guardable(v) for v in value)


class _Reads:
    """Attribute reads seen during a capture: ``(module, name) -> value``."""

    def __init__(self, modules: set[int], ignored: set[tuple[int, str]]) -> None:
        self.modules = modules
        self.ignored = ignored
        self.seen: dict[tuple[int, str], tuple[nn.Module, str, Any]] = {}


_RECORDING: list[_Reads] = []


def _recording_getattribute(self: Any, name: str) -> Any:
    value = object.__getattribute__(self, name)
    if _RECORDING and name not in _MODULE_INTERNALS and not name.startswith("__"):
        reads = _RECORDING[-1]
        key = (id(self), name)
        new = key not in reads.seen and key not in reads.ignored
        if new and id(self) in reads.modules and _guardable(value):
            own = object.__getattribute__(self, "__dict__")
            if name in own or _plain_class_attribute(type(self), name, value):
                reads.seen[key] = (self, name, value)
    return value


def _plain_class_attribute(cls: type, name: str, value: Any) -> bool:
    """A setting held by the class (``temperature = 1.0``), not ``nn.Module``'s or a property."""
    if hasattr(nn.Module, name):
        return False
    try:
        return inspect.getattr_static(cls, name) is value
    except AttributeError:
        return False


def _current(module: nn.Module, name: str) -> Any:
    """What ``module.<name>`` reads now: its own attribute, else its class's."""
    value = module.__dict__.get(name, _MISSING)
    return getattr(type(module), name, _MISSING) if value is _MISSING else value


@contextlib.contextmanager
def recording_reads(
    root: nn.Module, ignored: Iterable[tuple[nn.Module, str]] = ()
) -> Iterator[_Reads]:
    """Record the plain-valued instance attributes of ``root``'s modules read inside the block.

    ``ignored``: attributes the capture sets for itself (a layer's ``gradient_checkpointing``,
    switched off while it is exported, since the converted layer is checkpointed as a whole):
    the graph does not depend on the user's value, so it is not guarded.
    """
    reads = _Reads({id(m) for m in root.modules()}, {(id(m), name) for m, name in ignored})
    installed = "__getattribute__" in nn.Module.__dict__
    if not installed:
        nn.Module.__getattribute__ = _recording_getattribute  # type: ignore[method-assign]
    _RECORDING.append(reads)
    try:
        yield reads
    finally:
        _RECORDING.pop()
        if not installed:
            del nn.Module.__getattribute__


# -- the guard set ----------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)


def _describe_module(module: nn.Module, root: nn.Module) -> str:
    """``fc1 (Linear)``; the converted module itself by its own class name."""
    cls = type(module).__name__.removeprefix("SliceOut") if module is root else None
    for name, sub in root.named_modules():
        if sub is module:
            return f"{name} ({type(module).__name__})" if name else str(cls)
    return type(module).__name__


@dataclass
class CaptureGuards:
    """The assumptions of one capture; :meth:`failure` says which one no longer holds.

    Front ends extend it through ``extra``: callables ``(args, kwargs) -> reason or None`` for
    what their own graphs were specialised on.
    """

    hooked: frozenset[str] = frozenset()
    serial: int = 0
    reads: tuple[tuple[nn.Module, str, Any], ...] = ()
    extra: list[Any] = field(default_factory=list)

    @classmethod
    def record(cls, root: nn.Module, reads: _Reads | None = None) -> CaptureGuards:
        """The hooks ``root`` has now, and what the capture read (``reads``)."""
        return cls(
            frozenset(hooked_modules(root)),
            hook_serial(),
            tuple(reads.seen.values()) if reads is not None else (),
        )

    def failure(
        self, root: nn.Module, args: tuple = (), kwargs: Mapping | None = None
    ) -> str | None:
        """``None`` if the capture's assumptions still hold, else what changed (for the log)."""
        # Under torch.compile the serial is not read: dynamo would guard on it, and compiled
        # steps register tensor hooks of their own, so it would recompile at every step.
        if not torch.compiler.is_compiling() and self.serial != RemovableHandle.next_id:
            hooked = set(hooked_modules(root))
            new = sorted(hooked - self.hooked)
            if new:
                return f"hooks were registered on {new[:4]}"
            self.serial = RemovableHandle.next_id
        for module, name, value in self.reads:
            now = _current(module, name)
            if not _same(now, value):
                return (
                    f"{_describe_module(module, root)}.{name} is now {now!r} "
                    f"(it was {value!r} when the training graph was captured)"
                )
        for check in self.extra:
            reason = check(args, kwargs or {})
            if reason is not None:
                return reason
        return None

    def pop_state_changed_by_capture(self) -> list[str]:
        """Recorded attributes the capture itself changed: the forward mutates Python state.

        They are state, not settings, so they are no longer guarded (they would fail at every
        call); the names are returned for the front end to refuse the capture.
        """
        changed = [r for r in self.reads if not _same(_current(r[0], r[1]), r[2])]
        self.reads = tuple(r for r in self.reads if r not in changed)
        return [f"{type(m).__name__}.{name}" for m, name, _ in changed]
