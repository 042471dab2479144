"""Stage 7, the converted module: the user's own object, of a subclass of its own class.

``convert`` never wraps a model. It swaps the class of the converted object (the whole model on the
fx path, each repeated layer on the export path) for a generated subclass ``SliceOut<Cls>`` whose
``forward`` runs a SliceOut graph in training and the class's own ``forward`` otherwise. Every
method and attribute, ``isinstance`` check, container protocol (``c[0]``, ``len(c)``) and
``state_dict`` key stays the model's. What the conversion adds lives in the object's ``__dict__``
(a :class:`Conversion`), outside the module tree.

The graphs are a cache. A :class:`Conversion` keeps the recipe (config, example inputs, sampler
state) and rebuilds its graphs when they are missing (``copy.deepcopy`` and pickling copy only the
plain model and the recipe) or stale: a submodule, or a parameter or buffer of another shape, was
registered anywhere inside the converted tree (PEFT adapters, a new head, parametrizations).
Staleness is detected with PyTorch's global registration hooks, so a training step pays one
boolean test instead of a walk of the module tree.

What a capture read from the model in Python (hooks, flags, the call's arguments, input sizes a
loop was unrolled for) is guarded (:mod:`sliceout_fx.guards`): every training call checks it, and a
change switches to an earlier capture that fits, captures again, or - where the change cannot be
sliced - trains at full width with the model's own forward after one warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .errors import UntraceableModelError
from .guards import OWN_HOOK, CaptureGuards, recording_reads
from .sampling import SAMPLER_NAME, SliceSampler

if TYPE_CHECKING:
    from .config import SliceOutConfig
    from .report import Report

logger = logging.getLogger(__name__)

_STATE = "_sliceout"
_ABSENT = object()

#: Captures one conversion keeps for the variants its guards tell apart (an adapter switched on
#: and off, a mask given or not); past that, a change trains at full width, as ``torch.compile``
#: falls back to eager past its recompile limit.
RECAPTURE_LIMIT = 8


class Conversion:
    """What one converted object carries: its recipe, its graphs (a cache) and its sampler.

    Front ends subclass it (:class:`~sliceout_fx.whole.WholeModelConversion` for fx-captured
    models, :class:`~sliceout_fx.blocks.BlockConversion` for exported layers) and implement
    :meth:`build` and :meth:`run`.
    """

    kind = "abstract"

    def __init__(self, config: SliceOutConfig, original_class: type, name: str = "") -> None:
        self.config = config
        self.original_class = original_class
        self.name = name
        self.enabled = True  # False: train at full width with the class's own forward
        self.stale = True  # no graphs yet, or the module tree changed since they were built
        self.changes: list[str] = []  # what made the graphs stale, for the log
        self.suspended = False  # capture in progress: forward runs the class's own code
        self.sampler: SliceSampler | None = None
        self.resume_state: dict[str, Any] | None = None  # draw state for the next sampler
        self.guards: CaptureGuards | None = None  # what the current graphs assumed
        self.variants: list[dict[str, Any]] = []  # earlier captures, with their guards
        self.fallback: str | None = None  # why this capture trains at full width
        self.warned: set[str] = set()

    #: The attributes :meth:`build` sets: one capture's graphs, kept per variant.
    built_fields: tuple[str, ...] = ()

    # -- what front ends implement ---------------------------------------------------------------

    def build(self, module: nn.Module, args: tuple | None, kwargs: dict | None) -> None:
        """(Re)build the graphs from the module's current structure; ``args``: a training call."""
        raise NotImplementedError

    def run(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """One sliced training call."""
        raise NotImplementedError

    def extra_guards(self, module: nn.Module) -> list[Any]:
        """What the front end's graphs were specialised on: ``(args, kwargs) -> reason | None``."""
        return []

    def capture_settings(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        """Attributes :meth:`capturing` sets for the capture itself: not guarded."""
        return [(module, "gradient_checkpointing")]

    def recipe(self) -> dict[str, Any]:
        """Everything needed to rebuild this conversion on a copy of the plain module."""
        return {
            "kind": self.kind,
            "config": self.config,
            "name": self.name,
            "enabled": self.enabled,
            "draws": self.draw_state(),
        }

    @property
    def report(self) -> Report:
        raise NotImplementedError

    # -- shared behaviour ------------------------------------------------------------------------

    def ensure_built(
        self, module: nn.Module, args: tuple | None = None, kwargs: dict | None = None
    ) -> None:
        if not self.stale:
            return
        if self.changes:
            logger.warning(
                "sliceout_fx: %s changed after conversion (%s); analysing it again",
                self.name or self.original_class.__name__,
                "; ".join(self.changes[:3]),
            )
        self.fallback = None
        if self.changes:  # the module tree changed: earlier captures describe another model
            self.variants = []
        try:
            with (
                self.capturing(module),
                recording_reads(module, self.capture_settings(module)) as reads,
            ):
                self.build(module, args, kwargs)
        except Exception as error:
            if not self.changes:
                raise
            raise UntraceableModelError(
                f"{self.name or self.original_class.__name__} changed after conversion "
                f"({'; '.join(self.changes[:3])}) and cannot be analysed again: "
                f"{type(error).__name__}: {error}\n  Undo the change, or restore the plain model "
                "with sliceout_fx.to_original(model), make the change there and convert again "
                "(with leaf_modules=[...] for what cannot be traced)."
            ) from error
        self.captured(module, reads)

    def captured(self, module: nn.Module, reads: Any) -> None:
        """Record what the capture just made assumed (``reads``: what its forward read)."""
        self.stale = False
        self.changes = []
        self.guards = CaptureGuards.record(module, reads)
        self.guards.extra = self.extra_guards(module)
        mutated = self.guards.pop_state_changed_by_capture()
        if mutated:
            self.fall_back(
                f"its forward changes {mutated[:3]} on every call, which a captured graph "
                "cannot replay"
            )
        self._keep_variant()
        watch(module, self)

    # -- guards: what the capture assumed, checked at every training call --------------------

    def ready(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether this training call can run a sliced graph (else: full width, own forward).

        Builds the graphs if they are missing or stale, then checks the current capture's guards
        (:mod:`sliceout_fx.guards`); on a failure, switches to an earlier capture whose guards
        hold, or captures again from this call. A capture whose behaviour cannot be sliced
        (:meth:`fall_back`) still has guards: undoing the change slices again.
        """
        if self.stale:
            self.ensure_built(module, args, kwargs)
        guards = self.guards
        reason = None if guards is None else guards.failure(module, args, kwargs)
        if reason is not None:
            self._recapture(module, args, kwargs, reason)
        return self.fallback is None

    @torch.compiler.disable
    def _recapture(self, module: nn.Module, args: tuple, kwargs: dict, reason: str) -> None:
        for variant in self.variants:
            guards = variant["guards"]
            if guards is not self.guards and guards.failure(module, args, kwargs) is None:
                self._use_variant(module, variant)
                return
        if len(self.variants) >= RECAPTURE_LIMIT:
            self.fall_back(
                f"{reason}, and it was captured {len(self.variants)} times already (the limit "
                f"is sliceout_fx.module.RECAPTURE_LIMIT = {RECAPTURE_LIMIT})",
                once="recapture limit",
            )
            return
        logger.info("sliceout_fx: capturing %s again: %s", self._label(), reason)
        self.stale = True
        try:
            self.ensure_built(module, args, kwargs)
        except Exception as error:  # noqa: BLE001 - any capture failure ends the same way
            self.stale = False
            self.fall_back(f"{reason}, and capturing it again failed ({error})")

    def fall_back(self, reason: str, once: str | None = None) -> None:
        """Train at full width with the model's own forward, after one warning per cause.

        Holds for the current capture: a change its guards see captures again. ``once``: the
        cause to warn about once, where ``reason`` changes from call to call.
        """
        self.fallback = reason
        if (once or reason) in self.warned:
            return
        self.warned.add(once or reason)
        warnings.warn(
            f"sliceout_fx: {self._label()} trains at full width (its own forward, no slicing): "
            f"{reason}. Undo the change to slice again, or convert the model anew after it.",
            stacklevel=4,
        )

    def _label(self) -> str:
        return self.name or self.original_class.__name__

    def _keep_variant(self) -> None:
        state = {name: getattr(self, name) for name in self.built_fields}
        state.update(guards=self.guards, sampler=self.sampler, fallback=self.fallback)
        self.variants.append(state)

    def _use_variant(self, module: nn.Module, variant: dict[str, Any]) -> None:
        logger.info("sliceout_fx: %s switches to an earlier capture", self._label())
        for name in self.built_fields:
            setattr(self, name, variant[name])
        self.guards = variant["guards"]
        self.fallback = variant["fallback"]
        self.use_sampler(module, variant["sampler"])

    @contextlib.contextmanager
    def capturing(self, module: nn.Module) -> Iterator[None]:
        """Inside the block ``module`` is its plain self, for tracing and export.

        Its class is the original one (so ``torch.fx`` reads the original ``forward``'s
        signature and globals) and gradient checkpointing is off (an exported checkpoint would
        be a higher-order op the rewrite cannot see into; the converted layer is checkpointed
        as a whole anyway).
        """
        previous, swapped = self.suspended, type(module) is _CLASSES.get(self.original_class)
        checkpointing = module.__dict__.get("gradient_checkpointing", _ABSENT)
        self.suspended = True
        if swapped:
            module.__class__ = self.original_class
        if getattr(module, "gradient_checkpointing", False) is True:
            module.__dict__["gradient_checkpointing"] = False
        try:
            yield
        finally:
            self.suspended = previous
            if swapped:
                module.__class__ = _CLASSES[self.original_class]
            if checkpointing is _ABSENT:
                module.__dict__.pop("gradient_checkpointing", None)
            else:
                module.__dict__["gradient_checkpointing"] = checkpointing

    def use_sampler(self, module: nn.Module, sampler: SliceSampler) -> None:
        """Adopt a new sampler, carrying the draw state over where the draws are the same kind."""
        old = self.sampler
        state = self.resume_state or (old.draw_state() if old is not None else None)
        if state is not None and sampler.accepts(state):
            sampler.load_draw_state(state)
            if old is not None and old._forced is not None:
                sampler.force(old._forced)
        self.resume_state = None
        self.sampler = sampler
        module.__dict__[SAMPLER_NAME] = sampler

    def draw_state(self) -> dict[str, Any] | None:
        if self.sampler is None:
            return self.resume_state
        return self.sampler.draw_state()

    def load_draw_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if self.sampler is None or self.stale:
            self.resume_state = state  # loaded into the sampler the next build makes
            return
        self.sampler.load_draw_state(state)

    def mark_stale(self, what: str) -> None:
        self.stale = True
        self.changes.append(what)


class _FromState:
    """A read-only attribute of a converted module answered by its :class:`Conversion`.

    A non-data descriptor: an instance attribute of the same name (the user's own) wins, and so
    does any attribute of the user's class, which comes first in the generated class's MRO.
    """

    def __init__(self, getter: Any, doc: str) -> None:
        self.getter = getter
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        return self.getter(built_conversion(module))


class SliceOutModule(nn.Module):
    """The base every converted class mixes in: ``isinstance(m, SliceOutModule)`` after ``convert``.

    A converted model is an instance of ``SliceOut<Cls>``, a subclass of its own class ``Cls`` and
    of this one. In ``train()`` mode with slicing enabled its forward runs the sliced graph; in
    ``eval()`` mode, or at full width (:meth:`full_width`, ``slicing_enabled = False``), it runs
    ``Cls.forward``, the model's own code. The conveniences below are only defined where the
    user's class does not define the same name; :mod:`sliceout_fx`'s functions (``explain``,
    ``full_width``, ``set_slicing``, ``to_original``) work on every converted model.
    """

    report = _FromState(lambda c: c.report, "The analysis report of this conversion.")
    sliced_graph = _FromState(lambda c: c.sliced_graph, "The sliced training graph module.")
    full_graph = _FromState(
        lambda c: c.full_graph, "The captured full-width training graph (before the rewrite)."
    )
    sliceout_sampler = _FromState(
        lambda c: c.sampler, "The slice sampler (stored in the instance once the graphs are built)."
    )
    bn_refresh = _FromState(
        lambda c: getattr(c, "refresh", None),
        "The batch-norm refresh schedule (:class:`~sliceout_fx.norm_stats.FullWidthStatistics`).",
    )

    @property
    def slicing_enabled(self) -> bool:
        """``False`` trains at full width with the model's own forward (dropouts included)."""
        return conversion_of(self).enabled

    @slicing_enabled.setter
    def slicing_enabled(self, enabled: bool) -> None:
        conversion_of(self).enabled = bool(enabled)

    @contextlib.contextmanager
    def full_width(self) -> Iterator[nn.Module]:
        """Train at full width inside the ``with`` block (original dropouts included)."""
        state = conversion_of(self)
        previous = state.enabled
        state.enabled = False
        try:
            yield self
        finally:
            state.enabled = previous

    def explain(self) -> Report:
        """The analysis report of this conversion (sites, groups, skipped groups and reasons)."""
        return built_conversion(self).report

    def to_original(self) -> nn.Module:
        """Restore the original class in place (same object, same parameters) and return it."""
        return uninstall(self)


_CLASSES: dict[type, type] = {}


def converted_class(cls: type) -> type:
    """``SliceOut<Cls>``: ``cls`` with a forward that slices in training (made once per class)."""
    if cls in _CLASSES:
        return _CLASSES[cls]
    if issubclass(cls, SliceOutModule):
        raise TypeError(f"{cls.__name__} is already a converted class")

    @functools.wraps(cls.forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: Conversion | None = self.__dict__.get(_STATE)
        if (
            state is not None
            and self.training
            and state.enabled
            and not state.suspended
            and state.ready(self, args, kwargs)
        ):
            return state.run(self, args, kwargs)
        return cls.forward(self, *args, **kwargs)

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        # A new object of a converted class is a plain one: `converted[1:]` of a Sequential and
        # HF's `type(model)(config)` build fresh modules through the class, and a conversion
        # belongs to one object. It shares the layers it is given, and trains them unsliced.
        cls.__init__(self, *args, **kwargs)
        self.__class__ = cls

    def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        # The sampler is outside the module tree; `.to()`, `.cuda()`, `.double()` move it too.
        result = cls._apply(self, fn, recurse)
        sampler = self.__dict__.get(SAMPLER_NAME)
        if sampler is not None:
            sampler._apply(fn)
        return result

    def __reduce_ex__(self: nn.Module, protocol: int) -> Any:
        # copy.deepcopy and pickle copy the plain module and the recipe; graphs are rebuilt.
        return (_restore, (cls, plain_state(self), self.__dict__[_STATE].recipe()))

    subclass = type(
        f"SliceOut{cls.__name__}",
        (cls, SliceOutModule),
        {
            "__init__": __init__,
            "forward": forward,
            "_apply": _apply,
            "__reduce_ex__": __reduce_ex__,
            "__doc__": f"{cls.__name__} whose training forward runs a SliceOut graph.",
            "__module__": __name__,
            "__qualname__": f"SliceOut{cls.__name__}",
        },
    )
    _CLASSES[cls] = subclass
    return subclass


def install(module: nn.Module, state: Conversion) -> None:
    """Make ``module`` a converted module carrying ``state`` (graphs built lazily)."""
    if _STATE in module.__dict__:
        raise TypeError(
            f"{type(module).__name__} is already converted; convert to_original(model) instead"
        )
    module.__dict__[_STATE] = state
    module.__class__ = converted_class(type(module))


def uninstall(module: nn.Module) -> nn.Module:
    """Undo :func:`install` in place: original class, no conversion state, no sampler."""
    state = module.__dict__.pop(_STATE, None)
    if state is not None:
        module.__dict__.pop(SAMPLER_NAME, None)
        _remove_own_hooks(module)
        module.__class__ = state.original_class
    return module


def conversion_of(module: nn.Module) -> Conversion:
    state = module.__dict__.get(_STATE)
    if state is None:
        raise TypeError(
            f"{type(module).__name__} is not a converted model: convert it with sliceout_fx.convert"
        )
    return state


def built_conversion(module: nn.Module) -> Conversion:
    """The module's conversion with its graphs built (from the stored example inputs if needed)."""
    state = conversion_of(module)
    state.ensure_built(module)
    return state


def conversions_in(model: nn.Module) -> list[tuple[nn.Module, Conversion]]:
    """Every converted object in ``model``'s tree (the model itself first), with its state."""
    return [(m, m.__dict__[_STATE]) for m in model.modules() if _STATE in m.__dict__]


def converted_parts(model: nn.Module) -> list[tuple[nn.Module, Conversion]]:
    """:func:`conversions_in`, or a ``TypeError`` for a model that was never converted."""
    found = conversions_in(model)
    if not found:
        raise TypeError(
            f"{type(model).__name__} is not a converted model: convert it with sliceout_fx.convert"
        )
    return found


def plain_state(module: nn.Module) -> dict[str, Any]:
    """``module.__dict__`` without what a conversion added (its state, sampler and hooks)."""
    state = {k: v for k, v in module.__dict__.items() if k not in (_STATE, SAMPLER_NAME)}
    state["_forward_pre_hooks"] = type(module._forward_pre_hooks)(
        (k, h) for k, h in module._forward_pre_hooks.items() if not getattr(h, OWN_HOOK, False)
    )
    return state


def _restore(cls: type, state: dict[str, Any], recipe: dict[str, Any]) -> nn.Module:
    """Rebuild a converted module from its plain state and recipe (unpickling, deepcopy)."""
    from .blocks import BlockConversion
    from .whole import WholeModelConversion

    kinds = {c.kind: c for c in (WholeModelConversion, BlockConversion)}
    module = cls.__new__(cls)
    module.__setstate__(state)
    conversion = kinds[recipe["kind"]].from_recipe(cls, recipe)
    install(module, conversion)
    return module


# -- hooks the conversion adds to the module ---------------------------------------------------



def own_hook(fn: Any) -> Any:
    """Mark a hook function as the conversion's, so copies and ``to_original`` drop it."""
    setattr(fn, OWN_HOOK, True)
    return fn


def _remove_own_hooks(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, OWN_HOOK, False):
            del module._forward_pre_hooks[key]


def replaced_modules(gm: fx.GraphModule, full: fx.GraphModule) -> list[str]:
    """Modules the full graph calls and the sliced graph replaced by sliced functional ops."""
    kept = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    called = [str(n.target) for n in full.graph.nodes if n.op == "call_module"]
    return [name for name in dict.fromkeys(called) if name not in kept]


# -- change detection --------------------------------------------------------------------------

#: Every module inside a converted tree -> a weak reference to the conversion it belongs to.
_OWNER: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
_HOOKS_INSTALLED = False


def watch(root: nn.Module, state: Conversion) -> None:
    """Mark ``state`` stale whenever something is registered anywhere under ``root``."""
    _install_registration_hooks()
    ref = weakref.ref(state)
    for module in root.modules():
        _OWNER[module] = ref


def _owner(module: nn.Module) -> Conversion | None:
    if torch.compiler.is_compiling():
        # A registration inside a compiled forward (a buffer a layer sets on every call) is no
        # structural change; looking it up would make dynamo guard on the weak registry.
        return None
    ref = _OWNER.get(module)
    state = ref() if ref is not None else None
    if state is None or state.suspended or state.stale:
        return None
    return state


def _on_module(module: nn.Module, name: str, value: nn.Module | None) -> None:
    state = _owner(module)
    if state is not None and module._modules.get(name) is not value:
        state.mark_stale(f"{type(module).__name__}.{name} set to {type(value).__name__}")


def _on_tensor(kind: str) -> Any:
    def hook(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        state = _owner(module)
        if state is None:
            return
        old = getattr(module, f"_{kind}s").get(name)
        if (old is None) != (value is None) or (old is not None and old.shape != value.shape):
            state.mark_stale(f"{kind} {type(module).__name__}.{name} registered")

    return hook


def _install_registration_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    from torch.nn.modules import module as torch_module

    torch_module.register_module_module_registration_hook(_on_module)
    torch_module.register_module_parameter_registration_hook(_on_tensor("parameter"))
    torch_module.register_module_buffer_registration_hook(_on_tensor("buffer"))
    _HOOKS_INSTALLED = True
