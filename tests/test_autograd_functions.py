"""Custom ``torch.autograd.Function`` calls keep their own backward in both captures.

Traced through, a straight-through estimator (``round`` forward, identity backward) trains with a
zero gradient, and a memory-saving activation saves every intermediate. Kept whole, the Function
runs as written: the gradient it defines reaches the layers before it, slicing through an
element-wise Function equals the masked reference, and a Function that mixes elements keeps its
tensors whole with the reason.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx.functions import apply_function, resolve_function
from sliceout_fx.module import built_conversion

from .helpers import assert_sliced_matches_mask, train_step_outputs


class RoundSTE(torch.autograd.Function):
    """Rounds forward; passes the gradient straight through (``round``'s own is zero)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        RoundSTE.calls += 1
        return grad


class SavingGelu(torch.autograd.Function):
    """tanh-GELU that saves only its input and recomputes in backward (as BLOOM's GeLU does)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.79788456 * (1.0 + 3 * 0.044715 * x * x)
        return grad * d


class Normalise(torch.autograd.Function):
    """Divides by the norm of the whole tensor: not element-wise."""

    @staticmethod
    def forward(ctx, x):
        return x / x.norm()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Block(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function], width: int = 8) -> None:
        super().__init__()
        self.fn = fn
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.drop(self.fn.apply(self.up(x))))


class Stack(nn.Module):
    """Repeated blocks (what ``capture="blocks"`` exports one by one) and a head."""

    def __init__(self, fn: type[torch.autograd.Function], width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(fn, width) for _ in range(2))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


CAPTURES = ["fx", "blocks"]


def _model(fn: type[torch.autograd.Function]) -> Stack:
    torch.manual_seed(0)
    return Stack(fn)


def _x() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_straight_through_estimator_keeps_its_gradient(capture: str) -> None:
    model = _model(RoundSTE)
    converted = sliceout_fx.convert(model, p=0.5, seed=0, capture=capture, example_inputs=(_x(),))
    assert len(sliceout_fx.explain(converted).sites) == 2  # sliced through the Function
    RoundSTE.calls = 0
    _, grads = train_step_outputs(converted, (_x(),))
    assert RoundSTE.calls == 2  # its own backward ran, once per layer
    # round's derivative is zero: only the straight-through gradient reaches the up projections
    assert all(grads[f"layers.{i}.up.weight"].abs().sum() > 0 for i in range(2))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("fn", [RoundSTE, SavingGelu])
def test_slicing_through_an_elementwise_function_equals_the_mask_reference(
    capture: str, fn: type[torch.autograd.Function]
) -> None:
    model = _model(fn).double()
    assert_sliced_matches_mask(
        model, (_x().double(),), p=0.5, capture=capture, example_inputs=(_x().double(),)
    )


def _saved_bytes(model: nn.Module, inputs: Any) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward + backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            keep.append(t)
        return t

    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        getattr(out, "logits", out).float().sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_memory_saving_function_saves_only_what_it_saves(capture: str) -> None:
    """BLOOM's case: traced through, the GELU's seven intermediates would be saved for backward."""
    model = _model(SavingGelu)
    light = sliceout_fx.convert(model, p=0.1, seed=0, capture=capture, example_inputs=(_x(),))
    assert len(sliceout_fx.explain(light).sites) == 2
    # p=0.1 keeps most units: traced through, the seven intermediates would outweigh the saving
    assert 0 < _saved_bytes(light, (_x(),)) < _saved_bytes(copy.deepcopy(model), (_x(),))


def test_bloom_saves_less_than_with_dropout() -> None:
    """HF BLOOM trains its GeLU through a Function: sliced, it must save less, not more."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BloomConfig(
        hidden_size=32, n_layer=2, n_head=4, vocab_size=64, hidden_dropout=0.1,
        attention_dropout=0.1,
    )  # fmt: skip
    model = transformers.BloomForCausalLM(config)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    converted = sliceout_fx.convert(model, p=0.3, seed=0, example_inputs=inputs)
    assert any("mlp" in s.name for s in sliceout_fx.explain(converted).sites)
    assert _saved_bytes(converted, inputs) < _saved_bytes(copy.deepcopy(model), inputs)


def test_a_function_that_mixes_elements_keeps_its_tensors_whole() -> None:
    converted = sliceout_fx.convert(_model(Normalise), p=0.5, seed=0, example_inputs=(_x(),))
    report = sliceout_fx.explain(converted)
    assert not report.sites
    reasons = " ".join(s.reason for s in report.skipped)
    assert "autograd Function Normalise: its forward is not element-wise" in reasons
    out, _ = train_step_outputs(converted, (_x(),))
    assert torch.isfinite(out).all()


def test_a_function_defined_in_a_function_is_found_in_this_process() -> None:
    class Local(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    converted = sliceout_fx.convert(_model(Local), p=0.5, seed=0, example_inputs=(_x(),))
    assert len(sliceout_fx.explain(converted).sites) == 2
    _, grads = train_step_outputs(converted, (_x(),))
    assert all(g.isfinite().all() for g in grads.values())
    assert apply_function(f"{__name__}.{Local.__qualname__}", torch.ones(1)).item() == 2.0


def test_a_converted_model_with_a_function_pickles_and_trains_after_loading() -> None:
    converted = sliceout_fx.convert(_model(RoundSTE), p=0.5, seed=0, example_inputs=(_x(),))
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    RoundSTE.calls = 0
    _, grads = train_step_outputs(loaded, (_x(),))
    assert RoundSTE.calls == 2 and grads["layers.0.up.weight"].abs().sum() > 0
    assert resolve_function(f"{__name__}.RoundSTE") is RoundSTE


def test_capture_leaves_function_apply_as_it_was() -> None:
    before = torch.autograd.Function.__dict__["apply"]
    sliceout_fx.convert(_model(RoundSTE), p=0.5, seed=0, capture="blocks", example_inputs=(_x(),))
    with pytest.raises(Exception):  # noqa: B017 - any capture failure
        sliceout_fx.convert(nn.Sequential(nn.Dropout(0.5)), p=0.5, example_inputs=("not",))
    assert torch.autograd.Function.__dict__["apply"] is before
    assert RoundSTE.apply(torch.tensor([0.4])).item() == 0.0  # plain calls are plain


def test_timm_memory_efficient_activations_are_sliced_through_exactly() -> None:
    """timm's ``*Me`` activations are Functions that save only their input (real model)."""
    pytest.importorskip("timm")
    import timm
    from timm.layers import activations_me

    torch.manual_seed(0)
    model = timm.create_model(
        "mobilenetv3_small_050", act_layer=activations_me.HardSwishMe, num_classes=4
    ).double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double()
    sliced, _ = assert_sliced_matches_mask(model, (x,), steps=2, p=0.3, example_inputs=(x,))
    graph = built_conversion(sliced).sliced_gm.graph
    assert sum(n.target is apply_function for n in graph.nodes) > 10  # kept whole, not traced
