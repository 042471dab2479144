"""The converted model stays the user's model: its class and API, and changes made after convert.

Every test compares against the unconverted model or the masked full-width reference.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import warnings

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx.module import conversions_in
from tests.helpers import train_step_outputs
from tests.models import ConvChain, mlp, tiny_vit

timm = pytest.importorskip("timm")


def _vit(num_classes: int = 10) -> nn.Module:
    return tiny_vit(num_classes, drop_rate=0.1)


IMAGES = torch.randn(4, 3, 32, 32)


# -- class and API ------------------------------------------------------------------------------


def test_a_sequential_keeps_its_container_protocol():
    model = mlp()
    converted = sliceout_fx.convert(model, p=0.5, seed=0)
    assert isinstance(converted, nn.Sequential) and isinstance(
        converted, sliceout_fx.SliceOutModule
    )
    assert len(converted) == len(model)
    assert [type(m) for m in converted] == [type(m) for m in model]
    assert type(converted[0]) is nn.Linear and converted[-1].out_features == 5
    assert list(converted.state_dict()) == list(model.state_dict())
    assert [n for n, _ in converted.named_modules()] == [n for n, _ in model.named_modules()]


def test_a_timm_model_keeps_its_methods_and_what_timm_reads_from_it():
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2

    model = _vit()
    converted = sliceout_fx.convert(model, p=0.3, seed=0, example_inputs=IMAGES)
    assert (
        isinstance(converted, type(model))
        and type(converted).__name__ == "SliceOutVisionTransformer"
    )
    assert converted.pretrained_cfg == model.pretrained_cfg
    assert converted.no_weight_decay() == model.no_weight_decay()
    assert resolve_data_config({}, model=converted) == resolve_data_config({}, model=model)

    def groups(m):
        opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05)
        names = {id(p): n for n, p in m.named_parameters()}
        return [
            (g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups
        ]

    assert groups(converted) == groups(model)  # pos_embed and cls_token are not decayed
    with torch.no_grad():
        assert torch.equal(converted.eval()(IMAGES), model.eval()(IMAGES))
        assert torch.equal(converted.forward_features(IMAGES), model.forward_features(IMAGES))


def test_explain_and_to_original_work_alike_on_both_front_ends():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    )
    for model in (mlp(), gpt2):
        plain = copy.deepcopy(model)
        report = sliceout_fx.explain(model, p=0.5, placement=None)  # None: the default placement
        converted = sliceout_fx.convert(model, p=0.5)
        assert [s.name for s in sliceout_fx.explain(converted).sites] == [
            s.name for s in report.sites
        ]
        assert sliceout_fx.explain(converted).config.placement == "delayed"
        with sliceout_fx.full_width(converted):
            assert not any(c.enabled for _, c in conversions_in(converted))
        restored = sliceout_fx.to_original(converted)
        assert restored is converted and not conversions_in(restored)
        assert [type(m) for m in restored.modules()] == [type(m) for m in plain.modules()]


def test_options_are_resolved_in_one_place():
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="unknown conversion options"):
        sliceout_fx.explain(mlp(), p=0.5, placment="delayed")
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="capture must be"):
        sliceout_fx.explain(mlp(), capture="trace")


# -- changes after convert -----------------------------------------------------------------------


def test_a_new_head_is_trained_and_evaluated():
    converted = sliceout_fx.convert(_vit(), p=0.3, seed=0, example_inputs=IMAGES)
    converted.reset_classifier(5)
    out = converted.train()(IMAGES)
    assert out.shape == (4, 5)
    out.sum().backward()
    assert converted.head.weight.grad is not None and converted.head.weight.grad.abs().sum() > 0
    assert converted.eval()(IMAGES).shape == (4, 5)


def test_a_replaced_layer_is_detected_and_the_model_reanalysed(caplog):
    torch.manual_seed(0)
    converted = sliceout_fx.convert(mlp(), p=0.5, mode="slice", seed=3)
    reference = sliceout_fx.convert(mlp(), p=0.5, mode="mask", seed=3)
    new = nn.Linear(32, 32)
    converted.fc2 = new
    reference.fc2 = copy.deepcopy(new)
    reference.load_state_dict(converted.state_dict())
    x = torch.randn(6, 12)
    with caplog.at_level(logging.WARNING, logger="sliceout_fx.module"):
        out_s, grads_s = train_step_outputs(converted, (x,))
    assert "changed after conversion" in caplog.text
    out_m, grads_m = train_step_outputs(reference, (x,))
    assert converted.sliceout_sampler.last_starts() == reference.sliceout_sampler.last_starts()
    torch.testing.assert_close(out_s, out_m)
    torch.testing.assert_close(grads_s["fc2.weight"], grads_m["fc2.weight"])
    assert grads_s["fc2.weight"].abs().sum() > 0  # the new layer is the one trained


def test_a_parameter_of_another_shape_is_detected_but_a_same_shape_one_is_not():
    converted = sliceout_fx.convert(mlp(), p=0.5, seed=0)
    converted.train()(torch.randn(2, 12))
    state = conversions_in(converted)[0][1]
    converted.fc1.weight = nn.Parameter(torch.randn(32, 12))  # same shape: graphs read it live
    assert not state.stale
    converted.head.weight = nn.Parameter(torch.randn(5, 32))
    converted.head.bias = nn.Parameter(torch.randn(5))
    assert not state.stale
    converted.head = nn.Linear(32, 7)
    assert state.stale
    assert converted.train()(torch.randn(2, 12)).shape == (2, 7)
    assert not state.stale


def test_detecting_changes_costs_no_walk_of_the_module_tree(monkeypatch):
    converted = sliceout_fx.convert(mlp(), p=0.5, seed=0).train()
    x = torch.randn(2, 12)
    converted(x)
    calls = []
    original = nn.Module.named_modules

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    for _ in range(3):
        converted(x).sum().backward()
    assert calls == []


def test_forward_hooks_present_at_conversion_fire_without_a_warning():
    # (tests/test_capture_guards.py checks what hooks see against the mask reference)
    model = mlp()
    calls = []
    model.fc2.register_forward_hook(lambda m, i, o: calls.append(o.shape[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = sliceout_fx.convert(model, p=0.5)
    calls.clear()
    converted.train()(torch.randn(2, 12)).sum().backward()
    assert calls == [16]


# -- copies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_copies_round_trip_with_equal_outputs_and_draws(how):
    torch.manual_seed(0)
    source = sliceout_fx.convert(ConvChain(), p=0.5, seed=5)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        train_step_outputs(source, (x,))
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(source, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(source))
    else:
        clone = copy.deepcopy(source)
    assert type(clone) is type(source) and list(clone.state_dict()) == list(source.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), source.eval()(x))
    for step in range(4):  # the same draws continue, batch-norm refresh calls included
        out_s, grads_s = train_step_outputs(source, (x,), seed=step)
        out_c, grads_c = train_step_outputs(clone, (x,), seed=step)
        assert clone.sliceout_sampler.last_starts() == source.sliceout_sampler.last_starts()
        assert torch.equal(out_s, out_c)
        assert all(torch.equal(grads_s[k], grads_c[k]) for k in grads_s)
    assert not any(p is q for p in clone.parameters() for q in source.parameters())


def test_a_block_converted_model_pickles_and_copies_after_training():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    model = sliceout_fx.convert(GPT2LMHeadModel(config), p=0.3, seed=0)
    ids = torch.randint(0, 50, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for make_copy in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        clone = make_copy(model)  # copied where the model's draws stand now
        assert type(clone.transformer.h[0]) is type(model.transformer.h[0])
        with torch.no_grad():
            model.eval(), clone.eval()
            assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
        model.train(), clone.train()
        torch.manual_seed(1)
        a = model(input_ids=ids, labels=ids).loss
        torch.manual_seed(1)
        b = clone(input_ids=ids, labels=ids).loss
        assert torch.equal(a, b)


# -- arguments -----------------------------------------------------------------------------------


class WithMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(torch.relu(self.fc1(x)))
        if mask is not None:
            h = h * mask
        return self.fc2(h)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"example_inputs": (torch.randn(2, 8), None)},
        {"example_inputs": torch.randn(2, 8)},
        {"concrete_args": {"mask": None}},
    ],
    ids=["guessed", "explicit-none", "bare-tensor", "concrete-args"],
)
def test_none_default_arguments_are_specialised(kwargs):
    model = WithMask()
    converted = sliceout_fx.convert(model, p=0.5, seed=0, **kwargs)
    assert [s.name for s in sliceout_fx.explain(converted).sites] == ["drop"]
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), model.eval()(x))
    assert converted.train()(x).shape == (4, 3)


def test_example_inputs_of_the_wrong_rank_fail_at_convert_time():
    with pytest.raises(sliceout_fx.ShapeInferenceError, match="example_inputs"):
        sliceout_fx.convert(ConvChain(), p=0.5, example_inputs=(torch.randn(2, 12),))
    with pytest.raises(sliceout_fx.ShapeInferenceError, match="example_inputs"):
        sliceout_fx.convert(mlp(), p=0.5, example_inputs=torch.randn(2, 7))
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="example_inputs must be"):
        sliceout_fx.convert(mlp(), p=0.5, example_inputs=12)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiling_a_converted_hf_model_breaks_the_graph_no_more_than_the_original(kind):
    from torch._dynamo.utils import counters
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
        original = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        original = LlamaForCausalLM(config)
    converted = sliceout_fx.convert(copy.deepcopy(original), p=0.3, seed=0)
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a padded batch
    seen = {}
    for name, model in (("original", original), ("converted", converted)):
        torch._dynamo.reset()
        compiled = torch.compile(model.train(), backend="eager")
        per_call = []
        for _ in range(3):
            counters.clear()
            compiled(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            per_call.append(
                (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"])
            )
        seen[name] = per_call
    assert seen["converted"] == seen["original"]  # breaks and (re)compiled graphs, call by call
    assert seen["converted"][1:] == [(0, 0), (0, 0)]


def test_a_change_that_cannot_be_analysed_says_what_to_do():
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # fx cannot trace a branch on a tensor

    converted = sliceout_fx.convert(mlp(), p=0.5, seed=0)
    converted.act2 = DataDependent()
    with pytest.raises(sliceout_fx.UntraceableModelError, match="changed after conversion"):
        converted.train()(torch.randn(2, 12))
    x = torch.randn(2, 12)
    with torch.no_grad():  # eval is the model's own code, with the change
        assert converted.eval()(x).shape == (2, 5)


def test_a_new_call_structure_first_seen_under_gradient_checkpointing_trains():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    plain = sliceout_fx.convert(GPT2LMHeadModel(config), p=0.3, seed=0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    ids = torch.randint(0, 50, (2, 8))  # no attention mask: not the conversion's call structure
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_converting_without_example_inputs_leaves_the_global_rng_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    )
    for model in (mlp(), ConvChain(), gpt2):
        state = torch.get_rng_state()
        sliceout_fx.convert(model, p=0.5)
        assert torch.equal(torch.get_rng_state(), state), type(model).__name__


def test_tensor_constants_made_by_fx_tracing_are_kept():
    """timm Swin's shifted-window masks are tensors fx keeps as ``_tensor_constant`` attributes."""
    from tests.helpers import assert_sliced_matches_mask

    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=24,
        depths=(1, 1),
        num_heads=(2, 4),
        window_size=7,
        drop_rate=0.1,
        num_classes=5,
    ).double()
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    assert_sliced_matches_mask(model, (images,), steps=2, atol=1e-10, example_inputs=(images,))
