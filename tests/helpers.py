"""Reference comparisons used by the invariant tests."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

import sliceout_fx
from sliceout_fx import SliceOutModule


def train_step_outputs(model: nn.Module, inputs: Sequence[torch.Tensor], seed: int = 0):
    """One training forward and backward; returns the output and every parameter's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropouts left in place (and stochastic depth) draw alike
    out = model(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    grads = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
    return out.detach(), grads


def convert_pair(model: nn.Module, **options) -> tuple[SliceOutModule, SliceOutModule]:
    """The sliced and the masked reference conversions of one model, drawing identical slices."""
    sliced = sliceout_fx.convert(copy.deepcopy(model), mode="slice", seed=1234, **options)
    masked = sliceout_fx.convert(copy.deepcopy(model), mode="mask", seed=1234, **options)
    return sliced, masked


def assert_sliced_matches_mask(
    model: nn.Module, inputs: Sequence[torch.Tensor], steps: int = 3, atol: float = 1e-5, **options
) -> tuple[SliceOutModule, SliceOutModule]:
    """Forward outputs, gradients and batch-norm statistics of slice and mask modes agree."""
    sliced, masked = convert_pair(model, **options)
    assert sliced.report.sites, "the model has no site: the comparison would prove nothing"
    for step in range(steps):
        out_s, grads_s = train_step_outputs(sliced, inputs, seed=step)
        out_m, grads_m = train_step_outputs(masked, inputs, seed=step)
        assert sliced.sliceout_sampler.last_starts() == masked.sliceout_sampler.last_starts()
        torch.testing.assert_close(out_s, out_m, atol=atol, rtol=1e-4)
        for name in grads_m:
            torch.testing.assert_close(
                grads_s[name],
                grads_m[name],
                atol=atol,
                rtol=1e-4,
                msg=lambda m, n=name: f"gradient of {n}: {m}",
            )
        for (name, buf_s), (_, buf_m) in zip(
            sliced.named_buffers(), masked.named_buffers(), strict=True
        ):
            torch.testing.assert_close(
                buf_s, buf_m, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"buffer {n}: {m}"
            )
    return sliced, masked


def assert_eval_equal(model: nn.Module, inputs: Sequence[torch.Tensor], **options) -> None:
    """The converted model in eval mode computes exactly what the original computes."""
    model.eval()
    converted = sliceout_fx.convert(model, **options).eval()
    with torch.no_grad():
        expected = model(*inputs)
        got = converted(*inputs)
    assert torch.equal(expected, got)


def free_port() -> int:
    """A free local TCP port for a two-process gloo rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
