"""Demo: standard dropout vs SliceOut on the paper's Fashion-MNIST MLP (Appendix F.1).

Two copies of :func:`sliceout_lab.models.paper_mlp` start from the same weights: (a) the model as
it is, with standard ``nn.Dropout``; (b) the same model passed through :func:`sliceout_fx.convert`,
whose Dropout sites become SliceOut sites. Both are trained with Adam on the same batches, one
step of each in turn, so that the noise of a shared CPU hits both alike, and the demo reports:

- test accuracy of each (eval mode: full width, no dropout);
- the median over steps of (SliceOut step time / dropout step time), a step being
  forward + backward + optimizer step;
- the ratio of activation bytes that autograd saves for backward in one step (deterministic; the
  CPU stand-in for the paper's GPU memory figures).

Run it with ``sliceout-fx demo`` or ``python -m sliceout_lab.demo``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sliceout_fx import convert
from sliceout_lab.data import load_fashion_mnist
from sliceout_lab.harness import ABResult, Arm, run_interleaved
from sliceout_lab.models import paper_mlp
from sliceout_lab.table import format_table

__all__ = ["DemoResult", "format_result", "main", "run_demo"]

_WARMUP_STEPS = 5


@dataclass
class DemoResult:
    """What the demo measured: the interleaved training run and each variant's test accuracy."""

    run: ABResult
    test_accuracy: dict[str, float]


def _build_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sliceout-fx demo",
        description=(
            "Train the SliceOut paper's Fashion-MNIST MLP (784-2048-2048-2048-10) with standard "
            "dropout and with SliceOut side by side, and compare test accuracy, step time and "
            "activation memory."
        ),
    )
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default: 1)")
    parser.add_argument("--p", type=float, default=0.5, help="dropout rate (default: 0.5)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many training steps per variant (default: all epochs)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    return parser


def _epochs(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled batches, epoch after epoch (the harness takes as many as it trains on)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Top-1 accuracy in eval mode (full-width graph, dropout off)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        correct += int((logits.argmax(dim=1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / x.shape[0]


def run_demo(
    *,
    epochs: int = 1,
    p: float = 0.5,
    batch_size: int = 256,
    lr: float = 1e-4,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Train both variants interleaved (dropout is the baseline) and measure them."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")

    torch.manual_seed(seed)
    dropout_model = paper_mlp(p)
    # convert() deep-copies its input (inplace=False), so both variants start from the same
    # weights but never share parameters or optimizer state.
    sliceout_model = convert(dropout_model, p=p, seed=seed)
    arms = [
        Arm(name, model.train(), torch.optim.Adam(model.parameters(), lr=lr))
        for name, model in (("dropout", dropout_model), ("sliceout", sliceout_model))
    ]
    total = epochs * -(-x_train.shape[0] // batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    # The first steps pay one-off costs (Adam state allocation, allocator and cache warm-up);
    # keep them out of the timings when the run is long enough to spare them.
    run = run_interleaved(
        arms,
        _epochs(x_train, y_train, batch_size, seed),
        rounds=total,
        warmup=_WARMUP_STEPS if total >= 4 * _WARMUP_STEPS else 0,
        progress=progress,
    )
    return DemoResult(run, {arm.name: _accuracy(arm.model, x_test, y_test) for arm in arms})


def format_result(result: DemoResult) -> str:
    """The comparison as an aligned table; ratios are relative to dropout (the first row)."""
    run = result.run
    header = ["variant", "test acc", "median step (ms)", "step-time ratio", "saved activations",
              "saved-act. ratio"]  # fmt: skip
    rows = [
        [
            name,
            f"{100 * result.test_accuracy[name]:.2f}%",
            f"{run.median_ms(name):.2f}",
            f"{run.time_ratio(name):.3f}",
            f"{run.saved[name].bytes / 2**20:.2f} MiB",
            f"{run.memory_ratio(name):.3f}",
        ]
        for name in run.names
    ]
    return format_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``sliceout-fx demo``); returns a process exit code."""
    args = _build_argparser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"SliceOut demo: Fashion-MNIST, MLP 784-2048-2048-2048-10, p={args.p}, "
        f"batch {args.batch_size}, Adam lr={args.lr}, seed {args.seed}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    result = run_demo(
        epochs=args.epochs,
        p=args.p,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    print()
    print(format_result(result))
    print()
    print(
        f"{len(result.run.step_times['dropout'])} timed steps per variant (after any warm-up), "
        "interleaved with the same batches.\n"
        "step time: forward + backward + Adam step; ratio = median of per-step ratios vs dropout.\n"
        "saved activations: bytes autograd keeps for backward in one step (parameters excluded)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
