"""Transformers: HuggingFace models (block-wise conversion) and PyTorch-native encoders.

Every model is built from a small config (random init, float64 where outputs are compared) and
checked against a reference: eval equals the untouched original; a sliced training step equals the
masked full-width reference drawing the same slices; the converted object stays usable with the
HuggingFace tools (class, ``generate``, ``save_pretrained``, ``Trainer``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx import UntraceableModelError
from tests.models import tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")

SEED = 1234
LAYERS = 2


def _bert(**kw) -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    return transformers.BertForSequenceClassification(config)


def _distilbert(**kw) -> nn.Module:
    config = transformers.DistilBertConfig(
        dim=64,
        n_layers=LAYERS,
        n_heads=4,
        hidden_dim=128,
        vocab_size=100,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        **kw,
    )
    return transformers.DistilBertForSequenceClassification(config)


def _vit(**kw) -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        **kw,
    )
    return transformers.ViTForImageClassification(config)


HF_MODELS: dict[str, Callable[..., nn.Module]] = {
    "bert": _bert,
    "distilbert": _distilbert,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "vit": _vit,
}


def _inputs(name: str, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen, dtype=dtype)}
    ids = torch.randint(1, 100, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded sequence: masks must keep working
    return {"input_ids": ids, "attention_mask": mask}


def _build(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return HF_MODELS[name](**kw).double()


def _train_step(model: nn.Module, inputs: dict, seed: int) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _samplers(model: nn.Module) -> list:
    return [m.sliceout_sampler for m in model.modules() if hasattr(m, "sliceout_sampler")]


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def hf_case(request):
    name = request.param
    model = _build(name)
    sliced = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED, mode="slice")
    masked = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED, mode="mask")
    return name, model, sliced, masked


def test_class_and_sites(hf_case):
    name, model, sliced, _ = hf_case
    assert type(sliced) is type(model)  # the HF class itself, not a wrapper
    report = sliceout_fx.explain(sliced)
    # Every layer slices its attention heads and its FFN inner units.
    assert len(report.sites) == 2 * LAYERS, str(report)
    assert sliced.state_dict().keys() == model.state_dict().keys()
    for site in report.sites:
        live, total = site.channels()
        assert 0 < live < total
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", heads)
    attention = [s for s in report.sites if s.units <= heads]
    assert len(attention) == LAYERS
    assert all(s.units == kv_heads for s in attention)  # GQA: whole KV groups


def test_eval_equals_original(hf_case):
    name, model, sliced, _ = hf_case
    inputs = _inputs(name)
    model.eval()
    sliced.eval()
    with torch.no_grad():
        assert torch.equal(sliced(**inputs).logits, model(**inputs).logits)


def test_sliced_training_equals_masked_reference(hf_case):
    name, model, sliced, masked = hf_case
    inputs = _inputs(name)
    for step in range(2):
        out_s, grads_s = _train_step(sliced, inputs, step)
        out_m, grads_m = _train_step(masked, inputs, step)
        draws_s = [s.last_draws for s in _samplers(sliced)]
        assert draws_s == [s.last_draws for s in _samplers(masked)]
        torch.testing.assert_close(out_s, out_m, atol=1e-10, rtol=1e-9)
        assert grads_s.keys() == grads_m.keys()
        for key in grads_m:
            torch.testing.assert_close(grads_s[key], grads_m[key], atol=1e-10, rtol=1e-9)
    # Slicing is really on: the training output differs from the full-width model's.
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(sliced(**inputs).logits, model(**inputs).logits)


def test_weights_outside_the_slice_get_no_gradient(hf_case):
    name, _, sliced, _ = hf_case
    _train_step(sliced, _inputs(name), seed=5)
    site = sliceout_fx.explain(sliced).sites[-1]  # the last layer's FFN: named by its source
    source = sliced.get_submodule(site.name)
    live, total = site.channels()
    out_dim = 0 if isinstance(source, nn.Linear) else 1  # HF Conv1D stores (in, out)
    grad = source.weight.grad
    reduce = 1 - out_dim
    assert grad.shape[out_dim] == total
    assert int((grad.abs().sum(reduce) != 0).sum()) == live


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_matches_original(name):
    model = _build(name).float()
    sliced = sliceout_fx.convert(model, p=0.3, seed=SEED)
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    model.eval()
    sliced.eval()
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(sliced.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_save_pretrained_loads_into_the_original_class(name, tmp_path):
    model = _build(name).float()
    sliced = sliceout_fx.convert(model, p=0.3, seed=SEED)
    opt = torch.optim.SGD(sliced.parameters(), lr=0.1)
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in _inputs(name).items()}
    sliced.train()
    sliced(**inputs).logits.sum().backward()  # one sliced step, so weights differ from `model`
    opt.step()
    sliced.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    sliced.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, sliced(**inputs).logits)


def test_trainer_runs_a_few_steps(tmp_path):
    model = _build("gpt2").float()
    sliced = sliceout_fx.convert(model, p=0.3, seed=SEED)
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(1, 100, (8, 12), generator=gen)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-3,
    )
    before = {n: p.detach().clone() for n, p in sliced.named_parameters()}
    result = transformers.Trainer(model=sliced, args=args, train_dataset=rows).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in sliced.named_parameters())


def test_a_new_call_structure_is_converted_on_first_use():
    """Converted with a padded mask; trained without one (another export, same sites)."""
    model = _build("bert")
    sliced = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED)
    masked = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED, mode="mask")
    inputs = {"input_ids": _inputs("bert")["input_ids"]}
    out_s, grads_s = _train_step(sliced, inputs, 0)
    out_m, grads_m = _train_step(masked, inputs, 0)
    torch.testing.assert_close(out_s, out_m, atol=1e-10, rtol=1e-9)
    block = sliced.bert.encoder.layer[0]
    assert len(block.__dict__["_sliceout"].graphs) == 2


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_eager_attention_is_sliced_like_sdpa(name):
    """The matmul-softmax-matmul form: heads still sliced, training equals the reference."""
    model = _build(name, attn_implementation="eager")
    sliced = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED)
    masked = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED, mode="mask")
    assert len(sliceout_fx.explain(sliced).sites) == 2 * LAYERS
    inputs = _inputs(name)
    out_s, _ = _train_step(sliced, inputs, 0)
    out_m, _ = _train_step(masked, inputs, 0)
    torch.testing.assert_close(out_s, out_m, atol=1e-10, rtol=1e-9)


def test_full_width_and_to_original():
    model = _build("llama")
    sliced = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED)
    inputs = _inputs("llama")
    sliced.train()
    model.train()
    with sliceout_fx.full_width(sliced), torch.no_grad():
        assert torch.equal(sliced(**inputs).logits, model(**inputs).logits)
    restored = sliceout_fx.to_original(sliced)
    assert all(type(m).__name__.startswith("SliceOut") is False for m in restored.modules())
    with torch.no_grad():
        assert torch.equal(restored(**inputs).logits, model(**inputs).logits)


def test_converting_twice_and_fx_capture_are_refused():
    model = _build("gpt2")
    sliced = sliceout_fx.convert(model, p=0.3)
    with pytest.raises(TypeError, match="already converted"):
        sliceout_fx.convert(sliced, p=0.3)
    with pytest.raises(UntraceableModelError):
        sliceout_fx.convert(
            model, p=0.3, capture="fx", example_inputs=(_inputs("gpt2")["input_ids"],)
        )
    assert not any(type(m).__name__.startswith("SliceOut") for m in model.modules())


# --- PyTorch-native transformers ------------------------------------------------------------


class _Encoder(nn.Module):
    """A token classifier over ``nn.TransformerEncoder`` (batch-first, with its own dropouts)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.2, batch_first=True)
        # Attention-probability dropout draws over the kept heads only, which the full-width
        # reference cannot draw alike; the FFN and residual dropouts stay.
        layer.self_attn.dropout = 0.0
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def _native_cases():
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=LAYERS,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        dropout=0.2,
    )
    return {"encoder": (_Encoder, (2, 7, 16)), "vit_b_16-style": (lambda: vit, (2, 3, 32, 32))}


@pytest.mark.parametrize("name", ["encoder", "vit_b_16-style"])
def test_pytorch_native_transformers_slice_their_heads_and_ffn(name):
    make, shape = _native_cases()[name]
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sliced = sliceout_fx.convert(
        copy.deepcopy(model), p=0.5, seed=SEED, capture="blocks", example_inputs=(x,)
    )
    masked = sliceout_fx.convert(
        copy.deepcopy(model), p=0.5, seed=SEED, capture="blocks", example_inputs=(x,), mode="mask"
    )
    report = sliceout_fx.explain(sliced)
    # The FFN dropout of every layer becomes a site, and nn.MultiheadAttention's heads another.
    assert sorted(s.kind for s in report.sites) == ["dropout"] * LAYERS + ["group"] * LAYERS
    heads = [s for s in report.sites if s.kind == "group"]
    assert all(s.name.endswith(("self_attn", "self_attention")) and s.units == 4 for s in heads)
    model.eval()
    sliced.eval()
    with torch.no_grad():
        assert torch.equal(sliced(x), model(x))
    for module in (sliced, masked):
        module.train()
    for step in range(2):
        outs = []
        for module in (sliced, masked):
            module.zero_grad()
            torch.manual_seed(step)  # the residual dropouts left in place draw alike
            out = module(x)
            out.sum().backward()
            outs.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-10, rtol=1e-9)
        for a, b in zip(outs[0][1], outs[1][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_gpt2_bench_workload_builds_and_steps():
    from sliceout_lab.bench.workloads import BenchOptions, get_workload

    options = BenchOptions(
        batch_size=2,
        hidden=64,
        depth=1,
        num_batches=1,
        extra={"heads": 4, "vocab": 100, "seq": 16},
    )
    workload = get_workload("gpt2").build(0.3, options)
    variants = workload.build()
    assert list(variants) == ["dropout", "sliceout-flow", "sliceout-prob", "sliceout-capturable"]
    for variant in variants.values():
        variant.step(workload.batches[0])
    assert len(sliceout_fx.explain(variants["sliceout-flow"].model).sites) == 2


def test_deepcopy_of_a_converted_model_trains_on_its_own_weights():
    model = _build("gpt2")
    sliced = sliceout_fx.convert(model, p=0.5, seed=SEED)
    twin = copy.deepcopy(sliced)  # e.g. an EMA copy
    inputs = _inputs("gpt2")
    out_a, _ = _train_step(sliced, inputs, 0)
    out_b, _ = _train_step(twin, inputs, 0)
    torch.testing.assert_close(out_a, out_b)  # same weights, same sampler state
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    out_c, _ = _train_step(twin, inputs, 0)
    assert not torch.allclose(out_a, out_c)  # the copy's graphs read the copy's parameters
    weight = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(sliced.get_parameter(weight), model.get_parameter(weight))  # untouched


def test_each_layer_draws_its_own_slices_under_a_seed():
    sliced = sliceout_fx.convert(_build("bert"), p=0.5, seed=SEED)
    sliced.train()
    starts = set()
    for _ in range(4):
        sliced(**_inputs("bert"))
        draws = [s.last_draws for s in _samplers(sliced)]
        assert len(draws) == LAYERS
        starts.add(tuple(draws))
        if len({tuple(d) for d in draws}) > 1:
            break
    else:
        pytest.fail(f"every layer drew the same slices in 4 steps: {starts}")


def test_an_example_forward_that_fails_says_what_to_pass():
    model = _build("bert")
    with pytest.raises(UntraceableModelError, match="pass example_inputs"):
        sliceout_fx.convert(model, p=0.3, example_inputs={"no_such_argument": 1})
    assert not any(type(m).__name__.startswith("SliceOut") for m in model.modules())


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, options: object) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x))) * options.scale  # type: ignore[attr-defined]


class _Options:
    scale = 2.0


class _ScaledStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Scaled(), _Scaled()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, _Options())
        return x


def test_a_layer_argument_export_cannot_see_is_refused_not_dropped():
    model = _ScaledStack()
    with pytest.raises(UntraceableModelError, match="_Options"):
        sliceout_fx.convert(model, p=0.5, capture="blocks", example_inputs=(torch.randn(2, 8),))
    assert not any(type(m).__name__.startswith("SliceOut") for m in model.modules())


class _InplaceStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 32), nn.Hardswish(inplace=True), nn.Linear(32, 8))
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_an_inplace_activation_after_a_sliced_projection_works():
    """The sliced layers return fresh tensors, not views: in-place ops after them are legal."""
    x = torch.randn(2, 5, 8)  # 3-D, so the matmul runs on a flattened view of the input
    sliced = sliceout_fx.convert(_InplaceStack(), p=0.5, capture="blocks", example_inputs=(x,))
    assert len(sliceout_fx.explain(sliced).sites) == 2
    sliced.train()
    sliced(x).sum().backward()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_recomputes_the_same_slices(reentrant):
    """A seeded sampler is not rewound by checkpointing: the recompute must reuse the draws."""
    model = _build("llama")
    inputs = {"input_ids": _inputs("llama")["input_ids"]}
    results = []
    for mode in ("slice", "mask"):
        converted = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=SEED, mode=mode)
        converted.train()
        converted(**inputs, use_cache=False)  # this call structure is exported here, first
        converted.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
        results.append(_train_step(converted, inputs, seed=0))
    (out_s, grads_s), (out_m, grads_m) = results
    torch.testing.assert_close(out_s, out_m, atol=1e-10, rtol=1e-9)
    for key in grads_m:
        torch.testing.assert_close(grads_s[key], grads_m[key], atol=1e-10, rtol=1e-9)


def test_constants_lifted_by_export_are_kept():
    """GPT-Neo's attention builds a constant that torch.export lifts out of the layer's code."""
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(
        vocab_size=100,
        hidden_size=32,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        num_heads=4,
        max_position_embeddings=32,
        window_size=4,
    )
    model = transformers.GPTNeoForCausalLM(config).double()
    sliced = sliceout_fx.convert(copy.deepcopy(model), p=0.3, seed=SEED)
    masked = sliceout_fx.convert(copy.deepcopy(model), p=0.3, seed=SEED, mode="mask")
    assert sliceout_fx.explain(sliced).sites
    ids = torch.randint(0, 100, (2, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out_s, grads_s = _train_step(sliced, inputs, 0)
    out_m, grads_m = _train_step(masked, inputs, 0)
    torch.testing.assert_close(out_s, out_m, atol=1e-10, rtol=1e-9)
    for name in grads_m:
        torch.testing.assert_close(grads_s[name], grads_m[name], atol=1e-10, rtol=1e-9, msg=name)
    assert not any("sliceout_constant" in n for n, _ in sliced.named_buffers())


def test_site_names_and_rates_of_every_layer_can_be_given():
    """A site list and a rate mapping name sites of all layers; each layer takes its own."""
    model = _build("llama")
    ffn = [f"model.layers.{i}.mlp.gate_proj" for i in range(LAYERS)]
    by_list = sliceout_fx.convert(
        model, p=0.25, sites=ffn, example_inputs=_inputs("llama"), seed=SEED
    )
    assert sorted(s.name for s in sliceout_fx.explain(by_list).sites) == ffn
    rates = {ffn[0]: 0.5, ffn[1]: 0.25}
    by_rate = sliceout_fx.convert(
        model, p=rates, sites=ffn, example_inputs=_inputs("llama"), seed=SEED
    )
    assert {s.name: s.p for s in sliceout_fx.explain(by_rate).sites} == rates


def test_a_site_name_outside_every_layer_is_refused():
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="none of the converted layers"):
        sliceout_fx.convert(_build("llama"), sites=["lm_head"], example_inputs=_inputs("llama"))
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="known sites"):
        sliceout_fx.convert(
            _build("llama"), sites=["model.layers.0.mlp.nope"], example_inputs=_inputs("llama")
        )
