"""``nn.MultiheadAttention`` and the ``torch.nn`` transformer modules: heads cut in both front ends.

``torch.fx`` keeps these ``torch.nn`` modules whole and ``torch.export`` records heads merged into
the batch axis; the training graph is captured from :mod:`sliceout_fx.mha`'s spelt-out forward
instead. Every test compares with the original (eval, bit for bit) and with the mask reference
(training, float64).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sliceout_fx
from tests.helpers import assert_eval_equal, assert_sliced_matches_mask

torchvision = pytest.importorskip("torchvision")


class Encoder(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` blocks and a classifier, called with or without a key
    padding mask."""

    def __init__(self, batch_first: bool = True, norm_first: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding))


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another, weights returned or not."""

    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(32, 32), nn.Linear(32, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kv = self.kv(y)
        out, _ = self.attn(self.q(x), kv, kv, need_weights=self.need_weights)
        return self.head(out)


def _sites(model: nn.Module, inputs: tuple, **options) -> list[tuple[str, int, int]]:
    converted = sliceout_fx.convert(model, p=0.5, example_inputs=inputs, **options)
    return [(s.name, s.units, s.width) for s in sliceout_fx.explain(converted).sites]


def _check(model: nn.Module, inputs: tuple, **options) -> None:
    options = dict(p=0.5, example_inputs=inputs, **options)
    assert_eval_equal(model, inputs, **options)
    assert_sliced_matches_mask(model, inputs, steps=2, atol=1e-10, **options)


def test_torchvision_vit_cuts_whole_heads_of_its_multihead_attention() -> None:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    ).double()
    x = (torch.randn(2, 3, 32, 32, dtype=torch.float64),)
    sites = _sites(model, x, sites="all")
    for i in range(2):
        assert (f"encoder.layers.encoder_layer_{i}.self_attention", 4, 2) in sites, sites
    _check(model, x, sites="all")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_transformer_encoder_gets_the_same_head_and_ffn_sites_in_both_front_ends(
    batch_first: bool, norm_first: bool
) -> None:
    torch.manual_seed(0)
    model = Encoder(batch_first, norm_first).double()
    shape = (2, 5, 32) if batch_first else (5, 2, 32)
    x = (torch.randn(shape, dtype=torch.float64),)
    expected = [
        *(s for i in range(2) for s in [(f"encoder.layers.{i}.self_attn", 4, 2)]),
        *(s for i in range(2) for s in [(f"encoder.layers.{i}.dropout", 64, 32)]),
    ]
    for capture in ("fx", "blocks"):
        assert sorted(_sites(model, x, sites="all", capture=capture)) == sorted(expected)
        _check(model, x, sites="all", capture=capture)


class Seq2Seq(nn.Module):
    """``nn.TransformerDecoder`` over a memory, or a whole ``nn.Transformer``, and a classifier;
    attention dropout 0 so that no other draw differs between slicing and its reference."""

    def __init__(self, whole: bool) -> None:
        super().__init__()
        options = dict(dim_feedforward=64, dropout=0.1, batch_first=True)
        if whole:
            self.body = nn.Transformer(32, 4, 1, 2, **options)
        else:
            self.body = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, **options), 2)
        for module in self.body.modules():
            if isinstance(module, nn.MultiheadAttention):
                module.dropout = 0.0
        self.head = nn.Linear(32, 3)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if isinstance(self.body, nn.Transformer):
            return self.head(self.body(memory, tgt))
        return self.head(self.body(tgt, memory))


@pytest.mark.parametrize("whole", [False, True], ids=["decoder", "transformer"])
def test_decoder_self_and_cross_attention_heads_and_ffn_are_cut(whole: bool) -> None:
    torch.manual_seed(0)
    model = Seq2Seq(whole).double()
    inputs = tuple(torch.randn(2, n, 32, dtype=torch.float64) for n in (6, 5))
    prefix = "body.decoder.layers" if whole else "body.layers"
    expected = [
        (f"{prefix}.{i}.{name}", units, units // 2)
        for i in range(2)
        for name, units in (("self_attn", 4), ("multihead_attn", 4), ("dropout", 64))
    ]
    if whole:
        encoder = "body.encoder.layers.0"
        expected += [(f"{encoder}.self_attn", 4, 2), (f"{encoder}.dropout", 64, 32)]
    for capture in ("fx", "blocks"):
        assert sorted(_sites(model, inputs, sites="all", capture=capture)) == sorted(expected)
        _check(model, inputs, sites="all", capture=capture)


class CausalDecoder(Seq2Seq):
    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=tgt.dtype)
        return self.head(self.body(tgt, memory, tgt_mask=mask, tgt_is_causal=True))


def test_a_causal_decoder_is_sliced_by_export_and_kept_whole_with_its_reason_by_fx() -> None:
    torch.manual_seed(0)
    model = CausalDecoder(whole=False).double()
    inputs = tuple(torch.randn(2, n, 32, dtype=torch.float64) for n in (6, 5))
    report = sliceout_fx.explain(model, p=0.5, capture="fx", example_inputs=inputs)
    assert report.sites == []
    assert [(s.name, "capture='blocks'" in s.reason) for s in report.skipped] == [("body", True)]
    sites = _sites(model, inputs, sites="all", capture="blocks")
    assert {("body.layers.0.self_attn", 4, 2), ("body.layers.1.multihead_attn", 4, 2)} <= set(sites)
    _check(model, inputs, sites="all", capture="blocks")


def test_a_key_padding_mask_is_sliced_by_export_and_kept_whole_with_its_reason_by_fx() -> None:
    torch.manual_seed(0)
    model = Encoder().double()
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, -2:] = True  # the second sequence has two padding tokens
    inputs = (torch.randn(2, 5, 32, dtype=torch.float64), padding)
    assert ("encoder.layers.0.self_attn", 4, 2) in _sites(model, inputs, capture="blocks")
    _check(model, inputs, capture="blocks")
    with pytest.warns(UserWarning, match="found no site"):
        converted = sliceout_fx.convert(model, p=0.5, capture="fx", example_inputs=inputs)
    [skipped] = sliceout_fx.explain(converted).skipped
    assert skipped.name == "encoder" and "capture='blocks'" in skipped.reason


@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_cuts_heads_unless_averaged_weights_tie_them(need_weights: bool) -> None:
    """Averaging the weights over heads (``need_weights=True``) reads every head: the heads are
    left whole with that reason, the projections around them are still cut."""
    torch.manual_seed(0)
    model = CrossAttention(need_weights).double()
    inputs = (
        torch.randn(2, 5, 32, dtype=torch.float64),
        torch.randn(2, 7, 32, dtype=torch.float64),
    )
    converted = sliceout_fx.convert(model, p=0.5, sites="all", example_inputs=inputs)
    report = sliceout_fx.explain(converted)
    names = {s.name for s in report.sites}
    assert {"q", "kv", "attn.out_proj"} <= names
    assert ("attn" in names) is not need_weights
    if need_weights:
        blocked = [b for g in report.groups for b in g.blockers if "mean" in b]
        assert blocked and "reduces over this axis" in blocked[0]
    _check(model, inputs, sites="all")


def test_unbatched_attention_inputs_are_refused_with_the_way_out() -> None:
    model = nn.Sequential(nn.Linear(32, 32))
    attn = nn.MultiheadAttention(32, 4)

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.attn = model[0], attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            return self.attn(h, h, h, need_weights=False)[0]

    with pytest.raises(sliceout_fx.SliceOutError, match="batched .3-D. inputs only"):
        sliceout_fx.convert(Unbatched(), p=0.5, example_inputs=(torch.randn(5, 32),))
    # kept whole as asked, it converts (and slices only what is outside it)
    sliceout_fx.convert(
        Unbatched(),
        p=0.5,
        example_inputs=(torch.randn(5, 32),),
        leaf_modules=[nn.MultiheadAttention],
    )
