"""The policy knobs of a conversion, validated in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from torch import nn

from .errors import SliceOutConfigError
from .sampling import validate_rate

Normalisation = Literal["flow", "probabilistic"]
Placement = Literal["immediate", "delayed"]
Capture = Literal["auto", "fx", "blocks"]
Mode = Literal["slice", "gather", "mask"]
Scheme = Literal["channel", "patch"]
BatchNormStats = Literal["full_width", "sliced"]
SitePolicy = Union[Literal["auto", "dropout", "expand", "all"], Sequence[str]]  # noqa: UP007
Rate = Union[float, Mapping[str, float], None]  # noqa: UP007 (runtime alias, Python 3.10)

_CHOICES = {
    "normalisation": ("flow", "probabilistic"),
    "placement": ("immediate", "delayed"),
    "mode": ("slice", "gather", "mask"),
    "scheme": ("channel", "patch"),
    "bn_stats": ("full_width", "sliced"),
}


@dataclass(frozen=True)
class SliceOutConfig:
    """How to convert a model.

    Attributes:
        p: drop rate: one float for every site, a ``{site name: rate}`` mapping, or ``None`` to
            reuse each replaced dropout's own rate.
        normalisation: ``"flow"`` scales live units by ``n / w``; ``"probabilistic"`` by
            ``1 / P(keep unit j)`` (exact first moment, paper Appendix B).
        placement: ``"delayed"`` (default) scales just before the ops that consume the slice
            (after batch norm: a scale before a batch norm would be divided out in training
            and only distort its running statistics); ``"immediate"`` scales where the dropout
            was (or right after the slicing op). They differ only where a batch norm or a
            nonlinearity lies between a site and its readers.
        sites: ``"dropout"`` replaces existing dropouts, ``"expand"`` slices expand 1x1 convs,
            ``"all"`` slices every sliceable group, ``"auto"`` = dropout sites, else expand sites;
            or an explicit list of site names.
        mode: ``"slice"`` (SliceOut), ``"gather"`` (controlled dropout), ``"mask"`` (reference).
        scheme: ``"channel"`` slices units/channels; ``"patch"`` convolves a spatial window where
            each site's slice would end (Patch SliceOut, flow-normalised).
        seed: seeds the slice sampler's own generator (``None``: the global torch RNG).
        width_multiple: round slice widths (and starts) to this many channels, e.g. 8.
        leaf_modules: module types or qualified names to keep whole when tracing.
        capturable: draw slice starts on the model's device inside the step and slice by
            device-side offsets (no host sync, no Python RNG, static shapes), so that a whole
            training step compiles with ``fullgraph=True`` and can be captured in a CUDA graph
            that draws new slices at every replay (the name and meaning of ``torch.optim``'s
            flag). Costs gathered weight blocks instead of views; ``torch.compile`` takes this
            path by itself, even without the flag.
        bn_stats: ``"full_width"`` keeps the running statistics of every batch norm downstream
            of a slice equal to an average of the full-width network's batch statistics: sliced
            steps leave them alone and every ``bn_refresh_every``-th training call runs at full
            width to update them (see :mod:`sliceout_fx.norm_stats`; models without such a batch
            norm never take a full-width step). ``"sliced"`` updates the live channels' running
            statistics from the sliced tensors in every step (the paper's implementation; eval
            then needs :func:`~sliceout_fx.recalibrate_batch_norm`).
        bn_refresh_every: how often (in training calls) ``bn_stats="full_width"`` refreshes.
        rules: extra :class:`~sliceout_fx.rules.OpRule` objects for this conversion only; they
            take precedence over the registered rules for the targets they declare.
    """

    p: Rate = 0.5
    normalisation: Normalisation = "flow"
    placement: Placement = "delayed"
    sites: SitePolicy = "auto"
    mode: Mode = "slice"
    scheme: Scheme = "channel"
    seed: int | None = None
    width_multiple: int | None = None
    leaf_modules: Sequence[type[nn.Module] | str] = field(default_factory=tuple)
    capturable: bool = False
    bn_stats: BatchNormStats = "full_width"
    bn_refresh_every: int = 8
    rules: Sequence[Any] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise SliceOutConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.scheme == "patch" and (self.normalisation != "flow" or self.mode == "gather"):
            raise SliceOutConfigError(
                "scheme='patch' is flow-normalised and has no controlled-dropout form: use "
                "normalisation='flow' and mode='slice' or 'mask'"
            )
        if not isinstance(self.capturable, bool):
            raise SliceOutConfigError(f"capturable must be True or False, got {self.capturable!r}")
        if self.capturable and (self.scheme == "patch" or self.mode == "gather"):
            raise SliceOutConfigError(
                "capturable=True draws contiguous slices on the device; Patch SliceOut windows and "
                "controlled dropout's index sets are drawn on the host: use scheme='channel' and "
                "mode='slice' or 'mask', or capturable=False"
            )
        if isinstance(self.p, Mapping):
            for site, rate in self.p.items():
                validate_rate(rate, f"p[{site!r}]")
        elif self.p is not None:
            validate_rate(self.p)
        if isinstance(self.sites, str) and self.sites not in ("auto", "dropout", "expand", "all"):
            raise SliceOutConfigError(
                f"sites must be 'auto', 'dropout', 'expand', 'all' or a list of site names, got "
                f"{self.sites!r}"
            )
        if self.width_multiple is not None and (
            isinstance(self.width_multiple, bool)
            or not isinstance(self.width_multiple, int)
            or self.width_multiple < 1
        ):
            raise SliceOutConfigError(
                f"width_multiple must be a positive int, got {self.width_multiple!r}"
            )
        if (
            isinstance(self.bn_refresh_every, bool)
            or not isinstance(self.bn_refresh_every, int)
            or self.bn_refresh_every < 2
        ):
            raise SliceOutConfigError(
                f"bn_refresh_every must be an int >= 2 (one full-width call in that many), got "
                f"{self.bn_refresh_every!r}; use full_width() to train at full width throughout"
            )
        from .rules import OpRule

        single = isinstance(self.rules, (str, OpRule)) or not hasattr(self.rules, "__iter__")
        if single or any(not isinstance(r, OpRule) or not r.targets for r in self.rules):
            raise SliceOutConfigError(
                "rules must be a list of OpRule objects, each declaring its `targets` (module "
                f"classes, functions, ATen ops or 'method:<name>'); got {self.rules!r}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise SliceOutConfigError(f"seed must be an int or None, got {self.seed!r}")

    def rate_for(self, site: str, own_rate: float | None) -> float:
        """The drop rate of one site under this config."""
        if isinstance(self.p, Mapping):
            if site in self.p:
                return validate_rate(self.p[site], f"p[{site!r}]")
            if own_rate is None:
                raise SliceOutConfigError(
                    f"no rate for site {site!r}: add it to the p mapping (sites: {list(self.p)})"
                )
            return own_rate
        if self.p is None:
            if own_rate is None:
                raise SliceOutConfigError(
                    f"p=None reuses dropout rates, but site {site!r} is not a dropout; give p"
                )
            return own_rate
        return float(self.p)
