"""Real CNNs from torchvision, timm and the paper's Wide ResNet, each against its reference.

Random init and small inputs keep this fast. Slice-vs-mask comparisons run in float64 so that the
tolerance can be tight enough to catch a wrong slice through 50 layers of batch norm.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_lab.models import WideResNet
from tests.helpers import assert_sliced_matches_mask, train_step_outputs

torchvision = pytest.importorskip("torchvision")


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(num_classes=10)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, num_classes=10)

    return build


# name: (builder, input size, convert options, the sites explain must list)
MODELS = {
    "wrn-16-2": (lambda: WideResNet(16, 2, p=0.3), 32, dict(placement="delayed"), 6),
    "resnet18": (_tv("resnet18"), 64, dict(sites="all"), 8),
    "resnet50": (_tv("resnet50"), 64, dict(sites="all"), 33),  # 16 blocks x 2 + stem
    "wide_resnet50_2": (_tv("wide_resnet50_2"), 64, dict(sites="all"), 33),
    # 15 / 21 expand convs and the classifier dropout (the head conv's channels, through flatten)
    "efficientnet_b0": (_tv("efficientnet_b0"), 64, dict(placement="delayed"), 16),
    "efficientnet_b2": (_tv("efficientnet_b2"), 64, dict(placement="delayed"), 22),
    # 16 MBConv expand convs and the classifier's dropout, which slices the head conv's channels
    # (a dropout left in place on a sliced tensor would draw other masks than the reference's)
    "mobilenet_v2": (_tv("mobilenet_v2"), 64, dict(), 17),
    # 14 expand + the head conv (160 -> 960) + the classifier's dropout
    "mobilenet_v3_large": (_tv("mobilenet_v3_large"), 64, dict(), 16),
    "timm-efficientnet_b0": (_timm("efficientnet_b0"), 64, dict(placement="delayed"), 16),
}


def _build(name: str, dtype: torch.dtype = torch.float32, size: int | None = None, batch: int = 2):
    builder, default_size, options, expected_sites = MODELS[name]
    size = size or default_size
    torch.manual_seed(0)
    model = builder().to(dtype)
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    return model, (x,), dict(p=0.3, example_inputs=(x,), **options), expected_sites


def _convert(model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "found no site" allowed here
        return sliceout_fx.convert(model, **options)


@pytest.mark.parametrize("name", MODELS)
def test_convert_finds_the_sites_and_eval_is_identical(name):
    model, inputs, options, expected_sites = _build(name)
    converted = _convert(model, **options)
    report = converted.explain()
    assert len(report.sites) == expected_sites, str(report)
    if options.get("sites") in (None, "expand") and "efficientnet" in name:
        # every MBConv with an expansion: its expand conv is a site carrying SE and depthwise conv
        expand = [s for s in report.sites if s.kind == "expand"]
        assert [s.kind for s in report.sites if s not in expand] in ([], ["dropout"])
        for site in (s for s in expand if "head" not in s.name):  # not timm's conv_head
            kinds = {n.name for n in site.group.nodes}
            assert any("fc2" in k or "conv_expand" in k for k in kinds), kinds
    model.eval()
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(*inputs), model(*inputs))


@pytest.mark.parametrize("name", MODELS)
def test_sliced_training_matches_the_masked_reference_in_float64(name):
    # float64 convolutions have no fast CPU kernels: a smaller image keeps this test quick, and a
    # batch of 4 keeps batch norm well conditioned where the feature maps shrink to 1x1.
    model, inputs, options, _ = _build(name, torch.float64, size=32, batch=4)
    assert_sliced_matches_mask(model, inputs, steps=1, atol=1e-9, **options)


@pytest.mark.parametrize("name", ["wrn-16-2", "efficientnet_b0", "resnet50", "mobilenet_v3_large"])
def test_batchnorm_stats_outside_the_slice_are_untouched_and_a_step_updates(name):
    # bn_stats="sliced": live channels' statistics move in a sliced step (the default freezes them
    # until a full-width refresh call, see test_bn_statistics.py).
    model, inputs, options, _ = _build(name)
    converted = _convert(model, seed=0, bn_stats="sliced", **options)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    opt = torch.optim.SGD(converted.parameters(), lr=0.01, momentum=0.9)
    train_step_outputs(converted, inputs)
    opt.step()
    checked = 0
    draws = converted.sliceout_sampler.last_draws
    for site, start in zip(converted.report.sites, draws, strict=True):
        bn_nodes = [n for n in site.group.nodes if "bn" in n.name or "block_0_1" in n.name]
        for node in bn_nodes:
            if node.op != "call_module":
                continue
            prefix = str(node.target)
            key = f"{prefix}.running_mean"
            if key not in before:
                continue
            size = before[key].numel()
            scale = size // site.units
            live = torch.zeros(size, dtype=torch.bool)
            live[start * scale : (start + site.width) * scale] = True
            after = converted.state_dict()[key]
            assert torch.equal(after[~live], before[key][~live]), key
            assert not torch.equal(after[live], before[key][live]), key
            checked += 1
    assert checked >= 1
    changed = [k for k, v in converted.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)


def test_wrn_state_dict_moves_to_the_original_class():
    model = WideResNet(16, 2, p=0.3)
    converted = sliceout_fx.convert(copy.deepcopy(model), p=0.3)
    x = torch.randn(2, 3, 32, 32)
    train_step_outputs(converted, (x,))
    fresh = WideResNet(16, 2, p=0.3)
    fresh.load_state_dict(converted.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), converted.eval()(x))


# name: (the sites "auto" must find without any dropout inside a block, their kinds)
AUTO_INNER = {
    "resnet18": (8, {"inner"}),  # conv1 of every basic block
    "resnet50": (32, {"inner"}),  # conv1 and conv2 of every bottleneck
    "convnext_tiny": (18, {"inner"}),  # the MLP expansion of every block
    "squeezenet1_0": (9, {"inner"}),  # every Fire squeeze and the stem
    # every dense layer's 1x1 bottleneck: an expand conv where it widens its input
    "densenet121": (58, {"inner", "expand"}),
}


@pytest.mark.parametrize("name", AUTO_INNER)
def test_auto_slices_the_inner_width_of_blocks_never_the_residual_stream(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    converted = _convert(model, p=0.3, example_inputs=(torch.randn(1, 3, 64, 64),))
    report = converted.explain()
    count, kinds = AUTO_INNER[name]
    assert len(report.sites) == count, str(report)
    assert {s.kind for s in report.sites} == kinds
    for site in report.sites:
        assert not site.group.residual_adds, f"{site.name} is a residual stream"


@pytest.mark.parametrize("sites", ["all", "auto"])
def test_a_sliced_step_saves_fewer_activation_bytes_than_the_original(sites):
    # A sliced conv reads its live weight block as a view: a copy of it (scaled, or made
    # contiguous) would be saved for backward, and in the late layers of a small input those
    # copies outweigh every activation (resnet18 at 32x32 saved 5.6x the original's bytes).
    torchvision = pytest.importorskip("torchvision")
    from sliceout_lab.memory import saved_activation_bytes

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    converted = sliceout_fx.convert(model, p=0.3, sites=sites, example_inputs=(x[:2],))

    def step_bytes(m: nn.Module) -> int:
        m.train()
        return saved_activation_bytes(lambda: m(x).sum().backward(), m.parameters())

    assert step_bytes(converted) < step_bytes(model)
