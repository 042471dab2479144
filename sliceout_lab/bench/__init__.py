"""Benchmarks of SliceOut against standard and controlled dropout (``sliceout-fx bench``).

A workload builds, for one dropout rate, a baseline and variants of one model as
:class:`sliceout_lab.harness.Arm` objects over synthetic batches; the runner trains them through
the lab's A/B harness (:func:`sliceout_lab.harness.run_interleaved`) and reports ratios to the
baseline measured in the same process, plus exact saved-activation byte counts.
"""

from .runner import format_result, plot_result, run_benchmark
from .workloads import (
    BenchOptions,
    Workload,
    WorkloadSpec,
    get_workload,
    register_workload,
    workload_names,
)

__all__ = [
    "BenchOptions",
    "Workload",
    "WorkloadSpec",
    "format_result",
    "get_workload",
    "plot_result",
    "register_workload",
    "run_benchmark",
    "workload_names",
]
