"""Checks for lesson 05 (robust gradients): the Sobel edge map of an image and the Pearson
correlation per image, which together score how well a saliency map follows the image's edges.

labkit has no edge-alignment function; the references live here (they are short)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attribution.evaluation import spearman
from . import _engine
from ._cases import describe, draw, image_shapes, images
from ._engine import Case, Mistake, Spec

__all__ = ["check_edge_map", "check_correlation"]

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_components(x: torch.Tensor, padding: str = "zeros", grey=lambda x: x.mean(dim=1, keepdim=True)):
    """``B x 2 x H x W``: the horizontal and vertical Sobel derivatives of the grey image (the
    channel mean), with one pixel of zero padding so the size stays ``H x W``."""
    kernels = torch.stack([SOBEL_X, SOBEL_X.T])[:, None].to(x)
    image = grey(x)
    if padding == "replicate":
        return F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), kernels)
    return F.conv2d(image, kernels, padding=1)


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """Reference: the Sobel gradient magnitude ``sqrt(Gx^2 + Gy^2)`` of the channel-mean image,
    ``B x H x W`` (Sobel & Feldman 1968; zero padding)."""
    return sobel_components(x).norm(dim=1)


def _edge_cases(generator: torch.Generator) -> list[Case]:
    return [Case((images(generator, batch, channels, height, width, saturated=0.3),),
                 describe=describe(batch, channels, height, width))
            for batch, channels, height, width in image_shapes(generator)]


def _from_components(combine, **options):
    return lambda x: combine(sobel_components(x, **options))


def _luminance(x):
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return (x * torch.tensor([0.299, 0.587, 0.114]).to(x).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _prewitt(x):
    kx = torch.tensor([[-1.0, 0.0, 1.0]] * 3)
    kernels = torch.stack([kx, kx.T])[:, None].to(x)
    return F.conv2d(x.mean(dim=1, keepdim=True), kernels, padding=1).norm(dim=1)


def _edges_per_channel(x):
    return torch.stack([edge_map(x[:, c:c + 1]) for c in range(x.shape[1])]).mean(dim=0)


EDGE_MAP = Spec(
    name="check_edge_map",
    reference=edge_map,
    cases=_edge_cases,
    dims=("batch", "height", "width"),
    mistakes=(
        Mistake("that is only one direction's derivative: combine both, sqrt(Gx^2 + Gy^2)",
                _from_components(lambda g: g[:, 0].abs())),
        Mistake("that is only one direction's derivative: combine both, sqrt(Gx^2 + Gy^2)",
                _from_components(lambda g: g[:, 1].abs())),
        Mistake("you returned Gx^2 + Gy^2: take the square root (the magnitude of the gradient)",
                _from_components(lambda g: g.square().sum(dim=1))),
        Mistake("you added |Gx| + |Gy|: the magnitude is sqrt(Gx^2 + Gy^2)",
                _from_components(lambda g: g.abs().sum(dim=1))),
        Mistake("you added Gx + Gy with their signs: the magnitude is sqrt(Gx^2 + Gy^2)",
                _from_components(lambda g: g.sum(dim=1))),
        Mistake("average the channels into one grey image (x.mean(dim=1)); you summed them",
                _from_components(lambda g: g.norm(dim=1), grey=lambda x: x.sum(dim=1, keepdim=True))),
        Mistake("use the mean of all channels as the grey image; you used only the first channel",
                _from_components(lambda g: g.norm(dim=1), grey=lambda x: x[:, :1])),
        Mistake("make one grey image first (the channel mean), then its edges: you averaged the "
                "edge maps of the separate channels", _edges_per_channel),
        Mistake("the grey image is the plain mean of the channels (x.mean(dim=1)), not a weighted "
                "luminance", _from_components(lambda g: g.norm(dim=1), grey=_luminance)),
        Mistake("the grey image is the mean of the channels, not their maximum",
                _from_components(lambda g: g.norm(dim=1), grey=lambda x: x.amax(dim=1, keepdim=True))),
        Mistake("that is the Prewitt kernel, rows weighted 1, 1, 1: Sobel weights the centre row "
                "twice, rows weighted 1, 2, 1", _prewitt),
        Mistake("pad with zeros (F.conv2d(..., padding=1)), not by repeating the border pixels",
                _from_components(lambda g: g.norm(dim=1), padding="replicate")),
    ),
)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference: Pearson's correlation of ``a[i]`` and ``b[i]`` (all their values) for each
    ``i``: ``sum (a - mean a)(b - mean b) / (||a - mean a|| ||b - mean b||)``, shape ``B``."""
    a, b = (t.flatten(1) - t.flatten(1).mean(dim=1, keepdim=True) for t in (a, b))
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def _correlation_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for batch in (1, 3, draw(generator, 4, 6)):
        height, width = draw(generator, 6, 12), draw(generator, 6, 12)
        a = images(generator, batch, 1, height, width)[:, 0]
        # b: a mix of a and noise, each map its own offset and weight, so that correlations
        # differ between maps, are not +-1, and offsets matter for anything not centred
        weight = torch.rand(batch, 1, 1, generator=generator) * 2 - 1
        offset = 0.5 + 3 * torch.rand(batch, 1, 1, generator=generator)
        b = offset + weight * a + 0.3 * torch.rand(batch, height, width, generator=generator)
        a = a + 2 * torch.rand(batch, 1, 1, generator=generator)
        cases.append(Case((a, b), describe=f"{batch} pair(s) of {height}x{width} maps"))
    return cases


def _cosine(a, b):
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def _covariance(a, b):
    a, b = (t.flatten(1) - t.flatten(1).mean(dim=1, keepdim=True) for t in (a, b))
    return (a * b).mean(dim=1)


def _batch_centred(a, b):
    a, b = (t.flatten(1) - t.mean() for t in (a, b))
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def _whole_batch(a, b):
    return correlation(a.reshape(1, -1), b.reshape(1, -1)).expand(a.shape[0])


CORRELATION = Spec(
    name="check_correlation",
    reference=correlation,
    cases=_correlation_cases,
    dims=("batch",),
    mistakes=(
        Mistake("subtract each map's mean first: without it this is the cosine similarity, which "
                "a constant offset changes", _cosine),
        Mistake("divide by the two norms (or standard deviations): that is the covariance, whose "
                "size depends on the maps' scale", _covariance),
        Mistake("subtract each map's own mean, not the mean of the whole batch", _batch_centred),
        Mistake("one correlation per pair of maps: you correlated the whole batch at once", _whole_batch),
        Mistake("that is the rank (Spearman) correlation: Pearson's uses the values themselves",
                lambda a, b: spearman(a, b)),
    ),
)


def check_edge_map(edge_map) -> _engine.Result:
    """``edge_map(x)``: ``sqrt(Gx^2 + Gy^2)`` of the Sobel derivatives of the channel-mean image,
    zero padding, ``B x H x W``."""
    return _engine.run(EDGE_MAP, edge_map)


def check_correlation(correlation) -> _engine.Result:
    """``correlation(a, b)``: Pearson's correlation of each pair of maps ``a[i]``, ``b[i]``, shape ``B``."""
    return _engine.run(CORRELATION, correlation)
