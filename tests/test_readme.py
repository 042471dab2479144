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
