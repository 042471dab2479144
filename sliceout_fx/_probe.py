"""Running a model once to learn about it, without leaving a trace on it.

Capture and shape propagation run the user's model (or its traced graph) on example inputs. That
run must not change what the user has: the modules' train/eval flags, batch-norm statistics and
other buffers, gradients, or the random number streams their training will draw from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module.train(training)`` inside the block; every submodule's own flag restored after."""
    flags = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def untouched(module: nn.Module, training: bool) -> Iterator[None]:
    """A probing run: mode set, no autograd, forked RNG, buffers (BN statistics) restored."""
    buffers = [(b, b.clone()) for b in module.buffers()]
    try:
        with training_mode(module, training), torch.no_grad(), torch.random.fork_rng():
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
