"""SliceSchedule: full width for the last steps and one step in k, a ramp of sliced steps at the
start."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx.errors import SliceOutConfigError
from sliceout_fx.schedule import DEFAULT_FULL_WIDTH_EVERY
from tests.models import tiny_gpt2


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))


def _run(model: nn.Module, schedule: sliceout_fx.SliceSchedule, steps: int) -> list[bool]:
    """Train ``steps`` steps; whether each step ran sliced (its sampler drew)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sliced = []
    model.train()
    for step in range(steps):
        sampler = model.sliceout_sampler
        before = sampler.host_steps
        opt.zero_grad()
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).sum().backward()
        opt.step()
        sliced.append(sampler.host_steps != before)
        schedule.step()
    return sliced


def test_last_fraction_runs_full_width_and_equals_the_original_step() -> None:
    model = sliceout_fx.convert(_mlp(), p=0.5, seed=0)
    schedule = sliceout_fx.SliceSchedule(
        model, total_steps=200, full_width_last=0.05, full_width_every=0
    )
    sliced = _run(model, schedule, 200)
    assert sliced == [True] * 190 + [False] * 10
    # A full-width step is the original model's training step (its dropout included).
    model.train()
    x = torch.randn(4, 8)
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    assert torch.equal(out, sliceout_fx.to_original(model).train()(x))


def test_ramp_raises_the_share_of_sliced_steps_linearly() -> None:
    model = sliceout_fx.convert(_mlp(), p=0.5, seed=0)
    schedule = sliceout_fx.SliceSchedule(
        model, 2000, full_width_last=0.0, ramp_steps=1000, full_width_every=0
    )
    sliced = _run(model, schedule, 1200)
    first, second = sum(sliced[:500]), sum(sliced[500:1000])
    assert 0.15 < first / 500 < 0.35  # expected share 0.25
    assert 0.65 < second / 500 < 0.85  # expected share 0.75
    assert all(sliced[1000:])
    # The decisions are reproducible and resume with the step count.
    again = sliceout_fx.SliceSchedule(
        model, 2000, full_width_last=0.0, ramp_steps=1000, full_width_every=0
    )
    again.load_state_dict({"step_count": 700})
    assert again.slicing == schedule.slices_at(700)


def test_every_kth_step_runs_full_width_and_the_tail_still_applies() -> None:
    model = sliceout_fx.convert(_mlp(), p=0.5, seed=0)
    schedule = sliceout_fx.SliceSchedule(
        model, total_steps=40, full_width_last=0.1, full_width_every=4
    )
    sliced = _run(model, schedule, 40)
    assert sliced == [step % 4 != 3 for step in range(36)] + [False] * 4
    # Resuming at a step picks the same pattern up.
    again = sliceout_fx.SliceSchedule(model, 40, full_width_last=0.1, full_width_every=4)
    again.go_to(7)
    assert not again.slicing and again.slices_at(8)


def test_the_default_trains_one_step_in_five_and_the_last_percent_at_full_width() -> None:
    model = sliceout_fx.convert(_mlp(), p=0.5, seed=0)
    schedule = sliceout_fx.SliceSchedule(model, total_steps=300)
    assert schedule.full_width_every == DEFAULT_FULL_WIDTH_EVERY == 5
    sliced = _run(model, schedule, 300)
    assert sliced == [step % 5 != 4 for step in range(297)] + [False] * 3


def test_schedule_switches_block_converted_models() -> None:
    model = sliceout_fx.convert(tiny_gpt2(), p=0.3, seed=0)
    schedule = sliceout_fx.SliceSchedule(model, total_steps=10, full_width_last=0.2)
    for _ in range(8):
        schedule.step()
    assert not schedule.slicing
    reference = copy.deepcopy(sliceout_fx.to_original(copy.deepcopy(model)))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model.train(), reference.train()
    torch.manual_seed(0)
    out = model(input_ids=ids).logits
    torch.manual_seed(0)
    torch.testing.assert_close(out, reference(input_ids=ids).logits)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"total_steps": 0},
        {"full_width_last": 1.5},
        {"ramp_steps": -1},
        {"total_steps": True},
        {"full_width_every": 1},
        {"full_width_every": -2},
        {"full_width_every": 2.5},
    ],
)
def test_invalid_schedules_are_refused(kwargs) -> None:
    model = sliceout_fx.convert(_mlp(), p=0.5)
    with pytest.raises(SliceOutConfigError):
        sliceout_fx.SliceSchedule(model, **{"total_steps": 10, **kwargs})


def test_a_model_that_is_not_converted_is_refused() -> None:
    with pytest.raises(TypeError, match="convert"):
        sliceout_fx.SliceSchedule(_mlp(), 10)
