"""One prepared benchmark suite for a GPU: every workload in eager, compiled and CUDA-graph mode.

Device time on a lent GPU is scarce (minutes, its start included), so the suite is a single
command with a time budget: entries run in order and whatever would start after the budget is
spent is recorded as skipped, never silently dropped. For each workload and mode it reports the
step-time ratio and the CUDA peak-memory ratio of SliceOut against the *same model with dropout in
the same mode* (both compiled, or both captured), measured interleaved in one process.

Modes:

* ``eager``: plain PyTorch;
* ``compiled``: ``torch.compile`` (inductor) of both models; SliceOut takes its device-side
  path under compile by itself;
* ``cudagraph``: ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) of both models, SliceOut
  converted with ``capturable=True``. CUDA only.

``--device cpu`` runs the same suite with small sizes, so that it is tested without a GPU.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ..table import format_table
from .workloads import BenchOptions

__all__ = ["SuiteEntry", "format_suite", "run_gpu_suite", "suite_entries"]

MODES = ("eager", "compiled", "cudagraph")


@dataclass(frozen=True)
class SuiteEntry:
    """One workload of the suite at one rate, with its (GPU-sized) options."""

    name: str
    workload: str
    p: float
    options: dict[str, Any] = field(default_factory=dict)
    cpu_options: dict[str, Any] = field(default_factory=dict)  # the small size for --device cpu


def suite_entries() -> list[SuiteEntry]:
    """The suite: the paper's MLP at two batch sizes, WRN-16-8, EfficientNet-B0, GPT-2 768x12."""
    return [
        SuiteEntry("mlp-b256", "mlp", 0.5, {"batch_size": 256}, {"batch_size": 32, "hidden": 256}),
        SuiteEntry(
            "mlp-b4096", "mlp", 0.5, {"batch_size": 4096}, {"batch_size": 256, "hidden": 256}
        ),
        SuiteEntry(
            "wrn-16-8",
            "wrn",
            0.5,
            {"batch_size": 128},
            {"batch_size": 8, "depth": 10, "extra": {"widen": 2, "image_size": 16}},
        ),  # fmt: skip
        SuiteEntry(
            "efficientnet_b0",
            "efficientnet_b0",
            0.3,
            {"batch_size": 64, "extra": {"image_size": 224}},
            {"batch_size": 4, "extra": {"image_size": 32}},
        ),  # fmt: skip
        SuiteEntry(
            "gpt2-768x12",
            "gpt2",
            0.3,
            {"batch_size": 8, "hidden": 768, "depth": 12, "extra": {"seq": 512}},
            {
                "batch_size": 2,
                "hidden": 64,
                "depth": 2,
                "extra": {"seq": 32, "heads": 4, "vocab": 512},
            },
        ),  # fmt: skip
    ]


def _options(entry: SuiteEntry, mode: str, device: str, backend: str) -> BenchOptions:
    sized = dict(entry.options if torch.device(device).type == "cuda" else entry.cpu_options)
    return BenchOptions(
        device=device,
        compile=mode != "eager",
        compile_mode="reduce-overhead" if mode == "cudagraph" else None,
        compile_backend=backend,
        capturable=mode == "cudagraph",
        **sized,
    )


def run_gpu_suite(
    *,
    device: str = "cuda",
    modes: tuple[str, ...] = MODES,
    entries: list[str] | None = None,
    budget_s: float = 360.0,
    repeats: int = 10,
    warmup: int = 3,
    backend: str = "inductor",
    out: str | Path | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run the suite; write ``results.json`` and ``results.md`` under ``out`` and print the table.

    ``budget_s`` bounds the whole run (compilation and warm-up included): an entry that would start
    after it is recorded as skipped. ``cudagraph`` is skipped off CUDA.
    """
    from .runner import environment_info, run_benchmark

    stream = sys.stdout if stream is None else stream
    unknown_modes = [m for m in modes if m not in MODES]
    if unknown_modes:
        raise ValueError(f"unknown mode(s) {unknown_modes}; choose from {list(MODES)}")
    known = {e.name: e for e in suite_entries()}
    chosen = list(known) if not entries else list(entries)
    if any(name not in known for name in chosen):
        raise ValueError(f"unknown suite entries {chosen}; choose from {list(known)}")
    on_cuda = torch.device(device).type == "cuda"
    out_dir = Path(out) if out is not None else Path("bench-results") / f"gpu-suite-{device}"
    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    for name in chosen:
        entry = known[name]
        for mode in modes:
            row: dict[str, Any] = {"entry": name, "workload": entry.workload, "p": entry.p,
                                   "mode": mode}  # fmt: skip
            elapsed = time.monotonic() - start
            if mode == "cudagraph" and not on_cuda:
                rows.append(row | {"skipped": "CUDA graphs need a CUDA device"})
                continue
            if elapsed > budget_s:
                rows.append(row | {"skipped": f"time budget of {budget_s:.0f} s spent"})
                continue
            options = _options(entry, mode, device, backend)
            t0 = time.monotonic()
            try:
                result = run_benchmark(
                    entry.workload, [entry.p], options=options, repeats=repeats, warmup=warmup,
                    variants=["sliceout-flow"], out=out_dir / f"{name}-{mode}", plot=False,
                    progress=False, stream=io.StringIO(),
                )  # fmt: skip
            except Exception as error:  # one failing entry must not lose the others' figures
                rows.append(row | {"error": f"{type(error).__name__}: {error}"[:300]})
                continue
            stats = result["results"][0]["variants"]["sliceout-flow"]
            rows.append(
                row
                | {
                    "time_ratio": stats["time_ratio"],
                    "time_ratio_iqr": [stats["time_ratio_q25"], stats["time_ratio_q75"]],
                    "cuda_peak_ratio": stats.get("cuda_step_peak_ratio"),
                    "saved_bytes_ratio": stats["memory_ratio"],
                    "sliceout_ms": stats["median_ms"],
                    "seconds": time.monotonic() - t0,
                }
            )
            print(_format_row(rows[-1]), file=stream, flush=True)
    suite = {
        "device": device,
        "environment": environment_info(device),
        "settings": {
            "modes": list(modes),
            "repeats": repeats,
            "warmup": warmup,
            "budget_s": budget_s,
            "backend": backend,
        },  # fmt: skip
        "total_seconds": time.monotonic() - start,
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.json", "w", encoding="utf-8") as f:
        json.dump(suite, f, indent=2)
    table = format_suite(suite)
    (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table, file=stream)
    print(f"json: {out_dir / 'results.json'}\nmarkdown: {out_dir / 'results.md'}", file=stream)
    return suite


def _format_row(row: dict[str, Any]) -> str:
    return (
        f"[suite] {row['entry']} {row['mode']}: time ratio {row['time_ratio']:.3f} "
        f"({row['seconds']:.0f} s)"
    )


def format_suite(suite: dict[str, Any]) -> str:
    """The suite's markdown table: one row per workload and mode."""
    env = suite["environment"]
    device = env.get("device_name") or suite["device"]
    header = ["workload", "p", "mode", "step time ratio (IQR)", "CUDA peak memory ratio",
              "saved bytes ratio"]  # fmt: skip
    rows = []
    for r in suite["rows"]:
        head = [r["entry"], str(r["p"]), r["mode"]]
        if "skipped" in r or "error" in r:
            rows.append([*head, r.get("skipped") or r.get("error"), "", ""])
            continue
        q25, q75 = r["time_ratio_iqr"]
        peak = "-" if r["cuda_peak_ratio"] is None else f"{r['cuda_peak_ratio']:.3f}"
        rows.append([*head, f"{r['time_ratio']:.3f} ({q25:.3f}-{q75:.3f})", peak,
                     f"{r['saved_bytes_ratio']:.3f}"])  # fmt: skip
    title = f"SliceOut (flow) vs dropout in the same mode, on {device}; ratios < 1 favour SliceOut."
    return f"{title}\n\n{format_table(header, rows, left=(0, 2), markdown=True)}"
