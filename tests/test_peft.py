"""PEFT LoRA in both orders, on a HuggingFace Llama (layer export) and a timm ViT (fx trace).

The reference is the masked full-width conversion drawing the same slices: the adapters' outputs
and gradients of a sliced step must equal it, the LoRA rank and the adapter dropout are never
sites, and ``merge_and_unload`` gives the plain model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx.module import conversions_in
from tests.models import tiny_vit

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).double()


def _vit() -> nn.Module:
    return tiny_vit().double()


CASES = {
    "llama": (_llama, ["q_proj", "v_proj", "up_proj"], "forward_ids"),
    "vit": (_vit, ["qkv", "fc1"], "forward_images"),
}
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double()


def _lora(targets: list[str]) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1)


def _loss(name: str, model: nn.Module) -> torch.Tensor:
    if name == "llama":
        return model(input_ids=IDS, labels=IDS).loss
    return model(IMAGES).square().mean()


def _build(name: str, order: str, mode: str) -> nn.Module:
    make, targets, _ = CASES[name]
    options = {"p": 0.3, "seed": 7, "mode": mode}
    if name == "vit":
        options["example_inputs"] = (IMAGES,)
    if order == "peft-first":
        # PEFT initialises lora_B to zero; random B makes the adapters' gradients informative
        wrapped = peft.get_peft_model(make(), _lora(targets))
        _randomise_lora_b(wrapped)
        return sliceout_fx.convert(wrapped, **options)
    wrapped = peft.get_peft_model(sliceout_fx.convert(make(), **options), _lora(targets))
    _randomise_lora_b(wrapped)
    return wrapped


def _randomise_lora_b(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def _step(name: str, model: nn.Module, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = _loss(name, model)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("order", ["peft-first", "convert-first"])
@pytest.mark.parametrize("name", list(CASES))
def test_adapters_train_like_the_masked_reference(name, order):
    sliced = _build(name, order, "slice")
    masked = _build(name, order, "mask")
    lora_names = [n for n, p in sliced.named_parameters() if "lora_" in n]
    assert lora_names and all(p.requires_grad for n, p in sliced.named_parameters() if "lora_" in n)
    for step in range(2):
        loss_s, grads_s = _step(name, sliced, step)
        loss_m, grads_m = _step(name, masked, step)
        torch.testing.assert_close(loss_s, loss_m)
        assert set(lora_names) <= set(grads_s), "every adapter tensor gets a gradient"
        assert grads_s.keys() == grads_m.keys()
        for key in grads_s:
            torch.testing.assert_close(grads_s[key], grads_m[key], msg=key)
        assert any(grads_s[n].abs().sum() > 0 for n in lora_names)

    report = sliceout_fx.explain(sliced)
    assert report.sites
    assert not any("lora" in s.name or "base_layer" in s.name for s in report.sites)
    assert any("lora_" in k.name for k in report.skipped)  # rank / adapter dropout: kept


@pytest.mark.parametrize("name", list(CASES))
def test_adapters_change_in_training_and_merge_into_the_plain_model(name, tmp_path):
    model = _build(name, "peft-first", "slice")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        opt.zero_grad()
        _step(name, model, step)
        opt.step()
    changed = [
        n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, before[n])
    ]
    assert len(changed) == len(before)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()

    model.eval()
    with torch.no_grad():
        expected = _loss(name, model)
    sliceout_fx.to_original(model)
    merged = model.merge_and_unload()
    assert not conversions_in(merged)
    assert not any("lora" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(_loss(name, merged.eval()), expected)


def test_the_lora_rank_is_a_site_only_when_named():
    wrapped = peft.get_peft_model(_llama(), _lora(["up_proj"]))
    report = sliceout_fx.explain(wrapped, p=0.3, sites="all")
    assert report.sites and not any("lora" in s.name for s in report.sites)
    vit = peft.get_peft_model(_vit(), _lora(["fc1"]))
    rank = "blocks.0.mlp.fc1.lora_A.default"
    named = sliceout_fx.explain(vit, p=0.5, sites=[rank], example_inputs=(IMAGES,))
    assert [s.name for s in named.sites] == [rank] and named.sites[0].units == 4


@pytest.mark.parametrize("order", ["peft-first", "convert-first"])
@pytest.mark.parametrize("name", list(CASES))
def test_merging_before_to_original_trains_like_the_masked_reference(name, order):
    """``merge_and_unload`` on the converted PEFT model, without ``to_original`` first: the merged
    layers replace the LoRA ones, the conversion analyses the changed model again (same sites),
    evaluates as before the merge and, once its base weights are unfrozen, trains as the masked
    reference does. The weights come out of the merge frozen, as PEFT leaves them with or without
    SliceOut: a training step before ``requires_grad_`` has nothing to differentiate."""
    make, targets, _ = CASES[name]
    plain = peft.get_peft_model(make(), _lora(targets)).merge_and_unload()
    assert not any(p.requires_grad for p in plain.parameters())  # PEFT's own frozen base

    runs = {}
    for mode in ("slice", "mask"):
        model = _build(name, order, mode)
        _step(name, model, 0)
        sites = [s.name for s in sliceout_fx.explain(model).sites]
        model.eval()
        with torch.no_grad():
            before = _loss(name, model)
        merged = model.merge_and_unload()
        assert conversions_in(merged)
        assert not any("lora" in n for n, _ in merged.named_modules())
        assert not any(p.requires_grad for p in merged.parameters())
        with torch.no_grad():
            torch.testing.assert_close(_loss(name, merged.eval()), before)
        merged.requires_grad_(True)
        runs[mode] = [_step(name, merged, seed) for seed in (1, 2)]
        assert [s.name for s in sliceout_fx.explain(merged).sites] == sites
    for (loss_s, grads_s), (loss_m, grads_m) in zip(runs["slice"], runs["mask"], strict=True):
        torch.testing.assert_close(loss_s, loss_m)
        assert grads_s.keys() == grads_m.keys() == dict(merged.named_parameters()).keys()
        for key in grads_s:
            torch.testing.assert_close(grads_s[key], grads_m[key], msg=key)
