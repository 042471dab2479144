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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sliceout_fx import convert
from sliceout_lab.bench.memory import saved_activation_bytes
from sliceout_lab.bench.timing import median_ratio
from sliceout_lab.data import load_fashion_mnist
from sliceout_lab.models import paper_mlp

__all__ = ["VariantResult", "format_table", "main", "run_demo"]

_WARMUP_STEPS = 5


@dataclass
class VariantResult:
    """What the demo measured for one training variant."""

    name: str
    test_accuracy: float
    step_times: list[float]
    """Seconds per timed training step (warm-up steps excluded)."""
    saved_bytes: int
    final_loss: float


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


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One full training step: forward, cross-entropy, backward, Adam update."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A step without the optimizer update, for counting saved activations.

    The weights are left untouched (no ``optimizer.step``) and the gradients are discarded, so
    measuring does not change what is trained afterwards.
    """

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


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
) -> list[VariantResult]:
    """Train both variants interleaved and return their measurements (dropout first)."""
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
    models = {"dropout": dropout_model, "sliceout": sliceout_model}
    for m in models.values():
        m.train()
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}

    # Activation memory of one step, on the first batch, before training starts. The batch is
    # cloned: a slice of x_train would be a view of the whole 188 MB training set, and saved
    # tensors are accounted by the storage they keep alive.
    xb, yb = x_train[:batch_size].clone(), y_train[:batch_size].clone()
    saved = {
        name: saved_activation_bytes(_forward_backward(m, xb, yb), list(m.parameters()))
        for name, m in models.items()
    }

    n = x_train.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    # The first steps pay one-off costs (Adam state allocation, allocator and cache warm-up);
    # keep them out of the timings when the run is long enough to spare them.
    warmup = _WARMUP_STEPS if total >= 4 * _WARMUP_STEPS else 0
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {name: [] for name in models}
    last_loss: dict[str, float] = {name: float("nan") for name in models}
    order = list(models)

    step = 0
    with tqdm(total=total, desc="training", unit="step", disable=not progress) as bar:
        while step < total:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                if step >= total:
                    break
                idx = perm[i : i + batch_size]
                xb, yb = x_train[idx], y_train[idx]
                # Alternate which variant goes first, so neither always runs on a warmer cache.
                for name in order if step % 2 == 0 else reversed(order):
                    t0 = time.perf_counter()
                    loss = _train_step(models[name], optimizers[name], xb, yb)
                    elapsed = time.perf_counter() - t0
                    if step >= warmup:
                        times[name].append(elapsed)
                    last_loss[name] = float(loss)
                step += 1
                bar.update(1)
                if step % 20 == 0 or step == total:
                    bar.set_postfix(
                        loss_dropout=f"{last_loss['dropout']:.3f}",
                        loss_sliceout=f"{last_loss['sliceout']:.3f}",
                    )

    return [
        VariantResult(
            name=name,
            test_accuracy=_accuracy(m, x_test, y_test),
            step_times=times[name],
            saved_bytes=saved[name],
            final_loss=last_loss[name],
        )
        for name, m in models.items()
    ]


def format_table(results: Sequence[VariantResult]) -> str:
    """Render the results as a fixed-width text table; ratios are relative to the first row."""
    base = results[0]
    header = (
        f"{'variant':<10} {'test acc':>9} {'median step':>12} {'step time':>10} "
        f"{'saved activations':>18} {'memory':>7}"
    )
    sub = f"{'':<10} {'':>9} {'(ms)':>12} {'ratio':>10} {'(MiB)':>18} {'ratio':>7}"
    lines = [header, sub, "-" * len(header)]
    for r in results:
        time_ratio = median_ratio(r.step_times, base.step_times)
        mem_ratio = r.saved_bytes / base.saved_bytes if base.saved_bytes else float("nan")
        lines.append(
            f"{r.name:<10} {100 * r.test_accuracy:>8.2f}% "
            f"{1000 * statistics.median(r.step_times):>12.2f} {time_ratio:>10.3f} "
            f"{r.saved_bytes / 2**20:>18.2f} {mem_ratio:>7.3f}"
        )
    return "\n".join(lines)


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
    results = run_demo(
        epochs=args.epochs,
        p=args.p,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    print()
    print(format_table(results))
    print()
    print(
        f"{len(results[0].step_times)} timed steps per variant (after any warm-up), interleaved "
        "with the same batches.\n"
        "step time: forward + backward + Adam step; ratio = median of per-step ratios vs dropout.\n"
        "saved activations: bytes autograd keeps for backward in one step (parameters excluded)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
