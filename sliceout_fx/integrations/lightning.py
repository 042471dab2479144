"""``SliceOutLightningCallback``: SliceOut's schedule and resume for ``lightning.Trainer``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from ..calibration import recalibrate_batch_norm
from ..module import conversions_in
from ..resume import load_sampler_state, sampler_state
from ..schedule import DEFAULT_FULL_WIDTH_EVERY, SliceSchedule

logger = logging.getLogger(__name__)


class SliceOutLightningCallback(Callback):
    """Full width for the last steps, batch-norm re-estimation, and the sampler in checkpoints.

    The converted model may be the ``LightningModule`` itself or any submodule of it. The sampler
    state travels in the checkpoint's callback state (Lightning's ``state_dict`` /
    ``load_state_dict`` protocol), so ``trainer.fit(module, ckpt_path=...)`` resumes the draws.

    Args:
        full_width_last: fraction of the last optimiser steps trained at full width (paper: 0.01).
        ramp_steps: over the first steps, the share of sliced steps rises from 0 to 1.
        full_width_every: ``k >= 2`` trains every ``k``-th step at full width (default 5;
            0: only the last steps).
        recalibrate_batches: after the last training step, re-estimate batch-norm running
            statistics at full width on this many training batches (0: no re-estimation). It runs
            when the last batch of a run that ends at ``max_steps`` or ``max_epochs`` has ended,
            before the validation and the ``ModelCheckpoint`` saves of that step, so the last
            checkpoint holds the re-estimated statistics; a run stopped otherwise (early
            stopping, ``max_time``) re-estimates them at ``on_train_end``, after its checkpoints.
        inputs_of: turns a training batch into the converted model's input (default: the first
            element of a tuple or list batch, else the batch itself).
    """

    def __init__(
        self,
        full_width_last: float = 0.01,
        ramp_steps: int = 0,
        full_width_every: int = DEFAULT_FULL_WIDTH_EVERY,
        recalibrate_batches: int = 0,
        inputs_of: Callable[[Any], Any] | None = None,
    ) -> None:
        self.full_width_last = full_width_last
        self.ramp_steps = ramp_steps
        self.full_width_every = full_width_every
        self.recalibrate_batches = recalibrate_batches
        self.inputs_of = inputs_of or _first_element
        self.schedule: SliceSchedule | None = None
        self._module: torch.nn.Module | None = None
        self._loaded: dict[str, Any] | None = None
        self._recalibrated = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not conversions_in(pl_module):
            raise TypeError(
                f"SliceOutLightningCallback: {type(pl_module).__name__} holds no converted model; "
                "convert it (or the model it trains) with sliceout_fx.convert"
            )
        self._module = pl_module

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._recalibrated = False
        if self._loaded is not None:
            load_sampler_state(pl_module, self._loaded)
            self._loaded = None
        elif getattr(trainer, "ckpt_path", None) and trainer.global_step > 0:
            logger.warning(
                "sliceout_fx: resuming from %s without the sampler state (the checkpoint has no "
                "state of %s): the slices drawn from here on will differ from the uninterrupted "
                "run's",
                trainer.ckpt_path,
                self.state_key,
            )
        self.schedule = SliceSchedule(
            pl_module,
            max(int(trainer.estimated_stepping_batches), 1),
            full_width_last=self.full_width_last,
            ramp_steps=self.ramp_steps,
            full_width_every=self.full_width_every,
        )
        self.schedule.go_to(trainer.global_step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if self.schedule is not None:
            self.schedule.go_to(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        # ModelCheckpoint's own hooks run after every other callback's (Lightning moves them to
        # the end of the list), and validation after on_train_batch_end: re-estimating here puts
        # the final statistics into the checkpoints and the validation of the last step.
        if _last_training_batch(trainer):
            self._recalibrate(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._recalibrate(trainer, pl_module)  # a run that stopped before its last step

    def _recalibrate(self, trainer: Any, pl_module: Any) -> None:
        if not self.recalibrate_batches or self._recalibrated:
            return
        self._recalibrated = True
        converted = [m for m, _ in conversions_in(pl_module)]
        target = converted[0] if len(converted) == 1 else pl_module
        device = pl_module.device
        batches = []
        for batch in trainer.train_dataloader:
            batches.append(_to(self.inputs_of(batch), device))
            if len(batches) == self.recalibrate_batches:
                break
        recalibrate_batch_norm(target, batches)

    def state_dict(self) -> dict[str, Any]:
        if self._module is None:
            return {}
        return {"sampler": sampler_state(self._module)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("sampler")


def _last_training_batch(trainer: Any) -> bool:
    """Whether the batch that has just ended is the last one ``fit`` trains on.

    ``fit`` stops when ``max_steps`` optimiser steps have run or when the last epoch's batches are
    done (``max_epochs``; -1 or None: no limit). ``global_step`` already counts the step of this
    batch; ``trainer.should_stop`` (early stopping) is left to ``on_train_end``.
    """
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready == trainer.num_training_batches


def _first_element(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _to(value: Any, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
