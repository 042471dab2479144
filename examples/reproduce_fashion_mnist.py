"""Reproduce the SliceOut paper's Fashion-MNIST experiment (Appendix F.1, Tables 5-7).

The paper trains a 784-2048-2048-2048-10 MLP (dropout after each hidden layer) on Fashion-MNIST
with Adam (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay), batch 256, no input
transformation, and compares standard dropout, SliceOut with flow and with probabilistic
normalisation, and controlled dropout, reporting the highest test accuracy over training (Table 5),
train time per epoch (Table 6) and max cached GPU memory (Table 7), both as % of standard dropout.

This script runs every (variant, p, seed) on the real data set (``sliceout_lab.data``):

* each run starts from the weights ``torch.manual_seed(seed)`` gives ``paper_mlp(p)``, so the four
  variants of one seed start identically; the data order comes from a generator seeded the same;
* after every epoch the full-width model (eval mode) is scored on the test set; the run records the
  per-epoch test accuracy, its best (the paper's figure) and final value, train loss, and the mean
  training-step time;
* the results JSON is rewritten after every finished run and runs already in it are skipped, so an
  interrupted run resumes where it stopped;
* separately, for each ``p``, freshly built copies of the variants are trained side by side in
  this process through the lab's A/B harness (``sliceout_lab.harness.run_interleaved``:
  interleaved rounds, median of per-round step-time ratios to standard dropout), which also counts
  the bytes autograd saves for backward in one step and, on CUDA, each variant's peak allocated
  memory in one training step.

The whole data set is put on the device once; batches are gathered there with an on-device
permutation, and nothing in the training loop waits for the device except once per epoch (the
controlled-dropout variant aside: the library copies its CPU-drawn index sets to the device at
each step).

Examples::

    # full experiment (GPU), docs regenerated at the end
    python examples/reproduce_fashion_mnist.py --device cuda --epochs 40 --jobs 4 \\
        --write-docs docs/reproduction.md
    # CPU smoke run
    python examples/reproduce_fashion_mnist.py --limit-train 2048 --epochs 1 --p 0.5 --seeds 0 \\
        --results /tmp/fm.json --plot /tmp/fm.png
    # print the table of existing results (and regenerate the docs section)
    python examples/reproduce_fashion_mnist.py --table --write-docs docs/reproduction.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from sliceout_fx import convert  # noqa: E402
from sliceout_lab.bench.runner import environment_info  # noqa: E402
from sliceout_lab.bench.workloads import (  # noqa: E402
    BenchOptions,
    make_adam,
    resolve_device,
    variant_factory,
)
from sliceout_lab.data import load_fashion_mnist  # noqa: E402
from sliceout_lab.harness import Arm, run_interleaved  # noqa: E402
from sliceout_lab.models import paper_mlp  # noqa: E402
from sliceout_lab.table import format_table as render_table  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_RESULTS = REPO / "examples" / "results" / "fashion_mnist.json"
DEFAULT_PLOT = REPO / "docs" / "img" / "fashion-mnist-convergence.png"
DOCS_START = "<!-- results:start -->"
DOCS_END = "<!-- results:end -->"

BASELINE = "dropout"
#: name -> (description, keyword arguments of ``sliceout_fx.convert``; None: the model as built).
#: The names and conversions are those of the ``mlp`` benchmark workload (sliceout_lab.bench).
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "dropout": ("standard dropout (nn.Dropout, the model as built)", None),
    "sliceout-flow": ("SliceOut, flow normalisation", {"normalisation": "flow"}),
    "sliceout-prob": ("SliceOut, probabilistic normalisation", {"normalisation": "probabilistic"}),
    "controlled": ("controlled dropout (random index set, gathered weights)", {"mode": "gather"}),
}
PAPER_LABELS = {
    "dropout": "Standard dropout",
    "sliceout-flow": "SliceOut - Flow normalisation",
    "sliceout-prob": "SliceOut - Proba. normalisation",
    "controlled": "Controlled dropout",
}

_V = ("dropout", "sliceout-flow", "sliceout-prob", "controlled")

# Paper, Appendix F.1.2, Table 5 "FashionMNIST experiments - Highest test accuracy across dropout
# schemes": (mean %, +-) over 4 runs, columns in the order of _V. p = 0.0 has standard dropout only.
PAPER_BEST_ACC: dict[float, dict[str, tuple[float, float]]] = {
    0.0: {"dropout": (89.6, 0.04)},
    **{
        p: dict(zip(_V, row, strict=True))
        for p, row in {
            0.1: ((89.6, 0.08), (90.0, 0.02), (90.0, 0.06), (89.8, 0.05)),
            0.2: ((89.4, 0.03), (90.0, 0.04), (89.7, 0.03), (89.7, 0.03)),
            0.3: ((89.2, 0.02), (90.0, 0.07), (89.6, 0.04), (89.6, 0.05)),
            0.4: ((89.0, 0.05), (89.7, 0.05), (89.5, 0.05), (89.4, 0.04)),
            0.5: ((88.8, 0.03), (89.6, 0.05), (89.5, 0.07), (89.3, 0.04)),
            0.6: ((88.5, 0.03), (89.4, 0.03), (89.2, 0.05), (89.1, 0.02)),
            0.7: ((88.2, 0.04), (89.1, 0.02), (88.6, 0.30), (88.7, 0.02)),
            0.8: ((87.8, 0.01), (88.2, 0.01), (87.7, 0.03), (87.4, 0.01)),
            0.9: ((86.0, 0.02), (72.9, 0.17), (73.0, 0.10), (66.8, 1.87)),
        }.items()
    },
}
# Paper, Table 6 "FashionMNIST experiments - Train time per epoch (% of standard dropout)":
# (mean %, +-) for sliceout-flow, sliceout-prob, controlled (RTX 2080 GPU).
PAPER_TIME: dict[float, dict[str, tuple[float, float]]] = {
    p: dict(zip(_V[1:], row, strict=True))
    for p, row in {
        0.1: ((98.9, 0.22), (98.5, 0.76), (153.6, 0.83)),
        0.2: ((95.3, 0.54), (95.4, 0.68), (145.8, 0.94)),
        0.3: ((93.4, 0.51), (93.4, 0.54), (138.8, 0.71)),
        0.4: ((90.5, 0.65), (91.2, 0.84), (132.7, 0.75)),
        0.5: ((87.3, 0.39), (87.8, 0.60), (125.9, 0.87)),
        0.6: ((87.0, 0.66), (87.5, 0.63), (121.0, 0.59)),
        0.7: ((86.4, 0.85), (86.9, 0.76), (115.5, 0.84)),
        0.8: ((87.1, 0.91), (86.7, 0.80), (115.2, 1.03)),
        0.9: ((87.6, 0.77), (86.9, 0.83), (114.7, 0.98)),
    }.items()
}
# Paper, Table 7 "FashionMNIST experiments - Max GPU cached memory (% of standard dropout)"
# (identical across runs, so no +-): sliceout-flow, sliceout-prob, controlled.
PAPER_MEM: dict[float, dict[str, float]] = {
    p: dict(zip(_V[1:], row, strict=True))
    for p, row in {
        0.1: (93.2, 93.2, 148.3),
        0.2: (87.0, 87.0, 132.1),
        0.3: (81.5, 81.5, 116.4),
        0.4: (76.6, 76.6, 103.7),
        0.5: (73.0, 73.0, 92.3),
        0.6: (69.1, 69.1, 82.1),
        0.7: (66.8, 66.8, 76.7),
        0.8: (65.4, 65.4, 70.4),
        0.9: (65.4, 65.4, 66.2),
    }.items()
}


def _paper(table: dict[float, dict[str, Any]], p: float, variant: str) -> Any:
    return table.get(round(p, 4), {}).get(variant)


# ------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RunConfig:
    """What makes two runs comparable; a resumed run must match it exactly."""

    epochs: int
    batch_size: int = 256
    lr: float = 1e-4
    hidden: int = 2048
    depth: int = 3
    limit_train: int | None = None
    limit_test: int | None = None


def run_key(variant: str, p: float, seed: int) -> str:
    return f"{variant}/p={p:g}/seed={seed}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _device_name(device: torch.device) -> str:
    return str(environment_info(str(device)).get("device_name") or device.type)


def _make_optimizer(cfg: RunConfig) -> Callable[..., torch.optim.Optimizer]:
    """The paper's Adam at ``cfg.lr`` (``make_adam``: betas 0.9/0.999, eps 1e-8, no decay)."""
    return lambda params: make_adam(params, cfg.lr, BenchOptions())


# ---------------------------------------------------------------------------------------- data


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(device: torch.device, limit_train: int | None, limit_test: int | None) -> Data:
    """Both splits as tensors on ``device`` (optionally the first N examples, for smoke runs)."""
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if limit_train is not None:
        x_train, y_train = x_train[:limit_train].clone(), y_train[:limit_train].clone()
    if limit_test is not None:
        x_test, y_test = x_test[:limit_test].clone(), y_test[:limit_test].clone()
    return Data(*(t.to(device) for t in (x_train, y_train, x_test, y_test)))


# ------------------------------------------------------------------------------------- models


def build_model(variant: str, p: float, seed: int, cfg: RunConfig) -> nn.Module:
    """``paper_mlp(p)`` with the weights ``torch.manual_seed(seed)`` gives, converted if needed."""
    torch.manual_seed(seed)
    model = paper_mlp(p, hidden=cfg.hidden, depth=cfg.depth)
    kwargs = VARIANTS[variant][1]
    if kwargs is None:
        return model
    return convert(model, p, seed=seed, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Top-1 accuracy of the full-width model (eval mode); one host sync."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        correct += (logits.argmax(dim=1) == y[i : i + batch_size]).sum()
    model.train()
    return int(correct) / x.shape[0]


def train_run(
    variant: str,
    p: float,
    seed: int,
    cfg: RunConfig,
    data: Data,
    device: torch.device,
    *,
    eval_batch: int,
    progress: bool = True,
    position: int = 0,
    leave: bool = False,
) -> dict[str, Any]:
    """Train one (variant, p, seed) for ``cfg.epochs`` epochs; return its JSON record.

    Every step is :meth:`sliceout_lab.harness.Arm.step` (cross-entropy, the paper's Adam); its
    losses are summed on the device, so the host waits for the device once per epoch only.
    """
    t_start = time.perf_counter()
    model = build_model(variant, p, seed, cfg).to(device)
    model.train()
    arm = Arm(
        name=variant,
        model=model,
        optimizer=_make_optimizer(cfg)(model.parameters()),
        description=VARIANTS[variant][0],
    )
    gen = torch.Generator(device=device).manual_seed(seed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    n = data.x_train.shape[0]
    bs = cfg.batch_size
    steps = math.ceil(n / bs)
    test_acc: list[float] = []
    train_loss: list[float] = []
    epoch_s: list[float] = []
    bar = tqdm(
        total=cfg.epochs * steps,
        desc=f"{variant} p={p:g} seed={seed}",
        unit="step",
        disable=not progress,
        position=position,
        leave=leave,
        dynamic_ncols=True,
    )
    for _epoch in range(cfg.epochs):
        sync()
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss_sum += arm.step(
                (data.x_train.index_select(0, idx), data.y_train.index_select(0, idx))
            )
            bar.update(1)
        sync()
        epoch_s.append(time.perf_counter() - t0)
        test_acc.append(evaluate(model, data.x_test, data.y_test, eval_batch))
        train_loss.append(float(loss_sum) / steps)
        bar.set_postfix(
            acc=f"{test_acc[-1]:.4f}",
            best=f"{max(test_acc):.4f}",
            loss=f"{train_loss[-1]:.3f}",
            step_ms=f"{1e3 * epoch_s[-1] / steps:.2f}",
        )
    bar.close()
    # The first epoch pays one-off costs (allocator, kernel selection, Adam state): leave it out
    # of the step time when there are later epochs.
    timed = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
    best = max(range(len(test_acc)), key=test_acc.__getitem__)
    return {
        "variant": variant,
        "p": p,
        "seed": seed,
        "test_acc": test_acc,
        "train_loss": train_loss,
        "best_acc": test_acc[best],
        "best_epoch": best + 1,
        "final_acc": test_acc[-1],
        "epoch_train_s": epoch_s,
        "steps_per_epoch": steps,
        "mean_step_ms": 1e3 * statistics.fmean(timed) / steps,
        "wall_s": time.perf_counter() - t_start,
        "config": asdict(cfg),
        "n_train": n,
        "n_test": int(data.x_test.shape[0]),
        "device": device.type,
        "device_name": _device_name(device),
        "torch_version": torch.__version__,
        "finished": _now(),
    }


# ------------------------------------------------------------------------ time / memory ratios


def measure_ratios(
    p: float,
    variants: Sequence[str],
    cfg: RunConfig,
    data: Data,
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    num_batches: int = 4,
) -> dict[str, Any]:
    """Step-time and memory ratios of each variant vs standard dropout at ``p``.

    Every variant is a fresh copy of one ``paper_mlp(p)`` (seed 0) with its own Adam
    (:func:`sliceout_lab.bench.workloads.variant_factory`); all are trained side by side on the
    same real training batches by the A/B harness (:func:`sliceout_lab.harness.run_interleaved`):
    ``warmup`` untimed rounds, then ``repeats`` timed ones in rotating order with a device sync
    around each step. The harness also counts the bytes autograd saves for backward in one step
    (parameters excluded) and, on CUDA, each variant's peak allocated memory in one training step.
    Each variant's record is :meth:`sliceout_lab.harness.ABResult.stats`.
    """
    torch.manual_seed(0)
    base = paper_mlp(p, hidden=cfg.hidden, depth=cfg.depth)
    gen = torch.Generator(device=device).manual_seed(1)
    n = data.x_train.shape[0]
    perm = torch.randperm(n, device=device, generator=gen)
    batches = []
    for b in range(num_batches):
        idx = perm[(b * cfg.batch_size) % n :][: cfg.batch_size]
        # index_select copies: the batch must not be a view keeping the whole set alive, or the
        # saved-activation count would include the whole training set's storage.
        batches.append((data.x_train.index_select(0, idx), data.y_train.index_select(0, idx)))

    def transform(name: str) -> Callable[[nn.Module], nn.Module]:
        kwargs = VARIANTS[name][1]
        if kwargs is None:
            return lambda m: m
        return lambda m: convert(m, p, seed=0, **kwargs)

    # Built on the CPU (the same initial weights whatever the device); each arm is moved.
    factory = variant_factory(base, _make_optimizer(cfg), device)
    names = [BASELINE] + [v for v in variants if v != BASELINE]
    arms = [factory(name, transform(name), VARIANTS[name][0])() for name in names]
    run = run_interleaved(arms, itertools.cycle(batches), rounds=warmup + repeats, warmup=warmup)
    out: dict[str, Any] = {
        "p": p,
        "repeats": repeats,
        "warmup": warmup,
        "config": asdict(cfg),
        "device": device.type,
        "device_name": _device_name(device),
        "torch_version": torch.__version__,
        "measured": _now(),
        "variants": {
            arm.name: {"description": arm.description, **run.stats(arm.name)} for arm in arms
        },
    }
    del arms, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------ results file


def empty_results() -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "experiment": "SliceOut paper, Appendix F.1: Fashion-MNIST MLP 784-2048-2048-2048-10, "
        "Adam(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0), batch 256",
        "accuracy": "test accuracy of the full-width model (eval mode) after every epoch; "
        "best = highest over epochs (the paper's Table 5 figure), final = last epoch",
        "time_ratio": "median over interleaved rounds of variant / standard-dropout step time "
        "(fresh models, same batches, device sync after each step; sliceout_lab.harness)",
        "memory_ratio": "bytes autograd saves for backward in one step / standard dropout's "
        "(saved_tensors_hooks, distinct storages, parameters excluded)",
        "cuda_step_peak_ratio": "CUDA only: peak allocated device memory in one training step "
        "above what was allocated before it / standard dropout's",
        "runs": {},
        "ratios": {},
        "environment": {},
    }


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        if results.get("schema_version") != SCHEMA_VERSION:
            raise SystemExit(f"{path}: unknown schema version {results.get('schema_version')}")
        return results
    return empty_results()


def save_results(results: dict[str, Any], path: Path) -> None:
    """Write atomically, so an interrupted write never loses finished runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ summary


@dataclass
class Row:
    variant: str
    p: float
    n: int
    epochs: list[int]
    best: list[float]
    final: list[float]
    best_epoch: list[int]
    run_time_ratio: float | None
    time_ratio: float | None
    time_iqr: tuple[float, float] | None
    memory_ratio: float | None
    cuda_step_peak_ratio: float | None
    paper_best: tuple[float, float] | None
    paper_time: tuple[float, float] | None
    paper_mem: float | None


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarise(results: dict[str, Any]) -> list[Row]:
    """One row per (variant, p) present in the runs or ratios, sorted by p then variant."""
    runs = list(results.get("runs", {}).values())
    cells = {(r["variant"], float(r["p"])) for r in runs}
    for entry in results.get("ratios", {}).values():
        cells |= {(v, float(entry["p"])) for v in entry["variants"]}
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows = []
    for variant, p in sorted(cells, key=lambda c: (c[1], order.get(c[0], 99), c[0])):
        mine = sorted(
            (r for r in runs if r["variant"] == variant and float(r["p"]) == p),
            key=lambda r: r["seed"],
        )
        base = {r["seed"]: r for r in runs if r["variant"] == BASELINE and float(r["p"]) == p}
        paired = [
            r["mean_step_ms"] / base[r["seed"]]["mean_step_ms"] for r in mine if r["seed"] in base
        ]
        ratios = results.get("ratios", {}).get(f"{p:g}", {}).get("variants", {}).get(variant)
        rows.append(
            Row(
                variant=variant,
                p=p,
                n=len(mine),
                epochs=[len(r["test_acc"]) for r in mine],
                best=[r["best_acc"] for r in mine],
                final=[r["final_acc"] for r in mine],
                best_epoch=[r["best_epoch"] for r in mine],
                run_time_ratio=statistics.fmean(paired) if paired else None,
                time_ratio=None if ratios is None else ratios["time_ratio"],
                time_iqr=None
                if ratios is None
                else (ratios["time_ratio_q25"], ratios["time_ratio_q75"]),
                memory_ratio=None if ratios is None else ratios["memory_ratio"],
                # Files written before the harness have "cuda_peak_ratio" (forward + backward).
                cuda_step_peak_ratio=None
                if ratios is None
                else ratios.get("cuda_step_peak_ratio", ratios.get("cuda_peak_ratio")),
                paper_best=_paper(PAPER_BEST_ACC, p, variant),
                paper_time=_paper(PAPER_TIME, p, variant),
                paper_mem=_paper(PAPER_MEM, p, variant),
            )
        )
    return rows


def _acc(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, sd = _mean_sd([100 * v for v in values])
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def _pct(ratio: float | None, base: bool) -> str:
    if base:
        return "(base)"
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def _paper_pm(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.1f} ± {value[1]:.2f}"


def _paper_time(row: Row) -> str:
    if row.variant == BASELINE:
        return "(base)"
    return "-" if row.paper_time is None else f"{row.paper_time[0]:.1f}%"


def _paper_mem(row: Row) -> str:
    if row.variant == BASELINE:
        return "(base)"
    return "-" if row.paper_mem is None else f"{row.paper_mem:.1f}%"


def table_cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and string cells shared by the text and the Markdown tables."""
    has_peak = any(r.cuda_step_peak_ratio is not None for r in rows)
    header = [
        "variant",
        "p",
        "runs",
        "best acc %",
        "final acc %",
        "paper best % (T5)",
        "step time (interleaved)",
        "epoch time (runs)",
        "paper time (T6)",
        "saved activations",
    ]
    if has_peak:
        header.append("CUDA step peak")
    header.append("paper memory (T7)")
    body = []
    for r in rows:
        base = r.variant == BASELINE
        cells = [
            r.variant,
            f"{r.p:g}",
            str(r.n),
            _acc(r.best),
            _acc(r.final),
            _paper_pm(r.paper_best),
            _pct(r.time_ratio, base),
            _pct(r.run_time_ratio, base),
            _paper_time(r),
            _pct(r.memory_ratio, base),
        ]
        if has_peak:
            cells.append(_pct(r.cuda_step_peak_ratio, base))
        cells.append(_paper_mem(r))
        body.append(cells)
    return header, body


def _setup_lines(results: dict[str, Any]) -> list[str]:
    runs = list(results.get("runs", {}).values())
    if not runs:
        return ["no training runs yet"]
    epochs = sorted({len(r["test_acc"]) for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    devices = sorted({f"{r['device_name']} ({r['device']})" for r in runs})
    torch_versions = sorted({r["torch_version"] for r in runs})
    limits = sorted({(r["n_train"], r["n_test"]) for r in runs})
    hours = sum(r["wall_s"] for r in runs) / 3600
    concurrent = max(r.get("concurrent_jobs", 1) for r in runs)
    note = []
    if concurrent > 1:
        note = [
            f"runs were trained up to {concurrent} at a time on one device: the 'epoch time "
            "(runs)' column is then informational; the interleaved column is the measurement"
        ]
    return [
        f"{len(runs)} runs; epochs {', '.join(map(str, epochs))}; seeds "
        f"{', '.join(map(str, seeds))}; train/test examples "
        f"{', '.join(f'{a}/{b}' for a, b in limits)}",
        f"device {'; '.join(devices)}; torch {', '.join(torch_versions)}; "
        f"total training wall time {hours:.2f} h",
        *note,
    ]


def format_table(results: dict[str, Any]) -> str:
    """Aligned text table of every (variant, p), with the paper's figures beside ours."""
    rows = summarise(results)
    header, body = table_cells(rows)
    lines = [
        "Fashion-MNIST MLP (SliceOut paper, Appendix F.1): test accuracy mean ± sd over seeds;",
        "time and memory as % of standard dropout at the same p.",
        *_setup_lines(results),
        "",
        render_table(header, body, groups=[r.p for r in rows]),
        "",
        *_legend(rows),
    ]
    return "\n".join(lines)


def _legend(rows: Sequence[Row] = ()) -> list[str]:
    peak = []
    if any(r.cuda_step_peak_ratio is not None for r in rows):
        peak = [
            "CUDA step peak: peak allocated device memory in one training step (activations, "
            "gradients, temporaries, the update) above what was allocated before it (weights, "
            "Adam state, data and the other variants' models)."
        ]
    return [
        "best acc: highest test accuracy over epochs (the paper's Table 5 figure); "
        "final: last epoch.",
        "step time (interleaved): median of per-round step-time ratios to dropout, fresh models "
        "timed side by side in one process.",
        "epoch time (runs): the training runs' mean step time vs the dropout run of the same "
        "seed, mean over seeds.",
        "saved activations: bytes autograd saves for backward in one step (parameters excluded); "
        "the paper's Table 7 is max cached GPU memory (weights, optimiser state, cache included).",
        *peak,
    ]


def format_markdown(results: dict[str, Any], plot_link: str | None = None) -> str:
    """The Markdown block written between the docs markers."""
    rows = summarise(results)
    header, body = table_cells(rows)
    lines = [
        f"_Generated by `examples/reproduce_fashion_mnist.py` on {_now()[:10]}._",
        "",
        *(f"- {line}" for line in _setup_lines(results)),
        "",
        render_table(header, body, markdown=True),
        "",
        *(f"- {line}" for line in _legend(rows)),
    ]
    if plot_link:
        lines += ["", f"![Fashion-MNIST test accuracy per epoch]({plot_link})"]
    lines += ["", "### Differences from the paper, in numbers", "", *differences(results, rows)]
    return "\n".join(lines)


def differences(results: dict[str, Any], rows: Sequence[Row] | None = None) -> list[str]:
    """Factual bullet points comparing this run's setup and numbers with the paper's."""
    rows = list(rows if rows is not None else summarise(results))
    runs = list(results.get("runs", {}).values())
    out: list[str] = []
    if runs:
        epochs = sorted({len(r["test_acc"]) for r in runs})
        late = [r for r in runs if r["best_epoch"] > 0.9 * len(r["test_acc"])]
        out.append(
            f"- Training length: {', '.join(map(str, epochs))} epochs; the paper trains "
            '"until convergence" without stating an epoch count. '
            f"{len(late)} of {len(runs)} runs reached their best test accuracy in the last 10% "
            "of their epochs (if many did, accuracy was still rising and the best-accuracy "
            "figures are lower bounds)."
        )
        seeds = sorted({r["seed"] for r in runs})
        out.append(
            f"- Runs per cell: {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), spread shown "
            "as the sample standard deviation; the paper averages 4 runs and gives a ± it does "
            "not define."
        )
        devices = sorted({r["device_name"] for r in runs})
        out.append(
            f"- Hardware: {', '.join(devices)}; the paper used one NVIDIA RTX 2080. Data: "
            f"{runs[0]['n_train']} training and {runs[0]['n_test']} test images, pixels scaled to "
            "[0, 1], no other transformation (as in the paper)."
        )
    by_cell = {(r.variant, r.p): r for r in rows}
    gaps = []
    for r in rows:
        base = by_cell.get((BASELINE, r.p))
        if r.variant == BASELINE or not r.best or base is None or not base.best:
            continue
        ours = 100 * (statistics.fmean(r.best) - statistics.fmean(base.best))
        paper_b = _paper(PAPER_BEST_ACC, r.p, BASELINE)
        theirs = None if r.paper_best is None or paper_b is None else r.paper_best[0] - paper_b[0]
        gaps.append(
            f"{r.variant} p={r.p:g}: {ours:+.2f} pts"
            + ("" if theirs is None else f" (paper {theirs:+.1f})")
        )
    if gaps:
        out.append("- Best accuracy minus standard dropout's, same p: " + "; ".join(gaps) + ".")
    level = []
    for r in rows:
        if r.best and r.paper_best is not None:
            level.append(
                f"{r.variant} p={r.p:g}: {100 * statistics.fmean(r.best) - r.paper_best[0]:+.2f}"
            )
    if level:
        out.append("- Our best accuracy minus the paper's (pts): " + "; ".join(level) + ".")
    timing = [
        f"{r.variant} p={r.p:g}: {100 * r.time_ratio:.1f}% (paper {r.paper_time[0]:.1f}%)"
        for r in rows
        if r.variant != BASELINE and r.time_ratio is not None and r.paper_time is not None
    ]
    if timing:
        ratio_devices = sorted(
            {e.get("device_name", "?") for e in results.get("ratios", {}).values()}
        )
        out.append(
            f"- Step time vs standard dropout on {', '.join(ratio_devices)}: "
            + "; ".join(timing)
            + ". The paper's Table 6 is train time per epoch on an RTX 2080 (2020 software)."
        )
    memory = [
        f"{r.variant} p={r.p:g}: {100 * r.memory_ratio:.1f}% (paper {r.paper_mem:.1f}%)"
        for r in rows
        if r.variant != BASELINE and r.memory_ratio is not None and r.paper_mem is not None
    ]
    if memory:
        out.append(
            "- Saved activations vs standard dropout: "
            + "; ".join(memory)
            + ". Ours counts only what autograd keeps for backward; the paper's Table 7 is the "
            "maximum cached GPU memory, which also holds weights, gradients, Adam state and "
            "allocator slack, so its ratios are closer to 1 by construction."
        )
    return out or ["- No results yet."]


# --------------------------------------------------------------------------------------- plot


def plot_convergence(results: dict[str, Any], path: Path) -> None:
    """Test accuracy vs epoch, one panel per p, mean over seeds per variant (min-max shaded)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = list(results.get("runs", {}).values())
    ps = sorted({float(r["p"]) for r in runs})
    if not ps:
        return
    fig = Figure(figsize=(max(6.0, 4.2 * len(ps)), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ps), sharey=True, squeeze=False)[0]
    colors = dict(zip(VARIANTS, ("C0", "C1", "C2", "C3"), strict=True))
    lows: list[float] = []
    for ax, p in zip(axes, ps, strict=True):
        for variant in VARIANTS:
            curves = [r["test_acc"] for r in runs if r["variant"] == variant and float(r["p"]) == p]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            per_epoch = [[100 * c[e] for c in curves] for e in range(length)]
            epochs = list(range(1, length + 1))
            mean = [statistics.fmean(v) for v in per_epoch]
            ax.plot(epochs, mean, color=colors[variant], label=f"{variant} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(
                    epochs,
                    [min(v) for v in per_epoch],
                    [max(v) for v in per_epoch],
                    color=colors[variant],
                    alpha=0.15,
                    linewidth=0,
                )
            paper = _paper(PAPER_BEST_ACC, p, variant)
            if paper is not None:
                ax.axhline(paper[0], color=colors[variant], linestyle=":", linewidth=1)
            lows.append(mean[min(len(mean) - 1, max(1, length // 5))])
        ax.set_title(f"p = {p:g}")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    if lows:
        top = max(90.5, max(100 * max(r["test_acc"]) for r in runs) + 0.3)
        axes[0].set_ylim(min(lows) - 1.0, top)
    fig.suptitle(
        "Fashion-MNIST MLP: test accuracy per epoch, mean over seeds (shaded: min-max)\n"
        "dotted: the paper's best test accuracy (Table 5)",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------- docs


def write_docs(path: Path, results: dict[str, Any], plot_path: Path | None) -> None:
    """Replace the text between the results markers of ``path`` with the current results."""
    text = path.read_text(encoding="utf-8")
    if DOCS_START not in text or DOCS_END not in text:
        raise SystemExit(f"{path}: markers {DOCS_START} / {DOCS_END} not found")
    link = None
    if plot_path is not None and plot_path.exists():
        link = Path(os.path.relpath(plot_path.resolve(), path.resolve().parent)).as_posix()
    block = format_markdown(results, link)
    pattern = re.compile(re.escape(DOCS_START) + r".*?" + re.escape(DOCS_END), re.S)
    new = pattern.sub(lambda _m: f"{DOCS_START}\n{block}\n{DOCS_END}", text, count=1)
    path.write_text(new, encoding="utf-8")


# ------------------------------------------------------------------------- parallel workers

_WORKER: dict[str, Any] = {}


def _init_worker(slots: Any) -> None:
    _WORKER["slot"] = slots.get()


def _worker_run(job: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(job["device"])
    cfg = RunConfig(**job["cfg"])
    key = (job["device"], cfg.limit_train, cfg.limit_test)
    if _WORKER.get("data_key") != key:
        _WORKER["data"] = load_data(device, cfg.limit_train, cfg.limit_test)
        _WORKER["data_key"] = key
    return train_run(
        job["variant"],
        job["p"],
        job["seed"],
        cfg,
        _WORKER["data"],
        device,
        eval_batch=job["eval_batch"],
        progress=job["progress"],
        position=_WORKER.get("slot", 0) + 1,
    )


# ----------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Reproduce the SliceOut paper's Fashion-MNIST MLP experiment (Appendix F.1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--epochs", type=int, default=40, help="training epochs per run")
    ap.add_argument(
        "--p", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7], help="dropout rates"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (runs per cell)")
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants"
    )
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results JSON")
    ap.add_argument(
        "--plot", type=Path, default=None, help=f"convergence plot PNG (default: {DEFAULT_PLOT})"
    )
    ap.add_argument("--no-plot", action="store_true", help="do not write the plot")
    ap.add_argument(
        "--write-docs", type=Path, default=None, help="rewrite this file's results section"
    )
    ap.add_argument(
        "--table",
        action="store_true",
        help="only print the table (and --write-docs) from --results",
    )
    ap.add_argument("--limit-train", type=int, default=None, help="first N training images only")
    ap.add_argument("--limit-test", type=int, default=None, help="first N test images only")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--hidden", type=int, default=2048, help="hidden width (2048 in the paper)")
    ap.add_argument(
        "--eval-batch", type=int, default=None, help="test batch (cuda 10000, cpu 2000)"
    )
    ap.add_argument(
        "--timing-repeats", type=int, default=None, help="interleaved rounds (cuda 100, cpu 10)"
    )
    ap.add_argument(
        "--timing-warmup", type=int, default=None, help="untimed rounds (cuda 20, cpu 2)"
    )
    ap.add_argument("--skip-ratios", action="store_true", help="do not measure time/memory ratios")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained concurrently in worker processes (GPU: several small runs share the "
        "device; their step times are then not comparable with the paper's)",
    )
    ap.add_argument(
        "--overwrite-mismatched",
        action="store_true",
        help="retrain runs stored with another configuration (epochs, limits...), do not fail",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (or only report); return what was trained, skipped and printed."""
    args = build_parser().parse_args(argv)
    plot_path = None if args.no_plot else (args.plot or DEFAULT_PLOT)
    results = load_results(args.results)
    summary: dict[str, Any] = {"trained": [], "skipped": [], "results": str(args.results)}

    if not args.table:
        for p in args.p:
            if not 0.0 <= p < 1.0:
                raise SystemExit(f"--p: dropout rate must be in [0, 1), got {p}")
        if args.epochs < 1 or args.jobs < 1:
            raise SystemExit("--epochs and --jobs must be >= 1")
        try:
            device = torch.device(resolve_device(args.device))
        except ValueError as err:
            raise SystemExit(str(err)) from err
        cuda = device.type == "cuda"
        eval_batch = args.eval_batch or (10000 if cuda else 2000)
        repeats = args.timing_repeats or (100 if cuda else 10)
        warmup = args.timing_warmup if args.timing_warmup is not None else (20 if cuda else 2)
        if repeats < 1 or warmup < 0:
            raise SystemExit("--timing-repeats must be >= 1 and --timing-warmup >= 0")
        cfg = RunConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            hidden=args.hidden,
            limit_train=args.limit_train,
            limit_test=args.limit_test,
        )
        variants = [v for v in VARIANTS if v in args.variants]
        jobs = [(v, p, s) for p in args.p for s in args.seeds for v in variants]
        todo = []
        for v, p, s in jobs:
            stored = results["runs"].get(run_key(v, p, s))
            if stored is None:
                todo.append((v, p, s))
            elif stored["config"] == asdict(cfg):
                summary["skipped"].append(run_key(v, p, s))
            elif args.overwrite_mismatched:
                todo.append((v, p, s))
            else:
                raise SystemExit(
                    f"{args.results} holds {run_key(v, p, s)} with config {stored['config']}, "
                    f"not the requested {asdict(cfg)}: use another --results file or "
                    "--overwrite-mismatched"
                )
        results["environment"] = environment_info(str(device))
        data = load_data(device, cfg.limit_train, cfg.limit_test)
        print(
            f"device {device} ({_device_name(device)}), torch {torch.__version__}; "
            f"{data.x_train.shape[0]} train / {data.x_test.shape[0]} test images; "
            f"{len(todo)} run(s) to train, {len(summary['skipped'])} already in {args.results}",
            flush=True,
        )

        if not args.skip_ratios:
            for p in args.p:
                stored = results["ratios"].get(f"{p:g}")
                if (
                    stored is not None
                    and stored["config"]["hidden"] == cfg.hidden
                    and stored["config"]["batch_size"] == cfg.batch_size
                    and set(variants) <= set(stored["variants"])
                ):
                    continue
                t0 = time.perf_counter()
                entry = measure_ratios(
                    p, variants, cfg, data, device, repeats=repeats, warmup=warmup
                )
                results["ratios"][f"{p:g}"] = entry
                save_results(results, args.results)
                print(
                    f"p={p:g} step-time / saved-activation ratios vs dropout "
                    f"({time.perf_counter() - t0:.1f} s): "
                    + ", ".join(
                        f"{n} {e['time_ratio']:.3f} / {e['memory_ratio']:.3f}"
                        for n, e in entry["variants"].items()
                        if n != BASELINE
                    ),
                    flush=True,
                )

        progress = not args.no_progress

        def record(rec: dict[str, Any], concurrent: int) -> None:
            rec["concurrent_jobs"] = concurrent
            key = run_key(rec["variant"], rec["p"], rec["seed"])
            results["runs"][key] = rec
            save_results(results, args.results)
            summary["trained"].append(key)
            tqdm.write(
                f"{key}: best {100 * rec['best_acc']:.2f}% (epoch {rec['best_epoch']}), "
                f"final {100 * rec['final_acc']:.2f}%, {rec['mean_step_ms']:.2f} ms/step, "
                f"{rec['wall_s']:.1f} s"
            )

        overall = tqdm(
            total=len(todo),
            desc="runs",
            unit="run",
            disable=not progress,
            position=0,
            dynamic_ncols=True,
        )
        if args.jobs == 1 or len(todo) <= 1:
            for v, p, s in todo:
                rec = train_run(
                    v,
                    p,
                    s,
                    cfg,
                    data,
                    device,
                    eval_batch=eval_batch,
                    progress=progress,
                    position=1,
                )
                record(rec, 1)
                overall.update(1)
        else:
            del data
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            slots = ctx.Queue()
            for i in range(args.jobs):
                slots.put(i)
            with ProcessPoolExecutor(
                max_workers=args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(slots,)
            ) as pool:
                futures = [
                    pool.submit(
                        _worker_run,
                        {
                            "variant": v,
                            "p": p,
                            "seed": s,
                            "cfg": asdict(cfg),
                            "device": str(device),
                            "eval_batch": eval_batch,
                            "progress": progress,
                        },
                    )
                    for v, p, s in todo
                ]
                for fut in as_completed(futures):
                    record(fut.result(), args.jobs)
                    overall.update(1)
        overall.close()

    if plot_path is not None and results["runs"] and (not args.table or args.write_docs):
        plot_convergence(results, plot_path)
        summary["plot"] = str(plot_path)
    table = format_table(results)
    print(table)
    summary["table"] = table
    if args.write_docs is not None:
        write_docs(args.write_docs, results, plot_path)
        summary["docs"] = str(args.write_docs)
        print(f"docs: rewrote the results section of {args.write_docs}")
    print(f"results: {args.results}" + (f"; plot: {plot_path}" if "plot" in summary else ""))
    return summary


if __name__ == "__main__":
    main()
