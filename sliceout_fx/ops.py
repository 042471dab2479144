"""Runtime ops called by the rewritten training graph.

Every op takes its inputs, the *full* parameters of the layer it replaces and one :class:`Cut` per
sliced axis. A cut says which units of an axis are alive this step, and how:

* ``"slice"`` - SliceOut: ``index`` is an int start, parameters are narrowed (views, no copy) so the
  kernels run on smaller tensors and autograd saves smaller activations.
* ``"gather"`` - controlled dropout: ``index`` is a sorted index tensor and parameters are gathered
  (copies), the paper's baseline with the same FLOPs as slicing.
* ``"mask"`` - the reference: everything runs at full width and the complement of the slice is zeroed,
  so tests can compare the sliced graph against a plain dense computation with the same draws.

Keeping the mode inside the cut (instead of three sets of ops) means one rewrite serves all three
modes, and the mask reference exercises exactly the same graph positions as the sliced variant.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Cut",
    "make_cut",
    "take",
    "restrict",
    "normalise",
    "sliced_linear",
    "sliced_conv",
    "sliced_conv_module",
    "sliced_batch_norm",
]


class Cut(NamedTuple):
    """The live part of one axis for one training step."""

    index: int | Tensor  # start (slice/mask) or sorted channel indices (gather)
    width: int  # number of live channels on this axis
    size: int  # full number of channels on this axis
    mode: str  # "slice" | "gather" | "mask"


def make_cut(unit_index: int | Tensor, width: int, size: int, scale: int, mode: str) -> Cut:
    """Turn a group-level draw (in units) into a cut on an axis with ``scale`` channels per unit."""
    if mode == "gather":
        assert isinstance(unit_index, Tensor)
        if scale == 1:
            return Cut(unit_index, width, size, mode)
        offsets = torch.arange(scale, device=unit_index.device)
        return Cut((unit_index[:, None] * scale + offsets).flatten(), width, size, mode)
    return Cut(unit_index * scale, width, size, mode)


def take(t: Tensor | None, dim: int, cut: Cut | None) -> Tensor | None:
    """The live part of a parameter or buffer along ``dim`` (identity in mask mode)."""
    if t is None or cut is None or cut.mode == "mask":
        return t
    if cut.mode == "gather":
        return t.index_select(dim, cut.index.to(t.device))
    return t.narrow(dim, cut.index, cut.width)


def _mask(cut: Cut, like: Tensor, dim: int) -> Tensor:
    pos = torch.arange(cut.size, device=like.device)
    keep = (pos >= cut.index) & (pos < cut.index + cut.width)
    shape = [1] * like.dim()
    shape[dim] = cut.size
    return keep.to(like.dtype).view(shape)


def restrict(x: Tensor, cut: Cut, dim: int) -> Tensor:
    """Zero the complement of the cut in mask mode; a no-op for the narrow modes."""
    if cut.mode != "mask":
        return x
    return x * _mask(cut, x, dim)


def normalise(x: Tensor, cut: Cut, dim: int, inv_keep_prob: Tensor | None) -> Tensor:
    """Rescale live activations: flow (``size / width``) or per-unit ``1 / P(keep)``."""
    if inv_keep_prob is None:
        return x * (cut.size / cut.width)
    scale = take(inv_keep_prob, 0, cut)
    shape = [1] * x.dim()
    shape[dim] = scale.shape[0]
    return x * scale.to(x.dtype).view(shape)


def sliced_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, out_cut: Cut | None, in_cut: Cut | None
) -> Tensor:
    """``F.linear`` on the live rows (outputs) and columns (inputs) of the weight."""
    weight = take(take(weight, 0, out_cut), 1, in_cut)
    return F.linear(x, weight, take(bias, 0, out_cut))


def sliced_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...] | int,
    padding: tuple[int, ...] | int | str,
    dilation: tuple[int, ...] | int,
    groups: int,
    out_cut: Cut | None,
    in_cut: Cut | None,
) -> Tensor:
    """A 1d/2d/3d convolution on the live output and input channels.

    Grouped convolutions are sliced in whole groups (the dependency graph aligns both cuts to the
    group size), so only weight rows are taken and ``groups`` shrinks in proportion.
    """
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    weight = take(weight, 0, out_cut)
    if groups > 1:
        if out_cut is not None and out_cut.mode != "mask":
            groups = groups * out_cut.width // out_cut.size
    elif in_cut is not None and in_cut.mode != "mask":
        # Input-channel slices are strided; conv kernels want contiguous weights (a small copy).
        weight = take(weight, 1, in_cut).contiguous()
    return conv(x, weight, take(bias, 0, out_cut), stride, padding, dilation, groups)


def sliced_conv_module(
    x: Tensor, module: nn.modules.conv._ConvNd, out_cut: Cut | None, in_cut: Cut | None
) -> Tensor:
    """:func:`sliced_conv` with the hyper-parameters of a ``nn.ConvNd`` module."""
    if module.padding_mode != "zeros":
        pad = module._reversed_padding_repeated_twice
        x = F.pad(x, pad, mode=module.padding_mode)
        padding: tuple[int, ...] | int | str = 0
    else:
        padding = module.padding
    return sliced_conv(
        x, module.weight, module.bias, module.stride, padding, module.dilation, module.groups,
        out_cut, in_cut,
    )


def sliced_batch_norm(x: Tensor, module: nn.modules.batchnorm._BatchNorm, cut: Cut) -> Tensor:
    """Batch norm over the live channels only.

    Batch statistics come from the live channels and only their running statistics move: in slice
    mode the running buffers are narrowed views that ``F.batch_norm`` updates in place; gather and
    mask modes update a copy and write the live entries back.
    """
    bn = module
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    weight, bias = take(bn.weight, 0, cut), take(bn.bias, 0, cut)
    if bn.running_mean is None or cut.mode == "slice" or not bn.training:
        rm, rv = take(bn.running_mean, 0, cut), take(bn.running_var, 0, cut)
        return F.batch_norm(x, rm, rv, weight, bias, use_batch_stats, momentum, bn.eps)
    # gather / mask: run on copies of the running stats, then write back the live entries only.
    rm, rv = take(bn.running_mean, 0, cut).clone(), take(bn.running_var, 0, cut).clone()
    y = F.batch_norm(x, rm, rv, weight, bias, True, momentum, bn.eps)
    with torch.no_grad():
        if cut.mode == "gather":
            index = cut.index.to(rm.device)
            bn.running_mean.index_copy_(0, index, rm)
            bn.running_var.index_copy_(0, index, rv)
        else:
            live = slice(cut.index, cut.index + cut.width)
            bn.running_mean[live] = rm[live]
            bn.running_var[live] = rv[live]
    return y
