"""Rules met in real CNN code: padding, functional convolutions, squeeze-excite, recalibration."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from tests.helpers import assert_eval_equal, assert_sliced_matches_mask, train_step_outputs


class SamePadConv(nn.Conv2d):
    """A TF-"SAME" conv as ported models write it: pad, then the functional conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if self.stride[0] == 2 else nn.Identity()

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    """Expand 1x1 -> BN -> SiLU -> padded stride-2 depthwise -> BN -> SiLU -> SE -> project."""

    def __init__(self, c_in: int = 8, expand: int = 4, se: int = 4) -> None:
        super().__init__()
        c = c_in * expand
        self.expand = SamePadConv(c_in, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = SamePadConv(c, c, 3, stride=2, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se_reduce = nn.Conv2d(c, se, 1)
        self.se_expand = nn.Conv2d(se, c, 1)
        self.project = SamePadConv(c, c_in, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_in)

    def forward(self, x):
        h = F.silu(self.bn1(self.expand(x)))
        h = F.silu(self.bn2(self.dw(h)))
        gate = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return self.bn3(self.project(h * gate)).mean((2, 3))


def _inputs(dtype=torch.float32):
    return (torch.randn(4, 8, 8, 8, dtype=dtype),)


def test_functional_expand_conv_through_padding_and_se_is_one_site():
    report = sliceout_fx.explain(MBConv(), p=0.25, sites="expand")
    (site,) = report.sites
    assert site.name == "expand"  # named by the module whose forward called F.conv2d
    names = {n.name for n in site.group.nodes}
    assert {"bn1", "dw_pad", "bn2", "se_reduce", "se_expand", "mul"} <= names
    assert [n.name for n, _ in site.group.exit_sinks] == ["conv2d_2"]  # the projection only
    assert site.channels() == (24, 32)


def test_mbconv_slice_matches_mask_and_eval_is_exact():
    torch.manual_seed(0)
    model = MBConv().double()
    options = dict(p=0.25, sites="expand", placement="delayed")
    assert_sliced_matches_mask(model, _inputs(torch.float64), atol=1e-10, **options)
    assert_sliced_matches_mask(
        model, _inputs(torch.float64), atol=1e-10, normalisation="probabilistic", **options
    )
    assert_eval_equal(copy.deepcopy(model).float(), _inputs(), **options)


def test_padding_of_the_channel_axis_blocks():
    class PadChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(10, 4, 1)
            self.drop = nn.Dropout2d(0.5)

        def forward(self, x):  # pads channels 8 -> 10: a cut channel range would move
            return self.conv2(F.pad(self.drop(self.conv1(x)), (0, 0, 0, 0, 1, 1))).mean((2, 3))

    report = sliceout_fx.explain(PadChannels(), p=0.5, example_inputs=(torch.randn(2, 3, 4, 4),))
    assert not report.sites and "pad" in report.skipped[0].reason


def test_recalibrate_batch_norm_restores_full_width_statistics():
    torch.manual_seed(0)
    model = MBConv()
    converted = sliceout_fx.convert(copy.deepcopy(model), p=0.5, sites="expand")
    batches = [torch.randn(8, 8, 8, 8) for _ in range(3)]
    for x in batches:  # sliced training moves the running statistics
        train_step_outputs(converted, (x,))
    # The reference: the same weights, statistics re-estimated by the plain model at full width.
    reference = sliceout_fx.to_original(copy.deepcopy(converted))
    for bn in (m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
    reference.train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    assert sliceout_fx.recalibrate_batch_norm(converted, batches) == 3
    for (name, a), (_, b) in zip(
        converted.named_buffers(), reference.named_buffers(), strict=False
    ):
        if "running" in name:
            torch.testing.assert_close(a, b, msg=name)
    assert converted.training and converted.slicing_enabled  # modes are restored
    assert all(bn.momentum == 0.1 for bn in converted.modules() if isinstance(bn, nn.BatchNorm2d))


@pytest.mark.parametrize("normalisation", ["flow", "probabilistic"])
@pytest.mark.parametrize("placement", ["immediate", "delayed"])
@pytest.mark.parametrize("groups", [8, 2])
def test_a_slice_read_first_by_a_grouped_conv_trains_like_the_reference(
    groups, placement, normalisation
):
    # Conv -> Dropout -> Conv(groups) -> Conv: the normalisation folds into the grouped conv
    # (it used to fail an empty assertion in training).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, groups=groups, padding=1),
        nn.Conv2d(8, 4, 1),
    ).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    sliced, _ = assert_sliced_matches_mask(
        model, (x,), steps=2, atol=1e-10, placement=placement, normalisation=normalisation
    )
    # And both equal the computation written out by hand: half of the channels kept
    # through the grouped conv (the whole group is sliced, its bias included), rescaled where the
    # dropout was (immediate) or where the last conv reads them (delayed).
    from sliceout_fx.sampling import keep_probabilities

    site = sliced.report.site("1")
    per_unit = 8 // site.units
    start = site.units // 4  # channels [2, 6) when depthwise, the first group of 4 when groups=2
    sliced.sliceout_sampler.force((start,))
    sliced.train()
    keep = torch.zeros(8, dtype=torch.float64)
    keep[start * per_unit : (start + site.width) * per_unit] = 1.0
    if normalisation == "flow":
        scale = torch.full((8,), 2.0, dtype=torch.float64)
    else:
        scale = 1.0 / keep_probabilities(site.units, site.width).double()
        scale = scale.repeat_interleave(per_unit)
    keep, factor = keep.view(1, 8, 1, 1), (keep * scale).view(1, 8, 1, 1)
    if placement == "immediate":
        reference = model[3](model[2](model[0](x) * factor) * keep)
    else:
        reference = model[3](model[2](model[0](x)) * factor)
    # (probabilistic scales are float32 buffers)
    torch.testing.assert_close(sliced(x), reference, atol=1e-6, rtol=1e-6)
