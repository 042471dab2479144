"""``SliceOutTrainerCallback``: SliceOut's schedule and resume for ``transformers.Trainer``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from ..calibration import recalibrate_batch_norm
from ..module import conversions_in
from ..resume import load_sampler_state, sampler_state
from ..schedule import DEFAULT_FULL_WIDTH_EVERY, SliceSchedule
from . import SAMPLER_FILE

logger = logging.getLogger(__name__)


class SliceOutTrainerCallback(TrainerCallback):
    """Full width for the last steps, batch-norm re-estimation, and the sampler in checkpoints.

    Args:
        full_width_last: fraction of the last optimiser steps trained at full width (paper: 0.01).
        ramp_steps: over the first steps, the share of sliced steps rises from 0 to 1
            (see :class:`~sliceout_fx.SliceSchedule`).
        full_width_every: ``k >= 2`` trains every ``k``-th step at full width (default 5;
            0: only the last steps).
        recalibrate_batches: after the last training step, re-estimate batch-norm running
            statistics at full width on this many training batches (0: no re-estimation). It runs
            in ``on_step_end`` of the step that ends training (``max_steps``, or a callback before
            this one setting ``should_training_stop``), before that step's evaluation and
            checkpoint, so the last checkpoint holds the re-estimated statistics; training stopped
            in ``on_evaluate`` (early stopping) re-estimates them there if that callback comes
            before this one, else at ``on_train_end``, after the checkpoint.
        resume_from: the checkpoint folder to restore the sampler from; by default the Trainer's
            ``output_dir/checkpoint-<step>`` of the step it resumes at.

    Usage::

        trainer = Trainer(model=sliceout_fx.convert(model, p=0.3, seed=0), args=args,
                          train_dataset=data, callbacks=[SliceOutTrainerCallback()])
        trainer.train()                                   # or resume_from_checkpoint=True
    """

    def __init__(
        self,
        full_width_last: float = 0.01,
        ramp_steps: int = 0,
        full_width_every: int = DEFAULT_FULL_WIDTH_EVERY,
        recalibrate_batches: int = 0,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        self.full_width_last = full_width_last
        self.ramp_steps = ramp_steps
        self.full_width_every = full_width_every
        self.recalibrate_batches = recalibrate_batches
        self.resume_from = resume_from
        self.schedule: SliceSchedule | None = None
        self._recalibrated = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        self._recalibrated = False
        self.schedule = SliceSchedule(
            model,
            max(state.max_steps, 1),
            full_width_last=self.full_width_last,
            ramp_steps=self.ramp_steps,
            full_width_every=self.full_width_every,
        )
        if state.global_step > 0:
            self._restore(model, args, state.global_step)
        self.schedule.go_to(state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.schedule is not None:
            self.schedule.go_to(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(sampler_state(model), os.path.join(folder, SAMPLER_FILE))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        # The Trainer evaluates and saves the step's checkpoint after every on_step_end callback
        # has run (DefaultFlowCallback, first in the list, has set should_training_stop and
        # should_save at max_steps): re-estimating here puts the final statistics into them.
        if state.global_step >= state.max_steps or control.should_training_stop:
            self._recalibrate(model, kwargs.get("train_dataloader"))

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if control.should_training_stop:  # early stopping decides here, before the save
            self._recalibrate(model, kwargs.get("train_dataloader"))

    def on_train_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ):
        self._recalibrate(model, train_dataloader)  # training that stopped some other way

    def _recalibrate(self, model: Any, train_dataloader: Any) -> None:
        if not self.recalibrate_batches or self._recalibrated or train_dataloader is None:
            return
        self._recalibrated = True
        device = next(model.parameters()).device
        batches = _first(train_dataloader, self.recalibrate_batches, _model_inputs(device))
        recalibrate_batch_norm(model, batches)

    def _restore(self, model: Any, args: Any, step: int) -> None:
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{step}")
        path = os.path.join(folder, SAMPLER_FILE)
        if not os.path.isfile(path):
            if _needs_sampler_file(model, folder):
                logger.warning(
                    "sliceout_fx: resuming at step %d without %s: the slices drawn from here on "
                    "will differ from the uninterrupted run's (pass resume_from= the checkpoint "
                    "folder)",
                    step,
                    path,
                )
            return
        load_sampler_state(model, torch.load(path, weights_only=False))


def _needs_sampler_file(model: Any, folder: str | os.PathLike) -> bool:
    """Whether a resume without the sampler file draws other slices than the uninterrupted run.

    Unseeded draws come from torch's global generator, which the Trainer restores itself from the
    checkpoint's ``rng_state*.pth``; seeded draws and the batch-norm refresh count of a whole-model
    conversion are only in the sampler file.
    """
    rng_saved = os.path.isdir(folder) and any(
        name.startswith("rng_state") for name in os.listdir(folder)
    )
    return not rng_saved or any(
        conv.config.seed is not None
        or (conv.kind == "whole" and conv.config.bn_stats == "full_width")
        for _, conv in conversions_in(model)
    )


def _model_inputs(device: Any) -> Callable[[Any], dict[str, Any]]:
    """A Trainer batch (a dict) as keyword inputs on the model's device, labels left out."""

    def convert(batch: Any) -> dict[str, Any]:
        return {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if k not in ("labels", "label")
        }

    return convert


def _first(loader: Any, count: int, prepare: Callable[[Any], Any]) -> list[Any]:
    batches = []
    for batch in loader:
        batches.append(prepare(batch))
        if len(batches) == count:
            break
    return batches
