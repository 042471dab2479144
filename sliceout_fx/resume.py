"""Saving and restoring where a converted model's slice draws stand, for reproducible resume.

The draws are not part of the model's ``state_dict`` (its keys stay the original model's), so a
checkpoint of model and optimizer alone resumes with other slices than the uninterrupted run would
have drawn. :func:`sampler_state` is the missing piece: a small dict to save beside the checkpoint;
:func:`load_sampler_state` puts it back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .module import converted_parts

_VERSION = 1


def sampler_state(model: nn.Module) -> dict[str, Any]:
    """Where every sampler of a converted model stands (``torch.save``-able, no model tensors).

    With ``seed=`` a sampler's draws are a function of its step count, which is recorded. With
    ``seed=None`` they come from torch's global generator, and so do the dropouts a conversion
    keeps (skipped sites, the full-width batch-norm refresh calls): the generator's state is
    recorded too (``"torch_rng"``, and ``"cuda_rng"`` once CUDA is in use), and
    :func:`load_sampler_state` restores it, as ``transformers.Trainer`` does for its own
    checkpoints.
    """
    found = converted_parts(model)
    names = {id(m): name for name, m in model.named_modules()}
    state: dict[str, Any] = {
        "version": _VERSION,
        "samplers": {names[id(m)]: conv.draw_state() for m, conv in found},
    }
    state["torch_rng"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def load_sampler_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Continue the draws of a :func:`sampler_state` taken from the same conversion."""
    if not isinstance(state, dict) or state.get("version") != _VERSION:
        raise ValueError(
            "load_sampler_state needs a dict made by sliceout_fx.sampler_state "
            f"(version {_VERSION})"
        )
    found = converted_parts(model)
    names = {id(m): name for name, m in model.named_modules()}
    ours = {names[id(m)]: conv for m, conv in found}
    saved = state["samplers"]
    if set(saved) != set(ours):
        raise ValueError(
            f"the sampler state is of another conversion: it has samplers {sorted(saved)[:4]}, "
            f"this model {sorted(ours)[:4]}"
        )
    for name, conv in ours.items():
        sampler = conv.sampler if not conv.stale else None
        if sampler is not None and not sampler.accepts(saved[name]):
            raise ValueError(
                f"the sampler state is of another conversion: sampler {name or '<model>'!r} "
                f"draws {saved[name].get('specs')}, this model's {sampler.draw_state()['specs']}"
            )
        conv.load_draw_state(saved[name])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
