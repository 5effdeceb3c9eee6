"""Judging attributions: heatmaps for plotting, the model-randomization sanity check, and the
deletion / insertion curves that score faithfulness."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .._core import batched, check_positive_int, check_reference, preserved
from ..models import randomize
from ._common import check_score, class_score, per_forward, pixel_scores, prepare

REDUCTIONS = ("max_abs", "sum", "l2")


def to_heatmap(attr: torch.Tensor, reduce: str = "max_abs") -> torch.Tensor:
    """One value per pixel, ``B x H x W``, from ``B x C x H x W`` attributions: ``"max_abs"``
    the largest ``|a|`` over channels (Simonyan et al. 2014), ``"sum"`` the signed channel sum
    (keeps the sign, e.g. for gradient x input or LRP), ``"l2"`` the channel norm."""
    if not isinstance(attr, torch.Tensor) or not attr.is_floating_point():
        kind = f"a {attr.dtype} tensor" if isinstance(attr, torch.Tensor) else type(attr).__name__
        raise TypeError(f"attr must be a float tensor B x C x H x W, got {kind}")
    if attr.dim() != 4:
        raise ValueError(f"attr must have 4 dimensions (B x C x H x W), got shape {tuple(attr.shape)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    attr = attr.detach()
    if reduce == "max_abs":
        return attr.abs().amax(dim=1)
    if reduce == "sum":
        return attr.sum(dim=1)
    return attr.norm(dim=1)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties getting the mean of their ranks (as scipy)."""
    ordered = values.sort(dim=-1).values
    first = torch.searchsorted(ordered, values, right=False)
    last = torch.searchsorted(ordered, values, right=True)
    return (first + last - 1).float() / 2  # float32: exact up to 2**24 pixels, and MPS has no float64


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation between ``a[i]`` and ``b[i]`` (flattened) for every ``i``:
    the Pearson correlation of their ranks, ties ranked by their mean rank. NaN where one of
    them is constant (no ranking to compare)."""
    ranks = [_average_ranks(t.detach().flatten(1).contiguous()) for t in (a, b)]
    ranks = [r - r.mean(dim=1, keepdim=True) for r in ranks]
    return (ranks[0] * ranks[1]).sum(1) / (ranks[0].norm(dim=1) * ranks[1].norm(dim=1))


@dataclass
class SanityCheck:
    """Result of :func:`sanity_check`, ready to plot: ``layers[k]`` names the layer
    randomized (with those above it, in cascade) for row ``k`` of the ``L x B`` correlations;
    ``heatmaps`` holds the ``B x H x W`` channel-sum maps, the original model's first
    (``L + 1`` of them)."""
    layers: list[str]
    rank_correlation: torch.Tensor
    rank_correlation_signed: torch.Tensor
    heatmaps: torch.Tensor


def sanity_check(method: Callable, model: nn.Module, x: torch.Tensor, target,
                 layers: str = "cascade", seed: int = 0, progress: bool = True,
                 **method_options) -> SanityCheck:
    """Model-randomization sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency
    Maps"): the attribution ``method(model, x, target, **method_options)`` of the trained
    model against that of copies whose weights are re-initialized, layer by layer from the
    output (``layers="cascade"``: that layer and all above it; ``"independent"``: that layer
    alone; see :func:`labkit.models.randomize`, which ``seed`` seeds).

    Per image, the Spearman rank correlation of the channel-summed heatmaps, of their absolute
    values (``rank_correlation``, what the paper plots) and signed (``rank_correlation_signed``).
    A method that explains the model falls towards 0 as layers are randomized; one that stays
    near 1 explains the input, not the model. Every call runs with the global random generator
    seeded by ``seed``, so SmoothGrad without its own ``generator`` draws the same noise for each.
    """
    if not callable(method):
        raise TypeError(f"method must be an attribution function like gradient, got {type(method).__name__}")
    prepare(model, x, target)

    def heatmap(net):
        with _seeded(seed, x.device):
            attr = method(net, x, target, **method_options)
        return to_heatmap(attr, "sum")

    with preserved(model):
        copies = randomize(model, layers=layers, seed=seed)  # of the model in eval mode
        maps = [heatmap(model)]
        for _, copy in tqdm(copies, desc="Sanity check", disable=not progress, leave=False):
            maps.append(heatmap(copy))
    heatmaps = torch.stack(maps)
    signed = torch.stack([spearman(heatmaps[0], m) for m in heatmaps[1:]])
    absolute = torch.stack([spearman(heatmaps[0].abs(), m.abs()) for m in heatmaps[1:]])
    return SanityCheck([name for name, _ in copies], absolute, signed, heatmaps)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@dataclass
class Curve:
    """A deletion or insertion curve: ``scores`` (``B x (steps + 1)``) at ``fractions`` of the
    pixels removed (inserted), and ``auc``, the area under each curve (``B``)."""
    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


def deletion_curve(model: nn.Module, x: torch.Tensor, target, attr: torch.Tensor, steps: int = 20,
                   baseline=0.0, score: str = "probability", reduce: str = "sum",
                   batch_size: int | None = None, progress: bool = True) -> Curve:
    """Deletion (Samek et al. 2017, "Evaluating the Visualization of What a Deep Neural Network
    Has Learned"; Petsiuk et al. 2018, "RISE"): replace the most attributed pixels (all
    channels) by ``baseline``, a fraction ``k / steps`` at a time, and follow the target
    ``score`` -- softmax ``"probability"`` (the papers') or ``"logit"``. Faithful attributions
    make it fall fast: a small area under the curve is good.

    ``attr``: ``B x C x H x W`` (reduced to one value per pixel with :func:`to_heatmap`'s
    ``reduce``) or a ``B x H x W`` heatmap. The ``B x (steps + 1)`` images run ``batch_size``
    per forward pass (None: sized for the device, see :mod:`labkit.attribution`).
    """
    return _curve(model, x, target, attr, steps, baseline, score, reduce, batch_size, progress,
                  deleting=True)


def insertion_curve(model: nn.Module, x: torch.Tensor, target, attr: torch.Tensor, steps: int = 20,
                    baseline=0.0, score: str = "probability", reduce: str = "sum",
                    batch_size: int | None = None, progress: bool = True) -> Curve:
    """Insertion (Petsiuk et al. 2018, "RISE"): start from ``baseline`` (black by default; the
    paper uses a blurred copy of ``x``, which can be passed as a tensor) and put the most
    attributed pixels of ``x`` back, a fraction ``k / steps`` at a time, following the target
    ``score``. Faithful attributions make it rise fast: a large area under the curve is good.
    Arguments as in :func:`deletion_curve`.
    """
    return _curve(model, x, target, attr, steps, baseline, score, reduce, batch_size, progress,
                  deleting=False)


def _curve(model, x, target, attr, steps, baseline, score, reduce, batch_size, progress,
           deleting: bool) -> Curve:
    target = prepare(model, x, target)
    check_positive_int(steps, "steps")
    check_score(score)
    heat = pixel_scores(attr, x, reduce)
    baseline = check_reference(baseline, x, "baseline")
    pixels = heat[0].numel()
    # rank[b, p] = place of pixel p when image b's pixels are sorted by decreasing attribution
    order = heat.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=x.device).expand_as(order))
    fractions = torch.linspace(0, 1, steps + 1, device=x.device, dtype=x.dtype)
    start, end = (x, baseline) if deleting else (baseline, x)
    # step k changes the round(k * pixels / steps) most attributed pixels of each image
    images = ((torch.where((rank < round(k * pixels / steps)).view(-1, 1, *x.shape[-2:]), end, start), target)
              for k in range(steps + 1))
    with preserved(model), torch.no_grad():
        scores = torch.stack(list(batched(functools.partial(class_score, model, score=score), images,
                                          per_forward(x, batch_size), steps + 1, progress,
                                          "Deletion" if deleting else "Insertion")), dim=1)
    return Curve(fractions, scores, torch.trapezoid(scores, fractions, dim=1))
