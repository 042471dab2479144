"""Re-estimate batch-norm statistics at full width after SliceOut (or dropout) training.

Training on slices shifts the statistics a batch norm sees downstream of a site (its input had
fewer, rescaled channels), so running statistics accumulated during training can mismatch the
full-width network used in eval mode - the variance shift known from dropout. A few full-width
forward passes in train mode, with a cumulative average, re-estimate them without touching a
weight. The EfficientNet-Lite fine-tuning example shows the effect: eval accuracy 25.0% before,
89.1% after recalibration on 20 batches.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .module import conversions_in


def _full_width(model: nn.Module) -> Any:
    from .api import full_width

    return full_width(model)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Any]) -> int:
    """Reset every batch norm's running statistics and re-estimate them at full width.

    Args:
        model: a converted model (run with slicing off) or any module.
        batches: model inputs per batch: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (a HuggingFace batch).

    Returns:
        The number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    full_width = _full_width(model) if conversions_in(model) else contextlib.nullcontext()
    count = 0
    try:
        with full_width:
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                else:
                    model(*batch) if isinstance(batch, tuple) else model(batch)
                count += 1
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    if count == 0:
        raise ValueError("recalibrate_batch_norm needs at least one batch")
    return count


@dataclass(frozen=True)
class BatchNormDrift:
    """How far one batch norm's running statistics are from the full-width ones.

    Medians over channels: ``mean_offset`` is ``|running mean - full-width mean|`` in full-width
    standard deviations; ``var_ratio`` is running variance / full-width variance.
    """

    name: str
    mean_offset: float
    var_ratio: float


@torch.no_grad()
def batch_norm_drift(model: nn.Module, batches: Iterable[Any]) -> list[BatchNormDrift]:
    """Compare every batch norm's running statistics with the full-width network's on ``batches``.

    The full-width statistics are re-estimated on a copy (:func:`recalibrate_batch_norm`), so
    ``model`` is not changed. Offsets near 0 and ratios near 1 mean eval mode normalises as the
    trained network expects; the EfficientNet-Lite example prints this for both variants.
    """
    reference = copy.deepcopy(model)
    recalibrate_batch_norm(reference, batches)
    full = dict(reference.named_modules())
    rows = []
    for name, bn in model.named_modules():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        ref = full[name]
        sd = ref.running_var.clamp_min(bn.eps).sqrt()
        offset = ((bn.running_mean - ref.running_mean).abs() / sd).nanmedian().item()
        ratio = bn.running_var.clamp_min(bn.eps) / ref.running_var.clamp_min(bn.eps)
        rows.append(BatchNormDrift(name, offset, ratio.nanmedian().item()))
    return rows
