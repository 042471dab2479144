"""Fused projections cut into their parts: attention heads sliced in HF models that compute Q, K
and V (or gate and up) in one matmul and take the parts apart by slicing (Phi-3), by a per-head
view and ``chunk`` (GPT-NeoX), or with rotary code built from ``stack``/``flatten`` (GPT-J); and
multi-query attention (GPT-BigCode), whose one key/value head is broadcast to every query head:
the query heads are cut, the key and value are read whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sliceout_fx

from .helpers import assert_sliced_matches_mask

transformers = pytest.importorskip("transformers")

_COMMON = dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128,
)  # fmt: skip
CONFIGS = {
    "phi3": lambda: transformers.Phi3Config(
        **_COMMON, num_key_value_heads=2, pad_token_id=0, attention_dropout=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0,
    ),  # fmt: skip
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_COMMON, attention_dropout=0.0, hidden_dropout=0.0
    ),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    ),  # fmt: skip
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        attention_dropout=0.0, hidden_dropout=0.0,
    ),  # fmt: skip
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_inner=128, multi_query=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),  # fmt: skip
}
# The attention site of layer 0 and its units: whole KV groups (Phi-3: 2 of 4 query heads
# each), whole heads (GPT-NeoX, GPT-J).
ATTENTION = {
    "phi3": ("model.layers.0.self_attn", 2),
    "gpt_neox": ("gpt_neox.layers.0.attention.query_key_value", 4),
    "gptj": ("transformer.h.0.attn.q_proj", 4),
    "falcon": ("transformer.h.0.self_attention", 4),
    "gpt_bigcode": ("transformer.h.0.attn", 4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_heads_of_fused_projections_are_sliced_like_the_mask_reference(name: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).double()
    batch = {"input_ids": torch.randint(1, 100, (2, 8))}
    sliced, _ = assert_sliced_matches_mask(model, batch, steps=2, atol=1e-9, example_inputs=batch)
    sites = {s.name: s.units for s in sliceout_fx.explain(sliced).sites}
    site, units = ATTENTION[name]
    assert sites.get(site) == units, sites
    assert len(sites) == 4, sites  # attention and MLP of both layers
    assert isinstance(sliced, type(model))


DIM, HEADS = 32, 4
D_HEAD = DIM // HEADS


class HeadIndexedQKV(torch.nn.Module):
    """Falcon's multi-query layout: one projection viewed as ``H + 2`` heads, the query heads
    taken by a slice and the one key and one value head by index."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(DIM, (HEADS + 2) * D_HEAD)
        self.o = torch.nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        fused = self.qkv(x).view(b, t, HEADS + 2, D_HEAD)
        q, k, v = fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]
        y = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)))
        return x + self.o(y.transpose(1, 2).reshape(b, t, DIM))


class Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(HeadIndexedQKV() for _ in range(2))
        self.head = torch.nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("capture", ["fx", "blocks"])
def test_query_heads_taken_by_slice_and_index_are_cut_and_recomputed(capture: str) -> None:
    """The query heads are cut; the key and value heads are recomputed from their own rows, so
    no full-width product of the fused projection is left in the training graph."""
    torch.manual_seed(0)
    model, x = Layers().double(), torch.randn(2, 6, DIM, dtype=torch.float64)
    options = dict(p=0.5, sites="all", capture=capture, example_inputs=x)
    sliced, _ = assert_sliced_matches_mask(model, (x,), steps=2, atol=1e-10, **options)
    report = sliceout_fx.explain(sliced)
    assert [(s.name, s.units) for s in report.sites] == [("layers.0", HEADS), ("layers.1", HEADS)]
    if capture == "fx":
        graph = sliced.sliced_graph.graph
        assert not [n for n in graph.nodes if n.op == "call_module" and "qkv" in str(n.target)]
        rows = [n.args[1:] for n in graph.nodes if n.target is torch.narrow]
        assert sorted(rows) == sorted([(0, 0, 32), (0, 32, 8), (0, 40, 8)] * 2 * 2), rows


class SlicedTokens(torch.nn.Module):
    """A layer's output sliced along the tokens and read by ``.shape`` and ``.ndim`` (XCiT's
    class-attention, CoaT): not a partition of features, which the analysis must tell without
    binding the shape reads as calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = torch.nn.Linear(DIM, 64), torch.nn.Linear(64, 3)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        first, rest = y[:, 0:1], y[:, 1:]
        scale = y.shape[1] * y.ndim
        return self.out(self.drop(torch.relu(first + rest.mean(1, keepdim=True)))) / scale


def test_a_slice_of_tokens_read_beside_shape_queries_is_no_fused_part() -> None:
    torch.manual_seed(0)
    model, x = SlicedTokens().double(), torch.randn(2, 5, DIM, dtype=torch.float64)
    options = dict(p=0.5, sites="all", example_inputs=x)
    report = sliceout_fx.explain(model, **options)
    assert [s.name for s in report.sites] == ["drop"]
    assert_sliced_matches_mask(model, (x,), steps=2, atol=1e-10, **options)
