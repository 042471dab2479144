"""The mask reference itself: finite where slicing is, compared so that rounding is told from bugs.

Mask mode computes at full width and zeroes what slicing leaves out. Zeroing by a multiply broke
per-head RMSNorm (``rsqrt`` of a zeroed ``mean(x^2) + eps`` is ``inf``, and ``0 * inf`` is NaN), so
the reference of q/k-norm models (HF Qwen3) was NaN. And in float64, deep random-init nets have
gradients whose small elements carry the rounding of much larger terms: the comparison must be
relative to each gradient tensor's scale, yet still fail on a wrong channel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from sliceout_fx.ops import Cut, restrict
from tests.helpers import (
    assert_gradients_close,
    assert_sliced_matches_mask,
    convert_pair,
    samplers,
    train_step_outputs,
)


class HeadRMSNormAttention(nn.Module):
    """Self-attention with an RMSNorm over each head of q and k (Qwen3's, OLMo-2's q/k norm)."""

    def __init__(self, dim: int = 32, heads: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, dim // heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.q_norm = nn.Parameter(torch.rand(self.head_dim) + 0.5)
        self.k_norm = nn.Parameter(torch.rand(self.head_dim) + 0.5)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # from the layer's input, as HF's attention reads it
        heads = (b, t, self.heads, self.head_dim)
        q = self._norm(self.q(x).view(heads), self.q_norm).transpose(1, 2)
        k = self._norm(self.k(x).view(heads), self.k_norm).transpose(1, 2)
        v = self.v(x).view(heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def _assert_finite(model: nn.Module, inputs) -> None:
    out, grads = train_step_outputs(model, inputs)
    assert torch.isfinite(out).all(), "the mask reference's output is not finite"
    bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"the mask reference's gradients of {bad} are not finite"


def test_restrict_keeps_inf_and_nan_of_dropped_channels_out_forward_and_backward():
    # Channel 2 is dropped and holds inf (what rsqrt of a zeroed mean(x^2) + eps gives).
    x = torch.tensor([[1.0, 2.0, float("inf"), 3.0]], dtype=torch.float64, requires_grad=True)
    cut = Cut(0, 2, 4, "mask")  # channels 0 and 1 live
    y = restrict(x, cut, -1)
    assert torch.equal(y, torch.tensor([[1.0, 2.0, 0.0, 0.0]], dtype=torch.float64))
    # The upstream gradient at a dropped channel may be NaN (inf * 0 further on): not passed on.
    grad = torch.tensor([[1.0, 1.0, float("nan"), float("inf")]], dtype=torch.float64)
    y.backward(grad)
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))


class HeadRMSNormStack(nn.Module):
    """Two residual :class:`HeadRMSNormAttention` layers, for the block-wise front end."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([HeadRMSNormAttention(), HeadRMSNormAttention()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("capture", ["fx", "blocks"])
def test_per_head_rmsnorm_mask_reference_is_finite_and_equals_slicing(capture):
    torch.manual_seed(0)
    model = (HeadRMSNormAttention() if capture == "fx" else HeadRMSNormStack()).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    options = dict(p=0.5, sites="all", capture=capture, example_inputs=(x,))
    sliced, masked = assert_sliced_matches_mask(model, (x,), atol=1e-10, **options)
    nodes = [n.name for s in sliceout_fx.explain(sliced).sites for n in s.group.nodes]
    assert any("rsqrt" in n for n in nodes), f"the heads' norm is not cut: {nodes}"
    _assert_finite(masked, (x,))


def _tiny_qwen3() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).double()


def test_hf_qwen3_q_k_norm_mask_reference_is_finite_and_equals_slicing():
    model = _tiny_qwen3()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    options = dict(p=0.3, sites="all", example_inputs=inputs)
    sliced, masked = assert_sliced_matches_mask(model, inputs, steps=2, atol=1e-10, **options)
    sites = [s.name for s in sliceout_fx.explain(sliced).sites]
    assert any("self_attn" in name for name in sites), f"no attention heads are cut: {sites}"
    _assert_finite(masked, inputs)


# --- telling rounding from a bug ------------------------------------------------------------------


def _fake_gradients() -> dict[str, torch.Tensor]:
    """A weight gradient of scale 1e5 with elements of 1e-1, as float64 rexnet_100 has."""
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g[:4] *= 1e5
    g[4:] *= 1e-1
    return {"w": g}


def test_rounding_relative_to_a_gradients_scale_passes():
    expected = _fake_gradients()
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rounded = {"w": expected["w"] + 1e-10 * 1e5 * noise}  # 1e-10 of the scale everywhere
    # Element-wise alone, the small elements fail (1e-5 on 1e-1: 1e-4 of the element)...
    with pytest.raises(AssertionError):
        assert_gradients_close(rounded, expected, atol=1e-9, rtol=1e-9, scale_rtol=0.0)
    # ...relative to the tensor's scale, this is rounding.
    assert_gradients_close(rounded, expected, atol=1e-9, rtol=1e-9)


def test_a_wrong_channel_fails_the_scale_relative_tolerance():
    expected = _fake_gradients()
    wrong = {"w": expected["w"].clone()}
    wrong["w"][1] = expected["w"][2]  # one channel's gradient is its neighbour's
    with pytest.raises(AssertionError, match="of the tensor's scale"):
        assert_gradients_close(wrong, expected, atol=1e-9, rtol=1e-9)


def test_gradients_of_a_shifted_slice_are_caught():
    """A reference that drew the slice one unit further must not pass for the sliced result."""
    from tests.models import ConvChain

    torch.manual_seed(0)
    model = ConvChain().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    options = dict(p=0.5, example_inputs=(x,))
    sliced, masked = convert_pair(model, **options)
    _, grads_s = train_step_outputs(sliced, (x,))
    (sampler,) = samplers(sliced)
    draws = sampler.last_starts()
    # The same draws: equal up to rounding.
    (reference,) = samplers(masked)
    reference.force(draws)
    _, grads_m = train_step_outputs(masked, (x,))
    assert_gradients_close(grads_s, grads_m, atol=1e-10)
    # One unit further (or back, at the last start): a wrong reference, caught.
    highs = [spec.units - spec.width for spec in reference.specs]
    shifted = tuple(d + 1 if d < h else d - 1 for d, h in zip(draws, highs, strict=True))
    reference.force(shifted)
    _, grads_wrong = train_step_outputs(masked, (x,))
    with pytest.raises(AssertionError, match="of the tensor's scale"):
        assert_gradients_close(grads_s, grads_wrong, atol=1e-10)


def _scaled_errors(actual: dict, expected: dict) -> dict[str, float]:
    """Each gradient's largest error as a fraction of its tensor's scale."""
    return {
        n: float((actual[n] - g).abs().max() / g.abs().max())
        for n, g in expected.items()
        if g.abs().max() > 1e-6
    }


def _step(model: nn.Module, x: torch.Tensor, draws: tuple, order: torch.Tensor) -> dict:
    """One training step on the batch taken in ``order`` (the same loss whatever the order)."""
    (sampler,) = samplers(model)
    sampler.force(draws)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x[order])
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    (out * weights[order]).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_rexnet_float64_gradients_differ_by_rounding_only():
    """timm rexnet_100, batch 2 at 224 px: slice and mask differ as two orders of summation do.

    Its squeeze-excite batch norms normalise two pooled values, which makes the net
    ill-conditioned (gradients reach 1e3-1e5), so float64 gradients carry visible rounding. The
    sliced gradients are no further from the mask reference than the mask reference is from
    itself summed in another order (the batch reversed); a slice shifted by one unit is ten
    thousand times further. The helper's scale-relative tolerance passes the first and fails the
    second.
    """
    timm = pytest.importorskip("timm")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("rexnet_100", num_classes=10, drop_rate=0.0).double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    sliced, masked = convert_pair(model, p=0.3, sites="all", example_inputs=(x,))
    (sampler,) = samplers(masked)
    draws = tuple(int(d) for d in sampler.forward())
    ahead, back = torch.arange(2), torch.tensor([1, 0])
    grads_s = _step(sliced, x, draws, ahead)
    grads_m = _step(masked, x, draws, ahead)
    reordered = _scaled_errors(_step(masked, x, draws, back), grads_m)
    sliced_errors = _scaled_errors(grads_s, grads_m)
    assert max(sliced_errors.values()) <= 10 * max(reordered.values()), (
        max(sliced_errors.values()),
        max(reordered.values()),
    )
    assert_gradients_close(grads_s, grads_m, atol=1e-9)
    highs = [spec.units - spec.width for spec in sampler.specs]
    shifted = tuple(d + 1 if d < h else d - 1 for d, h in zip(draws, highs, strict=True))
    grads_wrong = _step(masked, x, shifted, ahead)
    assert max(_scaled_errors(grads_s, grads_wrong).values()) > 1e4 * max(reordered.values())
    with pytest.raises(AssertionError, match="of the tensor's scale"):
        assert_gradients_close(grads_s, grads_wrong, atol=1e-9)
