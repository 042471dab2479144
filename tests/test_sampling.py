"""Widths, eligible starts, keep probabilities and reproducibility of the sampler."""

from __future__ import annotations

import pytest
import torch

import sliceout_fx
from sliceout_fx.sampling import DrawSpec, SliceSampler, keep_probabilities, slice_width
from tests.models import ConvChain, mlp


def test_keep_probabilities_match_the_paper_formula_and_enumeration():
    n, w = 10, 6  # the paper's Fig. 5 example: 5 eligible starts
    probs = keep_probabilities(n, w)
    counts = torch.zeros(n)
    for start in range(n - w + 1):
        counts[start : start + w] += 1
    torch.testing.assert_close(probs, (counts / (n - w + 1)).double())
    for j in range(n):
        formula = (min(j, n - w) - max(0, j - w + 1) + 1) / (n - w + 1)
        assert probs[j].item() == pytest.approx(formula)
    assert probs.sum().item() == pytest.approx(w)  # expected slice size
    assert probs[0] == probs[-1] == pytest.approx(0.2) and probs[5] == 1


def test_starts_are_uniform_over_the_eligible_positions():
    sampler = SliceSampler([DrawSpec(units=10, width=6, mode="slice")], seed=0)
    starts = torch.tensor([sampler()[0] for _ in range(5000)])
    assert starts.min() == 0 and starts.max() == 4
    freq = torch.bincount(starts, minlength=5).double() / 5000
    assert (freq - 0.2).abs().max() < 0.025


@pytest.mark.parametrize(
    ("units", "p", "width"),
    [(2048, 0.5, 1024), (10, 0.4, 6), (7, 0.5, 4), (3, 0.0, 3), (100, 0.999, 1)],
)
def test_slice_width(units, p, width):
    if round((1 - p) * units) == 0:
        with pytest.warns(UserWarning):
            assert slice_width(units, p) == width
    else:
        assert slice_width(units, p) == width


def test_seeded_conversions_draw_the_same_slices_and_unseeded_follow_the_global_rng():
    x = torch.randn(4, 12)
    a, b = (sliceout_fx.convert(mlp(), p=0.5, seed=11).train() for _ in range(2))
    draws_a, draws_b = [], []
    for _ in range(5):
        a(x), b(x)
        draws_a.append(a.sliceout_sampler.last_draws)
        draws_b.append(b.sliceout_sampler.last_draws)
    assert draws_a == draws_b and len(set(draws_a)) > 1
    c = sliceout_fx.convert(mlp(), p=0.5).train()
    torch.manual_seed(3)
    c(x)
    first = c.sliceout_sampler.last_draws
    torch.manual_seed(3)
    c(x)
    assert c.sliceout_sampler.last_draws == first


def test_width_multiple_rounds_width_and_aligns_starts():
    converted = sliceout_fx.convert(mlp(width=64), p=0.3, width_multiple=8, seed=0)
    site = converted.report.sites[0]
    assert site.units == 8 and site.width == 6  # 6 blocks of 8 channels = 48 of 64
    assert site.channels() == (48, 64)
    assert site.effective_p == pytest.approx(0.25)
    converted.train()
    for _ in range(10):
        converted(torch.randn(2, 12))
        start_units = converted.sliceout_sampler.last_draws[0]
        assert 0 <= start_units <= 2  # in units of 8 channels


def test_grouped_conv_groups_are_cut_in_whole_groups():
    report = sliceout_fx.explain(ConvChain(groups=4), p=0.5)
    site = report.site("drop3")
    assert site.units == 4 and site.width == 2  # 24 channels in 4 groups of 6
    assert site.channels() == (12, 24)


def test_effective_rate_is_reported():
    report = sliceout_fx.explain(mlp(width=10), p=0.33)
    assert all(s.width == 7 and s.effective_p == pytest.approx(0.3) for s in report.sites)
    assert "effective p=0.300" in str(report)


def test_all_policy_replaces_dropouts_and_adds_the_other_groups():
    from sliceout_lab.models import WideResNet

    report = sliceout_fx.explain(WideResNet(10, 2), p=0.5, sites="all")
    kinds = [s.kind for s in report.sites]
    assert kinds.count("dropout") == 3  # the three blocks' dropouts are replaced...
    assert kinds.count("group") == 1  # ...and the stem group, the one non-residual group left
    assert all(s.dropouts for s in report.sites if s.kind == "dropout")
