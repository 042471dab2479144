"""Shared fixtures: no test leaves a rule registered for the tests after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sliceout_fx.rules import registered_rules


@pytest.fixture(autouse=True)
def restore_rules() -> Iterator[None]:
    """Whatever a test registers with ``register_rule`` is unregistered when it ends."""
    with registered_rules():
        yield
