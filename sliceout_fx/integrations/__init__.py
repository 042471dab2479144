"""Ready-made callbacks for ``transformers.Trainer`` and Lightning.

Both do what a SliceOut run needs from its trainer: a :class:`~sliceout_fx.SliceSchedule` (full
width for the last fraction of the steps and one step in five, optionally a ramp at the start),
an optional batch-norm re-estimation after the last step (before the trainer saves that step's
checkpoint), and the sampler state saved with every checkpoint and restored on resume, so a
resumed run draws the slices the uninterrupted run would have drawn.

Importing this package imports neither library; each callback class imports its own on first use::

    from sliceout_fx.integrations import SliceOutTrainerCallback   # needs transformers
    from sliceout_fx.integrations import SliceOutLightningCallback  # needs lightning
"""

from __future__ import annotations

from typing import Any

__all__ = ["SAMPLER_FILE", "SliceOutLightningCallback", "SliceOutTrainerCallback"]

#: The file the Trainer callback writes into every checkpoint folder.
SAMPLER_FILE = "sliceout_sampler.pt"


def __getattr__(name: str) -> Any:
    if name == "SliceOutTrainerCallback":
        from .huggingface import SliceOutTrainerCallback

        return SliceOutTrainerCallback
    if name == "SliceOutLightningCallback":
        from .lightning import SliceOutLightningCallback

        return SliceOutLightningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
