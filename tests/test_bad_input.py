"""Bad input gets a clear error (or a warning and an unchanged model), never silent wrong math."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx import SliceOutConfigError, SliceOutError, UntraceableModelError
from tests.helpers import assert_sliced_matches_mask
from tests.models import mlp


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_rates_outside_zero_one_are_rejected(p):
    with pytest.raises(SliceOutConfigError, match=r"\[0, 1\)"):
        sliceout_fx.convert(mlp(), p=p)


@pytest.mark.parametrize("p", ["0.5", True, [0.5], object()])
def test_rates_that_are_not_numbers_are_rejected(p):
    with pytest.raises(SliceOutConfigError, match="must be a number"):
        sliceout_fx.convert(mlp(), p=p)


def test_per_site_rates_are_validated_and_names_checked():
    with pytest.raises(SliceOutConfigError, match="drop2"):
        sliceout_fx.convert(mlp(), p={"drop2": 2.0})
    with pytest.raises(SliceOutConfigError, match="unknown sites"):
        sliceout_fx.convert(mlp(), p={"dropp1": 0.3})
    converted = sliceout_fx.convert(mlp(width=20), p={"drop1": 0.25})
    rates = {s.name: s.p for s in converted.report.sites}
    assert rates == {"drop1": 0.25, "drop2": 0.5, "drop3": 0.5}  # others keep their own rate


def test_p_none_reuses_each_dropouts_rate():
    model = mlp(width=20)
    model.drop2.p = 0.2
    converted = sliceout_fx.convert(model, p=None)
    assert [s.width for s in converted.report.sites] == [10, 16, 10]


@pytest.mark.parametrize(
    "option",
    [
        dict(mode="slices"),
        dict(normalisation="batch"),
        dict(placement="later"),
        dict(sites="everything"),
        dict(width_multiple=0),
        dict(seed="7"),
    ],
)
def test_invalid_options_are_rejected(option):
    with pytest.raises(SliceOutConfigError):
        sliceout_fx.convert(mlp(), **option)


def test_unknown_explicit_site_names_list_the_known_ones():
    with pytest.raises(SliceOutConfigError, match="known sites.*drop1"):
        sliceout_fx.convert(mlp(), sites=["nope"])


def test_a_width_that_rounds_to_zero_keeps_one_unit_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.9), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="rounds the slice width to 0"):
        converted = sliceout_fx.convert(model, p=0.9)
    site = converted.report.sites[0]
    assert site.width == 1 and site.effective_p == pytest.approx(0.75)
    assert converted.train()(torch.randn(5, 3)).shape == (5, 2)


def test_a_rate_that_rounds_to_the_full_width_leaves_its_dropout_in_place():
    """0.1 of 3 units rounds to 3 kept: slicing nothing must not silently remove the dropout."""
    model = mlp(width=32)
    model.fc2 = nn.Linear(32, 3)
    model.fc3 = nn.Linear(3, 32)
    converted = sliceout_fx.convert(model, p={"drop1": 0.3, "drop2": 0.1, "drop3": 0.3})
    assert [s.name for s in converted.report.sites] == ["drop1", "drop3"]
    (skipped,) = converted.report.skipped
    assert skipped.name == "drop2"
    assert "keeps all 3 units" in skipped.reason and "dropout stays" in skipped.reason
    assert "above 0.167" in skipped.reason

    kept = [n.target for n in converted.sliced_graph.graph.nodes if n.op == "call_module"]
    assert "drop2" in kept and "drop1" not in kept and "drop3" not in kept
    # With drop1 and drop3 kept whole (p=0), the sliced forward is the original's, drop2's mask
    # included: same seed, same output.
    with pytest.warns(UserWarning, match="found no site"):
        only_drop2 = sliceout_fx.convert(model, p={"drop1": 0.0, "drop2": 0.1, "drop3": 0.0})
    x = torch.randn(6, 12)
    torch.manual_seed(0)
    expected = model.train()(x)
    torch.manual_seed(0)
    assert torch.equal(only_drop2.train()(x), expected)


def test_a_model_without_sites_warns_and_still_works():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="found no site"):
        converted = sliceout_fx.convert(model)
    x = torch.randn(4, 6)
    assert torch.equal(converted.eval()(x), model.eval()(x))
    assert torch.equal(converted.train()(x), model.train()(x))
    assert converted.report.sites == []


def test_dropout_that_feeds_the_output_is_skipped_with_its_reason():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5))
    with pytest.warns(UserWarning, match="found no site"):
        converted = sliceout_fx.convert(model)
    (skipped,) = converted.report.skipped
    assert "reaches the model output" in skipped.reason
    assert "SKIPPED" in str(converted.explain())
    torch.manual_seed(0)
    a = converted.train()(torch.ones(3, 6))
    torch.manual_seed(0)
    assert torch.equal(a, model.train()(torch.ones(3, 6)))  # the dropout was left as it was


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return x * 2
        return x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.gate = DataDependent()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.gate(self.fc1(x)))))


def test_untraceable_model_names_the_code_and_the_leaf_to_use():
    model = Wrapper()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UntraceableModelError) as info:
        sliceout_fx.convert(model)
    message = str(info.value)
    assert "if x.sum() > 0" in message and "test_bad_input.py" in message
    assert "leaf_modules=[DataDependent]" in message and "'gate'" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Following the advice works: the leaf blocks the first group, the second is still sliced.
    converted = sliceout_fx.convert(model, leaf_modules=[DataDependent])
    assert converted.report.sites == []
    assert "DataDependent" in converted.report.skipped[0].reason


def test_converting_twice_is_refused():
    converted = sliceout_fx.convert(mlp())
    with pytest.raises(TypeError, match="already converted"):
        sliceout_fx.convert(converted)


def test_subclass_with_its_own_forward_is_not_treated_as_its_base():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), ScaledLinear(8, 2))
    # Kept whole, it is an op without a rule (its forward is not nn.Linear's): the site is skipped.
    with pytest.warns(UserWarning, match="found no site"):
        converted = sliceout_fx.convert(model, leaf_modules=[ScaledLinear])
    assert "ScaledLinear" in converted.report.skipped[0].reason
    # Traced through (the default for user modules), it is F.linear and a multiply: sliced.
    assert_sliced_matches_mask(model, (torch.randn(5, 4),), p=0.5)


def _wrapped(kind: str, model: nn.Module) -> nn.Module:
    if kind == "DataParallel":
        return nn.DataParallel(model)
    if kind == "torch.jit.script":
        return torch.jit.script(model)
    if kind == "torch.jit.trace":
        return torch.jit.trace(model.eval(), torch.randn(3, 12))
    return torch.compile(model)  # compiled on its first call only


#: What each refusal names: the wrapper, and the fix (convert first, then wrap).
_FIXES = {
    "DataParallel": r"DataParallel wrapper: convert the module it wraps \(its \.module\) first, "
    r"then wrap the converted model: DataParallel\(sliceout_fx\.convert\(model",
    "torch.jit.script": r"TorchScript module \(RecursiveScriptModule.*not supported as input: "
    "convert the eager nn.Module",
    "torch.jit.trace": r"TorchScript module \(TopLevelTracedModule.*not supported as input: "
    "convert the eager nn.Module",
    "torch.compile": r"torch\.compile wrapper \(OptimizedModule\): convert the module it "
    r"compiles \(its \._orig_mod\) first, then compile the converted model",
}


def _assert_untouched(wrapped: nn.Module, kind: type, state: dict[str, torch.Tensor]) -> None:
    assert type(wrapped) is kind
    assert not any(isinstance(m, sliceout_fx.SliceOutModule) for m in wrapped.modules())
    assert wrapped.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in wrapped.state_dict().items())


@pytest.mark.parametrize("wrapper", list(_FIXES))
@pytest.mark.parametrize("entry", ["convert", "explain"])
def test_wrapped_models_are_refused_with_the_fix(wrapper, entry):
    """A DataParallel, TorchScript or torch.compile wrapper is a SliceOutError that says what to
    convert instead, raised before the model is copied or changed (inplace=True too)."""
    torch.manual_seed(0)
    wrapped = _wrapped(wrapper, mlp())
    kind, state = type(wrapped), copy.deepcopy(wrapped.state_dict())
    options = {"inplace": True} if entry == "convert" else {}
    with pytest.raises(SliceOutError, match=_FIXES[wrapper]):
        getattr(sliceout_fx, entry)(wrapped, p=0.5, **options)
    _assert_untouched(wrapped, kind, state)


def test_data_parallel_of_the_converted_model_trains():
    """The fix the refusal names: convert the inner module, then wrap it."""
    torch.manual_seed(0)
    model = nn.DataParallel(sliceout_fx.convert(mlp(), p=0.5, seed=0)).train()
    model(torch.randn(4, 12)).sum().backward()
    assert model.module.sliceout_sampler.host_steps == 1


def test_distributed_data_parallel_is_refused_with_the_fix():
    """DDP around the plain model (a one-process gloo group): refused, untouched; DDP around the
    converted model, as the message says, trains."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from tests.helpers import free_port

    assert not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        plain = mlp()
        ddp = nn.parallel.DistributedDataParallel(plain)
        state = copy.deepcopy(ddp.state_dict())
        fix = (
            r"DistributedDataParallel wrapper: convert the module it wraps \(its \.module\) "
            r"first, then wrap the converted model: DistributedDataParallel\(sliceout_fx\.convert"
        )
        for entry in (sliceout_fx.convert, sliceout_fx.explain):
            with pytest.raises(SliceOutError, match=fix):
                entry(ddp, p=0.5)
        _assert_untouched(ddp, nn.parallel.DistributedDataParallel, state)
        assert type(ddp.module) is nn.Sequential

        converted = nn.parallel.DistributedDataParallel(sliceout_fx.convert(plain, p=0.5, seed=0))
        converted.train()
        converted(torch.randn(4, 12)).sum().backward()
        assert converted.module.sliceout_sampler.host_steps == 1
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
