"""Ablation: batch norms downstream of a slice normalise with the full-width running variance.

A hypothesis for why SliceOut fits a pretrained EfficientNet-Lite0 slower than dropout: in a
sliced step the batch norm after a project conv divides the sliced sum by the batch's own
standard deviation, which the slice inflates, so the signal reaching later layers is weaker in
training than at full width. This script replaces the library's sliced-step batch norm
(:func:`sliceout_fx.norm_stats.batch_norm_batch_stats`) by one that subtracts the batch mean and
divides by the *running* (full-width) standard deviation, then runs
``examples/finetune_efficientnet_lite.py`` with the given arguments.

Measured (600 steps, p = 0.3, seed 0; ``docs/batch-norm.md``): it does not help. It patches a
library internal and is kept as the record of that measurement, not as a feature::

    python examples/ablations/bn_running_variance.py --steps 600 --p 0.3 --seed 0 \\
        --recalibrate-bn 0 --out examples/results/ablations/bn_running_variance_p0.3_seed0.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

import sliceout_fx.norm_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import finetune_efficientnet_lite  # noqa: E402


def batch_mean_running_variance(x: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``bn(x)`` with the batch's mean and the running variance; running statistics untouched."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv_std = torch.rsqrt(bn.running_var + bn.eps).view(shape)
    return (x - x.mean(dims, keepdim=True)) * (inv_std * bn.weight.view(shape)) + bn.bias.view(
        shape
    )


if __name__ == "__main__":
    # The rewrite looks the function up when it builds the training graph: patch before convert.
    sliceout_fx.norm_stats.batch_norm_batch_stats = batch_mean_running_variance
    finetune_efficientnet_lite.main(sys.argv[1:])
