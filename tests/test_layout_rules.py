"""The ATen layout rules that carry a head slice through views, transposes and splits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from sliceout_fx.rules.layout import _dim_groups


@pytest.mark.parametrize(
    ("src", "dst", "groups"),
    [
        ((2, 8, 64), (2, 8, 4, 16), [([0], [0]), ([1], [1]), ([2], [2, 3])]),  # head split
        ((2, 4, 8, 16), (2, 4, 128), [([0], [0]), ([1], [1]), ([2, 3], [2])]),  # merge
        ((2, 8, 64), (16, 64), [([0, 1], [0]), ([2], [1])]),  # Conv1D flattening
        ((7, 2, 64), (7, 8, 16), [([0], [0]), ([1, 2], [1, 2])]),  # (B, E) -> (B*H, d)
        ((2, 1, 8), (2, 8), [([0], [0]), ([1], []), ([2], [1])]),  # size-1 dims stand alone
    ],
)
def test_dim_groups_pairs_runs_of_equal_product(src, dst, groups):
    assert _dim_groups(src, dst) == groups


class _Layer(nn.Module):
    """A pre-norm attention + FFN layer written with plain ops; ``heads_inner`` puts the head axis
    after the head dim in the split, which no contiguous slice of the projection can follow."""

    def __init__(self, heads_inner: bool = False) -> None:
        super().__init__()
        self.heads_inner = heads_inner
        self.norm = nn.LayerNorm(32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).split(32, dim=-1)
        shape = (b, t, 8, 4) if self.heads_inner else (b, t, 4, 8)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        if self.heads_inner:
            q, k, v = (z.transpose(1, 3) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, 32))
        return x + self.down(F.gelu(self.up(x)))


class _Stack(nn.Module):
    def __init__(self, heads_inner: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(heads_inner) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_fused_qkv_split_is_sliced_by_heads_and_matches_the_reference():
    torch.manual_seed(0)
    model = _Stack().double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    kw = {"p": 0.5, "seed": 3, "capture": "blocks", "example_inputs": (x,)}
    sliced = sliceout_fx.convert(copy.deepcopy(model), mode="slice", **kw)
    masked = sliceout_fx.convert(copy.deepcopy(model), mode="mask", **kw)
    sites = sliceout_fx.explain(sliced).sites
    assert [s.units for s in sites] == [4, 64, 4, 64]  # whole heads; FFN units
    outs = []
    for m in (sliced, masked):
        m.train()
        y = m(x)
        y.sum().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-10, rtol=1e-9)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    model.eval()
    sliced.eval()
    assert torch.equal(sliced(x), model(x))


def test_heads_in_an_inner_position_are_not_sliced_and_explain_says_why():
    model = _Stack(heads_inner=True)
    x = torch.randn(2, 6, 32)
    report = sliceout_fx.explain(model, p=0.5, capture="blocks", example_inputs=(x,))
    assert [s.units for s in report.sites] == [64, 64]  # only the FFNs
    assert "reshape" in str(report) or "transpose" in str(report)
