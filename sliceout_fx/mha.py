"""Stage 1, capture: ``nn.MultiheadAttention`` spelt out, so that its heads can be cut.

(And the ``nn.Transformer`` modules built of it, which ``torch.fx`` keeps whole: the encoder and
decoder, their layers, and ``nn.Transformer`` itself.)

``torch.fx`` keeps ``nn.MultiheadAttention`` whole (a ``torch.nn`` leaf), and what
``torch.export`` records of its forward merges the batch and head axes (``(L, B*H, d)``), where
the kept heads of a cut are no longer one contiguous range. The training graphs are therefore
captured from :func:`multihead_attention_forward` instead: the same computation written with a
packed in-projection split by ``chunk`` (a fused projection), heads on their own axis, scaled
dot-product attention and the output projection - ops whose rules cut whole heads.

Only the training graph is captured this way; eval runs the module's own forward, so eval output
is the original's bit for bit. Modules with separate Q/K/V weights of other sizes, ``bias_k`` /
``bias_v`` or ``add_zero_attn`` keep their own forward (and their heads).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def is_decomposable(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose computation :func:`multihead_attention_forward` spells
    out exactly."""
    return (
        isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
    )


def _without_masks(inputs: int, *names: str) -> Callable[[tuple, dict[str, Any]], bool]:
    """Whether a symbolically traced call passes no mask and no causal hint; ``names`` are the
    forward's arguments after its ``inputs`` tensors. ``torch.fx`` cannot read a mask's dtype (a
    bool mask means "masked out", a float mask is added), so such calls keep the module whole, as
    before; ``torch.export`` sees dtypes and spells out every call."""

    def accepts(args: tuple, kwargs: dict[str, Any]) -> bool:
        bound = dict(zip(names, args[inputs:], strict=False)) | kwargs
        masks = [v for k, v in bound.items() if "mask" in k]
        return all(m is None for m in masks) and not bound.get("is_causal", False)

    return accepts


#: ``nn.MultiheadAttention.forward(query, key, value, ...)``.
accepts_traced_call = _without_masks(
    3, "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"
)
#: ``nn.TransformerEncoderLayer.forward(src, ...)`` / ``nn.TransformerEncoder.forward(src, ...)``.
accepts_traced_layer_call = _without_masks(1, "src_mask", "src_key_padding_mask", "is_causal")
accepts_traced_encoder_call = _without_masks(1, "mask", "src_key_padding_mask", "is_causal")


def is_encoder_layer(module: nn.Module) -> bool:
    """An ``nn.TransformerEncoderLayer`` (``torch.fx`` would keep it whole: a ``torch.nn`` leaf)."""
    return isinstance(module, nn.TransformerEncoderLayer)


def is_encoder(module: nn.Module) -> bool:
    return isinstance(module, nn.TransformerEncoder)


def encoder_layer_forward(
    layer: nn.TransformerEncoderLayer,
    src: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """The training path of ``nn.TransformerEncoderLayer.forward`` (its fused fast path runs only
    without gradients): self-attention and feed-forward blocks, pre- or post-norm."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal))
    return layer.norm2(x + layer._ff_block(x))


def encoder_forward(
    encoder: nn.TransformerEncoder,
    src: torch.Tensor,
    mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` for a call without masks: its layers, then its norm."""
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
    return output if encoder.norm is None else encoder.norm(output)


def is_decoder_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.TransformerDecoderLayer)


def decoder_layer_forward(layer: nn.TransformerDecoderLayer, *args: Any, **kwargs: Any) -> Any:
    """``nn.TransformerDecoderLayer``'s own forward (it has no fused fast path): traced through
    instead of kept whole, each attention call then decides for itself (masks keep it whole)."""
    return nn.TransformerDecoderLayer.forward(layer, *args, **kwargs)


def is_decoder(module: nn.Module) -> bool:
    return isinstance(module, nn.TransformerDecoder)


#: ``nn.TransformerDecoder.forward(tgt, memory, ...)``: its causal-mask detection compares a given
#: mask's values, which a symbolic trace cannot.
accepts_traced_decoder_call = _without_masks(
    2,
    "tgt_mask",
    "memory_mask",
    "tgt_key_padding_mask",
    "memory_key_padding_mask",
    "tgt_is_causal",
    "memory_is_causal",
)


def decoder_forward(
    decoder: nn.TransformerDecoder, tgt: torch.Tensor, memory: torch.Tensor, **unused: Any
) -> torch.Tensor:
    """``nn.TransformerDecoder.forward`` for a call without masks: its layers, then its norm."""
    output = tgt
    for layer in decoder.layers:
        output = layer(output, memory)
    return output if decoder.norm is None else decoder.norm(output)


def is_transformer(module: nn.Module) -> bool:
    return isinstance(module, nn.Transformer)


accepts_traced_transformer_call = _without_masks(
    2,
    "src_mask",
    "tgt_mask",
    "memory_mask",
    "src_key_padding_mask",
    "tgt_key_padding_mask",
    "memory_key_padding_mask",
    "src_is_causal",
    "tgt_is_causal",
    "memory_is_causal",
)


def transformer_forward(
    model: nn.Transformer, src: torch.Tensor, tgt: torch.Tensor, **unused: Any
) -> torch.Tensor:
    """``nn.Transformer.forward`` for a call without masks (its shape checks branch on sizes,
    which a symbolic trace cannot): the encoder on ``src``, the decoder on ``tgt`` and memory."""
    return model.decoder(tgt, model.encoder(src))


def multihead_attention_forward(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``nn.MultiheadAttention.forward`` computes for batched inputs, heads on their own axis.

    ``(B, L, E)`` inputs with ``batch_first``, else ``(L, B, E)``; returns the attention output and,
    with ``need_weights``, the attention weights (averaged over heads unless told otherwise, which
    ties every head to the others: the heads are then left whole).
    """
    self_attention = query is key and key is value
    torch._assert(
        query.dim() == 3,
        "sliceout_fx spells out nn.MultiheadAttention for batched (3-D) inputs only; keep it "
        "whole with leaf_modules=[nn.MultiheadAttention]",
    )
    if not mha.batch_first:
        query = query.transpose(0, 1)
        key, value = (
            (query, query) if self_attention else (key.transpose(0, 1), value.transpose(0, 1))
        )
    heads, embed = mha.num_heads, mha.embed_dim
    head_dim = embed // heads
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    if self_attention:  # one matmul, split into Q, K and V: a fused projection
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:  # cross-attention: each input with its own rows of the packed weight
        rows = [slice(i * embed, (i + 1) * embed) for i in range(3)]
        q, k, v = (
            F.linear(x, weight[r], None if bias is None else bias[r])
            for x, r in zip((query, key, value), rows, strict=True)
        )
    batch, target, source = query.shape[0], query.shape[1], key.shape[1]
    q = q.view(batch, target, heads, head_dim).transpose(1, 2)
    k = k.view(batch, source, heads, head_dim).transpose(1, 2)
    v = v.view(batch, source, heads, head_dim).transpose(1, 2)
    mask, causal = _attention_mask(query, key_padding_mask, attn_mask, is_causal, need_weights, mha)
    dropout = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        out = F.dropout(weights, dropout, training=mha.training) @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
    out = mha.out_proj(out.transpose(1, 2).flatten(2))
    if not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _attention_mask(
    query: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    need_weights: bool,
    mha: nn.MultiheadAttention,
) -> tuple[torch.Tensor | None, bool]:
    """The additive ``(B or 1, H or 1, L, S)`` mask and the causal flag ``F.multi_head_attention_
    forward`` would use. Only reached with masks under ``torch.export``, where dtypes are known."""
    if key_padding_mask is None and attn_mask is None:
        return None, is_causal
    if is_causal and key_padding_mask is None and not need_weights and attn_mask is None:
        return None, True
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, query.dtype)
        if mask.dim() == 3:  # (B * H, L, S)
            mask = mask.view(-1, mha.num_heads, mask.shape[-2], mask.shape[-1])
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, query.dtype)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask, False


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: masked out) as ``-inf``/``0``; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


@contextlib.contextmanager
def spelt_out_attention() -> Iterator[None]:
    """Within the block, decomposable ``nn.MultiheadAttention`` modules run
    :func:`multihead_attention_forward` (what ``torch.export`` captures for training)."""
    original = nn.MultiheadAttention.forward

    def forward(self: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Any:
        if is_decomposable(self):
            return multihead_attention_forward(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    nn.MultiheadAttention.forward = forward
    try:
        yield
    finally:
        nn.MultiheadAttention.forward = original
