"""Perturbation attributions: occlusion."""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._core import batched, check_positive_int, check_reference, preserved
from ._common import Method, per_forward, prepare, target_logits


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return tuple(check_positive_int(v, name) for v in pair)


def occlusion(model: nn.Module, x: torch.Tensor, target, window=8, stride=4, fill=0.0,
              batch_size: int | None = None, progress: bool = True) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional
    Networks"): slide a ``window`` (int or (h, w)) over the image by ``stride``, replace it in
    every channel with ``fill`` (a number or a tensor broadcasting to ``x``), and record the
    drop of the target logit, ``f_t(x) - f_t(x with the window filled)``. Each pixel gets the
    mean drop over the windows that cover it (captum's Occlusion convention; the last window of
    a row or column is cut off at the image border, so every pixel is covered).

    Returns a tensor shaped like ``x``, the same value in every channel. The ``B x windows``
    occluded copies run ``batch_size`` per forward pass (None: sized for the device, see
    :mod:`labkit.attribution`); they are made one image at a time, so memory holds one image's
    copies beyond the batch.
    """
    target = prepare(model, x, target)
    (height, width), (stride_h, stride_w) = _pair(window, "window"), _pair(stride, "stride")
    rows, cols = x.shape[-2:]
    if height > rows or width > cols or stride_h > height or stride_w > width:
        raise ValueError(f"window must fit in the {rows} x {cols} image and stride must not exceed "
                         f"it (so every pixel is occluded), got window {(height, width)}, "
                         f"stride {(stride_h, stride_w)}")
    fill = check_reference(fill, x, "fill")
    tops = range(0, math.ceil((rows - height) / stride_h) * stride_h + 1, stride_h)
    lefts = range(0, math.ceil((cols - width) / stride_w) * stride_w + 1, stride_w)
    inside = torch.zeros(len(tops) * len(lefts), 1, rows, cols, dtype=torch.bool, device=x.device)
    for k, (top, left) in enumerate(itertools.product(tops, lefts)):
        inside[k, :, top:top + height, left:left + width] = True  # window k, cut off at the border
    # every window of one image at a time (image by image runs faster than window by window)
    occluded = ((torch.where(inside, fill[b], x[b]), target[b].expand(len(inside))) for b in range(len(x)))
    with preserved(model), torch.no_grad():
        original = target_logits(model, x, target)
        drops = [original[b] - logits for b, logits in enumerate(batched(
            functools.partial(target_logits, model), occluded, per_forward(x, batch_size), len(x),
            progress, "Occlusion"))]
    # Spread each window's drop over its pixels and divide by how many windows cover each pixel.
    kernel = torch.ones(1, 1, height, width, dtype=x.dtype, device=x.device)
    drop_maps = torch.stack(drops).view(len(x), 1, len(tops), len(lefts))
    summed = F.conv_transpose2d(drop_maps, kernel, stride=(stride_h, stride_w))[..., :rows, :cols]
    counts = F.conv_transpose2d(torch.ones_like(drop_maps[:1]), kernel, stride=(stride_h, stride_w))
    return (summed / counts[..., :rows, :cols]).expand_as(x).contiguous()


METHODS = (
    Method("occlusion", occlusion, "occlusion", "sum", quick={"window": 14, "stride": 14, "progress": False}),
)
