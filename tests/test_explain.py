"""``explain`` reports every site and group, with widths, rates, estimates and skip reasons."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_lab.models import paper_mlp
from tests.models import ConvChain


def test_explain_the_paper_mlp():
    report = sliceout_fx.explain(paper_mlp(0.5), p=0.5)
    text = str(report)
    for name in ("drop1", "drop2", "drop3"):
        assert f"[{name}] dropout site, p=0.5 -> width 1024/2048" in text
    assert "fc1 (source), act1 (coupled), drop1 (replaced), fc2 (sink)" in text
    assert "head:1 reaches the model output" in text
    # Sliced MACs: 784*1024 + 1024*1024*2 + 1024*10 of 784*2048 + 2048*2048*2 + 2048*10
    full = 784 * 2048 + 2 * 2048 * 2048 + 2048 * 10
    sliced = 784 * 1024 + 2 * 1024 * 1024 + 1024 * 10
    assert report.flops_ratio == pytest.approx(sliced / full)
    assert f"multiply-accumulates x{sliced / full:.3f}" in text


def test_explain_does_not_touch_the_model_and_matches_convert():
    model = ConvChain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sliceout_fx.explain(model, p=0.5, placement="delayed")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    converted = sliceout_fx.convert(model, p=0.5, placement="delayed")
    assert str(sliceout_fx.explain(converted)) == str(report)
    assert "conv3 (coupled)" in str(report)  # the grouped conv carries the slice through


def test_explain_lists_groups_that_are_not_sliced_with_reasons():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.drop(torch.relu(self.fc1(x)))
            return self.head(x + self.fc2(h).cumsum(1))

    report = sliceout_fx.explain(Residual(), p=0.3)
    text = str(report)
    assert [s.name for s in report.sites] == ["drop"]
    assert "fc2:1 is used by cumsum" in text and "no rule for method .cumsum()" in text


def test_convert_of_the_paper_mlp_takes_well_under_a_second():
    model = paper_mlp(0.5)
    sliceout_fx.convert(model, p=0.5)  # warm imports
    start = time.perf_counter()
    sliceout_fx.convert(model, p=0.5)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "options",
    [
        dict(p=0.9),
        dict(p=0.3),  # the conversion's own rate: still an option the report would ignore
        dict(sites="all"),
        dict(placement="immediate"),
        dict(example_inputs=torch.randn(2, 8)),
    ],
    ids=lambda options: "-".join(options),
)
def test_explain_of_a_converted_model_refuses_options(options):
    """A converted model's report is its own conversion's: options would be ignored, so they are
    an error that says where to try them; without options the report is returned as before."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    converted = sliceout_fx.convert(model, p=0.3)
    with pytest.raises(sliceout_fx.SliceOutConfigError) as error:
        sliceout_fx.explain(converted, **options)
    message = str(error.value)
    assert "returned without options" in message
    assert "explain the unconverted model" in message and "to_original(" in message
    assert all(name in message for name in options)

    report = sliceout_fx.explain(converted)
    assert [(s.name, s.p) for s in report.sites] == [("2", 0.3)]
    # The two ways the message names: the model converted, and a plain copy of the converted one
    plain = sliceout_fx.to_original(copy.deepcopy(converted))
    for unconverted in (model, plain):
        again = sliceout_fx.explain(unconverted, **options)
        assert [s.name for s in again.sites] == ["2"]
    assert isinstance(converted, sliceout_fx.SliceOutModule)  # the copy was restored, not it
