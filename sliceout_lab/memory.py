"""Activation-memory and RSS measurements on CPU.

There is no CPU counterpart of ``torch.cuda.max_memory_allocated``. What SliceOut saves at train
time is mostly the memory autograd keeps for the backward pass, and that is observable exactly and
deterministically with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves
goes through the pack hook. Peak RSS is also recorded, but it is a whole-process high-water mark
(allocator caching, other variants, the Python heap), so it is informational only.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "SavedTensorStats",
    "current_rss_bytes",
    "measure_saved_tensors",
    "peak_rss_bytes",
    "saved_activation_bytes",
]


@dataclass(frozen=True)
class SavedTensorStats:
    """What autograd saved for backward during one call of a step function."""

    bytes: int
    """Bytes of distinct non-parameter storages saved (the activation memory)."""
    tensors: int
    """Number of pack-hook calls (saved tensors, including parameter views)."""
    storages: int
    """Distinct non-parameter storages behind those tensors."""
    parameter_tensors: int
    """Saved tensors whose storage is a parameter's (e.g. a sliced weight view): not counted."""


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[object, int]:
    """Identify the memory behind ``t``: its untyped storage's address and full size.

    A saved view keeps its whole storage alive, so the storage's size (not the view's) is what the
    backward pass actually costs; several views of one storage are counted once.
    """
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr != 0:
            return ("storage", storage.device.type, ptr), storage.nbytes()
        return ("empty", id(t)), 0
    except (RuntimeError, NotImplementedError, TypeError):
        # Tensors without a plain storage (sparse, nested, some subclasses): count their elements.
        return ("tensor", id(t)), t.numel() * t.element_size()


def measure_saved_tensors(
    step_fn: Callable[[], object], params: Iterable[torch.Tensor]
) -> SavedTensorStats:
    """Run ``step_fn`` once and account every tensor autograd saves for backward.

    Storages shared with any tensor in ``params`` are excluded: a sliced weight is a view of a
    parameter, it costs no activation memory, and the parameter exists whatever the dropout scheme.
    A *copy* of weights (controlled dropout's gather) is a new storage and is counted, which is the
    duplication overhead the paper attributes to that baseline.
    """
    param_keys = {_storage_key_and_bytes(p)[0] for p in params}
    seen: dict[object, int] = {}
    # Saved tensors are kept referenced until the measurement ends, so their addresses cannot be
    # reused by later allocations in the same step (which would make dedup undercount).
    keep_alive: list[torch.Tensor] = []
    counts = {"tensors": 0, "param": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        counts["tensors"] += 1
        key, nbytes = _storage_key_and_bytes(t)
        if key in param_keys:
            counts["param"] += 1
        elif key not in seen:
            seen[key] = nbytes
            keep_alive.append(t)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step_fn()
    stats = SavedTensorStats(
        bytes=sum(seen.values()),
        tensors=counts["tensors"],
        storages=len(seen),
        parameter_tensors=counts["param"],
    )
    keep_alive.clear()
    return stats


def saved_activation_bytes(step_fn: Callable[[], object], params: Iterable[torch.Tensor]) -> int:
    """Bytes of activations autograd saved during one ``step_fn()`` call, parameters excluded."""
    return measure_saved_tensors(step_fn, params).bytes


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (whole process: informational only)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int | None:
    """Current resident set size, from /proc where available (``None`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
