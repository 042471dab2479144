"""Reference comparisons used by the invariant tests."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import sliceout_fx
from sliceout_fx import SliceOutModule

#: Inputs of one call: positional (a tuple) or keyword (a dict, e.g. a HuggingFace batch).
Inputs = Sequence[Any] | Mapping[str, Any]


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model(*inputs)`` or ``model(**inputs)``: tests pass either form of example inputs."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by.

    A tensor itself; a HuggingFace ``ModelOutput``'s ``logits`` (else ``last_hidden_state``); a
    segmentation model's ``"out"``; the first element of a tuple (GoogLeNet's auxiliary outputs).
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state", "out"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
        out = tuple(out.values())
    if isinstance(out, (tuple, list)) and out:
        return main_output(out[0])
    raise TypeError(f"cannot tell the main output tensor of a {type(out).__name__}")


def samplers(model: nn.Module) -> list[Any]:
    """Every slice sampler of a converted model (one per converted layer for HuggingFace)."""
    found: dict[int, Any] = {}
    for module in model.modules():
        sampler = getattr(module, "sliceout_sampler", None)
        if sampler is not None:
            found.setdefault(id(sampler), sampler)
    return list(found.values())


#: Gradient tolerance relative to the *scale* (``max |g|``) of each gradient tensor, per dtype;
#: see :func:`assert_gradients_close` for why. float64: in timm ``rexnet_100`` (batch 2 at
#: 224 px: its squeeze-excite batch norms normalise two pooled values, and gradients reach 1e3)
#: a correct slice differs from its mask reference by up to 2e-9 of a tensor's scale, and the mask
#: reference from itself with the batch reversed by 4e-9; the mask reference of a slice shifted
#: by one unit differs by 1e-2 to 3e2 of it.
GRAD_SCALE_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def assert_gradients_close(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    atol: float = 1e-5,
    rtol: float = 1e-4,
    scale_rtol: float | None = None,
    what: str = "",
    relative_atol: bool = False,
) -> None:
    """Every gradient in ``actual`` equals the one in ``expected`` up to rounding.

    Rounding error is relative to the *scale* of a gradient tensor, not to each element: a
    weight's gradient is a sum over the batch and positions, and an element that comes out small
    because large terms cancel still carries the rounding of those terms (float64 rexnet_100:
    elements of 1e-1 in a tensor reaching 1e5 differ by 1e-5 between two correct computations,
    1e-4 of the element but 1e-10 of the tensor). So each tensor is held to ``atol + rtol *
    |expected| + scale_rtol * max |expected|``: rounding passes, while a bug - a wrong channel, a
    shifted slice - moves whole rows or columns by amounts of the gradient's own size and fails.
    ``scale_rtol`` defaults to :data:`GRAD_SCALE_RTOL` of the gradient's dtype;
    ``relative_atol`` is :func:`assert_pair_matches`'s.
    """
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name, want in expected.items():
        got = actual[name]
        srtol = GRAD_SCALE_RTOL.get(want.dtype, 1e-5) if scale_rtol is None else scale_rtol
        scale = float(want.abs().max()) if want.numel() and want.is_floating_point() else 0.0

        def message(m: str, n: str = name, got=got, want=want, scale: float = scale) -> str:
            error = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
            return (
                f"{what}gradient of {n}: {m}\nlargest error {error:.3e}: {error / (scale or 1):.3e}"
                f" of the tensor's scale {scale:.3e}"
            )

        tol = atol * max(1.0, scale) if relative_atol else atol
        torch.testing.assert_close(got, want, atol=tol + srtol * scale, rtol=rtol, msg=message)


def train_step_outputs(model: nn.Module, inputs: Inputs, seed: int = 0):
    """One training forward and backward; returns the output and every parameter's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropouts left in place (and stochastic depth) draw alike
    out = main_output(call(model, inputs))
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
    model: nn.Module,
    inputs: Inputs,
    steps: int = 3,
    atol: float = 1e-5,
    scale_rtol: float | None = None,
    **options,
) -> tuple[SliceOutModule, SliceOutModule]:
    """Forward outputs, gradients and batch-norm statistics of slice and mask modes agree."""
    sliced, masked = convert_pair(model, **options)
    assert_pair_matches(sliced, masked, inputs, steps=steps, atol=atol, scale_rtol=scale_rtol)
    return sliced, masked


def assert_pair_matches(
    sliced: nn.Module,
    masked: nn.Module,
    inputs: Inputs,
    steps: int = 3,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    relative_atol: bool = False,
    scale_rtol: float | None = None,
) -> None:
    """``steps`` training calls of a :func:`convert_pair` agree: output, gradients, buffers.

    ``relative_atol`` scales ``atol`` by each reference tensor's largest magnitude: float64
    rounding grows with the values summed, and random-init gradients of deep nets reach 1e5,
    while a wrong slice is off by a large fraction of them. Gradients are always held to a
    tolerance relative to their tensor's scale too (``scale_rtol``, see
    :func:`assert_gradients_close`).
    """
    sites = sliceout_fx.explain(sliced).sites
    assert sites, "the model has no site: the comparison would prove nothing"

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        tol = atol
        if relative_atol and want.is_floating_point() and want.numel():
            tol = atol * max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, atol=tol, rtol=rtol, msg=lambda m: f"{what}: {m}")

    for step in range(steps):
        out_s, grads_s = train_step_outputs(sliced, inputs, seed=step)
        out_m, grads_m = train_step_outputs(masked, inputs, seed=step)
        draws_s = [s.last_starts() for s in samplers(sliced)]
        assert draws_s == [s.last_starts() for s in samplers(masked)], "the slices drawn differ"
        close(out_s, out_m, f"step {step}, output")
        assert_gradients_close(
            grads_s, grads_m, atol, rtol, scale_rtol, f"step {step}, ", relative_atol
        )
        for (name, buf_s), (_, buf_m) in zip(
            sliced.named_buffers(), masked.named_buffers(), strict=True
        ):
            close(buf_s, buf_m, f"step {step}, buffer {name}")


def assert_eval_equal(model: nn.Module, inputs: Inputs, **options) -> nn.Module:
    """The converted model in eval mode computes exactly what the original computes."""
    model.eval()
    converted = sliceout_fx.convert(model, **options).eval()
    with torch.no_grad():
        expected = main_output(call(model, inputs))
        got = main_output(call(converted, inputs))
    assert torch.equal(expected, got)
    return converted


def assert_kept_heads_attend_as_at_full_width(
    model: nn.Module, x: torch.Tensor, draws: int = 3, **options
) -> None:
    """``model(x)[1]`` is the first layer's attention weights ``(B, H, T, T)``: converted with
    ``options``, each step's kept heads equal the original's (same input to the first layer)
    and the dropped heads are zero, the site's width of them kept."""
    converted = sliceout_fx.convert(copy.deepcopy(model), example_inputs=x, **options)
    width = sliceout_fx.explain(converted).sites[0].width
    with torch.no_grad():
        want = model.train()(x)[1]
        for _ in range(draws):
            got = converted.train()(x)[1]
            assert got.shape == want.shape
            kept = (got != 0).flatten(2).any(-1).all(0)
            assert int(kept.sum()) == width
            torch.testing.assert_close(got[:, kept], want[:, kept], atol=1e-12, rtol=0)


def free_port() -> int:
    """A free local TCP port for a two-process gloo rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
