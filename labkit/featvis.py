"""Feature visualization: what makes a unit of a network respond.

- :func:`maximize`: gradient ascent on the input for a class logit, a neuron of the
  representation or a channel of a convolutional layer (Erhan et al. 2009; Simonyan et al. 2014),
  optionally with the image priors of Yosinski et al. 2015 (:class:`Regularization`).
- :func:`top_activating`: the dataset images that excite a unit most.
- :func:`nearest_neighbors`: the dataset images closest in the representation (Krizhevsky et al. 2012).
- :func:`filters`: the kernels of a convolution, scaled for plotting.
- :func:`class_transfer`: class visualizations of one model judged by another (Santurkar et al. 2019:
  a robust model's visualizations show features that other models recognise too).
- :func:`feature_maps`: a layer's output for a batch; :func:`receptive_field`: which input pixels
  one position of it sees; :func:`top_patches`: the dataset patches that excite a channel most.
- :func:`deep_dream`: amplify whatever a layer already sees in an image (Mordvintsev et al. 2015).
- :func:`consistency`: Dong et al.'s consis(n) = p^T A p of a neuron's top-activating images.

A *unit* is :class:`ClassLogit`, :class:`Neuron` or :class:`Channel`, or the same as a tuple:
``("class", 3)``, ``("neuron", 17)``, ``("channel", "conv3", 5)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attacks
from ._core import (batches, check_images, check_model, check_number, check_positive_int, hooks,
                    input_channels, logits_for, model_device, per_sample_norm, preserved, resolve_layer)
from .models import classifier_layer, features

_LOGITS = "<logits>"  # the site of class units: the model's output (no layer has this name)


@dataclass(frozen=True)
class ClassLogit:
    """The logit (pre-softmax score) of class ``index``; Simonyan et al. maximize the score, not the
    probability, which could rise by lowering the other classes alone."""
    index: int

    def site(self) -> str:
        return _LOGITS

    def value(self, output: torch.Tensor) -> torch.Tensor:
        _check_index(self, self.index, output.shape[1], "the model has {} classes")
        return output[:, self.index]


@dataclass(frozen=True)
class Neuron:
    """Entry ``index`` of the representation (the input of the final linear layer, what
    :func:`labkit.models.features` returns), or of the flattened output of ``layer``."""
    index: int
    layer: str | None = None

    def site(self) -> str | None:
        return self.layer

    def value(self, output: torch.Tensor) -> torch.Tensor:
        flat = output.flatten(1)
        where = "the representation" if self.layer is None else f"layer {self.layer!r}"
        _check_index(self, self.index, flat.shape[1], where + " has {} neurons")
        return flat[:, self.index]


@dataclass(frozen=True)
class Channel:
    """Channel ``index`` of the output of ``layer`` (a dotted name), averaged over positions."""
    layer: str
    index: int

    def site(self) -> str:
        return self.layer

    def value(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 4:
            raise ValueError(f"{self}: layer {self.layer!r} must output B x C x H x W feature maps, "
                             f"got shape {tuple(output.shape)}")
        _check_index(self, self.index, output.shape[1], f"layer {self.layer!r} has {{}} channels")
        return output[:, self.index].mean(dim=(1, 2))


_KINDS = {"class": ClassLogit, "neuron": Neuron, "channel": Channel}


def _check_index(unit, index, size: int, what: str) -> None:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"{unit}: index must be an int, got {type(index).__name__}")
    if not 0 <= index < size:
        raise ValueError(f"{unit}: index must be in [0, {size - 1}] because {what.format(size)}")


def as_unit(spec):
    """A :class:`ClassLogit`, :class:`Neuron` or :class:`Channel` from itself or a tuple such as
    ``("class", 3)``, ``("neuron", 17)`` or ``("channel", "conv3", 5)``."""
    if isinstance(spec, (ClassLogit, Neuron, Channel)):
        return spec
    if isinstance(spec, tuple) and spec and spec[0] in _KINDS:
        kind = _KINDS[spec[0]]
        if kind is Neuron and len(spec) == 3:  # ("neuron", layer, index) reads like ("channel", ...)
            return Neuron(spec[2], spec[1])
        expected = 3 if kind is Channel else 2
        if len(spec) == expected:
            return kind(*spec[1:])
    raise ValueError(f"a unit is ClassLogit(i), Neuron(i), Channel(layer, i) or a tuple "
                     f"('class', i), ('neuron', i), ('neuron', layer, i), ('channel', layer, i); "
                     f"got {spec!r}")


def _as_units(objective, batch: int | None) -> list:
    """One unit per image: a list is taken as is, a single unit is repeated ``batch`` times."""
    if isinstance(objective, list):
        if not objective:
            raise ValueError("objective is an empty list; give at least one unit")
        units = [as_unit(u) for u in objective]
    else:
        units = [as_unit(objective)] * (batch or 1)
    if batch is not None and len(units) != batch:
        raise ValueError(f"got {len(units)} objectives for a batch of {batch} images; give one "
                         f"objective per image or a single one for all")
    return units


def _site_outputs(model: nn.Module, x: torch.Tensor, sites: set) -> dict:
    """One forward pass; the output of each named layer in ``sites``, the representation (site
    ``None``) and the logits."""
    outputs = {}
    with hooks() as handles:
        for site in sites - {_LOGITS}:
            if site is None:
                handles.append(classifier_layer(model).register_forward_pre_hook(
                    lambda module, inputs: outputs.__setitem__(None, inputs[0])))
            else:
                handles.append(resolve_layer(model, site).register_forward_hook(
                    lambda module, inputs, output, site=site: outputs.__setitem__(site, output)))
        outputs[_LOGITS] = logits_for(model, x)
    return outputs


def _unit_values(model: nn.Module, x: torch.Tensor, units: list) -> torch.Tensor:
    """The value of ``units[i]`` on image ``i``, with the autograd graph (for gradient ascent)."""
    outputs = _site_outputs(model, x, {u.site() for u in units})
    values = x.new_zeros(x.shape[0])
    for unit in dict.fromkeys(units):  # each distinct unit once, on the images it belongs to
        rows = torch.tensor([i for i, u in enumerate(units) if u == unit], device=x.device)
        values = values.index_put((rows,), unit.value(outputs[unit.site()][rows]))
    return values


def activation(model: nn.Module, x: torch.Tensor, unit) -> torch.Tensor:
    """The value of ``unit`` (one for all images, or a list with one per image) on each image of
    ``x``: a tensor of length B, detached."""
    check_model(model)
    check_images(x, model)
    units = _as_units(unit, x.shape[0])
    with preserved(model), torch.no_grad():
        return _unit_values(model, x, units)


@dataclass(frozen=True)
class Regularization:
    """Image priors for :func:`maximize` (Yosinski et al. 2015, "Understanding Neural Networks
    Through Deep Visualization"), applied after every ascent step, each off at its default:

    - ``l2_decay``: ``x <- b + (1 - l2_decay) (x - b)``, the step of an L2 penalty towards ``b``;
    - ``jitter``: the objective is read on the image rolled by a random shift of up to
      ``jitter`` pixels in each direction (Mordvintsev et al. 2015), so no single pixel
      pattern can be relied upon;
    - ``blur_every``, ``blur_sigma``: a Gaussian blur of width ``blur_sigma`` pixels every
      ``blur_every`` steps, which removes high frequencies;
    - ``clip_percentile``: pixels whose norm ``||x_ij - b||`` over channels lies in the lowest
      ``clip_percentile`` percent are set to ``b``, which leaves only the pixels that matter.

    ``b`` is ``background``: 0 for Fashion-MNIST's black background, 0.5 for natural photos.
    """
    l2_decay: float = 0.0
    jitter: int = 0
    blur_every: int = 0
    blur_sigma: float = 0.5
    clip_percentile: float = 0.0
    background: float = 0.0

    def __post_init__(self):
        checks = {"l2_decay": 0 <= self.l2_decay < 1, "jitter": self.jitter >= 0,
                  "blur_every": self.blur_every >= 0, "blur_sigma": self.blur_sigma > 0,
                  "clip_percentile": 0 <= self.clip_percentile < 100,
                  "background": 0 <= self.background <= 1}
        ranges = {"l2_decay": "[0, 1)", "jitter": ">= 0", "blur_every": ">= 0", "blur_sigma": "> 0",
                  "clip_percentile": "[0, 100)", "background": "[0, 1]"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Regularization.{name} must be in {ranges[name]}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.jitter, int) or not isinstance(self.blur_every, int):
            raise TypeError(f"jitter and blur_every are whole pixels/steps, got {self.jitter!r} "
                            f"and {self.blur_every!r}")

    def apply(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The priors that act on the image after ascent step ``step`` (counted from 1)."""
        b = self.background
        x = b + (1 - self.l2_decay) * (x - b)
        if self.blur_every and step % self.blur_every == 0:
            x = gaussian_blur(x, self.blur_sigma)
        if self.clip_percentile:
            norms = (x - b).norm(dim=1, keepdim=True)
            cutoff = torch.quantile(norms.flatten(1), self.clip_percentile / 100, dim=1)
            x = torch.where(norms < cutoff.view(-1, 1, 1, 1), torch.full_like(x, b), x)
        return x.clamp(0, 1)


# Mild priors for 28 x 28 Fashion-MNIST images. They smooth a standard model's visualizations
# but do not make them its classes: the robust model recognises 28 % of them (24 % without
# priors; tests/benchmarks/bench_featvis_transfer.py, 100 steps, 5 images per class).
YOSINSKI = Regularization(l2_decay=0.01, jitter=1, blur_every=4, blur_sigma=0.5, clip_percentile=10)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel with a Gaussian of standard deviation ``sigma`` pixels (separable,
    truncated at 3 sigma, borders reflected)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, rows, groups=channels)
    return F.conv2d(blurred, rows.transpose(2, 3), groups=channels)


def _random_shift(jitter: int, generator) -> tuple[int, int]:
    if not jitter:
        return 0, 0
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
    return dy, dx


def _noise_images(model, batch: int, image_shape, noise: float, generator) -> torch.Tensor:
    channels = input_channels(model)
    if channels is not None and channels != image_shape[0]:
        raise ValueError(f"the model takes {channels}-channel images but image_shape "
                         f"is {tuple(image_shape)}; pass image_shape=({channels}, H, W)")
    if not 0 < noise <= 1:
        raise ValueError(f"noise must be in (0, 1], got {noise!r}")
    # drawn on the CPU so that a seed gives the same start on every device
    return (noise * torch.rand((batch, *image_shape), generator=generator)).to(model_device(model))


def maximize(model: nn.Module, objective, x0: torch.Tensor | None = None, steps: int = 100,
             lr: float = 0.02, regularization: Regularization | None = None,
             eps: float | None = None, noise: float = 0.4, image_shape=(1, 28, 28),
             generator=None, progress: bool = True) -> torch.Tensor:
    """Gradient ascent on the input for ``objective`` (Erhan et al. 2009, "Visualizing
    Higher-Layer Features of a Deep Network"; Simonyan et al. 2014, "Deep Inside Convolutional
    Networks"): repeat ``steps`` times

        x <- R( Proj( x + lr * sqrt(D) * g / ||g||_2 ) ),   g = grad_x a(x),

    with ``a`` the unit's value, ``D`` the number of pixel values of an image (so ``lr`` is the
    root-mean-square change of a pixel per step), ``Proj`` the projection onto [0, 1] and, when
    ``eps`` is given, onto the L2 ball of radius ``eps`` around the start (the "feature
    visualization" of robust models, Engstrom et al. 2019), and ``R`` the image priors of
    ``regularization`` (see :class:`Regularization`; ``None``: plain ascent).

    ``objective``: a unit (``("class", 3)``, ``Channel("conv3", 5)``, ...) for all images, a
    list with one unit per image, optimized together in one batch, or a function
    ``objective(model, x) -> B values`` (your own, e.g. one read with a forward hook).
    ``x0``: the images to start from; default noise, uniform in [0, ``noise``], of
    ``image_shape`` (one image per unit; one image for a function), drawn with ``generator``
    (dim noise: from full-range noise a robust model needs many more steps to draw its classes).
    Returns the images, in [0, 1], detached.
    """
    check_model(model)
    check_positive_int(steps, "steps")
    if check_number(lr, "lr") <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    regularization = Regularization() if regularization is None else regularization
    if not isinstance(regularization, Regularization):
        raise TypeError(f"regularization must be a labkit.featvis.Regularization or None, "
                        f"got {type(regularization).__name__}")
    if x0 is not None:
        check_images(x0, model, "x0")
    if callable(objective):
        units, count = objective, 1 if x0 is None else len(x0)
    else:
        units = _as_units(objective, None if x0 is None else len(x0))
        count = len(units)
    start = (_noise_images(model, count, image_shape, noise, generator) if x0 is None
             else x0.detach())
    step_size = lr * math.sqrt(start[0].numel())
    x = start
    with preserved(model):
        for step in tqdm(range(1, steps + 1), desc="maximize", disable=not progress, leave=False):
            g = _unit_gradient(model, x, units, _random_shift(regularization.jitter, generator))
            x = x + step_size * g / per_sample_norm(g)
            x = x.clamp(0, 1) if eps is None else _within(x, start, eps)
            x = regularization.apply(x, step)
            if eps is not None:
                x = _within(x, start, eps)
    return x.detach()


def _unit_gradient(model: nn.Module, x: torch.Tensor, units, shift: tuple[int, int]) -> torch.Tensor:
    """The gradient of each image's unit value (image ``i`` for ``units[i]``, or a function
    ``units(model, x) -> B``), read on the images rolled by ``shift`` (the jitter prior)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        shifted = x.roll(shift, dims=(2, 3))
        values = units(model, shifted) if callable(units) else _unit_values(model, shifted, units)
        if not isinstance(values, torch.Tensor) or values.shape != (len(x),):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"the objective must return one value per image, shape ({len(x)},), got {shape}")
        if not values.requires_grad:
            raise ValueError("the objective's values are detached from the image (torch.no_grad, "
                             ".detach() or .item()); the ascent differentiates them")
        (grad,) = torch.autograd.grad(values.sum(), x)
    return grad


def _within(x: torch.Tensor, start: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` projected onto the L2 ball of radius ``eps`` around ``start`` and onto [0, 1]."""
    return (start + attacks.project(x - start, eps, "l2")).clamp(0, 1)


class Transfer(NamedTuple):
    images: torch.Tensor      # the visualizations, one per target
    targets: torch.Tensor     # the class each image maximizes
    confidence: torch.Tensor  # the visualizing model's probability of the target
    predicted: torch.Tensor   # the other model's predicted class
    self_rate: float          # fraction the visualizing model classifies as the target
    transfer_rate: float      # fraction the other model classifies as the target


def class_transfer(model: nn.Module, other: nn.Module, per_class: int = 1,
                   **maximize_options) -> Transfer:
    """Visualize every class of ``model`` from noise with :func:`maximize` (``per_class`` images
    each, ``maximize_options`` passed on) and ask ``other`` what it sees (Santurkar et al. 2019,
    "Image Synthesis with a Single (Robust) Classifier"; Engstrom et al. 2019, "Adversarial
    Robustness as a Prior for Learned Representations"). A robust model's visualizations draw
    the class, so a standard model recognises most of them; a standard model's are textures
    that a robust model mostly does not recognise. On the shipped Fashion-MNIST models, 100
    steps: 80 % and 24 % (chance: 10 %), see ``tests/benchmarks/bench_featvis_transfer.py``."""
    check_model(other)
    check_positive_int(per_class, "per_class")
    num_classes = classifier_layer(model).out_features
    targets = torch.arange(num_classes).repeat(per_class)
    images = maximize(model, [ClassLogit(int(c)) for c in targets], **maximize_options)
    targets = targets.to(images.device)
    with preserved(model), preserved(other), torch.no_grad():
        probabilities = logits_for(model, images).softmax(dim=1)
        predicted = logits_for(other, images.to(model_device(other))).argmax(dim=1).to(images.device)
    return Transfer(images, targets, probabilities.gather(1, targets[:, None]).squeeze(1), predicted,
                    (probabilities.argmax(dim=1) == targets).float().mean().item(),
                    (predicted == targets).float().mean().item())


class TopActivating(NamedTuple):
    images: torch.Tensor       # k x C x H x W, most exciting first
    indices: torch.Tensor      # k dataset indices
    activations: torch.Tensor  # k values of the unit
    labels: torch.Tensor       # k dataset labels


def _fetcher(data):
    """``(n, fetch)``: the size of ``data`` and ``fetch(indices) -> (images, labels)``, for a
    dataset with ``.tensors(indices)`` (labkit's Fashion-MNIST), an ``(images, labels)`` pair of
    tensors, or any dataset of (image, label) pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data[0], torch.as_tensor(data[1])
        if len(labels) != len(images):
            raise ValueError(f"data holds {len(images)} images but {len(labels)} labels")
        return len(images), lambda idx: (images[idx.to(images.device)], labels[idx.to(labels.device)])
    if callable(getattr(data, "tensors", None)) and hasattr(data, "__len__"):  # not TensorDataset's tuple
        return len(data), data.tensors
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        def fetch(idx):
            items = [data[int(i)] for i in idx]
            return (torch.stack([torch.as_tensor(item[0]) for item in items]),
                    torch.tensor([int(item[1]) for item in items]))
        return len(data), fetch
    raise TypeError(f"data must be a dataset of (image, label) or an (images, labels) pair of "
                    f"tensors, got {type(data).__name__}")


def _image_batches(model, data, batch_size: int, desc: str, progress: bool):
    """``(indices, images)`` over ``data`` in batches, checked and on the model's device."""
    n, fetch = _fetcher(data)
    device = model_device(model)
    for part in tqdm(batches(n, batch_size), desc=desc, disable=not progress, leave=False):
        idx = torch.arange(part.start, part.stop)
        yield idx.to(device), check_images(fetch(idx)[0].to(device), model, "data images")


def _fetch(model, data, indices: torch.Tensor):
    """Images and labels of ``data`` at ``indices`` (any shape), on the model's device."""
    _, fetch = _fetcher(data)
    images, labels = fetch(indices.reshape(-1).cpu())
    device = model_device(model)
    return (images.to(device).view(*indices.shape, *images.shape[1:]),
            torch.as_tensor(labels).to(device).view(indices.shape))


def _check_k(k, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the dataset's size), got {k!r}")


def top_activating(model: nn.Module, data, unit, k: int = 9, batch_size: int = 500,
                   progress: bool = True) -> TopActivating:
    """The ``k`` images of ``data`` on which ``unit`` is largest, found in one batched pass: the
    dataset-example view of a unit (Zeiler & Fergus 2014), to set beside what :func:`maximize`
    draws. Returns ``(images, indices, activations, labels)``, largest first, on the model's
    device."""
    check_model(model)
    _check_k(k, _fetcher(data)[0])
    unit = as_unit(unit)
    device = model_device(model)
    best_values, best_idx = torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device)
    with preserved(model), torch.no_grad():
        for idx, images in _image_batches(model, data, batch_size, "top_activating", progress):
            values = torch.cat([best_values, _unit_values(model, images, [unit] * len(images))])
            indices = torch.cat([best_idx, idx])
            keep = values.topk(min(k, len(values))).indices
            best_values, best_idx = values[keep], indices[keep]
    images, labels = _fetch(model, data, best_idx)
    return TopActivating(images, best_idx, best_values, labels)


class Neighbors(NamedTuple):
    images: torch.Tensor     # B x k x C x H x W, nearest first
    indices: torch.Tensor    # B x k dataset indices
    distances: torch.Tensor  # B x k Euclidean distances in the representation
    labels: torch.Tensor     # B x k dataset labels


def nearest_neighbors(model: nn.Module, data, x: torch.Tensor, k: int = 5, batch_size: int = 500,
                      progress: bool = True) -> Neighbors:
    """For each image of ``x``, the ``k`` images of ``data`` whose representations
    (:func:`labkit.models.features`, the input of the final linear layer) are closest in
    Euclidean distance (Krizhevsky et al. 2012): images the model sees as alike, whatever their
    pixels. One batched pass over ``data``."""
    check_model(model)
    _check_k(k, _fetcher(data)[0])
    query = features(model, check_images(x, model))
    best_dist = query.new_empty(len(query), 0)
    best_idx = torch.empty(len(query), 0, dtype=torch.long, device=query.device)
    for idx, images in _image_batches(model, data, batch_size, "nearest_neighbors", progress):
        # without the matrix-product shortcut, so an image's distance to itself is exactly 0
        batch_dist = torch.cdist(query, features(model, images), compute_mode="donot_use_mm_for_euclid_dist")
        dist = torch.cat([best_dist, batch_dist], dim=1)
        indices = torch.cat([best_idx, idx.expand(len(query), -1)], dim=1)
        keep = dist.topk(min(k, dist.shape[1]), dim=1, largest=False).indices
        best_dist, best_idx = dist.gather(1, keep), indices.gather(1, keep)
    images, labels = _fetch(model, data, best_idx)
    return Neighbors(images, best_idx, best_dist, labels)


def filters(model: nn.Module, layer=None) -> torch.Tensor:
    """The kernels of the first ``nn.Conv2d`` (or of ``layer``, a module or its dotted name),
    ``out_channels x in_channels x kh x kw``, each kernel min-max scaled to [0, 1] so that it
    can be shown as an image (RGB for a 3-channel input), as in Krizhevsky et al. 2012, Fig. 3."""
    check_model(model)
    if layer is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer")
    else:
        conv = resolve_layer(model, layer)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"layer {layer!r} must be an nn.Conv2d, got {type(conv).__name__}")
    weight = conv.weight.detach().clone()
    low = weight.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
    high = weight.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return (weight - low) / (high - low).clamp_min(1e-12)


# --- inside the network: feature maps, receptive fields, patches, deep dream, consistency --------

def feature_maps(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` (a dotted name) for the images ``x``, read with a forward hook
    in one forward pass: ``B x C x H' x W'`` for a convolutional layer, detached."""
    check_model(model)
    check_images(x, model)
    with preserved(model), torch.no_grad():
        return _site_outputs(model, x, {layer})[layer].detach()


class ReceptiveField(NamedTuple):
    size: int     # R: one output position sees an R x R square of input pixels
    stride: int   # J: moving one position in the layer moves the square by J pixels
    padding: int  # P: the square of position (i, j) starts at pixel (i J - P, j J - P)

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)``, half-open, of the square seen by position ``(i, j)``;
        it may reach past the image's border (the zero padding)."""
        top, left = i * self.stride - self.padding, j * self.stride - self.padding
        return top, left, top + self.size, left + self.size


def _pair(value) -> int:
    """One number of a square kernel, stride or padding (``3`` or ``(3, 3)``)."""
    values = value if isinstance(value, tuple) else (value, value)
    if values[0] != values[1]:
        raise ValueError(f"receptive_field handles square kernels, strides and paddings, got {value!r}")
    return int(values[0])


def receptive_field(model: nn.Module, layer: str, image_shape=(1, 28, 28)) -> ReceptiveField:
    """The receptive field of one position of ``layer``'s output (Araujo et al. 2019,
    "Computing Receptive Fields of Convolutional Neural Networks"): with ``k_l, s_l, p_l, d_l``
    the kernel, stride, padding and dilation of the convolutions and poolings before it,

        R = 1 + sum_l (k_l - 1) d_l J_{l-1},   J = prod_l s_l,   P = sum_l p_l J_{l-1},

    ``J_l`` the product of the strides up to layer ``l`` (``J_0 = 1``). The layers are found in
    the order one forward pass of an ``image_shape`` image runs them; layers that keep the
    spatial size (ReLU, batch norm, residual adds) pass through. Padding layers count as ``p``."""
    check_model(model)
    target = resolve_layer(model, layer)
    leaves = [m for m in model.modules() if not list(m.children()) and m is not target] + [target]
    trace = []
    with preserved(model), hooks() as handles, torch.no_grad():
        for module in leaves:
            handles.append(module.register_forward_hook(
                lambda module, inputs, output: trace.append((module, inputs[0].shape, output.shape))
                if isinstance(output, torch.Tensor) and isinstance(inputs[0], torch.Tensor) else None))
        model(torch.zeros((1, *image_shape), device=model_device(model)))
    ends = [i for i, (module, _, _) in enumerate(trace) if module is target]
    if not ends:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    size, stride, padding = 1, 1, 0
    for module, before, after in trace[:ends[0] + 1]:
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            kernel, step = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
            dilation = _pair(getattr(module, "dilation", 1))
            size += (kernel - 1) * dilation * stride
            padding += _pair(module.padding) * stride
            stride *= step
        elif isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
            left, _, top, _ = module.padding
            if left != top:
                raise ValueError(f"receptive_field handles the same padding on top and left, got {module}")
            padding += left * stride
        elif len(after) != 4 or len(before) != 4 or after[-2:] != before[-2:]:
            raise ValueError(f"{type(module).__name__} before {layer!r} changes the spatial size "
                             f"({tuple(before)} -> {tuple(after)}) in a way receptive_field cannot "
                             f"follow: its positions see the whole image")
    return ReceptiveField(size, stride, padding)


class TopPatches(NamedTuple):
    patches: torch.Tensor      # k x C x R x R: the receptive field of the strongest position
    indices: torch.Tensor      # k dataset indices
    activations: torch.Tensor  # k values of the channel at that position
    positions: torch.Tensor    # k x 2: (row, column) of the position in the layer's map
    labels: torch.Tensor       # k dataset labels


def top_patches(model: nn.Module, data, units, k: int = 9, batch_size: int = 500,
                image_shape=(1, 28, 28), progress: bool = True) -> TopPatches:
    """The ``k`` dataset patches that excite a channel most (Zeiler & Fergus 2014; the
    "maximally activating patches" of Dong et al. 2017): for every image the position where the
    channel's map is largest, the ``k`` images where that maximum is largest, and of each the
    square of input pixels that position sees (:func:`receptive_field`; outside the image: 0,
    the zero padding). A channel is one detector slid over the image, so what it responds to is
    a patch, not a whole image.

    ``units``: a :class:`Channel`, or a list of channels of one layer, searched in the same
    pass (every field then has a leading dimension, one row per channel)."""
    check_model(model)
    single = not isinstance(units, list)
    units = [as_unit(u) for u in ([units] if single else units)]
    if not units or not all(isinstance(u, Channel) for u in units):
        raise TypeError(f"top_patches needs a Channel(layer, index) or a list of them, got {units!r}")
    layer = units[0].layer
    if any(u.layer != layer for u in units):
        raise ValueError(f"the channels of one call must belong to one layer, got {sorted({u.layer for u in units})}")
    _check_k(k, _fetcher(data)[0])
    field = receptive_field(model, layer, image_shape)
    device = model_device(model)
    channels = torch.tensor([u.index for u in units], device=device)
    n = len(units)
    values = torch.empty(n, 0, device=device)
    indices, positions = (torch.empty(n, 0, dtype=torch.long, device=device) for _ in range(2))
    with preserved(model), torch.no_grad():
        for idx, images in _image_batches(model, data, batch_size, "top_patches", progress):
            maps = _site_outputs(model, images, {layer})[layer]
            for unit in units:
                unit.value(maps[:1])  # validates the layer's shape and the channel index
            strongest, where = maps[:, channels].flatten(2).max(dim=2)  # B x n
            values = torch.cat([values, strongest.T], dim=1)
            indices = torch.cat([indices, idx.expand(n, -1)], dim=1)
            positions = torch.cat([positions, where.T], dim=1)
            keep = values.topk(min(k, values.shape[1]), dim=1).indices
            values, indices, positions = (t.gather(1, keep) for t in (values, indices, positions))
    rows, columns = positions // maps.shape[-1], positions % maps.shape[-1]
    images, labels = _fetch(model, data, indices)
    padded = F.pad(images, (field.size,) * 4)  # zeros: what the convolutions' padding saw
    patches = torch.stack([torch.stack([
        padded[u, j, :, top + field.size:bottom + field.size, left + field.size:right + field.size]
        for j, (top, left, bottom, right) in enumerate(field.box(int(r), int(c)) for r, c in zip(rows[u], columns[u]))])
        for u in range(n)])
    result = TopPatches(patches, indices, values, torch.stack([rows, columns], dim=2), labels)
    return TopPatches(*(t[0] for t in result)) if single else result


def _layer_energy(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Mean square of ``layer``'s output per image: what deep dream climbs."""
    return _site_outputs(model, x, {layer})[layer].flatten(1).pow(2).mean(dim=1)


def deep_dream(model: nn.Module, x: torch.Tensor, layer: str, steps: int = 10, lr: float = 0.01,
               octaves: int = 3, octave_scale: float = 1.4, jitter: int = 2, generator=None,
               progress: bool = True) -> torch.Tensor:
    """Deep dream (Mordvintsev, Olah & Tyka 2015, "Inceptionism"): gradient ascent on the
    image for the energy of a layer, ``E(x) = mean(A_layer(x)^2)``, so that whatever the layer
    already sees in ``x`` is amplified. The ascent runs at ``octaves`` scales, from the image
    shrunk by ``octave_scale ** (octaves - 1)`` up to full size; at each scale the details
    added so far are enlarged and put on the image at that scale, then ``steps`` steps of

        x <- clip_[0,1]( x + lr * sqrt(D) * g / ||g||_2 ),   g = grad_x E(roll(x, jitter)),

    (the same normalized step as :func:`maximize`; the random roll of up to ``jitter``
    pixels keeps the pattern from locking onto the pixel grid). Returns the dreamed images,
    the size of ``x``, detached; ``x`` is not changed."""
    check_model(model)
    check_images(x, model)
    check_positive_int(steps, "steps")
    check_positive_int(octaves, "octaves")
    if check_number(lr, "lr") <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if check_number(octave_scale, "octave_scale") < 1:
        raise ValueError(f"octave_scale must be >= 1 (how much smaller each octave is), got {octave_scale!r}")
    if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
        raise ValueError(f"jitter must be an int >= 0 (pixels), got {jitter!r}")
    resolve_layer(model, layer)
    bases = [x.detach()] + [F.interpolate(x.detach(), scale_factor=octave_scale ** -o, mode="bilinear",
                                          align_corners=False, antialias=True).clamp(0, 1)
                            for o in range(1, octaves)]
    detail = torch.zeros_like(bases[-1])
    with preserved(model):
        for base in tqdm(bases[::-1], desc="deep_dream", disable=not progress, leave=False):
            detail = F.interpolate(detail, size=base.shape[-2:], mode="bilinear", align_corners=False)
            image = (base + detail).clamp(0, 1)
            step_size = lr * math.sqrt(image[0].numel())
            for _ in range(steps):
                g = _unit_gradient(model, image, lambda m, z: _layer_energy(m, z, layer),
                                   _random_shift(jitter, generator))
                image = (image + step_size * g / per_sample_norm(g)).clamp(0, 1)
            detail = image - base
    return image.detach()


def consistency(labels: torch.Tensor, num_classes: int, similarity: torch.Tensor | None = None) -> torch.Tensor:
    """Dong et al.'s consistency of neurons (2017, "Towards Interpretable Deep Neural Networks
    by Leveraging Adversarial Examples"): for a neuron n, ``p_c = Pr(x shows concept c | x
    activates n)``, estimated as the fraction of its top-activating images whose concept
    (here: the true class) is ``c``, and

        consis(n) = p^T A p,   A_ij = similarity of concepts i and j (A_ii = 1),

    1 when all top images show one concept; with ``A = I`` (the default) ``1 / C`` when they
    spread evenly over ``C`` concepts. ``labels``: ``N x k`` concept indices, the top-``k``
    images of each of ``N`` neurons; returns ``N`` values. Computed on adversarial images
    (``consis_adv``), it asks whether a neuron still detects one concept there."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (N x k class indices), got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    check_positive_int(num_classes, "num_classes")
    if labels.dim() != 2 or labels.shape[1] == 0:
        raise ValueError(f"labels must be N x k (the top-k images of each of N neurons), got shape {tuple(labels.shape)}")
    if (labels < 0).any() or (labels >= num_classes).any():
        raise ValueError(f"labels must be class indices in [0, {num_classes - 1}]")
    p = F.one_hot(labels, num_classes).float().mean(dim=1)
    if similarity is None:
        return p.pow(2).sum(dim=1)
    if not isinstance(similarity, torch.Tensor) or similarity.shape != (num_classes, num_classes):
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"similarity must be a {num_classes} x {num_classes} tensor, got {shape}")
    if not torch.isfinite(similarity).all() or not torch.equal(similarity, similarity.T):
        raise ValueError("similarity must be a finite, symmetric matrix (A_ij = A_ji)")
    similarity = similarity.to(p)
    return torch.einsum("ni,ij,nj->n", p, similarity, p)
