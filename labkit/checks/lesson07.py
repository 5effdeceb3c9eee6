"""Checks for lesson 07 (Grad-CAM): Grad-CAM with hooks, guided backpropagation."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import attribution
from . import _engine
from ._cases import classifier_cases, draw
from ._engine import Mistake, Spec
from ._mistakes import (first_target, input_gradient_of, log_probability, logit_gradient, picked, predicted,
                        probability)

__all__ = ["check_grad_cam", "check_guided_backprop"]


# ------------------------------------------------------------------ Grad-CAM

def grad_cam(model, x, target, layer):
    """Reference: labkit's Grad-CAM of ``layer`` (a module name), ReLU'd and bilinearly upsampled
    to the input, ``B x 1 x H x W``."""
    return attribution.gradcam(model, x, target, layer=layer)


def _layer_and_gradient(model, x, target, layer, score=picked, capture="output"):
    """The output ``A`` of ``layer`` (or its input) and ``d score / dA``, for wrong Grad-CAMs."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, out: captured.append(out if capture == "output" else i[0]))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            (grad,) = torch.autograd.grad(score(logits, target).sum(), captured[-1])
    finally:
        handle.remove()
    return captured[-1].detach(), grad


def _weighted_maps(weights):
    """``sum_k weights(g)_k A_k`` over the channels, for the gradient ``g`` of the maps ``A``."""
    return lambda a, g: (weights(g) * a).sum(dim=1, keepdim=True)


def _bilinear(cam, size, **options):
    return F.interpolate(cam, size=size, **(options or {"mode": "bilinear", "align_corners": False}))


def _cam_variant(score=picked, combine=_weighted_maps(lambda g: g.mean(dim=(2, 3), keepdim=True)),
                 rectify=torch.relu, resize=_bilinear, capture="output"):
    """Grad-CAM with one piece changed: the score, how activations and gradients are combined,
    the rectification, the resizing, the layer's output or input."""
    def wrong(model, x, target, layer):
        a, g = _layer_and_gradient(model, x, target, layer, score, capture)
        return resize(rectify(combine(a, g)), x.shape[-2:])
    return wrong


# tiny_cnn's layers: "0" conv (full resolution), "2" conv (stride 2), "3" its ReLU
LAYERS = ("0", "2", "3")
OTHER_LAYER = {"0": "2", "2": "0", "3": "0"}


def _grad_cam_cases(generator: torch.Generator):
    cases = classifier_cases(generator)
    # a layer at half resolution first and last, so a map left at its resolution always shows,
    # and two different layers, so a fixed layer never passes
    layers = ["2", LAYERS[draw(generator, 0, 2)], "3"]
    for case, layer in zip(cases, layers):
        case.args += (layer,)
        case.describe += f", layer={layer!r}"
    # as under labkit's sanity check: the layer's output is in the graph only if x requires grad
    cases[-1].model.requires_grad_(False)
    cases[-1].describe += ", parameters frozen"
    return cases


def _not_upsampled(out, ref, case) -> str | None:
    x, layer = case.args[1], case.args[3]
    with torch.no_grad():
        captured = []
        handle = case.model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            case.model(x)
        finally:
            handle.remove()
    if out.dim() == 4 and tuple(out.shape[-2:]) == tuple(captured[-1].shape[-2:]) != tuple(x.shape[-2:]):
        return (f"the map has the layer's resolution {tuple(out.shape[-2:])}: upsample it to the "
                f"image's {tuple(x.shape[-2:])} with F.interpolate(cam, size=x.shape[-2:], "
                f"mode='bilinear', align_corners=False)")
    if out.dim() == 3 and out.shape == ref.shape[:1] + ref.shape[2:]:
        return "keep the channel dimension of size 1: the map is B x 1 x H x W (sum with keepdim=True)"
    return None


GRAD_CAM = Spec(
    name="check_grad_cam",
    reference=grad_cam,
    cases=_grad_cam_cases,
    forbidden=(attribution.gradcam, attribution.guided_gradcam),
    shape_hints=(_not_upsampled,),
    mistakes=(
        Mistake("apply a ReLU to the weighted sum of the feature maps: Grad-CAM keeps only the "
                "evidence *for* the class (F.relu(cam))", _cam_variant(rectify=lambda cam: cam)),
        Mistake("Grad-CAM rectifies with a ReLU (negative values become 0), not with the absolute value",
                _cam_variant(rectify=torch.abs)),
        Mistake("you multiplied gradient and activation pixel by pixel: first average the gradient "
                "over the positions of each channel (alpha_k = mean_ij dS/dA_kij), then weight each "
                "whole feature map A_k by its alpha_k",
                _cam_variant(combine=_weighted_maps(lambda g: g))),
        Mistake("average the gradient over the positions (mean over the height and width of the "
                "layer), do not sum it",
                _cam_variant(combine=_weighted_maps(lambda g: g.sum(dim=(2, 3), keepdim=True)))),
        Mistake("apply the ReLU to the weighted sum of the maps, not to the weights alpha_k",
                _cam_variant(combine=_weighted_maps(lambda g: g.mean(dim=(2, 3), keepdim=True).relu()))),
        Mistake("you differentiated the softmax probability: Grad-CAM explains the class's logit "
                "(the score before the softmax)", _cam_variant(score=probability)),
        Mistake("you differentiated the log-probability (or the cross-entropy loss): Grad-CAM "
                "explains the class's logit", _cam_variant(score=log_probability)),
        Mistake("you explained the predicted class (the largest logit), not the `target` passed in",
                _cam_variant(score=predicted)),
        Mistake("every image used target[0]: explain each image's own target",
                _cam_variant(score=first_target)),
        *(Mistake("upsample bilinearly: F.interpolate(cam, size=x.shape[-2:], mode='bilinear', "
                  "align_corners=False)", _cam_variant(resize=functools.partial(_bilinear, **options)))
          for options in ({"mode": "nearest"}, {"mode": "bilinear", "align_corners": True})),
        Mistake("you hooked the layer's input: Grad-CAM uses the layer's output A (the third "
                "argument of a forward hook) and the gradient with respect to it",
                _cam_variant(capture="input")),
        Mistake("average the gradient over the positions of each channel (dim=(2, 3)), not over "
                "the channels", _cam_variant(combine=_weighted_maps(lambda g: g.mean(dim=1, keepdim=True)))),
        Mistake("that is the plain mean of the feature maps: weight each map A_k by its alpha_k, "
                "the spatial mean of the gradient", _cam_variant(combine=lambda a, g: a.mean(dim=1, keepdim=True))),
        Mistake("apply the ReLU before upsampling, to the map at the layer's resolution",
                _cam_variant(rectify=lambda cam: cam, resize=lambda cam, size: _bilinear(cam, size).relu())),
        Mistake("this is the Grad-CAM of another layer: hook the module named `layer` "
                "(model.get_submodule(layer)) and differentiate with respect to its output",
                lambda model, x, target, layer: attribution.gradcam(model, x, target, OTHER_LAYER[layer])),
    ),
)


# ------------------------------------------------------------------ guided backpropagation

def _relu_backward_variant(replace, score=picked, types=(nn.ReLU, nn.ReLU6)):
    """The input gradient of ``score`` with every ReLU (or module of ``types``) passing back
    ``replace(grad_in, grad_out)``."""
    gradient_of = input_gradient_of(score)

    def wrong(model, x, target):
        def hook(module, grad_in, grad_out):
            return (replace(grad_in[0], grad_out[0]),)

        handles = [m.register_full_backward_hook(hook) for m in model.modules() if isinstance(m, types)]
        try:
            return gradient_of(model, x, target)
        finally:
            for handle in handles:
                handle.remove()
    return wrong


def _guided(score):
    return _relu_backward_variant(lambda grad_in, grad_out: grad_in.clamp_min(0), score)


def _guided_cases(generator: torch.Generator):
    """The usual cases, and one model with ReLU6 activations (EfficientNet-Lite0 has only those),
    its first layer strong enough that some activations pass 6."""
    cases = classifier_cases(generator)
    relu6 = classifier_cases(generator)[1]
    model = relu6.model
    for index, module in enumerate(model):
        if isinstance(module, nn.ReLU):
            model[index] = nn.ReLU6()
    with torch.no_grad():
        model[0].weight.mul_(4.0)
    relu6.describe += ", a model with nn.ReLU6 activations"
    return cases + [relu6]


GUIDED_BACKPROP = Spec(
    name="check_guided_backprop",
    reference=attribution.guided_backprop,
    cases=_guided_cases,
    forbidden=(attribution.guided_gradcam,),
    mistakes=(
        # first: on the ReLU6 model, hooking nn.ReLU alone gives the plain gradient
        Mistake("guide every ReLU-like module: nn.ReLU6 too (EfficientNet-Lite0 has only ReLU6), "
                "e.g. isinstance(module, (nn.ReLU, nn.ReLU6))",
                _relu_backward_variant(lambda gi, go: gi.clamp_min(0), types=(nn.ReLU,))),
        Mistake("that is the plain gradient: at every ReLU, let only positive gradients flow back "
                "(a backward hook on each nn.ReLU that clamps its grad_input at 0)", logit_gradient),
        Mistake("you passed back relu(grad_output) without the ReLU's own mask (that is the "
                "'deconvnet' rule): keep the usual backward (zero where the input was negative) and "
                "then clamp at 0, i.e. clamp grad_input, not grad_output",
                _relu_backward_variant(lambda gi, go: go.clamp_min(0))),
        Mistake("clamp the gradient at every ReLU on the way back, not once at the end (at the input)",
                lambda model, x, target: logit_gradient(model, x, target).clamp_min(0)),
        Mistake("you kept the negative gradients at the ReLUs: guided backpropagation keeps the "
                "positive ones (clamp_min(0))", _relu_backward_variant(lambda gi, go: gi.clamp_max(0))),
        Mistake("you took the absolute value of the gradient at the ReLUs: keep the positive "
                "gradients and set the negative ones to 0", _relu_backward_variant(lambda gi, go: gi.abs())),
        Mistake("you differentiated the softmax probability: explain the class's logit",
                _guided(probability)),
        Mistake("you explained the predicted class (the largest logit), not the `target` passed in",
                _guided(predicted)),
        Mistake("you hooked the convolutions: the guiding happens at the ReLU modules (nn.ReLU, nn.ReLU6)",
                _relu_backward_variant(lambda gi, go: gi.clamp_min(0), types=(nn.Conv2d,))),
    ),
)


def check_grad_cam(grad_cam) -> _engine.Result:
    """``grad_cam(model, x, target, layer)``: ``relu(sum_k alpha_k A_k)`` of the layer named
    ``layer``, ``alpha_k`` the spatial mean of ``d logit_target / dA_k``, bilinearly upsampled to
    ``B x 1 x H x W``; every hook removed afterwards."""
    return _engine.run(GRAD_CAM, grad_cam)


def check_guided_backprop(guided_backprop) -> _engine.Result:
    """``guided_backprop(model, x, target)``: the input gradient of the target logit with every
    ReLU passing back only positive gradients, shaped like ``x``."""
    return _engine.run(GUIDED_BACKPROP, guided_backprop)
