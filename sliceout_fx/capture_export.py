"""Stage 1, capture (second front end): ``torch.export`` for code ``torch.fx`` cannot trace.

``symbolic_trace`` fails on most HuggingFace code (``(*shape, -1, head_dim)`` unpacks a proxy) and
hides the inside of ``nn.MultiheadAttention``. Non-strict ``torch.export`` runs the Python code
with fake tensors instead, so it records whatever the forward really does, as ATen ops
(``aten.linear``, ``aten.view``, ``aten.scaled_dot_product_attention``, ``aten.dropout(x, p,
True)``) whose rules live beside the torch-level ones.

The export is specialised on the *structure* of the call (which arguments are tensors, ``None``,
flags) and made dynamic in every tensor size, so one graph serves every batch size and sequence
length. What comes out is turned into a plain ``fx.GraphModule`` on the module itself: parameters
as ``get_attr`` of their original names (no copies), one placeholder per flattened tensor input,
export's own guard and metadata-assert nodes removed.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ._probe import training_mode
from .errors import UntraceableModelError
from .functions import functions_kept_whole, replace_stand_ins
from .guards import hooks_suppressed
from .mha import spelt_out_attention

__all__ = ["CallSpec", "ExportedCall", "call_key", "export_call", "normalise_call"]

# Nodes torch.export adds for its own checks; they would pin shapes and dtypes of the call.
_DROPPED_TARGETS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


@dataclass(frozen=True)
class CallSpec:
    """The structure of one call: a pytree spec plus the non-tensor leaves, which are baked in."""

    treespec: pytree.TreeSpec
    constants: tuple[tuple[int, Any], ...]  # (leaf index, value) of every non-tensor leaf

    def tensor_leaves(self, leaves: list[Any]) -> list[torch.Tensor]:
        constant_at = {i for i, _ in self.constants}
        return [leaf for i, leaf in enumerate(leaves) if i not in constant_at]


def _exportable(value: Any) -> Any:
    """The call argument as export takes it: a KV cache becomes ``None``, see below.

    In sliced training a layer does not fill a KV cache: the keys and values it would store are
    sliced, useless to a full-width decoding step, and they do not change the layer's output.
    Any other object the graph could not see would change what the layer computes, so it is
    refused rather than dropped.
    """
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_exportable(v) for v in value)
    if isinstance(value, dict):
        return {k: _exportable(v) for k, v in value.items()}
    if "Cache" in type(value).__name__:
        return None
    raise UntraceableModelError(
        f"cannot capture a call with an argument of type {type(value).__name__}: pass tensors, "
        "numbers, flags or None, or convert a submodule whose arguments are tensors"
    )


def normalise_call(args: tuple, kwargs: dict[str, Any]) -> tuple[CallSpec, list[torch.Tensor]]:
    """The call's spec and its tensor leaves, in the order of the exported graph's placeholders.

    Keyword arguments are sorted so that the same call made in another keyword order matches.
    """
    call = (_exportable(tuple(args)), {k: _exportable(kwargs[k]) for k in sorted(kwargs)})
    leaves, treespec = pytree.tree_flatten(call)
    constants = tuple(
        (i, leaf) for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)
    )
    spec = CallSpec(treespec, constants)
    return spec, spec.tensor_leaves(leaves)


def call_key(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, list[torch.Tensor]]:
    """A hashable key of the call's structure (tensor ranks included), and its tensor leaves.

    The same information as :func:`normalise_call`, from plain tuples instead of a pytree spec:
    it is what every training step of a converted block looks up, so it must be cheap on the
    host and traceable by dynamo (``torch.compile`` then guards on the structure once instead of
    breaking the graph). The leaves come out in ``normalise_call``'s order.
    """
    tensors: list[torch.Tensor] = []

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            # The rank is structure: an exported graph is specialised on it (views of the
            # leading axes), so a batch of another rank is exported anew, not run wrongly.
            return (_TENSOR, value.dim())
        if value is None or isinstance(value, (bool, int, float, str)):
            return (type(value).__name__, value)  # 1, 1.0 and True are distinct structures
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(walk(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((k, walk(v)) for k, v in value.items()))
        _exportable(value)  # a KV cache (exported as None) or a clear error
        return ("NoneType", None)

    key = (walk(tuple(args)), tuple((k, walk(kwargs[k])) for k in sorted(kwargs)))
    return key, tensors


_TENSOR = "tensor"


@dataclass
class ExportedCall:
    """One exported call of a module, ready for the analysis pipeline."""

    gm: fx.GraphModule  # placeholders: the tensor leaves of the call, in `normalise_call` order
    spec: CallSpec
    out_spec: pytree.TreeSpec
    example_inputs: list[torch.Tensor]
    key: tuple  # the call's `call_key`: what a converted block looks its graph up by
    #: (input, dim, size) of every input size the graph is specialised on: export makes every
    #: size dynamic, unless the code needs its value (a Python loop over the sequence, a
    #: broadcast dimension of 1); a call with another size there needs a graph of its own.
    specialised: tuple[tuple[int, int, int], ...] = ()

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        """Whether a call with these tensor leaves (same structure) has the specialised sizes."""
        return all(tensors[i].shape[d] == size for i, d, size in self.specialised)

    def sizes(self, tensors: list[torch.Tensor]) -> tuple[int, ...]:
        return tuple(tensors[i].shape[d] for i, d, _ in self.specialised)

    def unflatten_output(self, flat: Any) -> Any:
        flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
        spec = self.out_spec
        if spec.is_leaf():
            return flat[0]
        if spec.type is tuple and all(child.is_leaf() for child in spec.children_specs):
            return tuple(flat)  # the usual block output, without a pytree walk per step
        return pytree.tree_unflatten(flat, spec)


def export_call(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], *, training: bool = True
) -> ExportedCall:
    """Export ``module(*args, **kwargs)`` in training (or eval) mode as a plain graph module."""
    spec, tensors = normalise_call(args, kwargs)
    flat_call = _FlatCall(module, spec)
    dynamic = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in tensors)
    try:
        with (
            training_mode(module, training),
            warnings.catch_warnings(),
            _quiet_export_logs(),
            _outside_checkpointing(),
            hooks_suppressed(module),
            spelt_out_attention() if training else contextlib.nullcontext(),
            functions_kept_whole("export"),
        ):
            warnings.simplefilter("ignore")
            exported = torch.export.export(
                flat_call, tuple(tensors), dynamic_shapes=(dynamic,), strict=False
            )
    except Exception as error:  # export raises many error types; all mean the same here
        first_line = (str(error).splitlines() or [""])[0]
        raise UntraceableModelError(
            f"torch.export could not capture {type(module).__name__}: "
            f"{type(error).__name__}: {first_line}. Pass example_inputs that match how the "
            "model is called, or convert a submodule."
        ) from error
    specialised = _specialised_sizes(exported, tensors)
    gm = _plain_graph_module(module, exported)
    replace_stand_ins(gm)
    gm.recompile()
    key, _ = call_key(args, kwargs)
    return ExportedCall(gm, spec, exported.call_spec.out_spec, tensors, key, specialised)


def _specialised_sizes(
    exported: torch.export.ExportedProgram, tensors: list[torch.Tensor]
) -> tuple[tuple[int, int, int], ...]:
    """The input sizes export fixed to the example's values (see :class:`ExportedCall`)."""
    user_inputs = [
        node
        for node, spec in zip(  # noqa: B905 - placeholders and input specs are one list
            (n for n in exported.graph.nodes if n.op == "placeholder"),
            exported.graph_signature.input_specs,
        )
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    found = []
    for index, (node, tensor) in enumerate(zip(user_inputs, tensors, strict=False)):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if is_concrete_int(size) and tensor.dim() > dim:
                found.append((index, dim, int(size)))
    return tuple(found)


class _FlatCall(nn.Module):
    """Calls ``module`` from the flat tensor leaves of one call structure (what export sees).

    It calls the module's ``forward``, not the module: hooks on the layer itself (FSDP2's
    gather and free of its parameters, say) belong to the real call, not to its capture.
    """

    def __init__(self, module: nn.Module, spec: CallSpec) -> None:
        super().__init__()
        self.inner = module
        self.spec = spec

    def forward(self, *tensors: torch.Tensor) -> Any:
        args, kwargs = pytree.tree_unflatten(
            fill_leaves(self.spec, list(tensors)), self.spec.treespec
        )
        return type(self.inner).forward(self.inner, *args, **kwargs)


def _outside_checkpointing() -> Any:
    """Keep what export saves for backward away from an enclosing activation checkpoint.

    A layer can meet a new call structure inside a checkpointed forward; non-reentrant
    checkpointing counts the tensors saved there and would find the recompute (which does not
    export again) saving fewer. Saved-tensor hooks of our own take them instead.
    """
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


@contextlib.contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """Export logs a warning per size it specialises (batch 1...); the graph is checked anyway."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fill_leaves(spec: CallSpec, tensors: list[torch.Tensor]) -> list[Any]:
    """All leaves of a call from its tensor leaves and the spec's constants."""
    constants = dict(spec.constants)
    it = iter(tensors)
    return [constants[i] if i in constants else next(it) for i in range(spec.treespec.num_leaves)]


INNER = "inner"
_FAKE_META = ("val", "example_value", "unbacked_bindings")


def _plain_graph_module(
    module: nn.Module, exported: torch.export.ExportedProgram
) -> fx.GraphModule:
    """``exported.module()`` without pytree codegen, guards or asserts, rooted on ``module``.

    Every ``get_attr`` resolves to the module's own parameter and buffer objects. Tensor
    constants that export lifted out of the code (``lifted_tensor_0``: a causal-mask bias built
    from a Python constant, say) exist only in the exported program; they are kept on the graph
    module itself, under top-level names, not written into the user's module.
    """
    unlifted = exported.module()
    graph = unlifted.graph
    attributes: dict[str, Any] = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            continue
        if node.op == "call_function" and node.target in _DROPPED_TARGETS:
            graph.erase_node(node)
            continue
        if node.op == "get_attr":
            target = str(node.target).removeprefix(INNER + ".")
            value = _lookup(module, target)
            if value is None:  # a lifted constant
                value = _lookup(unlifted, str(node.target))
                target = f"sliceout_constant_{len(attributes)}"
            node.target = target
            attributes[target] = value
        # Fake tensors from the export would make the graph impossible to deepcopy or pickle;
        # shapes are propagated again on real inputs by the next stage.
        for key in _FAKE_META:
            node.meta.pop(key, None)
    graph._codegen = fx.graph.CodeGen()
    gm = fx.GraphModule(attributes, graph, type(module).__name__ + "Export")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _lookup(root: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` under ``root``, or ``None``."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value
