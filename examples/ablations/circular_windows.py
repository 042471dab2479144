"""Ablation: circular slice windows, so that every unit is kept with probability ``w / n``.

With the paper's windows (Appendix A.1: a start uniform over the ``n - w + 1`` positions where the
slice fits) units near the edges are kept rarely and, for ``p < 0.5``, the middle ``2w - n`` units
are never dropped: at ``p = 0.3`` on 96 channels, channel 0 is kept in 1 step in 30 and channels
29-66 in every step. A hypothesis: the rarely trained edge channels of a pretrained model come
back at full width with stale weights. This script draws starts uniformly over all ``n`` positions
and lets a window run past the end wrap around to the first units (a wrapped window is taken by
index, the library's gather path), then runs ``examples/finetune_efficientnet_lite.py`` (or, with
``smollm2`` as the first argument, ``examples/finetune_smollm2_brown.py``) with the given arguments.

Measured (600 steps, p = 0.3, seed 0; ``docs/batch-norm.md``): it does not help. It patches library
internals and is kept as the record of that measurement, not as a feature::

    python examples/ablations/circular_windows.py --steps 600 --p 0.3 --seed 0 \\
        --recalibrate-bn 0 --out examples/results/ablations/circular_windows_p0.3_seed0.json

On SmolLM2-135M it does not help either (150 steps, p = 0.3, seed 0: validation perplexity 77.71
against 73.38 with the library's windows; ``docs/benchmarks.md``), although a circular window
damages the pretrained model a little less before fine-tuning (loss 8.16 against 8.59 with every
FFN sliced; ``examples/ablations/pretrained_noise.py``)::

    python examples/ablations/circular_windows.py smollm2 --steps 150 --p 0.3 --seed 0 \\
        --batch-size 4 --seq-len 64 --eval-blocks 64 \\
        --out examples/results/ablations/smollm2_circular_windows_p0.3_seed0.json
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import Tensor

import sliceout_fx.rewrite
import sliceout_fx.sampling
from sliceout_fx.ops import Cut, make_cut

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The example scripts this ablation can run, by the name given as the first argument.
EXAMPLES = {"efficientnet": "finetune_efficientnet_lite", "smollm2": "finetune_smollm2_brown"}


def make_circular_cut(
    unit_index: int | Tensor, width: int, size: int, scale: int, mode: str
) -> Cut:
    """:func:`sliceout_fx.ops.make_cut`, except that a window past the end wraps around."""
    if mode == "slice" and isinstance(unit_index, int) and unit_index * scale + width > size:
        index = (unit_index * scale + torch.arange(width)) % size
        return Cut(index, width, size, "gather")
    return make_cut(unit_index, width, size, scale, mode)


def use_every_start() -> None:
    """Make the sampler draw slice starts over all ``n`` units instead of the ``n - w + 1``."""
    init = sliceout_fx.sampling.SliceSampler.__init__

    def patched(self, specs, seed=None, capturable=False):
        init(self, specs, seed, capturable)
        pairs = zip(self.specs, self._highs, strict=True)
        self._highs = [spec.units if spec.mode == "slice" else high for spec, high in pairs]

    sliceout_fx.sampling.SliceSampler.__init__ = patched


if __name__ == "__main__":
    argv = sys.argv[1:]
    example = argv.pop(0) if argv and argv[0] in EXAMPLES else "efficientnet"
    sliceout_fx.rewrite.make_cut = make_circular_cut  # looked up when the graph is built
    use_every_start()
    importlib.import_module(EXAMPLES[example]).main(argv)
