"""The training graph accepts inputs of another rank than the example's.

A model converted on a ``(B, F)`` example is trained on ``(B, T, F)`` sequences, a CNN converted on
a batch is called on one unbatched image. The analysis numbers axes in the example's rank; the
runtime ops of mask mode and probabilistic normalisation count the sliced axis from the end, so
the same channel axis is cut at any number of leading axes. Each case is checked against the same
converted model, forced to the same draws, on the input reshaped to the example's rank.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import sliceout_fx
from tests.helpers import assert_pair_matches, convert_pair, samplers, train_step_outputs
from tests.models import mlp

OPTIONS = [
    dict(mode=m, normalisation=n, placement=pl)
    for m, n, pl in itertools.product(
        ("slice", "gather", "mask"), ("flow", "probabilistic"), ("immediate", "delayed")
    )
]


def _id(options: dict) -> str:
    return "-".join(options.values())


class ConvNet(nn.Module):
    """conv -> ReLU -> Dropout -> 1x1 conv -> spatial mean; no batch norm, so unbatched works."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.drop(self.act(self.conv1(x)))).mean((-2, -1))


def _step(model: nn.Module, x: torch.Tensor, draws: tuple) -> tuple[torch.Tensor, dict]:
    (sampler,) = samplers(model)
    sampler.force(draws)
    model.zero_grad(set_to_none=True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_step(model: nn.Module, x: torch.Tensor, like_example: torch.Tensor) -> None:
    """A step on ``x`` equals a step on ``like_example`` (``x`` at the example's rank)."""
    model.train()
    model(like_example)  # one draw, to force both steps to
    (sampler,) = samplers(model)
    draws = sampler.last_draws
    out, grads = _step(model, x, draws)
    out_ref, grads_ref = _step(model, like_example, draws)
    torch.testing.assert_close(out.reshape(out_ref.shape), out_ref, atol=1e-12, rtol=1e-12)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("options", OPTIONS, ids=_id)
def test_an_mlp_converted_on_rows_trains_on_sequences(options):
    torch.manual_seed(0)
    model = mlp().double()
    example = torch.randn(2, 12, dtype=torch.float64)
    converted = sliceout_fx.convert(model, p=0.5, seed=0, example_inputs=(example,), **options)
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    _assert_same_step(converted, x, x.reshape(-1, 12))


@pytest.mark.parametrize("options", OPTIONS, ids=_id)
def test_a_cnn_converted_on_a_batch_trains_on_an_unbatched_image(options):
    torch.manual_seed(0)
    model = ConvNet().double()
    example = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    converted = sliceout_fx.convert(model, p=0.5, seed=0, example_inputs=(example,), **options)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    _assert_same_step(converted, x, x[None])


@pytest.mark.parametrize("normalisation", ["flow", "probabilistic"])
def test_sliced_equals_mask_reference_on_another_rank(normalisation):
    torch.manual_seed(0)
    model = mlp().double()
    example = torch.randn(2, 12, dtype=torch.float64)
    options = dict(p=0.5, normalisation=normalisation, example_inputs=(example,))
    sliced, masked = convert_pair(model, **options)
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    assert_pair_matches(sliced, masked, (x,), atol=1e-12)
    # ...and on the example's rank, after those steps, still
    assert_pair_matches(sliced, masked, (x[0],), steps=1, atol=1e-12)


def test_eval_on_another_rank_equals_the_original():
    torch.manual_seed(0)
    model = mlp().double().eval()
    converted = sliceout_fx.convert(
        model, p=0.5, normalisation="probabilistic", example_inputs=(torch.randn(2, 12).double(),)
    ).eval()
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    _, grads = train_step_outputs(converted, (x,))
    assert all(torch.isfinite(g).all() for g in grads.values())


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.drop(torch.relu(self.up(x))))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Residual(), _Residual()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_an_exported_layer_called_at_another_rank_is_exported_for_it(mode):
    """The rank is part of a layer call's structure: a new rank gets its own graph."""
    torch.manual_seed(0)
    model = _Stack().double()
    example = torch.randn(4, 6, 16, dtype=torch.float64)
    options = dict(p=0.5, capture="blocks", mode=mode, normalisation="probabilistic")
    converted = sliceout_fx.convert(model, seed=0, example_inputs=(example,), **options)
    x = torch.randn(4, 16, dtype=torch.float64)
    converted.train()
    converted(x[:, None])  # the example's rank: one draw per layer, to force both steps to
    draws = [s.last_draws for s in samplers(converted)]

    def step(inputs: torch.Tensor) -> torch.Tensor:
        for sampler, draw in zip(samplers(converted), draws, strict=True):
            sampler.force(draw)
        return converted(inputs)

    torch.testing.assert_close(step(x), step(x[:, None])[:, 0], atol=1e-12, rtol=1e-12)
    assert all(len(layer._sliceout.graphs) == 2 for layer in converted.layers)


def test_exported_layers_at_another_rank_equal_the_mask_reference():
    torch.manual_seed(0)
    example = torch.randn(4, 6, 16, dtype=torch.float64)
    options = dict(p=0.5, capture="blocks", normalisation="probabilistic")
    sliced, masked = convert_pair(_Stack().double(), example_inputs=(example,), **options)
    assert_pair_matches(sliced, masked, (torch.randn(4, 16, dtype=torch.float64),), atol=1e-12)
