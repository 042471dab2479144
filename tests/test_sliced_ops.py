"""``sliced_linear`` against a dense reference, on every path it can take.

A sliced linear layer has three implementations (native views for small blocks, a custom autograd
function for large ones, index vectors for device-side offsets) and two weight layouts
(``nn.Linear``'s ``(out, in)``, HuggingFace ``Conv1D``'s ``(in, out)``). Each must give the
output and the gradients of ``F.linear`` on the explicitly sliced weight, with zero gradient
outside the block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sliceout_fx import ops
from sliceout_fx.ops import make_cut, sliced_linear

OUT, IN = 12, 10


def _reference(x, weight, bias, out_range, in_range, scale, layout):
    w = weight if layout == "out_in" else weight.t()
    (o0, ow), (i0, iw) = out_range, in_range
    b = None if bias is None else bias[o0 : o0 + ow]
    return F.linear(x * scale, w[o0 : o0 + ow, i0 : i0 + iw], b)


@pytest.mark.parametrize("path", ["native", "custom", "offset"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("cuts", ["out", "in", "both"])
@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("has_bias", [True, False])
def test_sliced_linear_equals_the_dense_reference(
    path: str, layout: str, cuts: str, rank: int, has_bias: bool, monkeypatch
) -> None:
    monkeypatch.setattr(ops, "NATIVE_BLOCK_LIMIT", 0 if path == "custom" else 1 << 30)
    torch.manual_seed(0)
    shape = (OUT, IN) if layout == "out_in" else (IN, OUT)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(OUT, dtype=torch.float64, requires_grad=True) if has_bias else None
    out_range = (3, 7) if cuts in ("out", "both") else (0, OUT)
    in_range = (2, 5) if cuts in ("in", "both") else (0, IN)
    lead = (4,) if rank == 2 else (2, 3)
    x = torch.randn(*lead, in_range[1], dtype=torch.float64, requires_grad=True)

    def cut(start: int, width: int, size: int):
        index = torch.tensor(start) if path == "offset" else start
        return make_cut(index, width, size, 1, "slice")

    out_cut = cut(*out_range, OUT) if cuts in ("out", "both") else None
    in_cut = cut(*in_range, IN) if cuts in ("in", "both") else None
    if path == "offset":
        assert (out_cut or in_cut).mode == "offset"
    y = sliced_linear(x, weight, bias, out_cut, in_cut, 1.5, layout)
    weights = torch.randn(y.shape, dtype=torch.float64)
    (y * weights).sum().backward()
    got = [y.detach(), x.grad, weight.grad] + ([bias.grad] if has_bias else [])

    params = [t.detach().clone().requires_grad_() for t in (x, weight)]
    ref_bias = bias.detach().clone().requires_grad_() if has_bias else None
    y_ref = _reference(*params, ref_bias, out_range, in_range, 1.5, layout)
    (y_ref * weights).sum().backward()
    expected = [y_ref.detach(), params[0].grad, params[1].grad]
    expected += [ref_bias.grad] if has_bias else []
    for name, a, b in zip(["output", "x", "weight", "bias"], got, expected, strict=False):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_a_sliced_linear_output_takes_an_in_place_activation(monkeypatch) -> None:
    for limit, offsets in ((0, False), (1 << 30, False), (0, True)):  # custom, native, offset
        monkeypatch.setattr(ops, "NATIVE_BLOCK_LIMIT", limit)
        weight = torch.randn(OUT, IN, requires_grad=True)
        x = torch.randn(2, 3, 5)
        o0, i0 = (torch.tensor(1), torch.tensor(4)) if offsets else (1, 4)
        y = sliced_linear(
            x, weight, None, make_cut(o0, 6, OUT, 1, "slice"), make_cut(i0, 5, IN, 1, "slice")
        )
        F.hardswish(y, inplace=True).sum().backward()
        outside = torch.ones(OUT, IN, dtype=torch.bool)
        outside[1:7, 4:9] = False
        assert weight.grad[1:7, 4:9].abs().sum() > 0
        assert weight.grad[outside].abs().sum() == 0


PARTS, PART = 3, 8  # a fused Q|K|V projection of three parts of 8 features


@pytest.mark.parametrize("path", ["index", "views"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("has_bias", [True, False])
def test_sliced_fused_linear_equals_the_dense_reference(
    path: str, layout: str, rank: int, has_bias: bool, monkeypatch
) -> None:
    """Every part's live outputs, by cached index (small weights) or by strided views (large)."""
    monkeypatch.setattr(ops, "NATIVE_BLOCK_LIMIT", 1 << 30 if path == "index" else 0)
    torch.manual_seed(0)
    out = PARTS * PART
    shape = (out, IN) if layout == "out_in" else (IN, out)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, dtype=torch.float64, requires_grad=True) if has_bias else None
    lead = (4,) if rank == 2 else (2, 3)
    x = torch.randn(*lead, IN, dtype=torch.float64, requires_grad=True)
    start, width = 2, 5
    y = ops.sliced_fused_linear(
        x, weight, bias, PARTS, make_cut(start, width, PART, 1, "slice"), None, layout
    )
    assert y.shape == (*lead, PARTS * width)
    weights = torch.randn(y.shape, dtype=torch.float64)
    (y * weights).sum().backward()
    got = [y.detach(), x.grad, weight.grad] + ([bias.grad] if has_bias else [])

    live = torch.cat([torch.arange(k * PART + start, k * PART + start + width) for k in range(3)])
    params = [t.detach().clone().requires_grad_() for t in (x, weight)]
    ref_bias = bias.detach().clone().requires_grad_() if has_bias else None
    w = params[1] if layout == "out_in" else params[1].t()
    y_ref = F.linear(params[0], w[live], None if ref_bias is None else ref_bias[live])
    (y_ref * weights).sum().backward()
    expected = [y_ref.detach(), params[0].grad, params[1].grad]
    expected += [ref_bias.grad] if has_bias else []
    names = ["output", "x", "weight", "bias"][: len(got)]
    for name, a, b in zip(names, got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
    # an in-place activation on the output is allowed (it is no view of an internal tensor)
    y2 = ops.sliced_fused_linear(
        x, weight, bias, PARTS, make_cut(start, width, PART, 1, "slice"), None, layout
    )
    F.relu(y2, inplace=True).sum().backward()
