"""Smoke test of examples/reproduce_fashion_mnist.py: runs, resume, table, docs rewrite."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "reproduce_fashion_mnist.py"
DOCS = ROOT / "docs" / "reproduction.md"


@pytest.fixture(scope="module")
def repro():
    from sliceout_lab.data import FashionMNISTNotFoundError, load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except FashionMNISTNotFoundError as err:  # pragma: no cover - depends on the machine
        pytest.skip(str(err))
    spec = importlib.util.spec_from_file_location("reproduce_fashion_mnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _smoke_args(results: Path, plot: Path) -> list[str]:
    # Real data, a narrow MLP and tiny limits: the pipeline, not the model, is under test.
    return [
        "--device", "cpu",
        "--limit-train", "512",
        "--limit-test", "1000",
        "--epochs", "1",
        "--p", "0.5",
        "--seeds", "0",
        "--variants", "dropout", "sliceout-flow",
        "--hidden", "256",
        "--timing-repeats", "2",
        "--timing-warmup", "0",
        "--results", str(results),
        "--plot", str(plot),
        "--no-progress",
    ]  # fmt: skip


def test_runs_resume_table_and_docs(repro, tmp_path, capsys):
    results, plot = tmp_path / "fm.json", tmp_path / "img" / "fm.png"
    first = repro.main(_smoke_args(results, plot))
    keys = {"dropout/p=0.5/seed=0", "sliceout-flow/p=0.5/seed=0"}
    assert set(first["trained"]) == keys and first["skipped"] == []

    data = json.loads(results.read_text())
    assert set(data["runs"]) == keys
    for run in data["runs"].values():
        assert len(run["test_acc"]) == 1
        assert all(0.0 <= a <= 1.0 for a in run["test_acc"])
        assert 0.0 <= run["best_acc"] <= 1.0 and 0.0 <= run["final_acc"] <= 1.0
        assert run["best_acc"] == max(run["test_acc"]) and run["final_acc"] == run["test_acc"][-1]
        assert run["mean_step_ms"] > 0 and run["n_train"] == 512 and run["n_test"] == 1000
        assert run["config"]["epochs"] == 1 and run["config"]["limit_train"] == 512
        assert run["device"] == "cpu" and run["torch_version"] and run["device_name"]
    ratios = data["ratios"]["0.5"]["variants"]
    assert ratios["dropout"]["memory_ratio"] == 1.0
    assert 0.0 < ratios["sliceout-flow"]["memory_ratio"] < 1.0  # SliceOut saves less
    assert ratios["sliceout-flow"]["time_ratio"] > 0
    # The records are the A/B harness's stats: 2 timed rounds, no CUDA step peak on the CPU.
    assert all(len(r["samples_s"]) == 2 and r["median_ms"] > 0 for r in ratios.values())
    assert ratios["dropout"]["time_ratio"] == 1.0
    assert "cuda_step_peak_ratio" not in ratios["sliceout-flow"]
    assert plot.is_file()

    # Resume: everything is already there, so nothing is trained and nothing is rewritten.
    second = repro.main(_smoke_args(results, plot))
    assert second["trained"] == [] and set(second["skipped"]) == keys
    assert json.loads(results.read_text())["runs"] == data["runs"]

    # The table has both rows, with the paper's Table 5 figure for the same cell.
    rows = {line.split()[0]: line for line in second["table"].splitlines() if " 0.5 " in line}
    assert set(rows) == {"dropout", "sliceout-flow"}
    assert "88.8 ± 0.03" in rows["dropout"] and "89.6 ± 0.05" in rows["sliceout-flow"]
    assert "73.0%" in rows["sliceout-flow"]  # Table 7
    assert "dropout" in capsys.readouterr().out

    # A mismatched configuration is refused rather than silently mixed in.
    with pytest.raises(SystemExit, match="overwrite-mismatched"):
        repro.main([*_smoke_args(results, plot), "--epochs", "2"])

    # --table --write-docs rewrites only the marked section.
    docs = tmp_path / "docs" / "reproduction.md"
    docs.parent.mkdir()
    docs.write_text(
        "# Title\n\nbefore\n\n<!-- results:start -->\nPLACEHOLDER\n<!-- results:end -->\n\nafter\n"
    )
    third = repro.main(
        ["--table", "--results", str(results), "--plot", str(plot), "--write-docs", str(docs)]
    )
    assert third["trained"] == []
    text = docs.read_text()
    assert "PLACEHOLDER" not in text
    assert text.startswith("# Title\n\nbefore\n\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\nafter\n")
    assert "| sliceout-flow | 0.5 | 1 |" in text and "| dropout | 0.5 | 1 |" in text
    assert "](../img/fm.png)" in text
    assert "Differences from the paper, in numbers" in text


def test_real_docs_page_has_one_results_section_and_no_python_blocks():
    text = DOCS.read_text()
    assert text.count("<!-- results:start -->") == 1 and text.count("<!-- results:end -->") == 1
    assert text.index("<!-- results:start -->") < text.index("<!-- results:end -->")
    assert "```python" not in text


def test_paper_tables_transcribed(repro):
    assert repro.PAPER_BEST_ACC[0.5]["sliceout-flow"] == (89.6, 0.05)
    assert repro.PAPER_BEST_ACC[0.9]["controlled"] == (66.8, 1.87)
    assert repro.PAPER_TIME[0.1]["controlled"] == (153.6, 0.83)
    assert repro.PAPER_MEM[0.4]["controlled"] == 103.7
    assert all(len(row) == 4 for p, row in repro.PAPER_BEST_ACC.items() if p > 0)
    assert all(len(row) == 3 for row in repro.PAPER_TIME.values())
    assert all(len(row) == 3 for row in repro.PAPER_MEM.values())


def _ratios_entry(p: float, peak_key: str) -> dict:
    def record(peak: float) -> dict:
        return {
            "time_ratio": 0.5,
            "time_ratio_q25": 0.4,
            "time_ratio_q75": 0.6,
            "memory_ratio": 0.25,
            peak_key: peak,
        }

    return {"p": p, "variants": {"dropout": record(1.0), "sliceout-flow": record(0.75)}}


def test_tables_group_by_p_and_show_the_cuda_step_peak(repro):
    results = repro.empty_results()
    # 0.5 as written before the harness ("cuda_peak_ratio"): still read, in the same column.
    results["ratios"] = {
        "0.1": _ratios_entry(0.1, "cuda_step_peak_ratio"),
        "0.5": _ratios_entry(0.5, "cuda_peak_ratio"),
    }
    lines = repro.format_table(results).splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert "CUDA step peak" in lines[top] and set(lines[top + 1]) == {"-", " "}
    body = lines[top + 2 : top + 7]
    assert [line.split()[:2] for line in body] == [
        ["dropout", "0.1"],
        ["sliceout-flow", "0.1"],
        [],  # a blank line between the p groups
        ["dropout", "0.5"],
        ["sliceout-flow", "0.5"],
    ]
    assert len({len(line) for line in [lines[top], lines[top + 1], *body] if line}) == 1
    assert all("75.0%" in line for line in body if line.startswith("sliceout-flow"))
    assert any(line.startswith("CUDA step peak: peak allocated device memory") for line in lines)

    markdown = repro.format_markdown(results)
    assert "| CUDA step peak |" in markdown and "| sliceout-flow | 0.5 |" in markdown
    assert "- CUDA step peak: peak allocated device memory in one training step" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_exits_with_the_reason(repro, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        repro.main(["--device", "cuda", "--results", str(tmp_path / "fm.json"), "--no-progress"])
