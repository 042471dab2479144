"""Tests of the benchmark harness: exact saved-tensor accounting, interleaving, runner, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sliceout_fx.cli import main
from sliceout_lab import memory, timing
from sliceout_lab.bench.runner import JSON_NAME, PLOT_NAME, run_benchmark
from sliceout_lab.bench.workloads import (
    BenchOptions,
    Workload,
    get_workload,
    make_adam,
    register_workload,
)
from sliceout_lab.harness import Arm

F32 = 4  # bytes per float32 element

# ----------------------------------------------------------------------------- saved activations


def _linear_relu(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU())


def test_saved_bytes_linear_relu_exact_and_parameters_excluded() -> None:
    model = _linear_relu()
    x = torch.randn(4, 8, requires_grad=True)

    def step() -> None:
        model(x).sum().backward()

    # Linear saves its input (4x8) and, since x needs a gradient, its weight (a parameter);
    # ReLU saves its output (4x16).
    expected_activations = (4 * 8 + 4 * 16) * F32
    stats = memory.measure_saved_tensors(step, model.parameters())
    assert stats.bytes == expected_activations == 384
    assert stats.parameter_tensors == 1
    assert stats.storages == 2
    assert memory.saved_activation_bytes(step, model.parameters()) == 384
    # Without telling it which tensors are parameters, the 16x8 weight is counted too.
    assert memory.saved_activation_bytes(step, []) == 384 + 16 * 8 * F32


def test_saved_bytes_sliced_weight_view_is_not_activation_memory() -> None:
    model = _linear_relu()
    lin = model[0]
    x = torch.randn(4, 8, requires_grad=True)

    def sliced_step() -> None:
        # Output rows 4..11 of the weight: a view into the parameter's storage.
        h = F.linear(x, lin.weight[4:12], lin.bias[4:12])
        torch.relu(h).sum().backward()

    stats = memory.measure_saved_tensors(sliced_step, model.parameters())
    assert stats.bytes == (4 * 8 + 4 * 8) * F32
    assert stats.parameter_tensors == 1

    def gathered_step() -> None:
        # Controlled dropout gathers rows: a copy, which does cost memory while it is saved.
        idx = torch.tensor([0, 3, 5, 6, 9, 10, 13, 15])
        h = F.linear(x, lin.weight[idx], lin.bias[idx])
        torch.relu(h).sum().backward()

    gathered = memory.measure_saved_tensors(gathered_step, model.parameters())
    # The gathered 8x8 weight copy plus the int64 index (saved by the gather's backward, once for
    # weight and bias: one storage).
    assert gathered.bytes == stats.bytes + 8 * 8 * F32 + 8 * 8
    assert gathered.parameter_tensors == 0


def test_saved_bytes_deduplicates_by_storage() -> None:
    x = torch.randn(4, 8, requires_grad=True)

    def step() -> None:
        h = x.exp()  # saves its result
        (h * h).sum().backward()  # saves h twice: same storage

    stats = memory.measure_saved_tensors(step, [])
    assert stats.tensors == 3
    assert stats.storages == 1
    assert stats.bytes == 4 * 8 * F32


def test_rss_helpers_report_plausible_sizes() -> None:
    peak = memory.peak_rss_bytes()
    assert peak > 10 * 2**20  # a process that imported torch holds well over 10 MiB
    current = memory.current_rss_bytes()
    if current is not None:
        assert 0 < current <= peak * 1.01


# ------------------------------------------------------------------------------------- timing


def test_interleaving_rotates_order_every_round() -> None:
    log: list[str] = []
    steps = {name: (lambda name=name: log.append(name)) for name in "ABC"}
    times = timing.interleaved_step_times(steps, repeats=4, warmup=2)
    warm = ["A", "B", "C", "B", "C", "A"]
    timed = ["C", "A", "B", "A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert log == warm + timed
    assert set(times) == {"A", "B", "C"}
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())
    # Over len(names) rounds every variant has held every position once.
    positions = {n: {timing.round_order("ABC", r).index(n) for r in range(3)} for n in "ABC"}
    assert positions == {n: {0, 1, 2} for n in "ABC"}


def test_interleaving_measures_each_call() -> None:
    import time

    steps = {"fast": lambda: None, "slow": lambda: time.sleep(0.01)}
    times = timing.interleaved_step_times(steps, repeats=3, warmup=0)
    assert min(times["slow"]) >= 0.01
    assert timing.median_ratio(times["slow"], times["fast"]) > 1.0


def test_ratios_pair_rounds() -> None:
    base = [1.0, 2.0, 4.0]
    variant = [0.5, 1.0, 3.0]  # a drifting machine: same ratio in two rounds of three
    assert timing.paired_ratios(variant, base) == [0.5, 0.5, 0.75]
    assert timing.median_ratio(variant, base) == 0.5
    assert timing.ratio_of_medians(variant, base) == 0.5
    assert timing.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    with pytest.raises(ValueError):
        timing.median_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        timing.interleaved_step_times({"a": lambda: None}, repeats=0, warmup=0)


# ------------------------------------------------------------------------------------- runner


def _toy_workload(p: float, options: BenchOptions) -> Workload:
    """Two plain models: the 'narrow' variant has half the hidden width (no convert needed)."""
    batches = [(torch.randn(16, 8), torch.randint(0, 2, (16,)))]

    def factory(name: str, hidden: int) -> Any:
        def build() -> Arm:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))
            return Arm(name, model, make_adam(model.parameters(), 1e-3, options))

        return build

    return Workload(
        name="toy-test",
        p=p,
        baseline="wide",
        factories={"wide": factory("wide", 32), "narrow": factory("narrow", 16)},
        batches=batches,
        info={"note": "test workload"},
    )


register_workload("toy-test", description="tests only", default_ps=(0.25,))(_toy_workload)


def _check_result_files(result: dict[str, Any], out: Path) -> dict[str, Any]:
    data = json.loads((out / JSON_NAME).read_text())
    png = (out / PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert result["files"] == {"json": str(out / JSON_NAME), "plot": str(out / PLOT_NAME)}
    for key in (
        "schema_version",
        "workload",
        "baseline",
        "variants",
        "settings",
        "environment",
        "results",
    ):
        assert key in data
    env = data["environment"]
    assert env["torch_version"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    return data


def test_runner_writes_json_plot_and_table(tmp_path: Path) -> None:
    import io

    text = io.StringIO()
    result = run_benchmark(
        "toy-test", [0.25, 0.5], repeats=3, warmup=1, out=tmp_path, progress=False, stream=text
    )
    data = _check_result_files(result, tmp_path)
    assert data["variants"] == ["wide", "narrow"]
    assert data["settings"]["repeats"] == 3 and data["settings"]["ps"] == [0.25, 0.5]
    assert [e["p"] for e in data["results"]] == [0.25, 0.5]
    for entry in data["results"]:
        wide, narrow = entry["variants"]["wide"], entry["variants"]["narrow"]
        for v in (wide, narrow):
            assert len(v["samples_s"]) == 3
            assert v["median_ms"] > 0
        assert wide["time_ratio"] == 1.0 and wide["memory_ratio"] == 1.0
        # Halving the hidden width halves the two hidden activations saved (16x32 -> 16x16 floats).
        assert wide["saved_activation_bytes"] - narrow["saved_activation_bytes"] == 16 * 16 * F32
        assert narrow["memory_ratio"] < 1.0
    table = text.getvalue()
    assert "time ratio" in table and "median ms (this machine, informational)" in table
    assert "narrow" in table and "wide (baseline)" in table


def test_runner_rejects_bad_rates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        run_benchmark("toy-test", [1.0], repeats=1, warmup=0, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown workload"):
        run_benchmark("nope", [0.5], repeats=1, warmup=0, out=tmp_path, progress=False)


# ------------------------------------------------------------------------- mlp with the real core

TINY = BenchOptions(hidden=64, batch_size=32, num_batches=2)


def test_mlp_variants_start_from_same_weights() -> None:
    wl = get_workload("mlp").build(0.5, TINY)
    built = wl.build()
    assert list(built) == [
        "dropout", "sliceout-flow", "sliceout-prob", "controlled", "sliceout-capturable"
    ]  # fmt: skip
    ref = built["dropout"].model.state_dict()
    for variant in built.values():
        state = variant.model.state_dict()
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in ref)
        assert variant.model.training
    # The models are independent copies: stepping one leaves the others' weights alone.
    built["sliceout-flow"].step(wl.batches[0])
    assert torch.equal(built["dropout"].model.state_dict()["head.weight"], ref["head.weight"])
    assert not torch.equal(
        built["sliceout-flow"].model.state_dict()["head.weight"], ref["head.weight"]
    )


def test_mlp_runner_end_to_end(tmp_path: Path) -> None:
    result = run_benchmark(
        "mlp", [0.5], options=TINY, repeats=2, warmup=1, out=tmp_path, progress=False
    )
    data = _check_result_files(result, tmp_path)
    entry = data["results"][0]
    assert set(entry["variants"]) == {
        "dropout", "sliceout-flow", "sliceout-prob", "controlled", "sliceout-capturable"
    }  # fmt: skip
    assert entry["workload_info"]["hidden"] == 64
    for name in ("sliceout-flow", "sliceout-prob"):
        v = entry["variants"][name]
        # Half of each hidden layer is sliced away, so less is saved for backward, and the
        # sliced weights are views of the parameters.
        assert v["memory_ratio"] < 1.0
        assert v["saved_parameter_views"] >= 1
        assert len(v["samples_s"]) == 2


# ---------------------------------------------------------------------------------------- CLI


def test_cli_bad_rate_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "mlp", "--p", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[0, 1)" in err


def test_cli_unknown_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no-such-workload"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown workload 'no-such-workload'" in err
    assert "mlp" in err and "package.module:factory" in err


def test_cli_runtime_error_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "mlp", "--p", "0.5", "--variants", "bogus", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown variant" in err


def test_cli_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--fused-adam" in out and "--repeats" in out


def test_cli_bench_tiny_mlp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench", "mlp", "--p", "0.5", "--hidden", "32", "--batch-size", "16",
            "--repeats", "2", "--warmup", "0", "--variants", "sliceout-flow",
            "--no-progress", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert data["variants"] == ["dropout", "sliceout-flow"]
    assert "sliceout-flow" in capsys.readouterr().out


def test_cli_explain_mlp(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "mlp", "--p", "0.5", "--hidden", "32"]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    assert "drop1" in out or "fc1" in out


def test_cli_demo_forwards_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import sliceout_lab.demo

    seen: list[list[str]] = []
    monkeypatch.setattr(sliceout_lab.demo, "main", lambda argv=None: seen.append(argv) or 0)
    assert main(["demo", "--help", "--epochs", "1"]) == 0
    assert seen == [["--help", "--epochs", "1"]]


def test_table_warns_when_the_machine_was_busy(tmp_path: Path) -> None:
    from sliceout_lab.bench.runner import format_result

    result = run_benchmark(
        "toy-test", [0.25], repeats=2, warmup=0, out=tmp_path, plot=False, progress=False
    )
    baseline = result["results"][0]["variants"]["wide"]
    baseline["step_time_spread"] = 1.1
    assert "warning" not in format_result(result)
    baseline["step_time_spread"] = 3.0
    assert "warning: baseline step times varied a lot within the run at p=0.25 (x3.0)" in (
        format_result(result)
    )


# ------------------------------------------------------------------------------- CNN workloads

# WRN-10-1 on 16x16 images: three blocks of 16/32/64 channels, a few ms per step.
TINY_WRN = BenchOptions(depth=10, batch_size=4, num_batches=2, extra={"widen": 1, "image_size": 16})
CNN_VARIANTS = ["sliceout-flow", "sliceout-prob", "controlled"]


def _patch_available() -> bool:
    import inspect

    import sliceout_fx

    return "scheme" in inspect.signature(sliceout_fx.convert).parameters


def test_cnn_workloads_registered_with_paper_defaults() -> None:
    for name in ("wrn", "efficientnet_b0"):
        spec = get_workload(name)
        assert spec.default_ps == (0.1, 0.2, 0.3, 0.4, 0.5)
        assert spec.example_model is not None


def test_wrn_variants_start_from_same_weights_with_paper_sgd() -> None:
    wl = get_workload("wrn").build(0.5, TINY_WRN)
    expected = ["dropout", *CNN_VARIANTS] + (["sliceout-patch"] if _patch_available() else [])
    expected.append("sliceout-capturable")
    assert wl.variant_names == expected
    assert wl.info["model"] == "WRN-10-1" and wl.info["image_size"] == 16
    built = wl.build()
    ref = built["dropout"].model.state_dict()
    for variant in built.values():
        state = variant.model.state_dict()
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in ref)
        assert variant.model.training
        group = variant.optimizer.param_groups[0]
        assert isinstance(variant.optimizer, torch.optim.SGD)
        assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
            0.1,
            0.9,
            True,
            5e-4,
        )
    assert sum(isinstance(m, nn.Dropout) for m in built["dropout"].model.modules()) == 3


def test_wrn_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="6n\\+4"):
        get_workload("wrn").build(0.5, BenchOptions(depth=12))
    with pytest.raises(ValueError, match="--widen"):
        get_workload("wrn").build(0.5, BenchOptions(hidden=64))


def test_wrn_runner_end_to_end(tmp_path: Path) -> None:
    result = run_benchmark(
        "wrn", [0.5], options=TINY_WRN, repeats=2, warmup=0, out=tmp_path, progress=False
    )
    data = _check_result_files(result, tmp_path)
    entry = data["results"][0]
    assert data["baseline"] == "dropout"
    assert set(CNN_VARIANTS) <= set(entry["variants"])
    for name in ("sliceout-flow", "sliceout-prob"):
        v = entry["variants"][name]
        assert v["memory_ratio"] < 1.0
        assert v["saved_parameter_views"] >= 1
        assert len(v["samples_s"]) == 2
    # Controlled dropout gathers (copies) the kept channels' weights: more is saved than SliceOut.
    assert (
        entry["variants"]["controlled"]["saved_activation_bytes"]
        > entry["variants"]["sliceout-flow"]["saved_activation_bytes"]
    )


def test_cli_bench_tiny_wrn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench", "wrn", "--p", "0.3", "--depth", "10", "--widen", "1", "--image-size", "8",
            "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--variants", "sliceout-prob",
            "--no-plot", "--no-progress", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert data["variants"] == ["dropout", "sliceout-prob"]
    assert data["settings"]["options"]["extra"] == {"widen": 1, "image_size": 8}
    assert "sliceout-prob" in capsys.readouterr().out


def test_cli_explain_tiny_wrn(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "wrn", "--p", "0.5", "--depth", "10", "--widen", "1"]) == 0
    assert "stage1.0.dropout" in capsys.readouterr().out


def test_efficientnet_b0_tiny_run(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    options = BenchOptions(batch_size=2, num_batches=1, extra={"image_size": 32})
    wl = get_workload("efficientnet_b0").build(0.3, options)
    assert wl.baseline == "original"
    assert wl.variant_names[:4] == ["original", *CNN_VARIANTS]
    assert wl.info["convert_kwargs"] == {"sites": "expand"}
    result = run_benchmark(
        "efficientnet_b0",
        [0.3],
        options=options,
        repeats=1,
        warmup=0,
        variants=["sliceout-flow"],
        out=tmp_path,
        progress=False,
    )
    data = _check_result_files(result, tmp_path)
    assert data["variants"] == ["original", "sliceout-flow"]
    flow = data["results"][0]["variants"]["sliceout-flow"]
    assert flow["saved_parameter_views"] >= 1 and len(flow["samples_s"]) == 1


def test_efficientnet_without_torchvision_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError, match="needs a working torchvision") as exc:
        get_workload("efficientnet_b0").build(0.3, BenchOptions())
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------- devices

# The smallest shapes each registered workload accepts (every one must be listed here).
TINY_HF = {"heads": 2, "vocab": 64, "seq": 8}
TINY_BY_WORKLOAD: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": 16, "depth": 1, "batch_size": 4},
    "wrn": {"depth": 10, "batch_size": 2, "extra": {"widen": 1, "image_size": 8}},
    "efficientnet_b0": {"batch_size": 2, "extra": {"image_size": 32}},
    "gpt2": {"hidden": 32, "depth": 1, "batch_size": 2, "extra": TINY_HF},
    "bert": {"hidden": 32, "depth": 1, "batch_size": 2, "extra": TINY_HF},
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _needs(workload: str) -> None:
    if workload == "efficientnet_b0":
        pytest.importorskip("torchvision")
    if workload in ("gpt2", "bert"):
        pytest.importorskip("transformers")


def test_every_registered_workload_has_tiny_options() -> None:
    from sliceout_lab.bench.workloads import workload_names

    assert set(workload_names()) - {"toy-test"} == set(TINY_BY_WORKLOAD)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workload", sorted(TINY_BY_WORKLOAD))
def test_workload_builds_and_steps_on_the_device(workload: str, device: str) -> None:
    _needs(workload)
    options = BenchOptions(num_batches=1, device=device, **TINY_BY_WORKLOAD[workload])
    assert options.device == device
    spec = get_workload(workload)
    wl = spec.build(0.3, options)
    # prob: its 1/P(keep) buffers are made by convert, not moved with the base model.
    built = wl.build(["sliceout-flow", "sliceout-prob"])
    assert list(built) == [wl.baseline, "sliceout-flow", "sliceout-prob"]
    for variant in built.values():
        tensors = [*variant.model.parameters(), *variant.model.buffers()]
        assert {t.device.type for t in tensors} == {device}
        variant.step(wl.batches[0])  # batches on another device than the model would fail here
        for state in variant.optimizer.state.values():
            assert all(v.device.type == device for v in state.values() if v.dim() > 0)
    assert spec.example_model is not None
    model, example = spec.example_model(0.3, options)
    inputs = example.values() if isinstance(example, dict) else example
    assert {t.device.type for t in model.parameters()} == {device}
    assert all(t.device.type == device for t in inputs)


def test_device_option_resolves_and_checks_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BenchOptions().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BenchOptions(device="auto").device == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
        BenchOptions(device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        BenchOptions(device="gpu0")


def test_cli_device_cuda_without_cuda_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["bench", "mlp", "--p", "0.5", "--device", "cuda", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sliceout-fx: error: device 'cuda' requested but CUDA is not available")
    assert "--device cpu" in err  # the fix
    assert not (tmp_path / JSON_NAME).exists()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "mlp", "--device", "tpu"])
    assert exc.value.code == 2


def test_results_and_table_name_the_device(tmp_path: Path) -> None:
    import io

    from sliceout_lab.bench.runner import format_result

    text = io.StringIO()
    result = run_benchmark(
        "toy-test", [0.25], repeats=2, warmup=0, out=tmp_path, plot=False, progress=False,
        stream=text,
    )  # fmt: skip
    data = json.loads((tmp_path / JSON_NAME).read_text())
    env = data["environment"]
    assert env["device"] == "cpu" and env["device_name"]
    assert data["settings"]["options"]["device"] == "cpu"
    table = text.getvalue()
    assert f"device: cpu ({env['device_name']})" in table
    assert "CUDA" not in table  # CPU output has no CUDA columns
    assert all("cuda_step_peak_bytes" not in v for v in data["results"][0]["variants"].values())

    # The same result as a CUDA run would record it: a step-peak column and the GPU's name.
    gpu = {"device": "cuda", "device_name": "NVIDIA H200", "cuda_version": "13.0"}
    result["environment"] |= gpu
    for name, peak in (("wide", 4096), ("narrow", 3072)):
        result["results"][0]["variants"][name] |= {
            "cuda_step_peak_bytes": peak,
            "cuda_step_peak_ratio": peak / 4096,
        }
    cuda_table = format_result(result)
    assert "device: cuda (NVIDIA H200, CUDA 13.0)" in cuda_table
    header = next(line for line in cuda_table.splitlines() if line.startswith("   p"))
    assert "CUDA step-peak ratio" in header and header.rstrip().endswith("informational)")
    narrow = next(line for line in cuda_table.splitlines() if line.lstrip().startswith("narrow"))
    assert "0.750" in narrow and "3.0 KiB" in narrow


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_bench_tiny_mlp_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench", "mlp", "--p", "0.5", "--hidden", "64", "--batch-size", "16",
            "--repeats", "3", "--warmup", "1", "--device", "cuda",
            "--no-progress", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert data["environment"]["device"] == "cuda"
    assert data["environment"]["device_name"] == torch.cuda.get_device_name()
    for v in data["results"][0]["variants"].values():
        assert v["cuda_step_peak_bytes"] > 0
        assert v["cuda_step_peak_ratio"] > 0
        assert len(v["samples_s"]) == 3
    assert data["results"][0]["variants"]["dropout"]["cuda_step_peak_ratio"] == 1.0
    out = capsys.readouterr().out
    assert f"device: cuda ({torch.cuda.get_device_name()}" in out and "CUDA step-peak ratio" in out


def test_python_dash_m_runs_the_cli_and_reports_its_version() -> None:
    import subprocess
    import sys

    import sliceout_fx

    done = subprocess.run(
        [sys.executable, "-m", "sliceout_fx", "--version"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"sliceout-fx {sliceout_fx.__version__}"


def test_cli_bench_options_of_your_model_and_of_workloads_do_not_mix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "mlp", "--input-shape", "3,8,8"]) == 2
    assert "--input-shape and --sites are for your own model" in capsys.readouterr().err
    assert main(["bench", "tests.models:ConvChain", "--hidden", "8"]) == 2
    assert "--hidden shape a built-in workload" in capsys.readouterr().err


def test_cli_bench_your_own_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench package.module:factory``: dropout as built vs SliceOut on synthetic batches, the
    table and the JSON result like a built-in workload's."""
    pytest.importorskip("torchvision")
    argv = ["bench", "tests.models:ConvChain", "--input-shape", "3,16,16",
            "--p", "0.5", "--repeats", "2", "--warmup", "1", "--no-plot", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sliceout-flow" in out and "dropout" in out
    [result] = list(tmp_path.glob("*.json"))
    data = json.loads(result.read_text())
    assert data["workload"] == "tests.models-ConvChain"
    assert "tests.models:ConvChain" in data["description"]
    again = [*argv[:-1], str(tmp_path / "again")]  # the same spec twice in one process
    assert main(again) == 0 and (tmp_path / "again" / result.name).is_file()
    assert data["baseline"] == "dropout" and data["variants"] == ["dropout", "sliceout-flow"]
