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
from typing import Any

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


_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def mix32(x: Any) -> Any:
    """A 32-bit integer hash (two multiply-xorshift rounds) of a Python int or an int64 tensor.

    Every intermediate stays below 2**63, so the int64 tensor form computes bit for bit what the
    Python form does, on any device: a seeded draw is the same number in eager, compiled and
    CUDA-graph runs, and needs no generator object (which neither dynamo nor graph capture
    handles well).
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _seed_key(seed: int) -> int:
    return mix32(seed & _M32) ^ mix32(((seed >> 32) ^ _GOLDEN) & _M32)


class SliceSampler(nn.Module):
    """Draws one slice start per group per training step.

    A start is ``(r * high) >> 32`` for a 32-bit random ``r`` and ``high`` eligible positions.
    ``r`` comes from one of two sources:

    * ``seed=None``: one ``torch.randint`` on the global (or, on the device path, the device's
      default) generator, so ``torch.manual_seed`` makes runs repeatable;
    * ``seed=s``: a counter-based hash of ``(s, step, group)`` (:func:`mix32`), so the draws are a
      pure function of the step count - identical on the host and the device paths, cheap, and
      restorable from a single integer.

    Starts are Python ints in eager training (narrowed views, no ATen op spent on drawing with a
    seed). Under ``torch.compile``, or always with ``capturable=True``, they are int64 tensors on
    the model's device instead (no host sync, no graph break, static shapes), which the runtime
    ops turn into contiguous index vectors. The sampler has no persistent state, so
    ``state_dict`` keys stay the original model's.
    """

    def __init__(
        self, specs: Sequence[DrawSpec], seed: int | None = None, capturable: bool = False
    ) -> None:
        super().__init__()
        self.specs = list(specs)
        self.capturable = capturable
        # Controlled dropout and Patch SliceOut draw index sets / window corners from a generator.
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self._key = None if seed is None else _seed_key(seed)
        self._starts_only = all(s.mode == "slice" for s in self.specs)
        self._highs = [s.units - s.width + 1 for s in self.specs]
        self._salts = [mix32((i * _GOLDEN + 0x7F4A7C15) & _M32) for i in range(len(self.specs))]
        self.host_steps = 0  # seeded draws made on the host path so far
        self.register_buffer("highs", torch.tensor(self._highs, dtype=torch.long), persistent=False)
        self.register_buffer("salts", torch.tensor(self._salts, dtype=torch.long), persistent=False)
        #: seeded draws made on the device path so far (a tensor, so CUDA-graph replays advance it)
        self.register_buffer("device_steps", torch.zeros((), dtype=torch.long), persistent=False)
        self._forced: tuple | None = None
        self.last_draws: tuple | None = None  # the draws of the latest training step

    def add_scale_buffer(self, name: str, values: Tensor) -> None:
        """Register a non-persistent per-channel tensor (moves with ``.to()``, not saved)."""
        self.register_buffer(name, values, persistent=False)

    def draw_state(self) -> dict[str, Any]:
        """Where the draws stand: enough to continue the same sequence after a restore.

        With ``seed=None`` the draws come from torch's global generator instead, which
        :func:`sliceout_fx.sampler_state` records beside this.
        """
        state: dict[str, Any] = {
            "specs": [(s.units, s.width, s.mode) for s in self.specs],
            "seeded": self._key is not None,
            "host_steps": self.host_steps,
            "device_steps": int(self.device_steps),
        }
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def accepts(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` came from a sampler drawing the same kind of slices as this one."""
        specs = [(s.units, s.width, s.mode) for s in self.specs]
        return [tuple(s) for s in state.get("specs", [])] == specs and state.get("seeded") == (
            self._key is not None
        )

    def load_draw_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`draw_state` (the model's ``state_dict`` is not involved)."""
        self.__dict__["host_steps"] = int(state["host_steps"])
        self.device_steps.fill_(int(state["device_steps"]))
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
        self.__dict__["last_draws"] = None

    def force(self, draws: Sequence[int | Tensor] | None) -> None:
        """Use these draws (one per group) instead of random ones; ``None`` to go back to random.

        For tests and debugging: two converted models forced to the same draws are comparable.
        """
        self._forced = None if draws is None else tuple(draws)

    def forward(self) -> tuple[int | Tensor, ...]:
        if self._forced is not None:
            draws = self._forced
        elif torch.compiler.is_compiling():  # dynamo traces the device path: no graph break
            draws = self._draw_on_device() if self._starts_only else self._draw_sets()
        elif self.last_draws is not None and _recomputing():
            # Activation checkpointing runs the forward again inside backward: it must see the
            # slices the first forward used (and the step counters must not move).
            draws = self.last_draws
        elif not self._starts_only:
            draws = self._draw_sets()
        elif self.capturable:
            draws = self._draw_on_device()
        else:
            draws = self._draw_on_host()
        self.__dict__["last_draws"] = draws  # not through nn.Module.__setattr__: a hot path
        return draws

    def last_starts(self) -> tuple | None:
        """The latest step's draws as Python ints (device-side starts are read back: a sync)."""
        if self.last_draws is None:
            return None
        return tuple(d.tolist() if isinstance(d, Tensor) else d for d in self.last_draws)

    def _draw_on_host(self) -> tuple[int, ...]:
        if self._key is None:
            randoms = torch.randint(0, 1 << 32, (len(self._highs),)).tolist()
        else:
            step = self._key ^ mix32(self.host_steps & _M32)
            randoms = [mix32(step ^ salt) for salt in self._salts]
            self.__dict__["host_steps"] += 1
        return tuple([(r * high) >> 32 for r, high in zip(randoms, self._highs)])  # noqa: B905

    def _draw_on_device(self) -> tuple[Tensor, ...]:
        if self._key is None:
            randoms = torch.randint(0, 1 << 32, self.highs.shape, device=self.highs.device)
        else:
            randoms = mix32((self._key ^ mix32(self.device_steps & _M32)) ^ self.salts)
            self.device_steps.add_(1)
        return ((randoms * self.highs) >> 32).unbind(0)

    @torch.compiler.disable
    def _draw_sets(self) -> tuple:
        """Controlled-dropout index sets and Patch SliceOut corners (host only)."""
        return tuple(self._draw(spec) for spec in self.specs)

    def _draw(self, spec: DrawSpec) -> Tensor | tuple[int, ...]:
        if spec.mode == "patch":
            return tuple(int(torch.randint(n, (), generator=self.generator)) for n in spec.starts)
        perm = torch.randperm(spec.units, generator=self.generator)
        return perm[: spec.width].sort().values

    def extra_repr(self) -> str:
        cuts = ", ".join(f"{s.width}/{s.units} ({s.mode})" for s in self.specs)
        return f"{cuts}, capturable={self.capturable}"
