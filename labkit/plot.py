"""The figures every lesson uses. Figures only: this module knows nothing of models.

Every function takes torch tensors (on any device, with or without grad) or NumPy arrays, a single
image (``C x H x W`` or ``H x W``) or a batch (``B x C x H x W``), grey (1 channel) or RGB, and
returns a matplotlib Figure. A 3-D input is one image when its first dimension is 1 or 3, else a
batch of ``H x W`` maps.

The same colours throughout a lesson: images in grey (or RGB) on the fixed scale [0, 1], so
brightness means the same in every panel; signed maps (gradients, attributions) in the
diverging ``SIGNED_CMAP`` with limits symmetric around 0, so white is exactly zero; unsigned
maps (saliency, Grad-CAM) in the sequential ``UNSIGNED_CMAP`` from 0. A map's colour limit is the
``CLIP_PERCENTILE``-th percentile of its ``|values|``, not the maximum: gradients often have a few
extreme pixels that would otherwise set the scale and leave every other pixel near zero (one
hot pixel on a blank panel); the few pixels beyond the limit are shown at full colour.

Figures are closed in pyplot before they are returned, so a notebook shows each exactly once as
the value of a cell (use ``display(fig)`` elsewhere in a cell, ``fig.savefig`` in scripts).
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

GREY_CMAP, SIGNED_CMAP, UNSIGNED_CMAP = "gray", "RdBu_r", "inferno"
NOTEBOOK_WIDTH = 10.0  # inches: what a notebook shows without a horizontal scroll bar
DPI = 100
CLIP_PERCENTILE = 99.0  # the SmoothGrad paper (Smilkov et al. 2017) clips its maps at the 99th


def _numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{name} must hold numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _image_batch(images, name: str = "images") -> np.ndarray:
    """``B x H x W x C`` (C = 1 or 3) from one image or a batch, channels first."""
    a = _numpy(images, name)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[None] if a.shape[0] in (1, 3) else a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3) or 0 in a.shape:
        raise ValueError(f"{name} must be H x W, C x H x W or B x C x H x W with 1 (grey) or 3 (RGB) "
                         f"channels, got shape {a.shape}")
    return a.transpose(0, 2, 3, 1)


def _map_batch(maps, name: str = "attr") -> np.ndarray:
    """``B x H x W`` from one map (``H x W``) or a batch (``B x H x W`` or ``B x 1 x H x W``)."""
    a = _numpy(maps, name)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or 0 in a.shape:
        hint = (" (reduce the channels first, e.g. labkit.attribution.to_heatmap)"
                if a.ndim == 4 else "")
        raise ValueError(f"{name} must be H x W, B x H x W or B x 1 x H x W maps, got shape "
                         f"{a.shape}{hint}")
    return a


def _grid(n_rows: int, n_cols: int, aspect: float, cell: float, extra_width: float = 0.0):
    """A figure of ``n_rows x n_cols`` image axes, at most notebook width, laid out so that titles
    and labels never overlap (constrained layout)."""
    width = min(NOTEBOOK_WIDTH, n_cols * cell + extra_width + 0.4)
    side = (width - extra_width - 0.4) / n_cols
    fig = plt.figure(figsize=(width, n_rows * (side * aspect + 0.35) + 0.3), dpi=DPI,
                     layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    plt.close(fig)  # the caller shows it once, as the returned Figure
    return fig, axes


def _draw_image(ax, image: np.ndarray, vrange):
    """An ``H x W x C`` image on a fixed scale (``vrange``) or stretched to its own min-max."""
    low, high = vrange if vrange is not None else (image.min(), max(image.max(), image.min() + 1e-12))
    if image.shape[2] == 1:
        return ax.imshow(image[..., 0], cmap=GREY_CMAP, vmin=low, vmax=high)
    return ax.imshow(np.clip((image - low) / (high - low), 0, 1))


def _one_each(values, n: int, name: str, each: str) -> list:
    """``values`` as a list of ``n`` entries (``None`` for none given); a string is one entry."""
    if values is None:
        return [None] * n
    if isinstance(values, str):
        values = [values]
    if len(values) != n:
        raise ValueError(f"{name} must give one entry per {each} ({n}), got {len(values)}")
    return list(values)


def show_images(rows, titles=None, labels=None, vrange=(0.0, 1.0), cell: float = 1.3) -> Figure:
    """Images in a grid: ``rows`` is one batch (one row) or a list of batches (one row each).

    ``titles``: one per row, written left of it. ``labels``: one string per image (a list per row,
    or a flat list for a single batch), written above it, e.g. ``"Sneaker 97%"``
    (:func:`prediction_labels`). ``vrange``: the values shown as black and white (grey images) or
    the range mapped to [0, 1] (RGB); ``None`` stretches each image to its own min-max.
    """
    single = not isinstance(rows, (list, tuple))
    batches = [_image_batch(r, "images" if single else f"rows[{i}]")
               for i, r in enumerate([rows] if single else rows)]
    if not batches:
        raise ValueError("rows is empty; give a batch of images or a list of batches")
    titles = _one_each(titles, len(batches), "titles", "row")
    labels = _one_each([labels] if single and labels is not None else labels, len(batches), "labels", "row")
    n_cols = max(len(b) for b in batches)
    aspect = batches[0].shape[1] / batches[0].shape[2]
    extra = 1.2 if any(titles) else 0.0
    fig, axes = _grid(len(batches), n_cols, aspect, cell, extra)
    for r, (batch, title, row_labels) in enumerate(zip(batches, titles, labels)):
        if row_labels is not None and len(row_labels) != len(batch):
            raise ValueError(f"labels of row {r} must give one string per image ({len(batch)}), "
                             f"got {len(row_labels)}")
        for c, ax in enumerate(axes[r]):
            if c >= len(batch):
                fig.delaxes(ax)
                continue
            _draw_image(ax, batch[c], vrange)
            if row_labels is not None:
                ax.set_title(str(row_labels[c]), fontsize=8)
        if title:
            axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=10)
    return fig


def prediction_labels(probabilities, class_names: Sequence[str]) -> list[str]:
    """``"name 97%"`` for each row of a ``B x classes`` probability matrix (its top class)."""
    p = _numpy(probabilities, "probabilities")
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise ValueError(f"probabilities must be B x {len(class_names)} (one column per class name), "
                         f"got shape {p.shape}")
    return [f"{class_names[i]} {row[i]:.0%}" for row, i in zip(p, p.argmax(axis=1))]


def normalize_gradient(g):
    """Map a gradient (or any signed image) to [0, 1] for display, per image: its mean goes to 0.5
    and mean -/+ 3 standard deviations to 0 and 1, values beyond are clipped:
    ``clip((g - mean) / (6 std) + 0.5, 0, 1)``. ``B x C x H x W`` is a batch; ``C x H x W`` and
    ``H x W`` one image. Returns the type it was given (a tensor stays on its device)."""
    if isinstance(g, torch.Tensor):
        if not g.is_floating_point():
            raise TypeError(f"g must be a float tensor, got dtype {g.dtype}")
        flat = g.detach().reshape(g.shape[0] if g.dim() == 4 else 1, -1)
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-12)
        return ((flat - mean) / (6 * std) + 0.5).clamp(0, 1).reshape(g.shape)
    a = _numpy(g, "g")
    return normalize_gradient(torch.from_numpy(a)).numpy()


def _map_norm(maps: np.ndarray, signed, same_scale: bool):
    """The colormap and one Normalize per map: symmetric around 0 for signed maps, from 0 for
    unsigned ones, up to the ``CLIP_PERCENTILE``-th percentile of ``|map|`` (of all maps with
    ``same_scale``); ``signed=None`` decides by whether any value is negative."""
    signed = bool((maps < 0).any()) if signed is None else signed
    if not signed and (maps < 0).any():
        raise ValueError(f"signed=False but the maps have negative values (down to "
                         f"{maps.min():.3g}); pass signed=True, or take the absolute value first")
    magnitudes = np.abs(maps).reshape(len(maps), -1)
    if same_scale:
        magnitudes = np.broadcast_to(magnitudes.reshape(1, -1), (len(maps), magnitudes.size))
    peaks = np.percentile(magnitudes, CLIP_PERCENTILE, axis=1)
    # a map with fewer than 1 % non-zero values keeps its maximum, or it would show nothing
    peaks = np.where(peaks > 0, peaks, magnitudes.max(axis=1))
    peaks = np.maximum(peaks, 1e-12)
    norms = [Normalize(vmin=-p if signed else 0.0, vmax=p) for p in peaks]
    return (SIGNED_CMAP if signed else UNSIGNED_CMAP), norms


def heatmap(attr, signed=None, colorbar: bool = True, labels=None, same_scale: bool = False,
            cell: float = 1.8) -> Figure:
    """One panel per map (``H x W``, ``B x H x W`` or ``B x 1 x H x W``), in one row.

    Signed maps (``signed=True``, or ``None`` when some value is negative): diverging
    ``SIGNED_CMAP`` with ``vmin = -vmax``, so white is zero, red positive, blue negative.
    Unsigned: sequential ``UNSIGNED_CMAP`` from 0. The limit is the ``CLIP_PERCENTILE``-th
    percentile of ``|map|``, per panel unless ``same_scale`` (needed to compare magnitudes
    across panels).
    """
    maps = _map_batch(attr)
    labels = _one_each(labels, len(maps), "labels", "map")
    cmap, norms = _map_norm(maps, signed, same_scale)
    fig, axes = _grid(1, len(maps), maps.shape[1] / maps.shape[2], cell, 0.0)
    for ax, m, norm, label in zip(axes[0], maps, norms, labels):
        im = ax.imshow(m, cmap=cmap, norm=norm)
        if label is not None:
            ax.set_title(str(label), fontsize=8)
        if colorbar and not same_scale:
            fig.colorbar(im, ax=ax, shrink=0.8)
    if colorbar and same_scale:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    return fig


def overlay(image, heatmap, alpha: float = 0.5, signed=None, colorbar: bool = False, labels=None,
            cell: float = 1.8) -> Figure:
    """Each image with its map drawn over it (``alpha`` opaque), one panel per image. A map of
    another size (e.g. Grad-CAM's 7 x 7) is stretched over the whole image. Colours as in
    :func:`heatmap`."""
    images, maps = _image_batch(image, "image"), _map_batch(heatmap, "heatmap")
    if len(maps) != len(images):
        raise ValueError(f"give one heatmap per image: {len(images)} images, {len(maps)} heatmaps")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = _one_each(labels, len(images), "labels", "image")
    cmap, norms = _map_norm(maps, signed, same_scale=False)
    height, width = images.shape[1:3]
    fig, axes = _grid(1, len(images), height / width, cell, 0.0)
    for ax, img, m, norm, label in zip(axes[0], images, maps, norms, labels):
        _draw_image(ax, img, (0.0, 1.0))
        im = ax.imshow(m, cmap=cmap, norm=norm, alpha=alpha, interpolation="bilinear",
                       extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        if label is not None:
            ax.set_title(str(label), fontsize=8)
        if colorbar:
            fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def side_by_side(images, maps, image_titles, map_titles, map_notes=None, cell: float = 2.0) -> Figure:
    """One row: each image (``1 x C x H x W`` or ``C x H x W``) followed by its map (``H x W``)
    with its own colour bar, colours as in :func:`heatmap` (signed maps diverge around 0).
    ``map_notes``: a small line of text under each map (the explorer's metrics). The explorer
    draws a standard and a robust model's view this way."""
    images = [_image_batch(image, "images")[0] for image in images]
    maps = [_map_batch(m, "maps") for m in maps]
    if not images or len(maps) != len(images):
        raise ValueError(f"give one map per image: {len(images)} images, {len(maps)} maps")
    fig, axes = _grid(1, 2 * len(images), images[0].shape[0] / images[0].shape[1], cell=cell,
                      extra_width=0.5 * len(images))  # room for the colour bars
    notes = map_notes if map_notes is not None else [""] * len(images)
    for image, m, image_title, map_title, note, (left, right) in zip(
            images, maps, image_titles, map_titles, notes, axes[0].reshape(-1, 2)):
        _draw_image(left, image, (0.0, 1.0))
        left.set_title(image_title, fontsize=9)
        cmap, (norm,) = _map_norm(m, None, same_scale=False)
        fig.colorbar(right.imshow(m[0], cmap=cmap, norm=norm), ax=right, shrink=0.8)
        right.set_title(map_title, fontsize=9)
        if note:
            right.set_xlabel(textwrap.fill(note, 34), fontsize=6.5)
    return fig


def _curve_points(curve, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(eps, accuracy)`` arrays from a pair of sequences or a mapping eps -> accuracy."""
    if isinstance(curve, Mapping):
        eps, acc = list(curve.keys()), list(curve.values())
    elif isinstance(curve, Sequence) and len(curve) == 2:
        eps, acc = curve
    else:
        raise TypeError(f"curve {name!r} must be (eps_list, accuracies) or a dict eps -> accuracy, "
                        f"got {type(curve).__name__}")
    eps, acc = (_numpy(v if isinstance(v, torch.Tensor) else np.asarray(v, dtype=float), name)
                for v in (eps, acc))
    if eps.ndim != 1 or eps.shape != acc.shape:
        raise ValueError(f"curve {name!r} needs one accuracy per eps, got {eps.shape} eps and "
                         f"{acc.shape} accuracies")
    return eps, acc


def robustness_plot(curves: Mapping, chance: float | None = None, title: str | None = None,
                    xlabel: str = "ε") -> Figure:
    """Accuracy against attack size, one line per model: ``curves`` maps a model's name to its
    curve, ``(eps_list, accuracies)`` or a dict ``eps -> accuracy``. ``chance``: a dashed line
    at the accuracy of guessing (0.1 for ten classes)."""
    if not isinstance(curves, Mapping) or not curves:
        raise TypeError(f"curves must be a non-empty dict name -> (eps_list, accuracies), got "
                        f"{type(curves).__name__}")
    fig = plt.figure(figsize=(5.5, 3.6), dpi=DPI, layout="constrained")
    plt.close(fig)
    ax = fig.subplots()
    for name, curve in curves.items():
        eps, acc = _curve_points(curve, str(name))
        ax.plot(eps, acc, marker="o", label=str(name))
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
