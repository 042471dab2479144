"""Reproducible resume: a run stopped and resumed from model, optimizer and sampler state ends
bit-identical to the uninterrupted run, and the sampler state leaves ``state_dict`` alone."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import sliceout_fx
from tests.models import ConvChain, mlp

STEPS, RESUME_AT = 1000, 500


def _setup(make, seed: int | None):
    torch.manual_seed(0)
    model = sliceout_fx.convert(make(), p=0.5, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt


def _batch(step: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(step))


def _train(model, opt, steps: range, shape) -> None:
    model.train()
    for step in steps:
        opt.zero_grad(set_to_none=True)
        model(_batch(step, shape)).square().mean().backward()
        opt.step()


def _checkpoint(model, opt) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sampler": sliceout_fx.sampler_state(model),
        },
        buffer,
    )
    return buffer.getvalue()


@pytest.mark.parametrize("seed", [3, None], ids=["seeded", "global-rng"])
@pytest.mark.parametrize(
    "make,shape,steps",
    [(mlp, (8, 12), STEPS), (ConvChain, (4, 3, 8, 8), 40)],
    ids=["mlp", "conv-bn"],
)
def test_a_resumed_run_ends_bit_identical(make, shape, steps, seed):
    resume_at = steps // 2
    model, opt = _setup(make, seed)
    _train(model, opt, range(resume_at), shape)
    saved = _checkpoint(model, opt)
    _train(model, opt, range(resume_at, steps), shape)  # the uninterrupted run

    resumed, opt2 = _setup(make, seed)
    torch.manual_seed(12345)  # a new process: the global RNG is anywhere
    state = torch.load(io.BytesIO(saved), weights_only=False)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sliceout_fx.load_sampler_state(resumed, state["sampler"])
    _train(resumed, opt2, range(resume_at, steps), shape)

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_without_the_sampler_state_the_resumed_run_differs():
    model, opt = _setup(mlp, 3)
    _train(model, opt, range(20), (8, 12))
    state = _checkpoint(model, opt)
    _train(model, opt, range(20, 40), (8, 12))
    resumed, opt2 = _setup(mlp, 3)
    saved = torch.load(io.BytesIO(state), weights_only=False)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, range(20, 40), (8, 12))  # draws restart from step 0
    assert not torch.equal(model.fc1.weight, resumed.fc1.weight)


def test_the_sampler_state_is_not_in_the_state_dict_and_checks_its_model():
    plain = mlp()
    model = sliceout_fx.convert(plain, p=0.5, seed=1)
    assert list(model.state_dict()) == list(plain.state_dict())
    state = sliceout_fx.sampler_state(model)
    assert torch.equal(state["torch_rng"], torch.get_rng_state())  # kept dropouts read it
    with pytest.raises(ValueError, match="another conversion"):
        sliceout_fx.load_sampler_state(sliceout_fx.convert(ConvChain(), p=0.5, seed=1), state)
    with pytest.raises(TypeError, match="not a converted model"):
        sliceout_fx.sampler_state(nn.Linear(2, 2))
