"""The host-overhead suite, the GPU suite (small, on the CPU) and the --compile/--capturable flags.

Timings are noisy and only shape-checked here; op counts are deterministic and asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from sliceout_fx.cli import main
from sliceout_fx.ops import Cut, sliced_linear
from sliceout_lab.bench.gpu_suite import format_suite, run_gpu_suite
from sliceout_lab.bench.overhead import count_ops, run_overhead


def test_a_seeded_draw_dispatches_no_aten_op_and_an_unseeded_one_op() -> None:
    from sliceout_fx.sampling import DrawSpec, SliceSampler

    specs = [DrawSpec(64, 32, "slice")] * 3
    seeded, unseeded = SliceSampler(specs, seed=0), SliceSampler(specs)
    assert sum(count_ops(seeded).values()) == 0
    assert count_ops(unseeded) == {"aten.randint.low": 1}  # one draw for all sites


def test_a_small_sliced_linear_dispatches_no_more_ops_than_its_full_width_forward() -> None:
    weight = torch.randn(64, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    x = torch.randn(8, 32)
    out_cut, in_cut = Cut(10, 32, 64, "slice"), Cut(5, 32, 64, "slice")
    sliced = count_ops(lambda: sliced_linear(x, weight, bias, out_cut, in_cut, 2.0))
    full = count_ops(lambda: F.linear(torch.randn(8, 64), weight, bias))
    # one strided view of the weight block replaces the transpose; the bias view is the extra op
    assert sum(sliced.values()) <= sum(full.values()) + 2, (sliced, full)


def test_overhead_suite_counts_ops_and_writes_its_table(tmp_path: Path, capsys) -> None:
    (result,) = run_overhead(["mlp"], repeats=2, warmup=1, calls_per_round=1, out=tmp_path)
    assert result.ops_dropout > 50 and result.ops_sliceout > 50
    # regression guard for the host-bound regime (measured: 114 vs 110 ops; was 142 vs 110)
    assert result.ops_sliceout <= 1.05 * result.ops_dropout, result.extra_ops
    # dropout's own ops are gone from the SliceOut step
    assert result.extra_ops.get("aten.bernoulli_.float") == -3
    assert result.time_ratio > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][0]["ops_sliceout"] == result.ops_sliceout
    assert "| mlp: MLP 784-64-64-64-10 |" in capsys.readouterr().out


def test_overhead_suite_refuses_an_unknown_workload(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown overhead workload"):
        run_overhead(["nope"], out=tmp_path)


def test_gpu_suite_runs_on_the_cpu_and_records_what_it_skips(tmp_path: Path) -> None:
    suite = run_gpu_suite(
        device="cpu",
        entries=["mlp-b256"],
        repeats=2,
        warmup=1,
        backend="aot_eager",
        out=tmp_path,
        budget_s=600,
    )
    rows = {r["mode"]: r for r in suite["rows"]}
    assert set(rows) == {"eager", "compiled", "cudagraph"}
    for mode in ("eager", "compiled"):
        assert rows[mode]["time_ratio"] > 0, rows[mode]
        assert 0 < rows[mode]["saved_bytes_ratio"] < 1  # p=0.5 saves activations
    assert "CUDA" in rows["cudagraph"]["skipped"]
    table = (tmp_path / "results.md").read_text()
    assert table.strip() == format_suite(suite).strip()
    assert "| mlp-b256 | 0.5 | compiled |" in table
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == suite["rows"]


def test_gpu_suite_skips_entries_once_its_budget_is_spent(tmp_path: Path) -> None:
    suite = run_gpu_suite(
        device="cpu", entries=["mlp-b256", "wrn-16-8"], modes=("eager",), budget_s=-1,
        out=tmp_path,
    )  # fmt: skip
    assert [r["skipped"] for r in suite["rows"]] == ["time budget of -1 s spent"] * 2


def test_cli_bench_compile_and_capturable(tmp_path: Path, capsys) -> None:
    code = main(
        ["bench", "mlp", "--p", "0.5", "--hidden", "32", "--repeats", "2", "--warmup", "1",
         "--compile", "--backend", "aot_eager", "--capturable", "--variants", "sliceout-flow",
         "--no-plot", "--no-progress", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    options = result["settings"]["options"]
    assert options["compile"] and options["capturable"]
    assert "sliceout-flow" in result["results"][0]["variants"]


def test_bench_capturable_leaves_host_only_variants_alone() -> None:
    from sliceout_lab.bench.workloads import BenchOptions, get_workload

    options = BenchOptions(hidden=16, batch_size=4, capturable=True, num_batches=1)
    built = get_workload("mlp").build(0.5, options).build(["sliceout-flow", "controlled"])
    flow, controlled = built["sliceout-flow"].model, built["controlled"].model
    assert flow.report.config.capturable
    assert not controlled.report.config.capturable  # index sets are drawn on the host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_suite_on_cuda_smallest_entry(tmp_path: Path) -> None:
    suite = run_gpu_suite(
        device="cuda", entries=["mlp-b256"], repeats=3, warmup=2, out=tmp_path, budget_s=300
    )
    rows = {r["mode"]: r for r in suite["rows"]}
    for mode in ("eager", "compiled", "cudagraph"):
        assert rows[mode].get("time_ratio", 0) > 0, rows[mode]
        assert rows[mode]["cuda_peak_ratio"] is not None


def test_converted_model_under_compile_keeps_eval_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 5))
    converted = sliceout_fx.convert(model, p=0.5, capturable=True)
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 12)
    model.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
