"""Runtime ops called by the rewritten training graph.

Every op takes its inputs, the *full* parameters of the layer it replaces and one :class:`Cut` per
sliced axis. A cut says which units of an axis are alive this step, and how:

* ``"slice"`` - SliceOut: ``index`` is an int start, parameters are narrowed (views, no copy) so the
  kernels run on smaller tensors and autograd saves smaller activations.
* ``"gather"`` - controlled dropout: ``index`` is a sorted index tensor and parameters are gathered
  (copies), the paper's baseline with the same FLOPs as slicing.
* ``"offset"`` - SliceOut from a start held in a device tensor (``capturable=True`` and
  ``torch.compile``): ``index`` is the contiguous index vector ``start + arange(width)``, gathered
  like controlled dropout's, because a view cannot be narrowed at a device-side offset without a
  host sync. Linear layers regather their block in backward instead of saving the copy.
* ``"mask"`` - the reference: everything runs at full width and the complement of the slice is
  zeroed, so tests can compare the sliced graph against a plain dense computation with the same
  draws.

An axis of ``k * size`` channels holds ``k`` *periods* of the cut (heads folded into the batch
axis, ``(B*H, T, d)``): its live channels are the cut's in every period, and :func:`take`,
:func:`restrict`, :func:`normalise` and :func:`widen` treat it period by period.

Keeping the mode inside the cut (instead of three sets of ops) means one rewrite serves all three
modes, and the mask reference exercises exactly the same graph positions as the sliced variant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Cut",
    "make_cut",
    "scale_cut",
    "take",
    "restrict",
    "normalise",
    "live_size",
    "live_extent",
    "live_parts",
    "sliced_linear",
    "sliced_fused_linear",
    "sliced_conv",
    "sliced_conv_module",
    "sliced_batch_norm",
]


#: Cut modes whose ``index`` is a tensor of channel indices (gathered, not viewed).
INDEXED = ("gather", "offset")


class Cut(NamedTuple):
    """The live part of one axis for one training step."""

    index: int | Tensor  # start (slice/mask) or sorted channel indices (gather)
    width: int  # number of live channels on this axis
    size: int  # full number of channels on this axis
    mode: str  # "slice" | "gather" | "offset" | "mask"


def make_cut(unit_index: int | Tensor, width: int, size: int, scale: int, mode: str) -> Cut:
    """Turn a group-level draw (in units) into a cut on an axis with ``scale`` channels per unit.

    A start held in a device tensor (the capturable and compiled path) cannot narrow a view
    without a host sync, so its live channels become a contiguous index vector, gathered like
    controlled dropout's index set: static shapes, no ``.item()``.
    """
    if mode == "gather":
        assert isinstance(unit_index, Tensor)
        if scale == 1:
            return Cut(unit_index, width, size, mode)
        offsets = torch.arange(scale, device=unit_index.device)
        return Cut((unit_index[:, None] * scale + offsets).flatten(), width, size, mode)
    if mode == "slice" and isinstance(unit_index, Tensor):
        index = unit_index * scale + torch.arange(width, device=unit_index.device)
        return Cut(index, width, size, "offset")
    return Cut(unit_index * scale, width, size, mode)


def scale_cut(cut: Cut, factor: int) -> Cut:
    """The same cut on an axis with ``factor`` channels per channel of ``cut``'s axis: heads to
    their features (Falcon takes its query heads from a fused projection's rows)."""
    if cut.mode in INDEXED:
        offsets = torch.arange(factor, device=cut.index.device)
        index = (cut.index[:, None] * factor + offsets).flatten()
        return Cut(index, cut.width * factor, cut.size * factor, cut.mode)
    return Cut(cut.index * factor, cut.width * factor, cut.size * factor, cut.mode)


def take(t: Tensor | None, dim: int, cut: Cut | None) -> Tensor | None:
    """The live part of a parameter or buffer along ``dim`` (identity in mask mode).

    An operand with several periods of the cut along ``dim`` (BLOOM's ALiBi bias, ``(B*H, 1,
    T)``) gives the live part of every period.
    """
    if t is not None and cut is not None and cut.mode != "mask" and t.shape[dim] != cut.size:
        return _per_period(t, dim, cut.size, lambda x, d: take_block(x, ((d, cut),)))
    return take_block(t, ((dim, cut),))


def _per_period(x: Tensor, dim: int, period: int, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``fn(view, d)`` on ``x`` viewed with ``dim`` split into ``(periods, period)``, where ``d``
    is the axis within a period, merged back afterwards."""
    dim %= x.dim()
    if x.shape[dim] % period:
        raise ValueError(
            f"axis {dim} of a {tuple(x.shape)} tensor is not a whole number of periods of "
            f"{period} channels, the size its cut was drawn for"
        )
    return fn(x.unflatten(dim, (-1, period)), dim + 1).flatten(dim, dim + 1)


def take_block(t: Tensor | None, cuts: tuple[tuple[int, Cut | None], ...]) -> Tensor | None:
    """The live block of ``t`` under several ``(dim, cut)`` pairs at once.

    Narrowing a parameter twice through autograd builds two backward nodes, each allocating a
    full-size zero gradient; :class:`_LiveBlock` narrows all dims in one node, so backward writes
    the block's gradient once into a single zero tensor of the parameter's shape.
    """
    cuts = tuple((d, c) for d, c in cuts if c is not None and c.mode != "mask")
    if t is None or not cuts:
        return t
    if cuts[0][1].mode in INDEXED:
        for dim, cut in cuts:
            t = t.index_select(dim, cut.index.to(t.device))
        return t
    region = tuple((dim, cut.index, cut.width) for dim, cut in cuts)
    if t.requires_grad and len(region) > 1:
        return _LiveBlock.apply(t, region)
    return _narrow(t, region)


def _narrow(t: Tensor, region: tuple[tuple[int, int, int], ...]) -> Tensor:
    for dim, start, width in region:
        t = t.narrow(dim, start, width)
    return t


class _LiveBlock(torch.autograd.Function):
    """A multi-dim narrow with a single backward node (see :func:`take_block`)."""

    @staticmethod
    def forward(ctx, t: Tensor, region: tuple[tuple[int, int, int], ...]) -> Tensor:
        ctx.shape, ctx.region = t.shape, region
        return _narrow(t, region)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        full = grad.new_zeros(ctx.shape)
        _narrow(full, ctx.region).copy_(grad)
        return full, None


def _keep(cut: Cut, like: Tensor, dim: int) -> Tensor:
    """Where the cut's live channels are on axis ``dim`` of ``like``, broadcastable against it.

    ``dim`` may count from the end: the training graph then accepts inputs of another rank than
    the example's (a ``(B, T, F)`` batch through a model converted on ``(B, F)``).
    """
    pos = torch.arange(cut.size, device=like.device)
    keep = (pos >= cut.index) & (pos < cut.index + cut.width)
    shape = [1] * like.dim()
    shape[dim] = like.shape[dim]
    if like.shape[dim] != cut.size:  # one copy per period
        keep = keep.repeat(like.shape[dim] // cut.size)
    return keep.view(shape)


def restrict(x: Tensor, cut: Cut, dim: int) -> Tensor:
    """Zero the complement of the cut in mask mode; a no-op for the narrow modes.

    A select, not a multiply by a 0/1 mask: a dropped channel may hold ``inf`` or ``NaN`` at full
    width (per-head RMSNorm: the masked ``mean(x^2) + eps`` is zeroed, ``rsqrt`` gives ``inf``, and
    ``0 * inf`` is ``NaN``). ``where`` outputs 0 there whatever ``x`` holds, and its backward
    selects 0 for ``x``'s gradient whatever the incoming gradient holds, so such values never
    leave the dropped channels, forward or backward, as they never exist in slice mode.
    """
    if cut.mode != "mask":
        return x
    return torch.where(_keep(cut, x, dim), x, 0)


def widen(x: Tensor, cut: Cut, dim: int) -> Tensor:
    """``x`` back at full width along ``dim``: its live channels in place, zeros elsewhere.

    What a graph output of a sliced group returns (the attention weights a layer hands back next
    to its hidden states): the shape the caller expects, with dropped heads zero, as dropout
    zeroes what it drops. The identity in mask mode, where ``x`` is already full width.
    """
    if cut.mode == "mask":
        return x
    if x.shape[dim] != cut.width:
        return _per_period(x, dim, cut.width, lambda v, d: widen(v, cut, d))
    shape = list(x.shape)
    shape[dim] = cut.size
    full = x.new_zeros(shape)
    if cut.mode in INDEXED:
        return full.index_copy(dim, cut.index.to(x.device), x)
    return full.slice_scatter(x, dim, cut.index, cut.index + cut.width)


def normalise(x: Tensor, cut: Cut, dim: int, inv_keep_prob: Tensor | None) -> Tensor:
    """Rescale live activations: flow (``size / width``) or per-unit ``1 / P(keep)``.

    ``dim`` may count from the end (see :func:`_keep`).
    """
    if inv_keep_prob is None:
        return x * (cut.size / cut.width)
    scale = take(inv_keep_prob, 0, cut)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    if x.shape[dim] != scale.shape[0]:  # one copy per period
        scale = scale.repeat(x.shape[dim] // scale.shape[0])
    return x * scale.to(x.dtype).view(shape)


def sliced_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_cut: Cut | None,
    in_cut: Cut | None,
    in_scale: float = 1.0,
    layout: str = "out_in",
) -> Tensor:
    """``F.linear(x * in_scale, W)`` on the live rows (outputs) and columns (inputs) of ``W``.

    ``in_scale`` is a flow normalisation folded into the matmul (``addmm(alpha=...)``), so the
    scaled input is never materialised nor saved for backward. In slice mode the weight block is
    one strided view (see :data:`NATIVE_BLOCK_LIMIT` for which backward it gets).
    ``layout="in_out"`` reads a weight stored ``(in, out)`` (HuggingFace's ``Conv1D``) as it is.
    """
    cut = out_cut if out_cut is not None else in_cut
    if cut is not None and cut.mode == "offset":
        out_dim = 0 if layout == "out_in" else 1
        index = (
            None if out_cut is None else out_cut.index,
            None if in_cut is None else in_cut.index,
        )
        return _OffsetLinear.apply(x, weight, bias, *index, in_scale, out_dim)
    if cut is None or cut.mode != "slice":
        return _gathered_or_masked_linear(x, weight, bias, out_cut, in_cut, in_scale, layout)
    out_dim = 0 if layout == "out_in" else 1
    o0, ow = (0, weight.shape[out_dim]) if out_cut is None else (out_cut.index, out_cut.width)
    i0, iw = (0, weight.shape[1 - out_dim]) if in_cut is None else (in_cut.index, in_cut.width)
    if ow * iw >= NATIVE_BLOCK_LIMIT:
        return _SlicedLinear.apply(x, weight, bias, o0, ow, i0, iw, in_scale, layout)
    # Native autograd: one view node for the weight block, one for the bias, backward in C++. A
    # block cut on one axis is a narrow (whose backward is one op), on two one as_strided.
    if in_cut is None or out_cut is None:
        dim, start, width = (out_dim, o0, ow) if in_cut is None else (1 - out_dim, i0, iw)
        w = weight.narrow(dim, start, width)
        wt = w.t() if layout == "out_in" else w
    else:
        wt = _live_block(weight, o0, ow, i0, iw, layout, as_in_out=True)
    b = bias if bias is None or out_cut is None else bias.narrow(0, o0, ow)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = _scaled_mm(x2, wt, b, in_scale)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], ow)


def _scaled_mm(x2: Tensor, wt: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """``scale * (x2 @ wt) + bias`` as one ``addmm`` (or one ``mm``): the scale costs no op."""
    if bias is not None:
        return torch.addmm(bias, x2, wt, alpha=scale)
    y = torch.mm(x2, wt)
    return y if scale == 1.0 else y.mul_(scale)


#: Weight blocks smaller than this many elements are sliced with native autograd views: at such
#: sizes a training step is bound by host work per op, and the C++ backward of a view costs less
#: than the Python backward of :class:`_SlicedLinear`. Larger blocks take :class:`_SlicedLinear`,
#: which spares a block-sized gradient copy and the ``alpha`` multiplies, memory traffic that
#: dominates there.
NATIVE_BLOCK_LIMIT = 1 << 16


def _gather_block(
    weight: Tensor,
    out_index: Tensor | None,
    in_index: Tensor | None,
    out_dim: int,
    regather: bool = False,
) -> Tensor:
    """The live block of a linear weight, as an ``(in, out)`` matrix, gathered by index."""
    rows, cols = (out_index, in_index) if out_dim == 0 else (in_index, out_index)
    if cols is None:
        w = weight.index_select(0, rows)  # whole rows: a memcpy each
    elif not torch.compiler.is_compiling():
        windows, at = _windows(weight, rows, cols)
        w = windows[at].squeeze(0 if rows is not None else 1)
    elif regather:
        # The backward's copy indexes with another op than the forward's: traced by
        # torch.compile, two identical gathers would be merged into one whose result is *saved*
        # for backward, a copy of the live weights kept as activation memory.
        w = weight[:, cols] if rows is None else weight[rows[:, None], cols]
    else:
        w = weight.index_select(1, cols) if rows is None else weight[rows][:, cols]
    return w.t() if out_dim == 0 else w


def _windows(t: Tensor, rows: Tensor | None, cols: Tensor) -> tuple[Tensor, tuple]:
    """``t.unfold`` into every window of the block's size, and the index of the block's window.

    The index vectors here are always contiguous, so a block is one window: reading it with one
    advanced index of one-element index tensors (no host sync) copies row by row, several times
    faster than ``index_select`` along columns, which gathers element by element; writing through
    the same index is a fast scatter. Under ``torch.compile`` the plain index ops are used
    instead (the unfolded view overlaps itself, which functionalization does not rewrite).
    """
    if rows is None:
        return t.unfold(1, cols.shape[0], 1), (slice(None), cols[:1])
    windows = t.unfold(0, rows.shape[0], 1).unfold(1, cols.shape[0], 1)
    return windows, (rows[:1], cols[:1])


def _scatter_block(
    block: Tensor, rows: Tensor | None, cols: Tensor | None, shape: torch.Size
) -> Tensor:
    """A zero tensor of ``shape`` with ``block`` at ``(rows, cols)``."""
    grad = block.new_zeros(shape)
    if cols is None:
        return grad.index_copy_(0, rows, block)  # whole rows
    if not torch.compiler.is_compiling():
        windows, at = _windows(grad, rows, cols)
        windows[at] = block.unsqueeze(0) if rows is not None else block.unsqueeze(1)
        return grad
    if rows is None:
        return grad.index_copy_(1, cols, block)
    strip = block.new_zeros(block.shape[0], shape[1]).index_copy_(1, cols, block)
    return grad.index_copy_(0, rows, strip)


class _OffsetLinear(torch.autograd.Function):
    """A linear layer on a block of its weight chosen by index vectors (device-side offsets).

    Autograd's own path would save the gathered block for backward, a copy of the live weights
    counted as activation memory (a Wide layer's block can outweigh its activations). This
    function saves the parameter and the indices and gathers the block again in backward; the
    gradients are scattered into zero tensors of the parameters' shapes. Compiles (fullgraph) and
    replays in CUDA graphs: no host sync, static shapes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, out_index, in_index, in_scale, out_dim):
        x_dtype = x.dtype
        wt = _gather_block(weight, out_index, in_index, out_dim)
        b = bias if bias is None or out_index is None else bias.index_select(0, out_index)
        dtype = _autocast_dtype(x)
        if dtype is not None:
            wt, x = wt.to(dtype), x.to(dtype)
            b = None if b is None else b.to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = _scaled_mm(x2, wt, b, in_scale)
        ctx.save_for_backward(x2, weight, out_index, in_index)
        ctx.meta = (in_scale, out_dim, x.shape, x_dtype, bias is not None, wt.dtype)
        if x.dim() == 2:
            return y
        # Not a view of `y`: autograd would then forbid in-place ops on the output.
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], wt.shape[1]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x2, weight, out_index, in_index = ctx.saved_tensors
        in_scale, out_dim, x_shape, x_dtype, has_bias, dtype = ctx.meta
        wt = _gather_block(weight, out_index, in_index, out_dim, torch.compiler.is_compiling())
        wt = wt.to(dtype)
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, wt.t()).mul_(in_scale).view(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # (out, in) or (in, out) as the weight is stored
            a, b = (g2.t(), x2) if out_dim == 0 else (x2.t(), g2)
            block = torch.mm(a, b).mul_(in_scale).to(weight.dtype)
            rows, cols = (out_index, in_index) if out_dim == 0 else (in_index, out_index)
            grad_w = _scatter_block(block, rows, cols, weight.shape)
        if has_bias and ctx.needs_input_grad[2]:
            summed = g2.sum(0).to(weight.dtype)
            if out_index is None:
                grad_b = summed
            else:
                grad_b = summed.new_zeros(weight.shape[out_dim]).index_copy_(0, out_index, summed)
        return grad_x, grad_w, grad_b, None, None, None, None


def _gathered_or_masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_cut: Cut | None,
    in_cut: Cut | None,
    in_scale: float,
    layout: str,
) -> Tensor:
    """Gather (controlled dropout, device-side starts) and mask modes of :func:`sliced_linear`."""
    if in_scale != 1.0:
        x = x * in_scale
    out_dim, in_dim = (0, 1) if layout == "out_in" else (1, 0)
    weight = take_block(weight, ((out_dim, out_cut), (in_dim, in_cut)))
    if layout == "in_out":
        weight = weight.t()
    return F.linear(x, weight, take(bias, 0, out_cut))


def sliced_fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    parts: int,
    out_cut: Cut,
    in_cut: Cut | None,
    layout: str = "out_in",
) -> Tensor:
    """A fused projection of ``parts`` equal outputs (GPT-2's Q|K|V), each cut by ``out_cut``.

    Returns the live features of every part, concatenated: ``parts * live`` features. The weight
    is viewed as ``(parts, part, in)`` and narrowed on the middle axis, so one matmul computes all
    parts and backward fills one zero gradient of the parameter's shape.
    """
    if out_cut.mode == "mask":
        return sliced_linear(x, weight, bias, None, in_cut, layout=layout)
    if out_cut.mode == "slice" and in_cut is None and weight.requires_grad:
        cut = (out_cut.index, out_cut.width)
        return _SlicedFusedLinear.apply(x, weight, bias, parts, *cut, layout)
    out_dim = 0 if layout == "out_in" else 1
    if in_cut is not None:
        weight = take(weight, 1 - out_dim, in_cut)
    w = weight.unflatten(out_dim, (parts, -1))
    b = None if bias is None else bias.unflatten(0, (parts, -1))
    if out_cut.mode in INDEXED:
        w = w.index_select(out_dim + 1, out_cut.index.to(w.device))
        b = None if b is None else b.index_select(1, out_cut.index.to(b.device))
    else:
        w = w.narrow(out_dim + 1, out_cut.index, out_cut.width)
        b = None if b is None else b.narrow(1, out_cut.index, out_cut.width)
    w = w.flatten(out_dim, out_dim + 1)
    return F.linear(x, w if layout == "out_in" else w.t(), None if b is None else b.flatten())


class _SlicedFusedLinear(torch.autograd.Function):
    """:func:`sliced_fused_linear` in slice mode, saving the parameter, not the gathered rows.

    The live rows of the parts are not contiguous, so the forward copies them into one matrix; the
    copy is rebuilt in backward instead of being kept (it would count as activation memory), and
    the weight gradient is written into one zero tensor of the parameter's shape. Small weights
    (below :data:`NATIVE_BLOCK_LIMIT`) and every bias are copied with one ``index_select`` on a
    cached index vector and written back with one ``index_copy_``: one op each where the strided
    views take four, at sizes where a step is bound by ops dispatched; large weights keep the
    views, whose copies are plain memcpys.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, parts, start, width, layout):
        dtype = _compute_dtype(x)  # honour autocast explicitly, as _SlicedLinear does
        out_dim = 0 if layout == "out_in" else 1
        index = _fused_index(weight, parts, start, width, out_dim)
        # the weight by index only while small; the bias always (see the class docstring)
        w_index = index if weight.numel() < NATIVE_BLOCK_LIMIT else None
        w = _fused_rows(weight, parts, start, width, out_dim, w_index).to(dtype)
        xc = x.to(dtype)
        x2 = xc if xc.dim() == 2 else xc.reshape(-1, x.shape[-1])
        wt = w.t() if layout == "out_in" else w
        b = None if bias is None else _fused_bias(bias, parts, start, width, index).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if x.dim() == 2:
                y = torch.mm(x2, wt) if b is None else torch.addmm(b, x2, wt)
            else:
                y = x2.new_empty(*x.shape[:-1], wt.shape[1])  # not a view: see _SlicedLinear
                if b is None:
                    torch.mm(x2, wt, out=y.view(-1, wt.shape[1]))
                else:
                    torch.addmm(b, x2, wt, out=y.view(-1, wt.shape[1]))
        ctx.save_for_backward(xc, weight)
        ctx.meta = (parts, start, width, layout, bias is not None, x.dtype)
        ctx.index = (index, w_index)  # constants of the draw, not saved activations
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        parts, start, width, layout, has_bias, x_dtype = ctx.meta
        index, w_index = ctx.index
        out_dim = 0 if layout == "out_in" else 1
        flat = x.dim() == 2
        g2 = (grad_y if flat else grad_y.reshape(-1, grad_y.shape[-1])).to(x.dtype)
        x2 = x if flat else x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = _fused_rows(weight, parts, start, width, out_dim, w_index).to(x.dtype)
            grad_x = torch.mm(g2, w if layout == "out_in" else w.t())
            grad_x = (grad_x if flat else grad_x.view(*x.shape)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            block = torch.mm(g2.t(), x2) if layout == "out_in" else torch.mm(x2.t(), g2)
            grad_w = _fused_scatter(
                block, weight.shape, weight.dtype, parts, start, width, out_dim, w_index
            )
        if has_bias and ctx.needs_input_grad[2]:
            shape, dtype = (weight.shape[out_dim],), weight.dtype  # the bias's
            grad_b = _fused_scatter(g2.sum(0), shape, dtype, parts, start, width, 0, index)
        return grad_x, grad_w, grad_b, None, None, None, None


@functools.lru_cache(maxsize=4096)
def _cached_fused_index(
    parts: int, part: int, start: int, width: int, device: torch.device
) -> Tensor:
    """``[k * part + start + j for k < parts, j < width]`` on ``device`` (host-side cache)."""
    rows = torch.arange(parts).mul_(part).add_(start)[:, None] + torch.arange(width)
    return rows.flatten().to(device)


def _fused_index(weight: Tensor, parts: int, start: int, width: int, out_dim: int) -> Tensor | None:
    """The positions of every part's live outputs on the fused axis, cached per draw.

    A layer sees at most ``part - width + 1`` different starts, so the cache holds a few small
    vectors per layer shape. ``None`` under ``torch.compile`` (which traces the views instead).
    """
    if torch.compiler.is_compiling():
        return None
    part = weight.shape[out_dim] // parts
    return _cached_fused_index(parts, part, start, width, weight.device)


def _fused_rows(
    weight: Tensor, parts: int, start: int, width: int, out_dim: int, index: Tensor | None = None
) -> Tensor:
    """The live outputs of every part of a fused weight, as one contiguous matrix (gathered by
    ``index`` if given, else copied through views)."""
    if index is not None:
        return weight.index_select(out_dim, index)
    w = weight.unflatten(out_dim, (parts, -1)).narrow(out_dim + 1, start, width)
    return w.flatten(out_dim, out_dim + 1)


def _fused_bias(bias: Tensor, parts: int, start: int, width: int, index: Tensor | None) -> Tensor:
    """The live entries of every part of a fused bias, as one vector."""
    if index is not None:
        return bias.index_select(0, index)
    return bias.unflatten(0, (parts, -1))[:, start : start + width].flatten()


def _fused_scatter(
    block: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    parts: int,
    start: int,
    width: int,
    dim: int,
    index: Tensor | None,
) -> Tensor:
    """A zero gradient of ``shape`` holding ``block`` at the live outputs of every part along
    ``dim`` (:func:`_fused_rows` backwards): by ``index`` if given, else through views."""
    grad = block.new_zeros(shape, dtype=dtype)
    if index is not None:
        return grad.index_copy_(dim, index, block.to(grad.dtype))
    live = grad.unflatten(dim, (parts, -1)).narrow(dim + 1, start, width)
    live.copy_(block.unflatten(dim, (parts, width)))
    return grad


def live_size(cut: Cut) -> int:
    """The size a cut axis has in the rewritten graph (its full size in mask mode)."""
    return cut.size if cut.mode == "mask" else cut.width


def live_extent(full: int, cut: Cut) -> int:
    """The live size of an axis of ``full`` channels that holds whole periods of ``cut`` (a
    shape argument of a view: ``B * H`` heads folded into the batch keep ``B * width``)."""
    return full if cut.mode == "mask" else full // cut.size * cut.width


def live_parts(fused: Tensor, parts: int, cut: Cut) -> tuple[Tensor, ...]:
    """All live parts of :func:`sliced_fused_linear`'s output, in one ``split``."""
    return fused.split(live_size(cut), dim=-1)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run ``x``'s device in, or ``None`` when it is off.

    The meta device has no autocast at all (asking raises), and ``None`` is the answer there.
    """
    device = x.device.type
    if device == "meta" or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return _autocast_dtype(x) or x.dtype


def _live_block(
    weight: Tensor, o0: int, ow: int, i0: int, iw: int, layout: str, *, as_in_out: bool
) -> Tensor:
    """The live block of a linear weight as one ``as_strided`` view.

    One op instead of a narrow per dimension plus a transpose: at small sizes a training step is
    bound by the number of ops dispatched, not by their arithmetic. ``as_in_out`` gives the block
    as an ``(in, out)`` view whatever the storage layout (what ``addmm(x, .)`` multiplies by);
    otherwise it keeps the weight's own layout (what a gradient block is written into).
    """
    s0, s1 = weight.stride()
    if layout == "out_in":
        offset, size, stride = o0 * s0 + i0 * s1, (ow, iw), (s0, s1)
    else:
        offset, size, stride = i0 * s0 + o0 * s1, (iw, ow), (s0, s1)
    if as_in_out and layout == "out_in":
        size, stride = size[::-1], stride[::-1]
    return weight.as_strided(size, stride, weight.storage_offset() + offset)


class _SlicedLinear(torch.autograd.Function):
    """A linear layer on a block of its weight, with the fewest ops forward and backward.

    Forward is one ``addmm`` (bias and input scale ride on it) over a strided view of the block.
    Backward writes the weight gradient with ``addmm(out=block)`` straight into its block of a
    zero tensor of the parameter's shape (autograd's own path would make a block-sized gradient,
    then copy it into a full-size zero tensor once per narrowed dimension), and the bias gradient
    with ``sum(out=block)``. Autocast is honoured by casting explicitly, as the autocast-wrapped
    ``F.linear`` would. The output is never a view (in-place activations may follow).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, o0, ow, i0, iw, in_scale, layout):
        wt = _live_block(weight, o0, ow, i0, iw, layout, as_in_out=True)
        b = None if bias is None else bias.narrow(0, o0, ow)
        xc = x
        dtype = _autocast_dtype(x)
        if dtype is not None:
            # Cast as the autocast-wrapped F.linear would; the ops below then run as cast.
            wt, xc = wt.to(dtype), x.to(dtype)
            b = None if b is None else b.to(dtype)
        elif x.dtype != weight.dtype:
            raise RuntimeError(
                f"sliced linear: input is {x.dtype} but the weight is {weight.dtype} "
                "(cast one of them, as F.linear requires)"
            )
        x2 = xc if xc.dim() == 2 else xc.reshape(-1, xc.shape[-1])
        y = _scaled_mm(x2, wt, b, in_scale)
        ctx.save_for_backward(x2, wt)
        bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.meta = (weight.shape, weight.dtype, bias_meta, o0, ow, i0, iw, in_scale, layout)
        ctx.meta += (x.shape, x.dtype)
        if x.dim() != 2:
            # Not a view of `y`: autograd would then forbid in-place ops on the output.
            y = torch.ops.aten._unsafe_view(y, (*x.shape[:-1], ow))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x2, wt = ctx.saved_tensors
        w_shape, w_dtype, bias_meta, o0, ow, i0, iw, in_scale, layout, x_shape, x_dtype = ctx.meta
        g2 = grad_y if grad_y.dtype == wt.dtype else grad_y.to(wt.dtype)
        if g2.dim() != 2:
            g2 = g2.reshape(-1, ow)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if in_scale != 1.0:  # beta=0: the first argument only gives the shape
                grad_x = torch.addmm(x2, g2, wt.t(), beta=0, alpha=in_scale)
            else:
                grad_x = torch.mm(g2, wt.t())
            if len(x_shape) != 2:
                grad_x = grad_x.view(x_shape)
            if grad_x.dtype != x_dtype:
                grad_x = grad_x.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(w_shape, dtype=w_dtype, device=g2.device)
            block = _live_block(grad_w, o0, ow, i0, iw, layout, as_in_out=False)
            a, b = (g2.t(), x2) if layout == "out_in" else (x2.t(), g2)
            if g2.dtype == w_dtype and not torch.compiler.is_compiling():
                torch.addmm(block, a, b, beta=0, alpha=in_scale, out=block)
            else:
                block.copy_(torch.mm(a, b).mul_(in_scale))
        if bias_meta is not None and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(bias_meta[0], dtype=bias_meta[1], device=g2.device)
            live = grad_b.narrow(0, o0, ow)
            if g2.dtype == bias_meta[1]:
                torch.sum(g2, 0, out=live)
            else:
                live.copy_(g2.sum(0))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


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
    in_scale: float = 1.0,
    in_scale_per_channel: Tensor | None = None,
) -> Tensor:
    """A 1d/2d/3d convolution on the live output and input channels.

    Grouped convolutions are sliced in whole groups (the dependency graph aligns both cuts to the
    group size), so only weight rows are taken and ``groups`` shrinks in proportion.
    ``in_scale`` / ``in_scale_per_channel`` (full-size, cut here) are a normalisation of the input
    folded into the conv instead of a scaled copy of the input, which would be saved for backward:
    into the copy of the weight block, or - where that copy would outweigh the input and the
    block is read as a view - a flow scale multiplies the output (the conv is linear in its
    input).
    """
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    if groups > 1:
        # Whole groups: the rows of the kept groups, each still seeing all its input channels.
        weight = take(weight, 0, out_cut)
        if out_cut is not None and out_cut.mode != "mask":
            groups = groups * out_cut.width // out_cut.size
        # A normalisation folded into a grouped conv (a slice that a depthwise conv reads first):
        # weight row o of group g reads input channel g * per_group + l at column l.
        if in_scale_per_channel is not None:
            scale = take(in_scale_per_channel, 0, in_cut).to(weight.dtype)
            scale = scale.view(groups, weight.shape[1]).repeat_interleave(
                weight.shape[0] // groups, 0
            )
            weight = weight * scale.view(*scale.shape, *([1] * (weight.dim() - 2)))
        elif in_scale != 1.0:
            weight = weight * in_scale
    else:
        # Autograd saves the weight a conv reads, so a copy of the live block (scaled, or made
        # contiguous) is kept until backward. Where the block is larger than the conv's input -
        # the late layers of a small input - that copy outweighs the activations (resnet18 at
        # 32x32 saved 5.6x the original's bytes): the block is then read as it is (a view in
        # slice mode; the kernel copes with its strides) and a flow scale rides on the output.
        # Where the block is the smaller (1x1 convs of large maps), the copy is cheaper than two
        # more passes over the output. Every mode decides alike, so they compute alike.
        large = _block_numel(weight, out_cut, in_cut) > x.numel()
        weight = take_block(weight, ((0, out_cut), (1, in_cut)))
        if in_scale_per_channel is not None:
            # A per-channel scale has to be on the weight block: a copy, saved for backward.
            scale = take(in_scale_per_channel, 0, in_cut).to(weight.dtype)
            weight = weight * scale.view(1, -1, *([1] * (weight.dim() - 2)))
        elif large and in_scale != 1.0:
            out = conv(x, weight, None, stride, padding, dilation, groups).mul_(in_scale)
            bias = take(bias, 0, out_cut)
            return out if bias is None else out + bias.view(-1, *([1] * (out.dim() - 2)))
        elif in_scale != 1.0:
            weight = weight * in_scale
        elif in_cut is not None and in_cut.mode != "mask" and not large:
            # Input-channel slices are strided; conv kernels want contiguous weights (a small copy).
            weight = weight.contiguous()
    return conv(x, weight, take(bias, 0, out_cut), stride, padding, dilation, groups)


def _block_numel(weight: Tensor, out_cut: Cut | None, in_cut: Cut | None) -> int:
    """Elements of the live block of a conv weight under the two cuts."""
    rows = weight.shape[0] if out_cut is None else out_cut.width
    columns = weight.shape[1] if in_cut is None else in_cut.width
    return rows * columns * weight[0, 0].numel()


def sliced_conv_module(
    x: Tensor,
    module: nn.modules.conv._ConvNd,
    out_cut: Cut | None,
    in_cut: Cut | None,
    in_scale: float = 1.0,
    in_scale_per_channel: Tensor | None = None,
) -> Tensor:
    """:func:`sliced_conv` with the hyper-parameters of a ``nn.ConvNd`` module."""
    if module.padding_mode != "zeros":
        pad = module._reversed_padding_repeated_twice
        x = F.pad(x, pad, mode=module.padding_mode)
        padding: tuple[int, ...] | int | str = 0
    else:
        padding = module.padding
    return sliced_conv(
        x,
        module.weight,
        module.bias,
        module.stride,
        padding,
        module.dilation,
        module.groups,
        out_cut,
        in_cut,
        in_scale,
        in_scale_per_channel,
    )


def sliced_batch_norm(
    x: Tensor,
    module: nn.modules.batchnorm._BatchNorm,
    cut: Cut,
    track_running_stats: bool = True,
) -> Tensor:
    """``nn.BatchNormNd`` over the live channels (see :func:`sliced_batch_norm_fn`).

    ``track_running_stats=False`` (in train mode) normalises with batch statistics and leaves the
    running statistics alone (see :mod:`sliceout_fx.norm_stats`).
    """
    bn = module
    if bn.training and not track_running_stats:
        weight, bias = take(bn.weight, 0, cut), take(bn.bias, 0, cut)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, bn.eps)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    return sliced_batch_norm_fn(
        x,
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        use_batch_stats,
        momentum,
        bn.eps,
        cut,
    )


def sliced_batch_norm_fn(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cut: Cut,
) -> Tensor:
    """``F.batch_norm`` over the live channels only.

    Batch statistics come from the live channels and only their running statistics move: in slice
    mode the running buffers are narrowed views that ``F.batch_norm`` updates in place; gather and
    mask modes update a copy and write the live entries back.
    """
    weight, bias = take(weight, 0, cut), take(bias, 0, cut)
    if running_mean is None or cut.mode == "slice" or not training:
        rm, rv = take(running_mean, 0, cut), take(running_var, 0, cut)
        return F.batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    # gather / mask: run on copies of the running stats, then write back the live entries only.
    rm, rv = take(running_mean, 0, cut).clone(), take(running_var, 0, cut).clone()
    y = F.batch_norm(x, rm, rv, weight, bias, True, momentum, eps)
    with torch.no_grad():
        if cut.mode in INDEXED:
            index = cut.index.to(rm.device)
            running_mean.index_copy_(0, index, rm)
            running_var.index_copy_(0, index, rv)
        else:
            live = slice(cut.index, cut.index + cut.width)
            running_mean[live] = rm[live]
            running_var[live] = rv[live]
    return y


def patch_conv(
    x: Tensor,
    module: nn.modules.conv._ConvNd,
    starts: tuple[int, ...],
    window: tuple[int, ...],
    out_size: tuple[int, ...],
    scale: float,
    mode: str,
) -> Tensor:
    """Patch SliceOut: ``module`` applied to a spatial window of ``x``, zero outside the window.

    ``starts`` count stride steps, so the window's output is exactly the matching window of the
    full output. ``scale`` (flow normalisation) rides on the conv output before the bias instead of
    materialising a scaled input. Mask mode computes the same thing at full size, for reference.
    """
    stride = module.stride
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    out_starts = list(starts)
    expected = tuple(s * n + w for s, n, w in zip(stride, starts, window, strict=True))
    if any(e > n for e, n in zip(expected, x.shape[2:], strict=True)):
        raise ValueError(
            f"Patch SliceOut windows were planned for larger inputs than {tuple(x.shape[2:])}; "
            "convert with example_inputs at the training resolution"
        )
    if mode == "mask":
        keep = x.new_ones(())
        for d, (s, w) in enumerate(zip(starts, window, strict=True)):
            keep = keep * _window_mask(x.shape[2 + d], s * stride[d], w, x, 2 + d)
        y = conv(
            x * keep, module.weight, None, stride, module.padding, module.dilation, module.groups
        )
        y = y * scale
        if module.bias is not None:
            y = y + module.bias.view(1, -1, *([1] * len(window)))
        out_keep = y.new_ones(())
        for d, s in enumerate(out_starts):
            size = _conv_out(window[d], module, d)
            out_keep = out_keep * _window_mask(y.shape[2 + d], s, size, y, 2 + d)
        return y * out_keep
    for d, (s, w) in enumerate(zip(starts, window, strict=True)):
        x = x.narrow(2 + d, s * stride[d], w)
    y = conv(x, module.weight, None, stride, module.padding, module.dilation, module.groups)
    y = y * scale
    if module.bias is not None:
        y = y + module.bias.view(1, -1, *([1] * len(window)))
    pad: list[int] = []
    for d in reversed(range(len(window))):
        pad += [out_starts[d], out_size[d] - out_starts[d] - y.shape[2 + d]]
    return F.pad(y, pad)


def _conv_out(n: int, module: nn.modules.conv._ConvNd, d: int) -> int:
    k, s, p, dil = module.kernel_size[d], module.stride[d], module.padding[d], module.dilation[d]
    return (n + 2 * p - dil * (k - 1) - 1) // s + 1


def _window_mask(n: int, start: int, width: int, like: Tensor, dim: int) -> Tensor:
    pos = torch.arange(n, device=like.device)
    keep = ((pos >= start) & (pos < start + width)).to(like.dtype)
    shape = [1] * like.dim()
    shape[dim] = n
    return keep.view(shape)
