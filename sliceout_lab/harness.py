"""The A/B harness: variants of one model trained interleaved on the same batches.

Every comparison in the lab - the demo, ``sliceout-fx bench``, the fine-tuning and reproduction
examples - asks the same question: how does a converted model train next to the model it came
from? The answer is only fair when both see the same batches in the same order and the machine's
noise hits both alike, so all of them run through :func:`run_interleaved`:

* one :class:`Arm` per variant: its model, optimizer, schedulers (anything with ``.step()``: an
  LR scheduler, a :class:`sliceout_fx.SliceSchedule`), loss and gradient clipping;
* in every round each arm takes one training step on that round's batch, in an order rotated
  round by round (:func:`sliceout_lab.timing.round_order`), the device synchronised around
  each timed step;
* before training, the bytes autograd saves for backward in one step are counted on the first
  batch (deterministic, :mod:`sliceout_lab.memory`), and on CUDA each arm's peak memory of
  one step is measured;
* the result, an :class:`ABResult`, holds the raw samples and answers the usual questions (median
  of per-round time ratios to the baseline, quartiles, saved-bytes ratio, losses).
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import SavedTensorStats, measure_saved_tensors
from .timing import interleaved_rounds, paired_ratios, quantile, ratio_of_medians

__all__ = [
    "ABResult",
    "Arm",
    "Batch",
    "call_model",
    "cross_entropy",
    "logits_of",
    "model_loss",
    "run_interleaved",
]

Batch = Any
"""What one step trains on: ``(inputs, labels)`` for :func:`cross_entropy`, keyword tensors for
:func:`model_loss`, or whatever the arm's own loss takes."""


class _Steps(Protocol):
    def step(self) -> Any: ...


# ----------------------------------------------------------------------------------------- losses


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """``model(**inputs)`` for keyword inputs (``{"input_ids": ...}``), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def logits_of(out: Any) -> Tensor:
    """The logits of a model's output: the tensor itself, its first item, or ``.logits``."""
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise ValueError(
            "the loss needs logits: a (batch, ..., classes) tensor output or an output with "
            ".logits"
        )
    return logits


def cross_entropy(model: Callable[..., Any], batch: Batch) -> Tensor:
    """Cross-entropy of ``model(inputs)`` against ``labels`` for a batch ``(inputs, labels)``.

    Inputs are a tensor or keyword tensors; labels with more than one axis (one per token) are
    scored against the logits flattened alike.
    """
    inputs, labels = batch
    logits = logits_of(call_model(model, inputs))
    if labels.dim() == 1 and logits.dim() == 2:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten())


def model_loss(model: Callable[..., Any], batch: Batch) -> Tensor:
    """The loss a model computes itself: ``model(**batch).loss`` (HuggingFace, labels in the
    batch)."""
    return model(**batch).loss


# -------------------------------------------------------------------------------------------- arm


@dataclass(eq=False)
class Arm:
    """One variant under comparison and how it takes a training step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[Callable[..., Any], Batch], Tensor] = cross_entropy
    """``loss(forward, batch)``: runs the forward pass and returns a scalar."""
    schedulers: Sequence[_Steps] = ()
    """Stepped after every optimizer step, in order (LR schedulers, ``SliceSchedule``...)."""
    clip_grad_norm: float | None = None
    forward: Callable[..., Any] | None = None
    """What the loss calls instead of ``model``: e.g. ``torch.compile(model)``."""
    description: str = ""

    @property
    def params(self) -> list[Tensor]:
        return list(self.model.parameters())

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (the CPU for a model without any)."""
        return next((t.device for t in self.model.parameters()), torch.device("cpu"))

    def _loss(self, batch: Batch) -> Tensor:
        return self.loss(self.model if self.forward is None else self.forward, batch)

    def step(self, batch: Batch) -> Tensor:
        """One training step (zero_grad, forward, backward, clip, update, schedulers); returns the
        detached loss (no host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        loss.backward()
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()
        return loss.detach()

    def saved_tensors(self, batch: Batch) -> SavedTensorStats:
        """What autograd saves for backward in one forward + backward on ``batch``.

        Nothing is trained: there is no update, the gradients are dropped and the buffers (batch
        norm statistics) are put back as they were.
        """
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        self.optimizer.zero_grad(set_to_none=True)
        stats = measure_saved_tensors(lambda: self._loss(batch).backward(), self.params)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        return stats

    def cuda_step_peak(self, batch: Batch) -> int:
        """Peak CUDA memory allocated during one training step, above what was allocated before.

        The gradients are freed first, so the figure is the step's working memory: activations
        kept for backward, gradients and temporaries. Parameters, optimizer state and the other
        arms' models are resident before and after and cancel out: an optimizer without state yet
        (Adam's moments are made by its first step) takes one step first. The steps train.
        """
        device = self.device
        if not self.optimizer.state:
            self.step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        self.step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before


# ----------------------------------------------------------------------------------------- result


@dataclass
class ABResult:
    """What :func:`run_interleaved` measured; ratios are to :attr:`baseline` (the first arm)."""

    baseline: str
    names: list[str]
    step_times: dict[str, list[float]]
    """Seconds per timed step; entry ``i`` of every list comes from the same round."""
    losses: dict[str, list[float]]
    """Training loss of every round."""
    saved: dict[str, SavedTensorStats] = field(default_factory=dict)
    cuda_peak_bytes: dict[str, int] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def time_ratios(self, name: str) -> list[float]:
        """Per-round ratios of ``name``'s step time to the baseline's in the same round."""
        return paired_ratios(self.step_times[name], self.step_times[self.baseline])

    def time_ratio(self, name: str) -> float:
        """Median of the per-round ratios: the headline figure, robust to drift and outliers."""
        return statistics.median(self.time_ratios(name))

    def time_ratio_quartiles(self, name: str) -> tuple[float, float]:
        ratios = self.time_ratios(name)
        return quantile(ratios, 0.25), quantile(ratios, 0.75)

    def total_time_ratio(self, name: str) -> float:
        """Sum of timed steps over the baseline's: counts the odd slow step the median ignores."""
        return sum(self.step_times[name]) / sum(self.step_times[self.baseline])

    def median_ms(self, name: str) -> float:
        """This machine's median step time (informational: only ratios are results)."""
        return 1e3 * statistics.median(self.step_times[name])

    def memory_ratio(self, name: str) -> float | None:
        """Saved-activation bytes over the baseline's (``None`` if not measured or zero)."""
        if name not in self.saved or self.baseline not in self.saved:
            return None
        base = self.saved[self.baseline].bytes
        return self.saved[name].bytes / base if base else None

    def cuda_peak_ratio(self, name: str) -> float | None:
        base = self.cuda_peak_bytes.get(self.baseline)
        return self.cuda_peak_bytes[name] / base if base and name in self.cuda_peak_bytes else None

    def mean_loss(self, name: str, last: int) -> float:
        """Mean training loss over the last ``last`` rounds."""
        return statistics.fmean(self.losses[name][-last:])

    def stats(self, name: str) -> dict[str, Any]:
        """The JSON record of one arm: ratios first, raw samples last."""
        q25, q75 = self.time_ratio_quartiles(name)
        samples = self.step_times[name]
        record: dict[str, Any] = {
            "time_ratio": self.time_ratio(name),
            "time_ratio_q25": q25,
            "time_ratio_q75": q75,
            "time_ratio_of_medians": ratio_of_medians(samples, self.step_times[self.baseline]),
            "step_time_spread": quantile(samples, 0.9) / quantile(samples, 0.1),
            "median_ms": self.median_ms(name),
        }
        if name in self.saved:
            saved = self.saved[name]
            record |= {
                "saved_activation_bytes": saved.bytes,
                "memory_ratio": self.memory_ratio(name),
                "saved_tensors": saved.tensors,
                "saved_storages": saved.storages,
                "saved_parameter_views": saved.parameter_tensors,
            }
        if name in self.cuda_peak_bytes:
            record |= {
                "cuda_step_peak_bytes": self.cuda_peak_bytes[name],
                "cuda_step_peak_ratio": self.cuda_peak_ratio(name),
            }
        return record | {"samples_s": samples}


# ------------------------------------------------------------------------------------------ loop


def run_interleaved(
    arms: Sequence[Arm],
    batches: Iterable[Batch],
    *,
    rounds: int,
    warmup: int = 0,
    timed: Callable[[int], bool] | None = None,
    measure_saved: bool = True,
    measure_cuda_peak: bool | None = None,
    progress: bool = False,
    desc: str = "training",
    on_round: Callable[[int], None] | None = None,
) -> ABResult:
    """Train ``arms`` (the first is the baseline) for ``rounds`` interleaved rounds.

    Round ``r`` takes the next batch of ``batches`` and gives it to every arm. The first
    ``warmup`` rounds are not timed (one-off costs: optimizer state, allocator, kernel choice),
    nor are rounds for which ``timed(r)`` is false (e.g. a full-width tail one does not want in
    the ratio). On CUDA every timed step is bracketed by ``torch.cuda.synchronize`` and, unless
    ``measure_cuda_peak=False``, each arm's step peak is measured by an extra step on the first
    batch before round 0 (see :meth:`Arm.cuda_step_peak`). With ``measure_saved`` the saved
    activations are counted on the first batch (no training, see :meth:`Arm.saved_tensors`).
    """
    names = [arm.name for arm in arms]
    if not arms:
        raise ValueError("no arms to compare")
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must differ, got {names}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 <= warmup < rounds:
        raise ValueError(f"warmup must be in [0, rounds), got {warmup} of {rounds} rounds")
    by_name = {arm.name: arm for arm in arms}
    device = arms[0].device
    on_cuda = device.type == "cuda"
    stream: Iterator[Batch] = iter(batches)
    try:
        current: list[Batch] = [next(stream)]
    except StopIteration:
        raise ValueError("no batches to train on") from None
    result = ABResult(
        baseline=names[0],
        names=names,
        step_times={},
        losses={},
        descriptions={arm.name: arm.description for arm in arms},
    )
    if measure_saved:
        result.saved = {arm.name: arm.saved_tensors(current[0]) for arm in arms}
    if on_cuda and measure_cuda_peak is not False:
        result.cuda_peak_bytes = {arm.name: arm.cuda_step_peak(current[0]) for arm in arms}

    losses: dict[str, list[Tensor]] = {name: [] for name in names}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, desc=desc, unit="step")

    def before_round(r: int) -> None:
        if r:
            try:
                current[0] = next(stream)
            except StopIteration:
                raise ValueError(f"the batches ran out after {r} of {rounds} rounds") from None

    def after_round(r: int) -> None:
        if bar is not None:
            bar.update(1)
            if (r + 1) % 10 == 0 or r + 1 == rounds:
                recent = {n: torch.stack(ls[-10:]).mean().item() for n, ls in losses.items()}
                bar.set_postfix({f"loss_{n}": f"{v:.3f}" for n, v in recent.items()})
        if on_round is not None:
            on_round(r)

    def step(name: str, _round: int) -> None:
        losses[name].append(by_name[name].step(current[0]))

    try:
        result.step_times = interleaved_rounds(
            names,
            rounds,
            step,
            timed=lambda r: r >= warmup and (timed is None or timed(r)),
            sync=(lambda: torch.cuda.synchronize(device)) if on_cuda else None,
            before_round=before_round,
            after_round=after_round,
        )
    finally:
        if bar is not None:
            bar.close()
    result.losses = {n: torch.stack(ls).float().cpu().tolist() for n, ls in losses.items()}
    return result
