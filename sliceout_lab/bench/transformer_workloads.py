"""Transformer benchmark workloads: HuggingFace GPT-2 and BERT from configs (random init).

The baseline is the model with every dropout rate of its config set to ``p`` (the paper's
"standard dropout" transformer); the SliceOut variants convert that same model, which slices
attention heads and FFN units in every layer at rate ``p`` and keeps the config's own dropouts.
Inputs are random token ids (timing and saved bytes do not depend on the text). AdamW, lr 1e-4.

* ``gpt2``: ``GPT2LMHeadModel``, width 768, 6 layers, 12 heads, sequence 128, batch 8, LM loss.
* ``bert``: ``BertForSequenceClassification``, width 768, 6 layers, 12 heads, sequence 128,
  batch 8, 2 labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..harness import model_loss
from .workloads import (
    BenchOptions,
    Workload,
    register_workload,
    sliceout_options,
    variant_factory,
)

__all__ = ["bert_workload", "gpt2_workload"]

TRANSFORMER_PS: tuple[float, ...] = (0.1, 0.2, 0.3)
_VOCAB = 50257
_WIDTH, _LAYERS, _HEADS, _SEQ, _BATCH = 768, 6, 12, 128, 8


def _gpt2(p: float, options: BenchOptions) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_embd=options.hidden or _WIDTH,
        n_layer=options.depth or _LAYERS,
        n_head=options.extra.get("heads", _HEADS),
        vocab_size=options.extra.get("vocab", _VOCAB),
        n_positions=max(_SEQ, options.extra.get("seq", _SEQ)),
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        use_cache=False,
    )
    return transformers.GPT2LMHeadModel(config)


def _bert(p: float, options: BenchOptions) -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        hidden_size=options.hidden or _WIDTH,
        num_hidden_layers=options.depth or _LAYERS,
        num_attention_heads=options.extra.get("heads", _HEADS),
        intermediate_size=4 * (options.hidden or _WIDTH),
        vocab_size=options.extra.get("vocab", 30522),
        hidden_dropout_prob=p,
        attention_probs_dropout_prob=p,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def _batches(model: nn.Module, options: BenchOptions, labels: str) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(options.seed + 1)  # CPU generator: same data everywhere
    batch, seq = options.batch_size or _BATCH, options.extra.get("seq", _SEQ)
    vocab = model.config.vocab_size
    out = []
    for _ in range(options.num_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        target = ids if labels == "lm" else torch.randint(0, 2, (batch,), generator=gen)
        ids, target = ids.to(options.device), target.to(options.device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": target})
    return out


def _workload(
    name: str,
    make: Callable[[float, BenchOptions], nn.Module],
    labels: str,
    p: float,
    options: BenchOptions,
) -> Workload:
    torch.manual_seed(options.seed)
    # Built on the CPU (same initial weights whatever the device), then moved.
    base = make(p, options).to(options.device)
    batches = _batches(base, options, labels)
    lr = options.lr if options.lr is not None else 1e-4
    example = {k: v for k, v in batches[0].items() if k != "labels"}

    factory = variant_factory(
        base,
        lambda params: torch.optim.AdamW(params, lr=lr),
        options.device,
        options,
        loss=model_loss,
    )

    def sliceout(**kwargs: Any) -> Callable[[nn.Module], nn.Module]:
        import sliceout_fx

        kwargs = sliceout_options(options, kwargs)
        return lambda m: sliceout_fx.convert(
            m, p, seed=options.seed, example_inputs=example, **kwargs
        )

    variants = {
        "dropout": ("standard dropout at p (config dropout rates = p)", lambda m: m),
        "sliceout-flow": ("SliceOut heads + FFN, flow normalisation", sliceout()),
        "sliceout-prob": (
            "SliceOut heads + FFN, probabilistic normalisation",
            sliceout(normalisation="probabilistic"),
        ),
        "sliceout-capturable": (
            "SliceOut heads + FFN, flow, capturable=True (device-side offsets)",
            sliceout(capturable=True),
        ),
    }
    return Workload(
        name=name,
        p=p,
        baseline="dropout",
        factories={n: factory(n, fn, desc) for n, (desc, fn) in variants.items()},
        batches=batches,
        descriptions={n: desc for n, (desc, _) in variants.items()},
        info={
            "model": type(base).__name__,
            "width": base.config.hidden_size,
            "layers": base.config.num_hidden_layers,
            "heads": base.config.num_attention_heads,
            "sequence": options.extra.get("seq", _SEQ),
            "batch_size": options.batch_size or _BATCH,
            "optimizer": f"AdamW lr {lr}",
            "data": "synthetic: random token ids",
        },
    )


def _example(make: Callable[[float, BenchOptions], nn.Module]):
    def example(p: float, options: BenchOptions) -> tuple[nn.Module, Any]:
        torch.manual_seed(options.seed)
        model = make(p, options).to(options.device)
        batch = _batches(model, options, "lm")[0]
        return model, {k: v for k, v in batch.items() if k != "labels"}

    return example


@register_workload(
    "gpt2",
    description="HF GPT2LMHeadModel from config: width 768, 6 layers, 12 heads, seq 128, batch 8, "
    "AdamW; baseline = dropout rates set to p",
    default_ps=TRANSFORMER_PS,
    example_model=_example(_gpt2),
)
def gpt2_workload(p: float, options: BenchOptions) -> Workload:
    return _workload("gpt2", _gpt2, "lm", p, options)


@register_workload(
    "bert",
    description="HF BertForSequenceClassification from config: width 768, 6 layers, 12 heads, "
    "seq 128, batch 8, AdamW; baseline = dropout rates set to p",
    default_ps=TRANSFORMER_PS,
    example_model=_example(_bert),
)
def bert_workload(p: float, options: BenchOptions) -> Workload:
    return _workload("bert", _bert, "cls", p, options)
