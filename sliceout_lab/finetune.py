"""What the fine-tuning examples share, so that each holds only its data, model and metric.

The examples (``examples/finetune_*.py``) fine-tune a baseline and a SliceOut copy of one
pretrained model through the A/B harness (:func:`sliceout_lab.harness.run_interleaved`). This
module holds the pieces around that run: the data order, the learning-rate schedule (built from
``torch.optim.lr_scheduler``), the checks that both copies start alike, the summary of what was
sliced, and the comparison table and JSON record made from the harness's :class:`ABResult`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sliceout_fx.schedule import DEFAULT_FULL_WIDTH_EVERY, SliceSchedule, full_width_every_problem

from .harness import ABResult
from .table import format_table

__all__ = [
    "batch_indices",
    "example_parser",
    "example_slice_schedule",
    "start_run",
    "comparison_rows",
    "comparison_table",
    "run_record",
    "same_weights",
    "summarise_sites",
    "warmup_schedule",
    "write_results",
]


def example_parser(
    doc: str,
    *,
    steps: int,
    batch_size: int,
    p: float,
    p_help: str,
    eval_batch_size: int,
    out: Path | None,
    out_help: str = "where to write the JSON results",
    full_width_last: float | None = None,
    full_width_every: int = DEFAULT_FULL_WIDTH_EVERY,
) -> argparse.ArgumentParser:
    """The options every fine-tuning example has, with its defaults; it adds its own after.

    ``full_width_last`` (the default fraction) adds ``--full-width-last`` and
    ``--full-width-every`` (default ``full_width_every``, the library's unless an example has
    measured a better one for its model) to an example that trains SliceOut with a
    :class:`sliceout_fx.SliceSchedule`.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=steps, help="training steps per variant")
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--p", type=float, default=p, help=p_help)
    ap.add_argument(
        "--normalisation",
        choices=("flow", "probabilistic"),
        default="flow",
        help="SliceOut rescaling (library default: flow; the paper used probabilistic)",
    )
    ap.add_argument(
        "--mode",
        choices=("slice", "gather"),
        default="slice",
        help="slice: contiguous slices (SliceOut, the default); gather: random unit subsets "
        "(controlled dropout)",
    )
    ap.add_argument("--eval-batch-size", type=int, default=eval_batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=out, help=out_help)
    if full_width_last is not None:
        ap.add_argument(
            "--full-width-last",
            type=_fraction,
            default=full_width_last,
            help="fraction of the last steps SliceOut trains at full width (the paper's 1%%)",
        )
        ap.add_argument(
            "--full-width-every",
            type=_every,
            default=full_width_every,
            metavar="K",
            help="also train every K-th step at full width (default: %(default)s; the library's: "
            f"{DEFAULT_FULL_WIDTH_EVERY}; 0: off)",
        )
    return ap


def _fraction(text: str) -> float:
    """An argparse type: a float in ``[0, 1)``, refused before any data or model is loaded."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _every(text: str) -> int:
    """An argparse type: a ``full_width_every`` that :class:`sliceout_fx.SliceSchedule` takes."""
    value = int(text)
    why = full_width_every_problem(value)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return value


def example_slice_schedule(model: nn.Module, args: argparse.Namespace) -> SliceSchedule:
    """The SliceOut arm's schedule from ``--steps``, ``--full-width-last``, ``--full-width-every``.

    The last fraction is rounded up to at least one step: the paper's 1% of a short run would
    otherwise be no step at all. ``schedule.total_steps - schedule.full_width_from`` is the
    number of last steps at full width.
    """
    tail = max(1, math.ceil(args.full_width_last * args.steps))
    return SliceSchedule(
        model,
        args.steps,
        full_width_last=tail / args.steps,
        full_width_every=args.full_width_every,
    )


def start_run(args: argparse.Namespace) -> float:
    """Apply ``--threads`` and seed torch with ``--seed``; returns the start time (seconds)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return time.perf_counter()


def batch_indices(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """The example indices of ``steps`` batches: shuffled epochs of ``range(n)``, back to back.

    The order is drawn from ``generator`` now, not when the batches are consumed.
    """
    need = steps * batch_size
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-need // n))])
    return (order[i : i + batch_size] for i in range(0, need, batch_size))


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    warmup_fraction: float,
    decay: Literal["linear", "cosine"],
    floor: float = 0.0,
) -> LambdaLR:
    """Linear warm-up over the first ``warmup_fraction`` of the steps, then a linear or cosine
    decay to ``floor`` times the peak rate; step it once per optimizer step.

    A ``LambdaLR`` of the closed-form factor, so every parameter group keeps its own peak rate
    and the curve is exact (chaining ``LinearLR`` and ``CosineAnnealingLR`` in a
    ``SequentialLR`` undershoots a non-zero floor: the cosine's recursive form starts from the
    wrong rate).
    """
    warm = max(1, int(steps * warmup_fraction))
    if steps <= warm:
        raise ValueError(f"{steps} steps leave none after {warm} warm-up steps")
    if decay not in ("linear", "cosine"):
        raise ValueError(f"decay must be 'linear' or 'cosine', got {decay!r}")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / (steps - warm))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return LambdaLR(optimizer, factor)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold equal tensors under equal ``state_dict`` keys."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def summarise_sites(report: Any) -> list[str]:
    """One line per kind of site (layer indices folded): width kept and effective rate."""
    kinds: dict[str, list[Any]] = {}
    for s in report.sites:
        kinds.setdefault(re.sub(r"\.\d+\.", ".*.", s.name), []).append(s)
    lines = []
    for name, sites in kinds.items():
        live, total = sites[0].channels()
        lines.append(
            f"  {name} x{len(sites)}: {live}/{total} channels kept "
            f"(p={sites[0].p:g}, effective p={sites[0].effective_p:.3f}, {sites[0].units} units)"
        )
    return lines


def comparison_rows(
    run: ABResult, quality: Mapping[str, Mapping[str, Any]], loss_last: int
) -> list[dict[str, Any]]:
    """One JSON row per variant: its quality figures, then the harness's step-time and memory
    ratios and its mean training loss over the last ``loss_last`` steps."""
    return [
        {
            "variant": name,
            **quality[name],
            "median_step_ms": run.median_ms(name),
            "step_time_ratio": run.time_ratio(name),
            "saved_activation_bytes": run.saved[name].bytes,
            "saved_activation_ratio": run.memory_ratio(name),
            f"final_train_loss_last{loss_last}": run.mean_loss(name, loss_last),
        }
        for name in run.names
    ]


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def comparison_table(
    rows: Sequence[Mapping[str, Any]],
    run: ABResult,
    *,
    metrics: Sequence[tuple[str, str]],
    loss_last: int,
    elapsed: float,
) -> str:
    """The printed table: variant, quality metrics (``(row key, column label)`` pairs), step
    times and saved-activation ratios, training loss; a footnote with the spread."""
    header = ["variant", *(label for _, label in metrics), "median step (ms)", "step-time ratio",
              "saved act. (MiB)", "saved-act. ratio", f"train loss (last {loss_last})"]  # fmt: skip
    body = [
        [
            r["variant"],
            *(_cell(r[key]) for key, _ in metrics),
            f"{r['median_step_ms']:.1f}",
            f"{r['step_time_ratio']:.3f}",
            f"{r['saved_activation_bytes'] / 2**20:.2f}",
            f"{r['saved_activation_ratio']:.3f}",
            f"{r[f'final_train_loss_last{loss_last}']:.3f}",
        ]
        for r in rows
    ]
    other = run.names[1]
    q25, q75 = run.time_ratio_quartiles(other)
    return "\n".join(
        [
            format_table(header, body),
            f"step-time ratio: median over {len(run.step_times[other])} timed steps of the "
            f"{other}/{run.baseline} time of the same step (quartiles {q25:.3f}-{q75:.3f}; ratio "
            f"of total times {run.total_time_ratio(other):.3f}); saved act.: bytes autograd saved "
            f"for backward in one step. Total {elapsed:.0f} s.",
        ]
    )


def run_record(report: Any, run: ABResult, elapsed: float, device: str = "cpu") -> dict[str, Any]:
    """The JSON fields every example shares: sites, timings, losses and the environment."""
    from .bench.runner import environment_info

    other = run.names[1]
    return {
        "sites": [
            {"name": s.name, "kind": s.kind, "p": s.p, "effective_p": s.effective_p,
             "width": s.width, "units": s.units}  # fmt: skip
            for s in report.sites
        ],
        "skipped_sites": [{"name": k.name, "reason": k.reason} for k in report.skipped],
        "step_time_ratio_quartiles": list(run.time_ratio_quartiles(other)),
        "total_time_ratio": run.total_time_ratio(other),
        "timed_steps": len(run.step_times[other]),
        "step_times_ms": {n: [round(1000 * t, 2) for t in ts] for n, ts in run.step_times.items()},
        "train_losses": {n: [round(v, 4) for v in ls] for n, ls in run.losses.items()},
        "elapsed_s": elapsed,
        "environment": environment_info(device),
    }


def write_results(path: Path, result: Mapping[str, Any]) -> None:
    """Write the example's JSON (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
