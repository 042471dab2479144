"""Both front ends see the same model: ``capture="fx"`` (torch-level ops) and ``capture="blocks"``
(ATen ops from ``torch.export``) pick the same sites, with the same units and widths.

Each model is a stack of repeated blocks (what ``capture="blocks"`` converts one by one) built
from the op families whose torch-level and ATen forms differ: module vs functional conv, batch norm
and pad, ``view``/``flatten``/``x.shape[0]`` vs ``aten.view``/``sym_size``, ``torch.cat``, tensor
indexing vs ``aten.slice``, grouped convolutions, hand-written GELU adds (not residual merges) and
residual adds (which are), squeeze-excite, attention split into heads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from sliceout_fx.rules import AxisRelations, OpRule, register_rule, registered_rules, rule_for
from sliceout_fx.rules.linear import LinearRule

from .helpers import assert_sliced_matches_mask


class ConvBlock(nn.Module):
    """pad -> conv -> BN -> ReLU -> squeeze-excite (Linear) -> dropout -> conv, plus residual."""

    def __init__(self, c: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, hidden, 3)
        self.bn = nn.BatchNorm2d(hidden)
        self.se_reduce, self.se_expand = nn.Linear(hidden, 4), nn.Linear(4, hidden)
        self.drop = nn.Dropout(0.2)
        self.project = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.expand(F.pad(x, (1, 1, 1, 1)))))
        gate = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(gate))))
        y = y * gate.view(gate.shape[0], -1, 1, 1)
        return x + self.project(self.drop(y))


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise (functional BN) -> 1x1 project; a Linear head on the block."""

    def __init__(self, c: int = 8, hidden: int = 24) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, hidden, 1, bias=False)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn_weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.bn_bias = nn.Parameter(torch.randn(hidden) * 0.1)
        self.register_buffer("bn_mean", torch.zeros(hidden))
        self.register_buffer("bn_var", torch.ones(hidden))
        self.project = nn.Conv2d(hidden, c, 1, bias=False)
        self.mix = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.expand(x))
        y = self.dw(y)
        y = F.batch_norm(
            y, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias, self.training, 0.1, 1e-5
        )
        y = x + self.project(F.relu6(y))
        return self.mix(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class AttentionBlock(nn.Module):
    """Pre-norm attention (fused QKV split, heads by view/transpose) and a hand-written GELU MLP."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.out(a)
        h = self.fc(self.norm2(x))
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h.pow(3))))
        return x + self.proj(self.drop(h))


class ConcatBlock(nn.Module):
    """Two branches concatenated along features (cut blocked there), indexed, then dropout."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(width, 24), nn.Linear(width, 24)
        self.inner = nn.Linear(48, 32)
        self.drop = nn.Dropout(0.25)
        self.back = nn.Linear(32, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.left(x), self.right(x)], dim=-1)
        h = F.gelu(self.inner(h))[:, :]
        return x + self.back(self.drop(h))


class FusedPartsBlock(nn.Module):
    """Phi-3's layout: one Q|K|V projection with fewer key/value heads, parts taken by slices,
    and one gate|up projection split by ``chunk``."""

    def __init__(self, width: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, width // heads
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * self.d)
        self.o = nn.Linear(width, width)
        self.gate_up, self.down = nn.Linear(width, 128), nn.Linear(64, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)
        q_end, kv = self.heads * self.d, self.kv_heads * self.d
        q = qkv[..., :q_end].view(b, t, self.heads, self.d).transpose(1, 2)
        k = qkv[..., q_end : q_end + kv].view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = qkv[..., q_end + kv :].view(b, t, self.kv_heads, self.d).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class MatmulLinear(nn.Linear):
    """A linear layer with its own forward, ``x @ W.T + b`` (HF Falcon's ``FalconLinear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class ParameterMatmulBlock(nn.Module):
    """Linear layers written as matmuls by parameters, ``(out, in)`` and ``(in, out)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = MatmulLinear(32, 64)
        self.w_down = nn.Parameter(torch.randn(64, 32) / 8)  # (in, out): x @ W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.up(x)) @ self.w_down


class Stack(nn.Module):
    def __init__(self, block: type[nn.Module], depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


MODELS = {
    "conv-se": (ConvBlock, (2, 8, 6, 6)),
    "inverted-residual": (InvertedResidual, (2, 8, 6, 6)),
    "attention": (AttentionBlock, (2, 5, 32)),
    "concat": (ConcatBlock, (3, 16)),
    "fused-parts": (FusedPartsBlock, (2, 5, 32)),
    "matmul-by-parameter": (ParameterMatmulBlock, (2, 5, 32)),
}


def _sites(model: nn.Module, capture: str, sites: str, x: torch.Tensor):
    converted = sliceout_fx.convert(model, p=0.3, sites=sites, capture=capture, example_inputs=x)
    report = sliceout_fx.explain(converted)
    found = sorted((s.name, s.kind, s.units, s.width) for s in report.sites)
    return found, sorted(s.name for s in report.skipped)


@pytest.mark.parametrize("sites", ["dropout", "expand", "all"])
@pytest.mark.parametrize("name", list(MODELS))
def test_both_front_ends_pick_the_same_sites(name: str, sites: str) -> None:
    block, shape = MODELS[name]
    torch.manual_seed(0)
    model, x = Stack(block), torch.randn(shape)
    fx_sites, fx_skipped = _sites(model, "fx", sites, x)
    export_sites, export_skipped = _sites(model, "blocks", sites, x)
    assert fx_sites == export_sites
    assert fx_skipped == export_skipped
    if sites == "all":
        assert fx_sites, "the comparison needs sites to compare"


@pytest.mark.parametrize("capture", ["fx", "blocks"])
@pytest.mark.parametrize("name", list(MODELS))
def test_each_front_end_slices_like_its_mask_reference(name: str, capture: str) -> None:
    block, shape = MODELS[name]
    torch.manual_seed(0)
    model = Stack(block).double()
    x = torch.randn(shape, dtype=torch.float64)
    assert_sliced_matches_mask(
        model, (x,), steps=2, atol=1e-10, sites="all", capture=capture, example_inputs=x
    )


def test_unequal_fused_parts_slice_whole_key_value_groups() -> None:
    """Q|K|V parts of different sizes are recomputed from their own rows: heads are cut in whole
    key/value groups, and the gate|up parts by chunk are named after their projection."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    sites, _ = _sites(Stack(FusedPartsBlock), "blocks", "all", x)
    assert ("layers.0", "group", 2, 1) in sites  # 2 KV groups of (2 query heads, 1 KV head)
    assert ("layers.0.gate_up", "group", 64, 45) in sites


def test_flatten_of_pooled_channels_keeps_the_classifier_dropout() -> None:
    """``(N, C, 1, 1) -> flatten -> dropout -> Linear``: the channel axis stays whole."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(16, 5),
    ).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sliced, _ = assert_sliced_matches_mask(model, (x,), atol=1e-10)
    assert [s.name for s in sliced.report.sites] == ["4"]


# -- rules passed per conversion, and registrations that do not leak --------------------------


class Scale(nn.Module):
    """A module no built-in rule knows: element-wise, so a rule can say so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


class ElementwiseModuleRule(OpRule):
    name = "scale"
    targets = (Scale,)

    def relations(self, node, gm) -> AxisRelations:
        from sliceout_fx.rules.base import couple_all_dims

        return AxisRelations(couplings=couple_all_dims(node.args[0], node))


def _scaled_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), Scale(), nn.Dropout(0.5), nn.Linear(16, 3)).double()


def _sites_of_scaled_mlp(**options) -> list:
    model = _scaled_mlp()  # Scale kept whole as a leaf: only a rule can see through it
    converted = sliceout_fx.convert(model, p=0.5, leaf_modules=[Scale], **options)
    return sliceout_fx.explain(converted).sites


def test_rules_passed_to_convert_apply_to_that_conversion_only() -> None:
    model, x = _scaled_mlp(), torch.randn(4, 6, dtype=torch.float64)
    without = sliceout_fx.explain(sliceout_fx.convert(model, p=0.5, leaf_modules=[Scale]))
    assert not without.sites and "no rule for module Scale" in without.skipped[0].reason
    sliced, _ = assert_sliced_matches_mask(
        model, (x,), atol=1e-10, rules=[ElementwiseModuleRule()], leaf_modules=[Scale]
    )
    assert [s.name for s in sliced.report.sites] == ["2"]
    assert not _sites_of_scaled_mlp(), "a conversion's own rules must not stay registered"


class Projection(nn.Module):
    """A linear layer of the user's own, which no built-in rule knows."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, features) / features**0.5)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class ProjectionRule(LinearRule):
    targets = (Projection,)


class GatedMLP(nn.Module):
    """``Projection`` computing gate | up at once, split by ``chunk``: a fused projection."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up, self.down = Projection(8, 32), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def test_a_conversion_rule_is_seen_where_another_rule_looks_a_rule_up() -> None:
    """The split asks for the rule of what it splits (is it a fused projection?): a rule given
    to ``convert`` answers there too, not only for the node it is registered for."""
    torch.manual_seed(0)
    model, x = GatedMLP().double(), torch.randn(4, 8, dtype=torch.float64)
    options = dict(sites="all", leaf_modules=[Projection], example_inputs=x)
    sliced, _ = assert_sliced_matches_mask(
        model, (x,), atol=1e-10, rules=[ProjectionRule()], **options
    )
    [site] = sliced.report.sites  # gate and up cut alike, each from its own weight rows
    assert site.units == 16 and len(site.group.sources) == 2
    without = sliceout_fx.convert(model, p=0.5, **options)
    assert not sliceout_fx.explain(without).sites


def test_registered_rules_are_scoped_to_the_with_block() -> None:
    with registered_rules(ElementwiseModuleRule()):
        assert _sites_of_scaled_mlp()
    assert not _sites_of_scaled_mlp()


def test_a_rule_registered_in_a_test_is_gone_after_it(restore_rules) -> None:
    register_rule(ElementwiseModuleRule())  # the autouse fixture unregisters it afterwards
    assert _sites_of_scaled_mlp()


def test_the_previous_test_left_no_rule_behind() -> None:
    assert not _sites_of_scaled_mlp()


def test_a_rule_without_targets_is_refused() -> None:
    class Untargeted(OpRule):
        pass

    with pytest.raises(sliceout_fx.SliceOutConfigError, match="targets"):
        sliceout_fx.convert(_scaled_mlp(), p=0.5, rules=[Untargeted()])


def test_every_rule_serves_both_dialects() -> None:
    """For each op family with a functional form, the torch-level and the ATen call of one
    op find the same rule object."""
    pairs = {
        "conv2d": (torch.conv2d, torch.ops.aten.conv2d.default),
        "batch_norm": (F.batch_norm, torch.ops.aten.batch_norm.default),
        "pad": (F.pad, torch.ops.aten.pad.default),
        "linear": (F.linear, torch.ops.aten.linear.default),
        "layer_norm": (F.layer_norm, torch.ops.aten.layer_norm.default),
        "dropout": (F.dropout, torch.ops.aten.dropout.default),
        "cat": (torch.cat, torch.ops.aten.cat.default),
        "flatten": (torch.flatten, torch.ops.aten.flatten.using_ints),
        "add": (torch.add, torch.ops.aten.add.Tensor),
        "softmax": (F.softmax, torch.ops.aten.softmax.int),
        "sdpa": (
            F.scaled_dot_product_attention,
            torch.ops.aten.scaled_dot_product_attention.default,
        ),
        "max_pool2d": (F.max_pool2d, torch.ops.aten.max_pool2d.default),
        "mean": (torch.mean, torch.ops.aten.mean.dim),
    }
    from torch import fx

    graph = fx.Graph()
    gm = fx.GraphModule(nn.Module(), graph)
    for name, (torch_level, aten_level) in pairs.items():
        a = graph.call_function(torch_level, ())
        b = graph.call_function(aten_level, ())
        ra, rb = rule_for(a, gm), rule_for(b, gm)
        assert ra is rb and ra.targets, f"{name}: {ra.name} vs {rb.name}"
