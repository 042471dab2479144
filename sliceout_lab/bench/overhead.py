"""Host overhead of one training step at tiny sizes: ATen ops dispatched and host time.

On a GPU, a training step of small or medium size is bound by the host: Python, the dispatcher and
autograd, one kernel launch per ATen op. At tiny sizes a CPU step measures the same thing, since
the kernels then cost next to nothing. This module counts the ATen ops one step dispatches
(deterministic: a ``TorchDispatchMode`` sees every op once, forward, backward and optimizer) and
times SliceOut against dropout interleaved, on two workloads:

* ``mlp``: 784-64-64-64-10 with dropout after each hidden layer, batch 8, p=0.5;
* ``gpt2``: HuggingFace GPT-2 from a config, width 64, 2 layers, 4 heads, sequence 16, batch 2,
  p=0.3 (the baseline has every config dropout at p; SliceOut slices heads and FFN units on top,
  as in the ``gpt2`` workload).

Both use AdamW with ``foreach=True``. ``sliceout-fx bench overhead`` prints the table.
"""

from __future__ import annotations

import collections
import copy
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..harness import Arm
from ..table import format_table
from ..timing import interleaved_step_times, paired_ratios, quantile

__all__ = ["OpCounter", "OverheadResult", "count_ops", "overhead_cases", "run_overhead"]

Step = Callable[[], None]


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(step: Step) -> collections.Counter[str]:
    """The ATen ops of one call of ``step``, by name."""
    with OpCounter() as counter:
        step()
    return counter.ops


def _adamw_step(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> Step:
    """One AdamW (foreach) training step of ``model`` on its fixed batch, as a closure."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    arm = Arm("step", model, optimizer, loss=lambda m, _batch: loss(m))
    return lambda: arm.step(None)


def _mlp_case(seed: int) -> tuple[dict[str, Step], dict[str, Any]]:
    import sliceout_fx

    torch.manual_seed(seed)
    widths = (784, 64, 64, 64)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU(), nn.Dropout(0.5)]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(8, 784, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    sliced = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=seed)

    def loss(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    steps = {"dropout": _adamw_step(model, loss), "sliceout": _adamw_step(sliced, loss)}
    info = {"model": "MLP 784-64-64-64-10", "batch": 8, "p": 0.5}
    return steps, info, _guard_check(sliced, (x,), {})


def _gpt2_case(seed: int) -> tuple[dict[str, Step], dict[str, Any]]:
    import transformers

    import sliceout_fx

    p = 0.3
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=16, use_cache=False,
        resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed + 1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sliced = sliceout_fx.convert(copy.deepcopy(model), p=p, seed=seed, example_inputs=batch)

    def loss(m: nn.Module) -> torch.Tensor:
        return m(**batch, labels=ids).loss

    steps = {"dropout": _adamw_step(model, loss), "sliceout": _adamw_step(sliced, loss)}
    info = {"model": "GPT-2 width 64, 2 layers, 4 heads", "batch": 2, "sequence": 16, "p": p}
    return steps, info, _guard_check(sliced, (), batch)


def _guard_check(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Step:
    """The capture-guard checks one training step of ``model`` makes (every converted part).

    A converted layer's guards read no call arguments; the whole-model (fx) guard reads the
    model's own call, which is ``args``/``kwargs``.
    """
    from sliceout_fx.module import conversions_in

    parts = [(m, s, args if s.kind == "whole" else (), kwargs if s.kind == "whole" else {})
             for m, s in conversions_in(model)]  # fmt: skip

    def check() -> None:
        for module, state, a, k in parts:
            if not state.ready(module, a, k):
                raise RuntimeError("the guard check must not change the conversion")

    return check


def overhead_cases() -> dict[str, Callable[[int], tuple[dict[str, Step], dict[str, Any], Step]]]:
    """The workloads of ``bench overhead``: name -> builder of ``({variant: step}, info,
    guard_check)``, the last the capture-guard checks of one SliceOut step."""
    return {"mlp": _mlp_case, "gpt2": _gpt2_case}


@dataclass
class OverheadResult:
    """One workload's figures: op counts per step and the host-time ratio."""

    workload: str
    info: dict[str, Any]
    ops_dropout: int
    ops_sliceout: int
    op_ratio: float
    time_ratio: float
    time_ratio_q25: float
    time_ratio_q75: float
    extra_ops: dict[str, int]  # op name -> SliceOut count minus dropout count (non-zero only)
    guard_us: float = 0.0  # host time of one step's capture-guard checks, microseconds
    guard_share: float = 0.0  # guard_us over the SliceOut step's host time


def _measure(name: str, build, seed: int, repeats: int, warmup: int, calls: int) -> OverheadResult:
    steps, info, guard_check = build(seed)
    for step in steps.values():  # first calls export, allocate optimizer state...
        for _ in range(3):
            step()
    ops = {variant: count_ops(step) for variant, step in steps.items()}

    def batched(step: Step) -> Step:
        def run() -> None:
            for _ in range(calls):
                step()

        return run

    times = interleaved_step_times({v: batched(s) for v, s in steps.items()}, repeats, warmup)
    ratios = paired_ratios(times["sliceout"], times["dropout"])
    names = set(ops["dropout"]) | set(ops["sliceout"])
    extra = {n: ops["sliceout"][n] - ops["dropout"][n] for n in sorted(names)}
    total_d, total_s = sum(ops["dropout"].values()), sum(ops["sliceout"].values())
    guard_us = _guard_microseconds(guard_check)
    step_us = 1e6 * statistics.median(times["sliceout"]) / calls
    return OverheadResult(
        workload=name,
        info=info,
        ops_dropout=total_d,
        ops_sliceout=total_s,
        op_ratio=total_s / total_d,
        time_ratio=statistics.median(ratios),
        time_ratio_q25=quantile(ratios, 0.25),
        time_ratio_q75=quantile(ratios, 0.75),
        extra_ops={n: d for n, d in extra.items() if d},
        guard_us=guard_us,
        guard_share=guard_us / step_us,
    )


def _guard_microseconds(check: Step, calls: int = 2000, rounds: int = 7) -> float:
    """Median over ``rounds`` of the mean time of one ``check()`` call, in microseconds."""
    import time

    means = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            check()
        means.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(means)


def format_overhead(results: list[OverheadResult]) -> str:
    """A markdown table of :func:`run_overhead`'s results."""
    header = ["workload", "ATen ops / step, dropout", "SliceOut", "op ratio",
              "host time ratio (IQR)", "guard checks / step"]  # fmt: skip
    rows = [
        [
            f"{r.workload}: {r.info['model']}",
            str(r.ops_dropout),
            str(r.ops_sliceout),
            f"{r.op_ratio:.2f}",
            f"{r.time_ratio:.3f} ({r.time_ratio_q25:.3f}-{r.time_ratio_q75:.3f})",
            f"{r.guard_us:.1f} us ({100 * r.guard_share:.2f}% of the step)",
        ]
        for r in results
    ]
    return format_table(header, rows, markdown=True)


def run_overhead(
    workloads: list[str] | None = None,
    *,
    repeats: int = 30,
    warmup: int = 5,
    calls_per_round: int = 10,
    seed: int = 0,
    threads: int | None = 1,
    out: str | Path | None = None,
    stream: TextIO | None = None,
) -> list[OverheadResult]:
    """Count ops and time SliceOut against dropout on each workload; print and save the table.

    A round runs ``calls_per_round`` steps of one variant; the time ratio is the median over
    ``repeats`` interleaved rounds of SliceOut's round time over dropout's in the same round.
    One intra-op thread by default: the point is host work, not parallel kernels.
    """
    stream = sys.stdout if stream is None else stream
    cases = overhead_cases()
    names = list(cases) if not workloads else list(workloads)
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise ValueError(f"unknown overhead workload(s) {unknown}; choose from {list(cases)}")
    if threads is not None:
        torch.set_num_threads(threads)
    results = [_measure(n, cases[n], seed, repeats, warmup, calls_per_round) for n in names]
    print(format_overhead(results), file=stream)
    out_dir = Path(out) if out is not None else Path("bench-results") / "overhead"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    settings = {"repeats": repeats, "warmup": warmup, "calls_per_round": calls_per_round,
                "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "results": [asdict(r) for r in results]}, f, indent=2)
    print(f"json: {path}", file=stream)
    return results
