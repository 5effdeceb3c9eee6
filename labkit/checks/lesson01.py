"""Checks for lesson 01 (gradient saliency): the gradient, gradient x input, the saliency map."""
from __future__ import annotations

from .. import attribution
from . import _engine
from ._cases import classifier_cases
from ._engine import Mistake, Spec
from ._mistakes import gradient_mistakes, input_gradient_of, logit_gradient

__all__ = ["check_gradient", "check_gradient_x_input", "check_saliency_map"]


GRADIENT = Spec(
    name="check_gradient",
    reference=attribution.gradient,
    cases=classifier_cases,
    mistakes=(
        *gradient_mistakes(),
        Mistake("you differentiated the sum of all logits: pick each image's target logit first",
                input_gradient_of(lambda z, t: z.sum(1))),
    ),
)

GRADIENT_X_INPUT = Spec(
    name="check_gradient_x_input",
    reference=attribution.gradient_x_input,
    cases=classifier_cases,
    mistakes=(
        Mistake("that is the plain gradient: multiply it by the input x",
                lambda model, x, target: logit_gradient(model, x, target)),
        Mistake("you multiplied |gradient| by the input: gradient x input keeps the gradient's sign",
                lambda model, x, target: logit_gradient(model, x, target).abs() * x),
        Mistake("you multiplied by (1 - x) or the inverted image: multiply by x itself",
                lambda model, x, target: logit_gradient(model, x, target) * (1 - x)),
        Mistake("you added the gradient and the input: gradient x input multiplies them, pixel by pixel",
                lambda model, x, target: logit_gradient(model, x, target) + x),
        Mistake("multiply by each pixel's own value x, not by the mean of x",
                lambda model, x, target: logit_gradient(model, x, target) * x.mean()),
        *gradient_mistakes(then=lambda grad, x: grad * x),
    ),
)


def _reduce_channels(reduction):
    return lambda model, x, target: reduction(logit_gradient(model, x, target))


def saliency_map(model, x, target):
    """Reference: Simonyan et al.'s saliency, ``max_c |df_t/dx_c|``, ``B x H x W``."""
    return attribution.to_heatmap(attribution.gradient(model, x, target), "max_abs")


SALIENCY_MAP = Spec(
    name="check_saliency_map",
    reference=saliency_map,
    cases=classifier_cases,
    dims=("batch", "height", "width"),
    forbidden=(attribution.to_heatmap,),
    mistakes=(
        Mistake("take the absolute value of the gradient first, then the maximum over channels "
                "(max_c |g_c|): you took the max of the signed gradient",
                _reduce_channels(lambda g: g.amax(dim=1))),
        Mistake("take the absolute value before the maximum over channels, not after "
                "(max_c |g_c|, not |max_c g_c|)", _reduce_channels(lambda g: g.amax(dim=1).abs())),
        Mistake("you averaged |gradient| over the channels: the saliency map takes the maximum",
                _reduce_channels(lambda g: g.abs().mean(dim=1))),
        Mistake("you summed |gradient| over the channels: the saliency map takes the maximum",
                _reduce_channels(lambda g: g.abs().sum(dim=1))),
        Mistake("you took the L2 norm over the channels: the saliency map takes the maximum of |g|",
                _reduce_channels(lambda g: g.norm(dim=1))),
        Mistake("you used only the first channel: take the maximum of |gradient| over all channels",
                _reduce_channels(lambda g: g[:, 0].abs())),
        Mistake("you took the minimum over the channels: the saliency map takes the maximum of |g|",
                _reduce_channels(lambda g: g.abs().amin(dim=1))),
        Mistake("that is gradient x input: the saliency map uses the gradient alone",
                lambda model, x, target: (logit_gradient(model, x, target) * x).abs().amax(dim=1)),
        *gradient_mistakes(then=lambda grad, x: grad.abs().amax(dim=1)),
    ),
)


def check_gradient(gradient) -> _engine.Result:
    """``gradient(model, x, target)``: ``d logit_target / d x``, shaped like ``x``."""
    return _engine.run(GRADIENT, gradient)


def check_gradient_x_input(gradient_x_input) -> _engine.Result:
    """``gradient_x_input(model, x, target)``: ``x * d logit_target / d x``."""
    return _engine.run(GRADIENT_X_INPUT, gradient_x_input)


def check_saliency_map(saliency_map) -> _engine.Result:
    """``saliency_map(model, x, target)``: ``max`` over channels of ``|gradient|``, ``B x H x W``."""
    return _engine.run(SALIENCY_MAP, saliency_map)
