"""Checks for lesson 12 (measuring attributions): infidelity with given perturbations, the Gini
index of a map."""
from __future__ import annotations

import torch

from .. import attribution
from ..attribution import metrics
from . import _engine
from ._cases import classifier_cases, draw
from ._engine import Mistake, Spec

__all__ = ["check_infidelity", "check_gini"]


# ------------------------------------------------------------------ infidelity

def infidelity(model, x, target, attr, perturbations):
    """Reference: ``mean_k (I_k . attr - (f_t(x) - f_t(x - I_k)))^2`` per image, for the
    perturbations ``B x K x C x H x W``, ``f_t`` the target logit (labkit's infidelity without
    normalization, handed exactly these perturbations)."""
    flat = perturbations.flatten(0, 1)
    return metrics.infidelity(model, x, target, attr, n_perturb=perturbations.shape[1], normalize=False,
                              perturb=lambda xs: (flat, xs - flat))


def _score(model, images, target, kind):
    with torch.no_grad():
        logits = model(images)
    if kind == "probability":
        logits = logits.softmax(1)
    if kind == "predicted":
        return logits.max(1).values
    return logits.gather(1, target[:, None]).squeeze(1)


def _infidelity_variant(sign: float = 1.0, flip: float = 1.0, loss=torch.square, reduce=torch.mean,
                        kind: str = "logit", dot=lambda i, a: (i * a).flatten(2).sum(2)):
    """Infidelity with one piece changed: the direction of the perturbation (``sign``: x - I or
    x + I), the order of the score difference (``flip``), the loss, the reduction over
    perturbations, the score, the product ``I . attr``."""
    def wrong(model, x, target, attr, perturbations):
        batch, k = perturbations.shape[:2]
        moved = (x[:, None] - sign * perturbations).flatten(0, 1)
        repeated = target.repeat_interleave(k)
        change = _score(model, x, target, kind).repeat_interleave(k) - _score(model, moved, repeated, kind)
        predicted = dot(perturbations, attr[:, None])
        return reduce(loss(predicted - flip * change.view(batch, k)), 1)
    return wrong


def _infidelity_cases(generator: torch.Generator):
    cases = classifier_cases(generator)
    for case in cases:
        model, x, target = case.args[:3]
        k = draw(generator, 3, 6)
        # near the model's own gradient, so I . attr and the change of the score have the same
        # size: then a wrong score, sign or reduction changes the answer visibly (with a random
        # map, (I . attr)^2 swamps the score's change and many mistakes look alike)
        attr = attribution.gradient(model, x, target) * (1 + 0.5 * torch.randn(x.shape, generator=generator))
        perturbations = 0.1 * torch.randn(len(x), k, *x.shape[1:], generator=generator)
        case.args += (attr, perturbations)
        case.describe += f", {k} perturbations per image"
    return cases


INFIDELITY = Spec(
    name="check_infidelity",
    reference=infidelity,
    cases=_infidelity_cases,
    forbidden=(metrics.infidelity,),
    dims=("batch",),
    mistakes=(
        Mistake("the perturbed image is x - I (the perturbation is what is taken away), not x + I",
                _infidelity_variant(sign=-1.0)),
        Mistake("the score change is f(x) - f(x - I), the original minus the perturbed: you have it "
                "the other way round", _infidelity_variant(flip=-1.0)),
        Mistake("square the error (I . attr - change)^2; you took its absolute value",
                _infidelity_variant(loss=torch.abs)),
        Mistake("take the mean over the perturbations of each image, not the sum",
                _infidelity_variant(reduce=torch.sum)),
        Mistake("the error is squared before averaging over the perturbations: mean of squares, "
                "not the square of the mean", _infidelity_variant(loss=lambda e: e, reduce=lambda e, d:
                                                                 e.mean(d).square())),
        Mistake("you used the softmax probability: here the score is the target class's logit",
                _infidelity_variant(kind="probability")),
        Mistake("you explained the predicted class (the largest logit), not the `target` passed in",
                _infidelity_variant(kind="predicted")),
        Mistake("I . attr is a dot product: multiply pixel by pixel and *sum* over channels and "
                "pixels (you took the mean)", _infidelity_variant(dot=lambda i, a: (i * a).flatten(2).mean(2))),
    ),
)


# ------------------------------------------------------------------ Gini index

def gini(attr):
    """Reference: the Gini index of ``|attr|`` per image (labkit's sparseness)."""
    return metrics.sparseness(attr)


def _gini_variant(magnitude=torch.abs, descending: bool = False, offset: int = 0, divide_by_n: bool = True):
    def wrong(attr):
        a = magnitude(attr).flatten(1).sort(dim=1, descending=descending).values
        n = a.shape[1]
        i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device) - offset
        return ((2 * i - n - 1) * a).sum(1) / ((n if divide_by_n else 1) * a.sum(1))
    return wrong


def _gini_cases(generator: torch.Generator):
    cases = []
    for batch, channels, height, width in ((1, 1, draw(generator, 5, 9), draw(generator, 5, 9)),
                                          (draw(generator, 2, 4), 3, draw(generator, 6, 10), 7),
                                          (draw(generator, 2, 4), 1, 8, draw(generator, 6, 10))):
        # signed maps with a few strong pixels, as attributions are
        attr = torch.randn(batch, channels, height, width, generator=generator) ** 3
        cases.append(_engine.Case((attr,), describe=f"{batch} signed map(s) {channels}x{height}x{width}"))
    return cases


GINI = Spec(
    name="check_gini",
    reference=gini,
    cases=_gini_cases,
    forbidden=(metrics.sparseness,),
    dims=("batch",),
    mistakes=(
        Mistake("take the absolute value of the attributions first: a strong negative value is as "
                "concentrated as a strong positive one", _gini_variant(magnitude=lambda a: a)),
        Mistake("sort the values in ascending order (smallest first), so the largest get the "
                "largest weights 2i - n - 1", _gini_variant(descending=True)),
        Mistake("the ranks i run from 1 to n, not from 0 (torch.arange(1, n + 1))", _gini_variant(offset=1)),
        Mistake("divide by n times the sum of the values, not by the sum alone",
                _gini_variant(divide_by_n=False)),
    ),
)


def check_infidelity(infidelity) -> _engine.Result:
    """``infidelity(model, x, target, attr, perturbations)``: per image, the mean over its
    perturbations ``I_k`` (``B x K x C x H x W``) of ``(I_k . attr - (f_t(x) - f_t(x - I_k)))^2``,
    ``f_t`` the target logit; ``B`` values."""
    return _engine.run(INFIDELITY, infidelity)


def check_gini(gini) -> _engine.Result:
    """``gini(attr)``: the Gini index of ``|attr|`` per image, ``B`` values."""
    return _engine.run(GINI, gini)
