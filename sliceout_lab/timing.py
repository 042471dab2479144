"""Interleaved wall-clock timing of training-step variants.

The project's machines are shared and noisy: absolute step times drift by tens of percent over a
run. Running the variants round-robin inside one process, and comparing each variant with the
baseline step taken in the *same* round, cancels most of that drift. Only ratios are meant to be
quoted; the absolute milliseconds are informational.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "interleaved_rounds",
    "interleaved_step_times",
    "median_ratio",
    "paired_ratios",
    "quantile",
    "ratio_of_medians",
    "round_order",
]


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Order of the variants in round ``round_index``: the list rotated by one each round.

    Rotating (A B C, B C A, C A B, ...) puts every variant in every position equally often over
    ``len(names)`` rounds, so a variant never profits systematically from running right after a
    cheaper one (warm caches) or suffers from running first (cold caches, frequency ramp-up).
    """
    if not names:
        return []
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def interleaved_rounds(
    names: Sequence[str],
    rounds: int,
    run: Callable[[str, int], None],
    *,
    timed: Callable[[int], bool] | None = None,
    sync: Callable[[], None] | None = None,
    before_round: Callable[[int], None] | None = None,
    after_round: Callable[[int], None] | None = None,
    collect_every: int = 50,
) -> dict[str, list[float]]:
    """Call ``run(name, r)`` for every name in every round ``r``, in :func:`round_order`.

    The one timing loop of the lab. Returns the seconds of each call in the rounds where
    ``timed(r)`` (all by default), keyed like ``names``: entry ``i`` of every list comes from the
    same round, so lists pair round by round (see :func:`paired_ratios`).

    ``sync`` (``torch.cuda.synchronize`` on an accelerator, where kernels run asynchronously) is
    called before the clock starts, so no earlier work is billed to the step, and after the step
    before it stops. Automatic garbage collection is off for the whole loop, so that a collection
    triggered by one variant is not billed to it; the collector runs between rounds instead,
    every ``collect_every`` rounds, outside the clocks.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            if before_round is not None:
                before_round(r)
            clocked = timed is None or timed(r)
            for name in round_order(names, r):
                if sync is not None:
                    sync()
                start = time.perf_counter()
                run(name, r)
                if sync is not None:
                    sync()
                if clocked:
                    times[name].append(time.perf_counter() - start)
            if after_round is not None:
                after_round(r)
            if collect_every and (r + 1) % collect_every == 0:
                gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def interleaved_step_times(
    steps: Mapping[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    *,
    sync: Callable[[], None] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Time each argument-less step ``repeats`` times, round-robin, after ``warmup`` untimed
    rounds (:func:`interleaved_rounds` for closures; ``on_round`` gets the timed round's index).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")

    def after_round(r: int) -> None:
        if on_round is not None and r >= warmup:
            on_round(r - warmup)

    return interleaved_rounds(
        list(steps),
        warmup + repeats,
        lambda name, _r: steps[name](),
        timed=lambda r: r >= warmup,
        sync=sync,
        after_round=after_round,
    )


def paired_ratios(samples: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-round ratios ``samples[i] / baseline[i]`` (both lists from the same interleaved run)."""
    if len(samples) != len(baseline):
        raise ValueError(
            f"cannot pair {len(samples)} samples with {len(baseline)} baseline samples"
        )
    if not samples:
        raise ValueError("no samples")
    return [s / b for s, b in zip(samples, baseline, strict=True)]


def median_ratio(samples: Sequence[float], baseline: Sequence[float]) -> float:
    """Median of the per-round ratios: the headline figure, robust to drift and to outliers."""
    return statistics.median(paired_ratios(samples, baseline))


def ratio_of_medians(samples: Sequence[float], baseline: Sequence[float]) -> float:
    """``median(samples) / median(baseline)``: a cross-check that needs no pairing."""
    return statistics.median(samples) / statistics.median(baseline)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1]); used for the spread of paired ratios."""
    if not values:
        raise ValueError("no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
