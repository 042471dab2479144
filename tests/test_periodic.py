"""Heads folded into the batch axis: a cut held once per period.

BLOOM and DeBERTa-v2 run attention as ``bmm`` on ``(B*H, T, d)``: the head axis is merged into
the *inner* position of the batch axis, so a cut of the heads is a cut of every period of ``H``
channels of that axis. The group follows it through ``baddbmm`` (BLOOM's ALiBi bias), ``repeat``
and ``gather`` (DeBERTa's relative positions) and the split back to ``(B, H, ...)``; an operand
with such an axis that the group does not compute is narrowed period by period. The runtime ops
treat an axis of ``k * size`` channels as ``k`` periods of the cut; the reference for them is a
loop over periods.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx.ops import Cut, live_extent, normalise, restrict, take, widen
from tests.helpers import (
    assert_eval_equal,
    assert_kept_heads_attend_as_at_full_width,
    assert_sliced_matches_mask,
)
from tests.models import AttentionStack

DIM, HEADS, SEQ, BATCH = 32, 4, 6, 2
D_HEAD = DIM // HEADS


def _heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, H*d) -> (B*H, T, d)``: the heads folded into the batch axis."""
    b, t = x.shape[:2]
    return x.view(b, t, HEADS, D_HEAD).transpose(1, 2).reshape(b * HEADS, t, D_HEAD)


def _merge(y: torch.Tensor, b: int) -> torch.Tensor:
    """``(B*H, T, d) -> (B, T, H*d)``."""
    t = y.shape[1]
    return y.view(b, HEADS, t, D_HEAD).permute(0, 2, 1, 3).reshape(b, t, DIM)


class AlibiAttention(nn.Module):
    """BLOOM's shape of attention: ``baddbmm`` of a per-head bias repeated per batch index,
    scores viewed back to ``(B, H, T, T)`` for the mask, probabilities folded again for ``bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.slopes = nn.Parameter(torch.rand(HEADS, 1, 1))
        self.register_buffer("causal", torch.ones(SEQ, SEQ, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (_heads(f(x)) for f in (self.q, self.k, self.v))
        alibi = (self.slopes * torch.arange(t, dtype=x.dtype)).repeat(b, 1, 1)  # (B*H, 1, T)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), alpha=1 / math.sqrt(D_HEAD))
        scores = scores.view(b, HEADS, t, t).masked_fill(~self.causal, -1e4)
        probs = scores.softmax(-1)
        y = torch.bmm(probs.reshape(b * HEADS, t, t), v)
        return x + self.o(_merge(y, b)), probs


class RelativeAttention(nn.Module):
    """DeBERTa's shape of attention: position embeddings projected by the key layer, repeated
    per batch index, and the content-to-position scores gathered by relative distance."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.positions = nn.Parameter(torch.randn(2 * SEQ, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (_heads(f(x)) for f in (self.q, self.k, self.v))
        pos_k = _heads(self.k(self.positions[None])).repeat(b, 1, 1)  # (B*H, 2T, d)
        at = torch.arange(t, device=x.device)
        distance = (at[:, None] - at[None, :] + SEQ).clamp(0, 2 * SEQ - 1)
        index = distance.expand(b * HEADS, t, t)
        c2p = torch.gather(torch.bmm(q, pos_k.transpose(1, 2)), -1, index)
        scores = (torch.bmm(q, k.transpose(1, 2)) + c2p) / math.sqrt(2 * D_HEAD)
        probs = scores.softmax(-1)
        return x + self.o(_merge(torch.bmm(probs, v), b)), probs.view(b, HEADS, t, t)


def stack(block: type[nn.Module]) -> AttentionStack:
    """Two blocks and a classifier; the weights ``(B, H, T, T)`` of each block come back too."""
    return AttentionStack(block, DIM)


def _inputs() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, DIM, dtype=torch.float64)


BLOCKS = [AlibiAttention, RelativeAttention]


@pytest.mark.parametrize("capture", ["fx", "blocks"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_heads_folded_into_the_batch_are_cut_and_match_the_reference(
    block: type[nn.Module], capture: str
) -> None:
    torch.manual_seed(0)
    model, x = stack(block).double(), _inputs()
    options = dict(p=0.5, sites="all", capture=capture, example_inputs=x)
    report = sliceout_fx.explain(model, **options)
    heads = [s for s in report.sites if s.name.endswith(".q")]
    assert [(s.name, s.units) for s in heads] == [("layers.0.q", HEADS), ("layers.1.q", HEADS)]
    for site in heads:  # q, k, v (and DeBERTa's projected positions) share one cut
        assert site.group.periods, "no axis holds the cut per period"
        assert set(site.group.periods.values()) == {HEADS}
        sources = {a.node.name for a in site.group.sources}
        assert len(sources) == (4 if block is RelativeAttention else 3), sources
    assert_eval_equal(model, (x,), **options)
    assert_sliced_matches_mask(model, (x,), steps=2, atol=1e-10, **options)


def test_a_bias_the_group_does_not_compute_is_narrowed_period_by_period() -> None:
    torch.manual_seed(0)
    report = sliceout_fx.explain(stack(AlibiAttention).double(), p=0.5, sites="all",
                                 capture="fx", example_inputs=_inputs())
    site = report.sites[0]
    assert [(op.name, operand.name, dim) for op, operand, dim in site.group.entries] == [
        ("baddbmm", "repeat", 0)
    ]


@pytest.mark.parametrize("options", [{"capturable": True}, {"mode": "gather"}], ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_index_cuts_hold_the_heads_per_period(block: type[nn.Module], options: dict) -> None:
    """Device-side offsets and gathered heads narrow the folded axis by index: each kept head
    of the first block attends exactly as at full width (its own bias, its own positions), and
    the dropped heads come back zero."""
    torch.manual_seed(0)
    model = stack(block).double()
    options = dict(p=0.5, sites="all", seed=3, **options)
    assert_kept_heads_attend_as_at_full_width(model, _inputs(), **options)


def test_a_layer_reading_a_periodic_axis_blocks_the_group() -> None:
    """A channel shuffle merges the cut group axis into the inner position of the channels a
    convolution reads: its kept channels are not one block of the weight's columns."""

    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, _, h, w = x.shape
            y = self.a(x).view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w)
            return self.b(torch.relu(y))

    model = Shuffle()
    report = sliceout_fx.explain(model, p=0.5, sites="all", example_inputs=torch.randn(2, 3, 5, 5))
    [group] = [g for g in report.groups if g.primary.node.name == "a"]
    assert not group.sliceable
    assert any("once per period" in b and "b" in b for b in group.blockers), group.blockers
    assert report.sites == []


# --- the runtime ops, against a loop over periods ------------------------------------------


def _cuts(size: int, width: int, start: int) -> list[Cut]:
    index = torch.arange(start, start + width)
    return [
        Cut(start, width, size, "slice"),
        Cut(index, width, size, "gather"),
        Cut(index, width, size, "offset"),
    ]


@pytest.mark.parametrize("cut", _cuts(HEADS, 2, 1), ids=lambda c: c.mode)
def test_take_and_widen_work_period_by_period(cut: Cut) -> None:
    periods = 3
    x = torch.randn(periods * HEADS, 5)
    got = take(x, 0, cut)
    want = torch.cat([chunk[1:3] for chunk in x.split(HEADS)])
    assert torch.equal(got, want)
    back = widen(got, cut, 0)
    expected = torch.zeros_like(x)
    for p in range(periods):
        expected[p * HEADS + 1 : p * HEADS + 3] = x[p * HEADS + 1 : p * HEADS + 3]
    assert torch.equal(back, expected)


def test_restrict_and_normalise_work_period_by_period() -> None:
    periods, cut = 3, Cut(1, 2, HEADS, "mask")
    x = torch.randn(5, periods * HEADS)
    keep = torch.tensor([0, 1, 1, 0] * periods, dtype=torch.bool)
    assert torch.equal(restrict(x, cut, -1), torch.where(keep, x, 0))
    inv = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sliced = Cut(1, 2, HEADS, "slice")
    y = torch.randn(5, periods * 2)
    assert torch.equal(normalise(y, sliced, -1, inv), y * torch.tensor([2.0, 3.0] * periods))


def test_a_shape_argument_of_a_folded_axis_keeps_its_periods() -> None:
    assert live_extent(BATCH * HEADS, Cut(0, 3, HEADS, "slice")) == BATCH * 3
    assert live_extent(HEADS, Cut(0, 3, HEADS, "slice")) == 3
    assert live_extent(BATCH * HEADS, Cut(0, 3, HEADS, "mask")) == BATCH * HEADS
    with pytest.raises(ValueError, match="whole number of periods"):
        take(torch.randn(7, 2), 0, Cut(0, 2, HEADS, "slice"))
