"""Slice widths, eligible starts, keep probabilities and the per-step sampler.

The paper (Appendix A.1) keeps every tensor shape constant across steps: a layer of ``n`` units
keeps ``w = round((1 - p) n)`` of them and the start is uniform over the ``n - w + 1`` positions
where the slice fits. Unit ``j`` is then kept with probability

    P(j) = (min(j, n - w) - max(0, j - w + 1) + 1) / (n - w + 1),

lower at the edges, which is what probabilistic normalisation divides by (Appendix B). Groups are
cut in *units* (one channel, or one conv group, or a user-chosen multiple); all quantities here are
in units.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import SliceOutConfigError

#: Attribute name of the sampler in converted modules and training graphs.
SAMPLER_NAME = "sliceout_sampler"


def validate_rate(p: object, where: str = "p") -> float:
    """A dropout rate in ``[0, 1)``, or a :class:`SliceOutConfigError` saying what is wrong."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise SliceOutConfigError(f"{where} must be a number in [0, 1), got {p!r}")
    p = float(p)
    if math.isnan(p) or not 0.0 <= p < 1.0:
        raise SliceOutConfigError(
            f"{where} must be in [0, 1) (the fraction of units dropped), got {p!r}"
        )
    return p


def slice_width(units: int, p: float, *, site: str = "") -> int:
    """``round((1 - p) * units)``, at least one unit (with a warning when rounding hits 0)."""
    width = round((1.0 - p) * units)
    if width < 1:
        warnings.warn(
            f"SliceOut site {site or '?'}: p={p} on {units} units rounds the slice width to 0; "
            "keeping 1 unit (lower p or use a wider layer)",
            stacklevel=3,
        )
        width = 1
    return width


def keep_probabilities(units: int, width: int) -> Tensor:
    """``P(unit j is in the slice)`` for a uniform start over the eligible positions."""
    j = torch.arange(units, dtype=torch.float64)
    last_start = units - width
    count = (
        torch.minimum(j, torch.tensor(float(last_start))) - torch.clamp(j - width + 1, min=0) + 1
    )
    return count / (last_start + 1)


@dataclass(frozen=True)
class DrawSpec:
    """What the sampler draws for one group each step."""

    units: int
    width: int
    mode: str  # "slice"/"mask" draw a start, "gather" a sorted index set, "patch" a start per axis
    starts: tuple[int, ...] = ()  # "patch": number of eligible starts on each spatial axis


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass (an activation-checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


class SliceSampler(nn.Module):
    """Draws one cut per group per training step, from its own seeded generator.

    It lives in the training graph as its first call. It is excluded from ``torch.compile`` so the
    draws are plain Python ints handed to the compiled region (which then specialises once and
    treats them as dynamic), never module attributes that would force a recompile every step. It has
    no persistent state, so ``state_dict`` keys stay those of the original model.
    """

    def __init__(self, specs: Sequence[DrawSpec], seed: int | None = None) -> None:
        super().__init__()
        self.specs = list(specs)
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self._forced: tuple | None = None
        self.last_draws: tuple | None = (
            None  # the draws of the latest training step, for inspection
        )

    def add_scale_buffer(self, name: str, values: Tensor) -> None:
        """Register a non-persistent per-channel tensor (moves with ``.to()``, not saved)."""
        self.register_buffer(name, values, persistent=False)

    def force(self, draws: Sequence[int | Tensor] | None) -> None:
        """Use these draws (one per group) instead of random ones; ``None`` to go back to random.

        For tests and debugging: two converted models forced to the same draws are comparable.
        """
        self._forced = None if draws is None else tuple(draws)

    @torch.compiler.disable
    def forward(self) -> tuple[int | Tensor, ...]:
        if self._forced is not None:
            draws = self._forced
        elif self.last_draws is not None and _recomputing():
            # Activation checkpointing runs the forward again inside backward: it must see the
            # slices the first forward used (a seeded generator is not rewound by checkpoint).
            draws = self.last_draws
        else:
            draws = tuple(self._draw(spec) for spec in self.specs)
        self.last_draws = draws
        return draws

    def _draw(self, spec: DrawSpec) -> int | Tensor:
        if spec.mode == "patch":
            return tuple(int(torch.randint(n, (), generator=self.generator)) for n in spec.starts)
        if spec.mode == "gather":
            perm = torch.randperm(spec.units, generator=self.generator)
            return perm[: spec.width].sort().values
        high = spec.units - spec.width + 1
        return int(torch.randint(high, (), generator=self.generator))

    def extra_repr(self) -> str:
        return ", ".join(f"{s.width}/{s.units} ({s.mode})" for s in self.specs)
