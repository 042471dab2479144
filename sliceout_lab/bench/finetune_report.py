"""What the fine-tuning examples record and print, in one place.

The examples (``examples/finetune_*.py``) train a baseline and a SliceOut copy of one pretrained
model with interleaved steps; this module turns their timings and the conversion report into the
shared parts of the results JSON and into the comparison table, so the three scripts differ only in
their model, data and quality metric.
"""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["comparison_table", "run_record", "write_results"]


def _quartiles(ratios: Sequence[float]) -> list[float]:
    if len(ratios) > 1:
        return statistics.quantiles(ratios, n=4, method="inclusive")
    return [statistics.median(ratios)] * 3 if ratios else [float("nan")] * 3


def comparison_table(
    rows: Sequence[Mapping[str, Any]],
    ratios: Sequence[float],
    *,
    metric: tuple[str, str],
    loss: tuple[str, str],
    elapsed: float,
) -> str:
    """The printed table: variant, quality metric, step times and saved-activation ratios.

    ``metric`` and ``loss`` are ``(row key, column label)`` pairs, e.g. ``("val_perplexity",
    "val ppl")`` and ``("final_train_loss_last5", "(last 5)")``.
    """
    (metric_key, metric_label), (loss_key, loss_label) = metric, loss
    header = (
        f"{'variant':<10} {metric_label:>9} {'median step':>12} {'step-time':>10} "
        f"{'saved act.':>11} {'saved-act.':>11} {'train loss':>11}"
    )
    lines = [
        header,
        f"{'':<10} {'':>9} {'(ms)':>12} {'ratio':>10} {'(MiB)':>11} {'ratio':>11} {loss_label:>11}",
        "-" * len(header),
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<10} {r[metric_key]:>9.4g} {r['median_step_ms']:>12.1f} "
            f"{r['step_time_ratio']:>10.3f} {r['saved_activation_bytes'] / 2**20:>11.2f} "
            f"{r['saved_activation_ratio']:>11.3f} {r[loss_key]:>11.3f}"
        )
    q = _quartiles(ratios)
    lines.append(
        f"step-time ratio: median over {len(ratios)} steps of the SliceOut/baseline time of the "
        f"same step (quartiles {q[0]:.3f}-{q[2]:.3f}); saved act.: bytes autograd saved for "
        f"backward in one step. Total {elapsed:.0f} s."
    )
    return "\n".join(lines)


def run_record(
    report: Any,
    ratios: Sequence[float],
    times: Mapping[str, Sequence[float]],
    losses: Mapping[str, Sequence[float]],
    elapsed: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """The JSON fields every example shares: sites, timings, losses and the environment."""
    return {
        "sites": [
            {
                "name": s.name,
                "kind": s.kind,
                "p": s.p,
                "effective_p": s.effective_p,
                "width": s.width,
                "units": s.units,
            }
            for s in report.sites
        ],
        "skipped_sites": [{"name": k.name, "reason": k.reason} for k in report.skipped],
        "step_time_ratio_quartiles": _quartiles(ratios),
        "timed_steps": len(ratios),
        "step_times_ms": {n: [round(1000 * t, 2) for t in ts] for n, ts in times.items()},
        "train_losses": {n: [round(v, 4) for v in ls] for n, ls in losses.items()},
        "elapsed_s": elapsed,
        "environment": {
            "torch": torch.__version__,
            "device": device if device == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }


def write_results(path: Path, result: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
