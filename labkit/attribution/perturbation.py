"""Perturbation attributions: occlusion."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._core import preserved
from ._common import Method, check_positive_int, check_reference, chunks, per_forward, prepare, target_logits


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
    occluded copies run ``batch_size`` per forward pass (bounding memory; None: sized for the
    device, see :mod:`labkit.attribution`).
    """
    target = prepare(model, x, target)
    (height, width), (stride_h, stride_w) = _pair(window, "window"), _pair(stride, "stride")
    rows, cols = x.shape[-2:]
    if height > rows or width > cols or stride_h > height or stride_w > width:
        raise ValueError(f"window must fit in the {rows} x {cols} image and stride must not exceed "
                         f"it (so every pixel is occluded), got window {(height, width)}, "
                         f"stride {(stride_h, stride_w)}")
    fill = check_reference(fill, x, "fill")
    tops = torch.arange(math.ceil((rows - height) / stride_h) + 1, device=x.device) * stride_h
    lefts = torch.arange(math.ceil((cols - width) / stride_w) + 1, device=x.device) * stride_w
    n_windows, batch = len(tops) * len(lefts), x.shape[0]
    drops = torch.empty(batch * n_windows, dtype=x.dtype, device=x.device)
    with preserved(model), torch.no_grad():
        original = target_logits(model, x, target)
        for part in chunks(batch * n_windows, per_forward(x, batch_size), progress, "Occlusion"):
            index = torch.arange(part.start, part.stop, device=x.device)
            image, window_index = index // n_windows, index % n_windows
            in_rows = _interval(rows, tops[window_index // len(lefts)], height, x.device)
            in_cols = _interval(cols, lefts[window_index % len(lefts)], width, x.device)
            inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
            occluded = torch.where(inside, fill[image], x[image])
            drops[part] = original[image] - target_logits(model, occluded, target[image])
    # Spread each window's drop over its pixels and divide by how many windows cover each pixel.
    kernel = torch.ones(1, 1, height, width, dtype=x.dtype, device=x.device)
    drop_maps = drops.view(batch, 1, len(tops), len(lefts))
    summed = F.conv_transpose2d(drop_maps, kernel, stride=(stride_h, stride_w))[..., :rows, :cols]
    counts = F.conv_transpose2d(torch.ones_like(drop_maps[:1]), kernel, stride=(stride_h, stride_w))
    return (summed / counts[..., :rows, :cols]).expand_as(x).contiguous()


def _interval(size: int, start: torch.Tensor, length: int, device) -> torch.Tensor:
    """``k x size`` booleans: position ``i`` lies in ``[start_k, start_k + length)``."""
    position = torch.arange(size, device=device)
    return (position >= start[:, None]) & (position < start[:, None] + length)


METHODS = (
    Method("occlusion", occlusion, "occlusion", "sum", quick={"window": 14, "stride": 14, "progress": False}),
)
