"""Benchmarks of SliceOut against standard and controlled dropout.

Measurements are ratios to a baseline measured in the same process with interleaved runs (the
machines are shared and noisy) plus exact saved-activation byte counts. See ``sliceout-fx bench``.
"""

from .memory import (
    SavedTensorStats,
    current_rss_bytes,
    measure_saved_tensors,
    peak_rss_bytes,
    saved_activation_bytes,
)
from .runner import format_table, plot_result, run_benchmark
from .timing import interleaved_step_times, median_ratio, ratio_of_medians, round_order
from .workloads import (
    BenchOptions,
    Variant,
    Workload,
    WorkloadSpec,
    get_workload,
    register_workload,
    workload_names,
)

__all__ = [
    "BenchOptions",
    "SavedTensorStats",
    "Variant",
    "Workload",
    "WorkloadSpec",
    "current_rss_bytes",
    "format_table",
    "get_workload",
    "interleaved_step_times",
    "measure_saved_tensors",
    "median_ratio",
    "peak_rss_bytes",
    "plot_result",
    "ratio_of_medians",
    "register_workload",
    "round_order",
    "run_benchmark",
    "saved_activation_bytes",
    "workload_names",
]
