"""The zoo sweep: every catalogue model (tests/zoo.py) under ``sites="auto"`` and ``sites="all"``.

Each test converts one model in float64 and asserts what the issue asks of every model: convert
succeeds or raises a documented ``SliceOutError``; the class is kept; eval output is
``torch.equal`` to the original's; with sites, two sliced training steps equal the masked
reference (output, every gradient, every buffer).

The default run checks the fast subset ``zoo.FAST`` (a minute or two on two CPU cores). The full
sweep (154 models, about an hour on a CPU) runs with ``pytest -m zoo`` or ``SLICEOUT_ZOO=1 pytest``;
``scripts/coverage.py`` runs the same checks and writes ``docs/coverage.md``.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests import zoo

pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")


def _full_sweep(config: pytest.Config) -> bool:
    """``-m zoo`` (``zoo`` named in the marker expression, not negated) or ``SLICEOUT_ZOO=1``."""
    if os.environ.get("SLICEOUT_ZOO", "") not in ("", "0"):
        return True
    expression = config.getoption("markexpr", "") or ""
    return re.search(r"(?<!not )\bzoo\b", expression) is not None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per (model, site policy): the fast subset unless the full sweep is asked for."""
    if "entry" not in metafunc.fixturenames:
        return
    entries = zoo.catalogue()
    if not _full_sweep(metafunc.config):
        entries = [e for e in entries if e.name in zoo.FAST]
    params = []
    for entry in entries:
        for sites in zoo.SITE_POLICIES:
            marks = [pytest.mark.zoo]
            known = zoo.KNOWN_FAILURES.get((entry.name, sites))
            if known:
                marks.append(pytest.mark.xfail(strict=True, reason=known))
            params.append(pytest.param(entry, sites, id=f"{entry.name}-{sites}", marks=marks))
    metafunc.parametrize(("entry", "sites"), params)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: float64 CPU kernels on small inputs gain nothing from more, and on a
    shared two-core machine oversubscribed OpenMP threads made these tests 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fast_subset_and_known_failures_name_catalogue_models() -> None:
    names = {e.name for e in zoo.catalogue()}
    assert set(zoo.FAST) <= names
    assert {name for name, _ in zoo.KNOWN_FAILURES} <= names
    assert {sites for _, sites in zoo.KNOWN_FAILURES} <= set(zoo.SITE_POLICIES)


@pytest.mark.timeout(1800)
def test_zoo_model(entry: zoo.ZooEntry, sites: str) -> None:
    result = zoo.check_model(entry, sites)
    problems = result.problems()
    assert not problems, "\n".join(problems) + "\n" + result.trace
