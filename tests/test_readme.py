"""Every Python block of the README runs as written, so the front page cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    if "torchvision" in BLOCKS[index]:
        pytest.importorskip("torchvision")
    # The blocks carry their own asserts (eval equality, state_dict keys, sites found).
    assert "assert " in BLOCKS[index]
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})


HOW = Path(__file__).resolve().parents[1] / "docs" / "how-it-works.md"


def test_how_it_works_shows_the_graphs_the_pass_really_produces():
    from collections import OrderedDict

    import torch
    from torch import nn

    import sliceout_fx

    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), drop=nn.Dropout(0.5), fc2=nn.Linear(16, 4))
    )
    converted = sliceout_fx.convert(model, p=0.5, seed=0)
    text = HOW.read_text()
    assert converted.full_graph.code.strip() in text
    assert converted.sliced_graph.code.strip() in text
    assert str(converted.explain()) in text


def test_how_it_works_rule_example_registers_a_working_rule():
    from torch import nn

    import sliceout_fx

    (block,) = [
        b for b in re.findall(r"```python\n(.*?)```", HOW.read_text(), re.S) if "register_rule" in b
    ]
    namespace: dict = {}
    exec(compile(block, "how-it-works.md", "exec"), namespace)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Dropout2d(0.5), namespace["MyFilter"](), nn.Conv2d(8, 4, 1)
    )
    report = sliceout_fx.explain(model, p=0.5, leaf_modules=[namespace["MyFilter"]])
    assert len(report.sites) == 1 and "_2" in report.sites[0].group.describe()
