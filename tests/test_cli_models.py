"""``sliceout-fx explain|draw MODEL`` with the user's own model: ``package.module:factory``,
``timm:NAME`` or a local HuggingFace folder, and errors that say what to pass instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sliceout_fx
from sliceout_fx.cli import main
from sliceout_fx.model_specs import ModelSpecError, load_model

torchvision = pytest.importorskip("torchvision")


def test_explain_a_factory_prints_the_report_convert_would_give(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["explain", "torchvision.models:resnet18", "--input-shape", "3,64,64", "--sites", "all"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    expected = sliceout_fx.explain(
        model, p=0.5, sites="all", example_inputs=(torch.randn(2, 3, 64, 64),)
    )
    assert out.strip() == str(expected).strip()
    assert "layer1.0.conv1" in out


def test_explain_a_timm_model_guesses_its_input(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    assert main(["explain", "timm:resnet18", "--p", "0.2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SliceOut plan for ResNet") and "layer1.0.conv1" in out


def test_explain_a_save_pretrained_folder_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    assert isinstance(load_model(str(tmp_path)), transformers.BertForSequenceClassification)
    assert main(["explain", str(tmp_path), "--p", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out
    assert "bert.encoder.layer.0.attention.self" in out  # whole heads cut


def test_draw_a_factory_model_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "block.svg"
    argv = ["draw", "torchvision.models:resnet18", "-o", str(out), "--input-shape", "3,64,64",
            "--only", "layer1.0", "--sites", "all"]  # fmt: skip
    assert main(argv) == 0
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "layer1.0.conv1" in out.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "no_such_package.models:build"], "cannot import 'no_such_package.models'"),
        (["explain", "torchvision.models:resnet_nope"], "torchvision.models has no 'resnet_nope'"),
        (["explain", "torch:pi"], "torch:pi is a float, not a callable"),
        (["explain", "timm:"], "timm: needs a model name"),
        (["explain", "wrn", "--input-shape", "3,8,8"], "--input-shape is for your own model"),
        (["explain", "torchvision.models:resnet18", "--hidden", "8"], "--hidden shape a built-in"),
    ],
)
def test_a_bad_model_spec_is_one_line_naming_the_fix(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_folder_without_a_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="without config.json"):
        load_model(str(tmp_path))


def test_a_bad_input_shape_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["explain", "timm:resnet18", "--input-shape", "3,a,4"])
    assert exc.value.code == 2
    assert "not a shape" in capsys.readouterr().err


def test_without_the_lab_extra_explain_takes_your_model_and_demo_names_the_extra() -> None:
    """``sliceout_lab`` (benchmarks, demo) is optional: blocked here as if not installed."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['sliceout_lab'] = None\n"
        "from sliceout_fx.cli import main\n"
        "assert main(['explain', 'torchvision.models:resnet18', '--input-shape', '3,32,32']) == 0\n"
        "assert main(['demo']) == 2\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "SliceOut plan for ResNet" in result.stdout
    assert "pip install 'sliceout-fx[lab]'" in result.stderr
