"""Operands a group reads at full width, and attention weights returned at full width.

A relative-position bias (BEiT, Swin, T5, MPNet), a causal ``masked_fill`` (GPT-Neo, MPT,
DeBERTa) or a layer-scale parameter meets a sliced group at an element-wise op or attention
without being computed by the group's layers. Such an operand is narrowed where the group reads
it, instead of blocking the group ("a model input or attribute"). Attention weights a layer hands
back beside its hidden states come back at full width, with the dropped heads zero. A residual
stream that enters a block as its input is still a residual stream.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from tests.helpers import (
    assert_eval_equal,
    assert_kept_heads_attend_as_at_full_width,
    assert_sliced_matches_mask,
    convert_pair,
)
from tests.models import AttentionStack

DIM, HEADS, SEQ = 32, 4, 6


class BiasedAttention(nn.Module):
    """Eager attention with a learned per-head bias, a causal mask and the weights returned."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused, self.d = fused, DIM // HEADS
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.rel_bias = nn.Parameter(torch.randn(1, HEADS, SEQ, SEQ))
        self.register_buffer("causal", torch.ones(SEQ, SEQ, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, HEADS, self.d).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.fused:  # the bias as SDPA's float mask; no weights to return
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_bias)
            probs = x.new_zeros(b, HEADS, t, t)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.d) + self.rel_bias
            scores = scores.masked_fill(~self.causal, -1e4)
            probs = scores.softmax(-1)
            y = probs @ v
        return x + self.o(y.transpose(1, 2).reshape(b, t, DIM)), probs


def stack(fused: bool = False) -> AttentionStack:
    """Two biased attention blocks (eager, or the bias as SDPA's mask) and a classifier."""
    return AttentionStack(lambda: BiasedAttention(fused), DIM)


class ScaledMLP(nn.Module):
    """``fc2(gamma * gelu(fc1(x)))``: a learned per-channel scale inside the inner width."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, 64), nn.Linear(64, DIM)
        self.gamma = nn.Parameter(torch.rand(64) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gamma * F.gelu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """``x + fc2(relu(fc1(x)))`` on the model input: ``x`` enters the stream whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(DIM, 64), nn.Linear(64, DIM), nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(F.relu(self.fc1(x))))


def _inputs() -> torch.Tensor:
    return torch.randn(2, SEQ, DIM, dtype=torch.float64)


def _report(model: nn.Module, capture: str, sites: str = "all"):
    converted = sliceout_fx.convert(
        model, p=0.5, sites=sites, capture=capture, example_inputs=_inputs()
    )
    return converted, sliceout_fx.explain(converted)


class ClassToken(nn.Module):
    """A learned token concatenated along the sequence to a projected input (ViT's cls token)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(DIM, 64), nn.Linear(64, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        return self.out(F.relu(tokens))


def _inputs() -> torch.Tensor:
    return torch.randn(2, SEQ, DIM, dtype=torch.float64)


def _report(model: nn.Module, capture: str = "fx"):
    converted = sliceout_fx.convert(
        model, p=0.5, sites="all", capture=capture, example_inputs=_inputs()
    )
    return converted, sliceout_fx.explain(converted)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "sdpa-mask"])
@pytest.mark.parametrize("capture", ["fx", "blocks"])
def test_heads_are_cut_through_a_bias_the_layers_do_not_compute(capture: str, fused: bool) -> None:
    torch.manual_seed(0)
    model = stack(fused).double()
    _, report = _report(model, capture)
    assert [(s.name, s.units) for s in report.sites] == [
        ("layers.0.q", HEADS),
        ("layers.1.q", HEADS),
    ]
    for site in report.sites:  # each layer reads its own bias, narrowed to the kept heads
        assert [(e.name.endswith("rel_bias"), dim) for _, e, dim in site.group.entries] == [
            (True, 1)
        ]
    x = _inputs()
    assert_eval_equal(model, (x,), p=0.5, sites="all", capture=capture, example_inputs=x)
    assert_sliced_matches_mask(
        model, (x,), steps=2, atol=1e-10, p=0.5, sites="all", capture=capture, example_inputs=x
    )


@pytest.mark.parametrize("capture", ["fx", "blocks"])
def test_attention_weights_come_back_full_width_with_the_dropped_heads_zero(capture: str) -> None:
    torch.manual_seed(0)
    model, x = stack().double(), _inputs()
    sliced, masked = convert_pair(model, p=0.5, sites="all", capture=capture, example_inputs=x)
    width = sliceout_fx.explain(sliced).sites[0].width
    sliced.train(), masked.train()
    got, want = sliced(x), masked(x)
    for probs_s, probs_m in zip(got[1:], want[1:], strict=True):
        assert probs_s.shape == (2, HEADS, SEQ, SEQ)
        dropped = (probs_s == 0).flatten(2).all(-1).all(0)
        assert int(dropped.sum()) == HEADS - width
        torch.testing.assert_close(probs_s, probs_m, atol=1e-12, rtol=0)
    with torch.no_grad():  # eval returns every head's weights, as the original does
        for a, b in zip(sliced.eval()(x)[1:], model.eval()(x)[1:], strict=True):
            assert torch.equal(a, b)


def test_a_learned_scale_inside_the_inner_width_is_narrowed() -> None:
    torch.manual_seed(0)
    model = ScaledMLP().double()
    _, report = _report(model)
    [site] = report.sites
    assert site.name == "fc1"
    assert [(e.name, dim) for _, e, dim in site.group.entries] == [("gamma", 0)]
    x = _inputs()
    assert_sliced_matches_mask(
        model, (x,), steps=2, atol=1e-10, p=0.5, sites="all", example_inputs=x
    )


def test_a_stream_entering_as_the_model_input_stays_a_residual_stream() -> None:
    """``x + fc2(...)``: the group of fc2 reads ``x`` at full width, but it is the stream the
    block's layers read, so ``sites="all"`` leaves it alone and slices the inner width only."""
    torch.manual_seed(0)
    _, report = _report(ResidualMLP().double())
    assert [s.name for s in report.sites] == ["fc1"]
    [stream] = [g for g in report.groups if g.primary.node.name == "fc2"]
    assert stream.sliceable and [n.name for n in stream.residual_adds] == ["add"]


def test_an_operand_read_by_an_op_that_cannot_narrow_it_still_blocks() -> None:
    """A concatenation's rewrite does not know a full-width operand: the group stays whole."""
    torch.manual_seed(0)
    _, report = _report(ClassToken().double())
    assert report.sites == []
    [group] = [g for g in report.groups if g.primary.node.name == "proj"]
    assert any("model input or attribute" in b for b in group.blockers), group.blockers


@pytest.mark.parametrize("options", [{"capturable": True}, {"mode": "gather"}], ids=str)
def test_index_cuts_narrow_the_bias_and_widen_the_weights(options: dict) -> None:
    """Device-side offsets (capturable) and gathered heads (controlled dropout) narrow the bias
    and widen the returned weights by index: the first layer's kept heads attend exactly as the
    original's heads do (same input, same bias rows), the dropped ones are zero."""
    torch.manual_seed(0)
    model = stack().double()
    options = dict(p=0.5, sites="all", seed=3, **options)
    assert_kept_heads_attend_as_at_full_width(model, _inputs(), **options)
