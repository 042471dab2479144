"""Run a workload over several dropout rates; report ratios as a table, JSON and a plot.

Only ratios to the baseline measured in the same interleaved run are results. Absolute times are
kept (raw samples in the JSON, medians in a secondary column) for diagnosis, not for quoting.
The device (``BenchOptions.device``: CPU or CUDA) and its name are recorded with every result and
printed in the table header; on CUDA each variant's peak allocated memory in one training step is
reported too.
"""

from __future__ import annotations

import datetime as _dt
import gc
import itertools
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ..harness import run_interleaved
from ..memory import peak_rss_bytes
from ..table import format_bytes, format_table
from .workloads import BenchOptions, get_workload

__all__ = [
    "SCHEMA_VERSION",
    "environment_info",
    "format_result",
    "plot_result",
    "run_benchmark",
    "validate_ps",
]

SCHEMA_VERSION = 1
JSON_NAME = "results.json"
PLOT_NAME = "ratios.png"


def validate_ps(ps: Sequence[float]) -> list[float]:
    """Check dropout rates: each in [0, 1), no duplicates; keep the given order."""
    out: list[float] = []
    for p in ps:
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate p must be in [0, 1), got {p}")
        if p in out:
            raise ValueError(f"dropout rate p={p} given twice")
        out.append(p)
    if not out:
        raise ValueError("no dropout rate given")
    return out


def _cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _device_info(device: str) -> dict[str, Any]:
    """The device the steps ran on, by name: so GPU and CPU figures cannot be confused."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"device": str(dev), "device_name": _cpu_model_name() or platform.processor()}
    props = torch.cuda.get_device_properties(dev)
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev),
        "device_capability": f"{props.major}.{props.minor}",
        "device_total_memory_bytes": props.total_memory,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
    }


def environment_info(device: str = "cpu") -> dict[str, Any]:
    """What a reader needs to interpret the numbers: software versions, threads, machine, device."""
    try:
        from importlib.metadata import version

        pkg_version: str | None = version("sliceout-fx")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        pkg_version = None
    try:
        cpu_capability: str | None = torch.backends.cpu.get_cpu_capability()
    except Exception:
        cpu_capability = None
    return {
        "torch_version": torch.__version__,
        "sliceout_fx_version": pkg_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model_name() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": cpu_capability,
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "cuda_available": torch.cuda.is_available(),
        **_device_info(device),
    }


NOISY_SPREAD = 1.5
"""Baseline step times whose 90th/10th percentile ratio exceeds this flag a busy machine."""


def run_benchmark(
    workload: str,
    ps: Sequence[float] | None = None,
    *,
    options: BenchOptions | None = None,
    repeats: int = 30,
    warmup: int = 5,
    variants: Sequence[str] | None = None,
    threads: int | None = None,
    out: str | os.PathLike[str] | None = None,
    plot: bool = True,
    rss: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Benchmark ``workload`` at each ``p``; return the result dict (also written under ``out``).

    Per ``p``: build all variants from the same initial weights and train them through the A/B
    harness on the workload's batches: the bytes autograd saves in one step of each are counted
    (deterministic), then ``repeats`` interleaved rounds are timed after ``warmup`` untimed ones.
    ``out=None`` means ``bench-results/<workload>/`` (``<workload>-cuda/`` on CUDA).
    ``rss=True`` additionally measures each variant's peak-RSS growth in a fresh subprocess
    (slow-ish, informational).

    Everything runs on ``options.device``. On CUDA every timed step is bracketed by
    ``torch.cuda.synchronize``, and each variant's peak allocated memory in one step is measured
    (outside the timed rounds, see :meth:`sliceout_lab.harness.Arm.cuda_step_peak`) and reported
    relative to the baseline's.
    """
    from tqdm.auto import tqdm

    spec = get_workload(workload)
    ps = validate_ps(spec.default_ps if ps is None else ps)
    options = options or BenchOptions()
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    stream = sys.stdout if stream is None else stream
    device = options.device
    on_cuda = torch.device(device).type == "cuda"
    # GPU results go to their own default folder, so they never overwrite (or pass for) CPU ones.
    default_dir = workload if torch.device(device).type == "cpu" else f"{workload}-cuda"
    out_dir = Path(out) if out is not None else Path("bench-results") / default_dir

    per_p: list[dict[str, Any]] = []
    baseline_name = ""
    bar = tqdm(ps, desc=f"bench {workload}", unit="p", disable=not progress, leave=False)
    for p in bar:
        bar.set_postfix_str(f"p={p:g} building")
        wl = spec.build(p, options)
        baseline_name = wl.baseline
        arms = wl.build(variants)

        def on_round(r: int, p: float = p) -> None:
            if r >= warmup:
                bar.set_postfix_str(f"p={p:g} round {r + 1 - warmup}/{repeats}")

        bar.set_postfix_str(f"p={p:g} saved tensors, warm-up")
        run = run_interleaved(
            list(arms.values()),
            itertools.cycle(wl.batches),
            rounds=warmup + repeats,
            warmup=warmup,
            on_round=on_round,
        )
        entry: dict[str, Any] = {
            "p": p,
            "workload_info": wl.info,
            "variants": {
                name: {"description": wl.descriptions.get(name, arm.description), **run.stats(name)}
                for name, arm in arms.items()
            },
        }
        if rss:
            from .rss import measure_rss_in_subprocess

            for name in arms:
                bar.set_postfix_str(f"p={p:g} rss {name}")
                entry["variants"][name]["rss_subprocess"] = measure_rss_in_subprocess(
                    workload, p, name, options, threads=threads
                )
        per_p.append(entry)
        del arms, run, wl
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    bar.close()

    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "workload": workload,
        "description": spec.description,
        "baseline": baseline_name,
        "variants": list(per_p[0]["variants"]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "ps": ps,
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "options": {k: v for k, v in vars(options).items() if k != "extra"}
            | {"extra": dict(options.extra)},
            "timing": "interleaved rounds, order rotated each round; ratio = median of per-round "
            "variant/baseline ratios",
            "memory": "bytes of distinct storages saved for backward in one step "
            "(saved_tensors_hooks), parameter storages excluded",
        }
        | (
            {
                "cuda_memory": "peak torch.cuda.max_memory_allocated during one untimed training "
                "step minus memory allocated before it (the variant's gradients freed first); "
                "ratio to the baseline's",
                "cuda_sync": "torch.cuda.synchronize before and after every timed step",
            }
            if on_cuda
            else {}
        ),
        "environment": environment_info(device),
        "process_peak_rss_bytes": peak_rss_bytes(),
        "results": per_p,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON_NAME
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    result["files"] = {"json": str(json_path)}
    if plot:
        plot_path = out_dir / PLOT_NAME
        plot_result(result, plot_path)
        result["files"]["plot"] = str(plot_path)

    print(format_result(result), file=stream)
    for kind, path in result["files"].items():
        print(f"{kind}: {path}", file=stream)
    return result


def format_result(result: dict[str, Any]) -> str:
    """An aligned text table: ratios first; absolute milliseconds last, labelled informational."""
    settings = result["settings"]
    env = result["environment"]
    header = [
        "p",
        "variant",
        "time ratio",
        "IQR of ratios",
        "saved-activation ratio",
        "saved activations",
        "median ms (this machine, informational)",
    ]
    has_cuda = any(
        "cuda_step_peak_bytes" in v for e in result["results"] for v in e["variants"].values()
    )
    if has_cuda:
        header[-1:-1] = ["CUDA step-peak ratio", "CUDA step peak"]
    has_rss = any("rss_subprocess" in v for e in result["results"] for v in e["variants"].values())
    if has_rss:
        header.append("peak-RSS growth (own process, informational)")
    rows: list[list[str]] = []
    for entry in result["results"]:
        first = True
        for name, v in entry["variants"].items():
            is_base = name == result["baseline"]
            mem_ratio = v["memory_ratio"]
            cuda_cells: list[str] = []
            if has_cuda:
                peak, peak_ratio = v.get("cuda_step_peak_bytes"), v.get("cuda_step_peak_ratio")
                cuda_cells = [
                    "n/a" if peak_ratio is None else f"{peak_ratio:.3f}",
                    format_bytes(peak),
                ]
            rows.append(
                [
                    f"{entry['p']:.2f}" if first else "",
                    name + (" (baseline)" if is_base else ""),
                    f"{v['time_ratio']:.3f}",
                    "" if is_base else f"{v['time_ratio_q25']:.3f}-{v['time_ratio_q75']:.3f}",
                    "n/a" if mem_ratio is None else f"{mem_ratio:.3f}",
                    format_bytes(v["saved_activation_bytes"]),
                    *cuda_cells,
                    f"{v['median_ms']:.1f}",
                ]
            )
            if has_rss:
                rss = v.get("rss_subprocess", {})
                growth = rss.get("peak_rss_growth_bytes")
                rows[-1].append("error" if growth is None else format_bytes(growth))
            first = False
    lines = [
        f"SliceOut benchmark: {result['workload']} (baseline: {result['baseline']})",
        f"{settings['repeats']} interleaved rounds after {settings['warmup']} warm-up rounds; "
        f"torch {env['torch_version']}, {settings['threads']} thread(s), {env['processor']}",
        f"device: {_device_label(env)}",
        "time ratio = median of per-round variant/baseline step-time ratios (< 1: faster);",
        "saved-activation ratio = bytes autograd saves for backward in one step vs baseline "
        "(parameters excluded).",
        *(
            [
                "CUDA step-peak ratio = peak memory allocated during one training step (above what "
                "was allocated before it) vs baseline.",
            ]
            if has_cuda
            else []
        ),
    ]
    groups = [entry["p"] for entry in result["results"] for _ in entry["variants"]]
    lines += ["", format_table(header, rows, left=(1,), groups=groups)]
    noisy = [
        (entry["p"], entry["variants"][result["baseline"]]["step_time_spread"])
        for entry in result["results"]
        if entry["variants"][result["baseline"]].get("step_time_spread", 1.0) > NOISY_SPREAD
    ]
    if noisy:
        where = ", ".join(f"p={p:g} (x{spread:.1f})" for p, spread in noisy)
        lines += [
            "",
            f"warning: baseline step times varied a lot within the run at {where} "
            "(90th/10th percentile):",
            "the machine was busy; paired ratios absorb some of this, but rerun on a quieter "
            "machine or with more --repeats before quoting them.",
        ]
    return "\n".join(lines)


def _device_label(env: dict[str, Any]) -> str:
    """``cpu (<processor>)`` or ``cuda (<GPU name>, CUDA <version>)``; old results count as CPU."""
    device = env.get("device", "cpu")
    name = env.get("device_name") or env.get("processor") or "unknown"
    if torch.device(device).type == "cuda" and env.get("cuda_version"):
        name += f", CUDA {env['cuda_version']}"
    return f"{device} ({name})"


def plot_result(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Save time and saved-activation ratios vs ``p`` (one line per variant) as a PNG.

    Uses the Agg canvas directly, not pyplot, so no display or global backend is involved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_time, ax_mem = fig.subplots(1, 2, sharex=True)
    ps = [entry["p"] for entry in result["results"]]
    baseline = result["baseline"]
    for name in result["variants"]:
        if name == baseline:
            continue
        vs = [entry["variants"][name] for entry in result["results"]]
        (line,) = ax_time.plot(ps, [v["time_ratio"] for v in vs], marker="o", label=name)
        ax_time.fill_between(
            ps,
            [v["time_ratio_q25"] for v in vs],
            [v["time_ratio_q75"] for v in vs],
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )
        mem = [v["memory_ratio"] if v["memory_ratio"] is not None else float("nan") for v in vs]
        ax_mem.plot(ps, mem, marker="o", label=name, color=line.get_color())
    for ax, title in (
        (ax_time, "training-step time / baseline (median, IQR shaded)"),
        (ax_mem, "activations saved for backward / baseline"),
    ):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=f"{baseline} (baseline)")
        ax.set_xlabel("dropout rate p")
        ax.set_ylabel("ratio")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(
        f"{result['workload']}: {result['settings']['repeats']} interleaved rounds, "
        f"torch {env['torch_version']}, {result['settings']['threads']} thread(s)\n"
        f"device: {_device_label(env)}",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
