"""Peak-RSS growth of one variant, measured in a fresh Python process.

Peak RSS is a process-wide high-water mark, so measuring several variants in one process says
nothing about any one of them. A fresh interpreter per variant isolates them; the figure is still
coarse (allocator caching, page granularity) and is reported as informational only.

Run as ``python -m sliceout_lab.bench.rss '<json request>'``; prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import asdict
from typing import Any

__all__ = ["measure_rss_in_subprocess", "probe"]


def probe(
    workload: str, p: float, variant: str, options: dict[str, Any], steps: int
) -> dict[str, Any]:
    """Build one variant, then report peak RSS before and after ``steps`` training steps."""
    from ..memory import current_rss_bytes, peak_rss_bytes
    from .workloads import BenchOptions, get_workload

    wl = get_workload(workload).build(p, BenchOptions(**options))
    arm = wl.factories[variant]()
    before_current = current_rss_bytes()
    before_peak = peak_rss_bytes()
    for _, batch in zip(range(steps), itertools.cycle(wl.batches), strict=False):
        arm.step(batch)
    after_peak = peak_rss_bytes()
    reference = before_current if before_current is not None else before_peak
    return {
        "rss_before_steps_bytes": before_current,
        "peak_rss_before_steps_bytes": before_peak,
        "peak_rss_after_steps_bytes": after_peak,
        "peak_rss_growth_bytes": max(0, after_peak - reference),
        "steps": steps,
    }


def measure_rss_in_subprocess(
    workload: str,
    p: float,
    variant: str,
    options: Any,
    *,
    steps: int = 3,
    threads: int | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run :func:`probe` in a fresh interpreter; returns its dict, or ``{"error": ...}``."""
    request = {
        "workload": workload,
        "p": p,
        "variant": variant,
        "options": asdict(options),
        "steps": steps,
        "threads": threads,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sliceout_lab.bench.rss", json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"probe exited with {proc.returncode}: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    if request.get("threads"):
        import torch

        torch.set_num_threads(int(request["threads"]))
    result = probe(
        request["workload"], request["p"], request["variant"], request["options"], request["steps"]
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
