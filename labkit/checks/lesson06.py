"""Checks for lesson 06 (feature visualization): gradient ascent on a class logit with L2 decay."""
from __future__ import annotations

import math

import torch

from .. import featvis
from . import _engine
from ._cases import describe, draw, image_shapes, images, targets, tiny_cnn
from ._engine import Case, Mistake, Spec
from ._mistakes import (first_target_gradient, in_unit_range, log_probability_gradient, logit_gradient,
                        per_image_l2, predicted_gradient, probability_gradient)

__all__ = ["check_visualize_class"]


def visualize_class(model, x0, target, steps, lr, l2_decay=0.0):
    """Reference: labkit's :func:`~labkit.featvis.maximize` for the logits of ``target``, started
    at ``x0``, with the L2-decay prior alone."""
    return featvis.maximize(model, [featvis.ClassLogit(int(t)) for t in target], x0=x0, steps=steps,
                            lr=lr, regularization=featvis.Regularization(l2_decay=l2_decay),
                            progress=False)


def _ascent(gradient_of=logit_gradient, direction=lambda g: g / per_image_l2(g), sign=+1,
            length=lambda x: math.sqrt(x[0].numel()), clamp=True, decay="after"):
    """Gradient ascent with one piece changed: the score differentiated, the step's direction
    and length, the clamp, and how (or whether) the L2 decay is applied."""
    def wrong(model, x0, target, steps, lr, l2_decay=0.0):
        x = x0.clone()
        for _ in range(steps):
            if decay == "before":
                x = (1 - l2_decay) * x
            x = x + sign * lr * length(x) * direction(gradient_of(model, x, target))
            if clamp:
                x = x.clamp(0, 1)
            if decay == "after":
                x = (1 - l2_decay) * x
            elif decay == "kept":
                x = l2_decay * x
            elif decay == "minus":
                x = x - l2_decay
            elif decay == "lr":
                x = (1 - lr * l2_decay) * x
        return x
    return wrong


def _visualization_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for number, (batch, channels, height, width) in enumerate(image_shapes(generator)):
        classes = draw(generator, 4, 10)
        model = tiny_cnn(channels, classes)
        x0 = images(generator, batch, channels, height, width, saturated=0.3)
        target = targets(generator, model, x0, classes)
        steps = draw(generator, 3, 5)
        lr = round(0.03 + 0.05 * float(torch.rand(1, generator=generator)), 3)
        # the first case without decay: a wrong ascent is told apart from a wrong decay
        l2_decay = 0.0 if number == 0 else round(0.05 + 0.15 * float(torch.rand(1, generator=generator)), 3)
        cases.append(Case((model, x0, target, steps, lr, l2_decay),
                          describe=describe(batch, channels, height, width) +
                          f", steps={steps}, lr={lr}, l2_decay={l2_decay}"))
    return cases


VISUALIZE_CLASS = Spec(
    name="check_visualize_class",
    reference=visualize_class,
    cases=_visualization_cases,
    forbidden=(featvis.maximize,),
    constraints=(in_unit_range,),
    delta_from=lambda case: case.args[1],
    steps="steps",
    mistakes=(
        Mistake("you went down the gradient: gradient *ascent* adds the step (x + step), so the "
                "logit grows", _ascent(sign=-1)),
        # after the L2 normalization, the probability and its log give the same step
        *(Mistake("you maximized the softmax probability (or its log, or minimized the cross-entropy): "
                  "maximize the class's logit, the raw score, which cannot rise just by lowering "
                  "the other classes", _ascent(gradient_of))
          for gradient_of in (probability_gradient, log_probability_gradient)),
        Mistake("you maximized the largest logit (the predicted class), not the `target` passed in",
                _ascent(predicted_gradient)),
        Mistake("every image used target[0]: each image maximizes its own target's logit",
                _ascent(first_target_gradient)),
        Mistake("normalize each image's gradient by its own L2 norm, not by the norm of the whole batch",
                _ascent(direction=lambda g: g / g.norm())),
        Mistake("step along g / ||g||_2 (the L2-normalized gradient), not along its sign",
                _ascent(direction=torch.sign, length=lambda x: 1.0)),
        *(Mistake("normalize the step: move along g / ||g||_2 (per image), times lr * sqrt(D); the raw "
                  "gradient has an arbitrary size", _ascent(direction=lambda g: g, length=length))
          for length in (lambda x: 1.0, lambda x: math.sqrt(x[0].numel()))),
        Mistake("the step is lr * sqrt(D) * g / ||g||_2 with D the number of values in one image "
                "(C * H * W): you left out sqrt(D)", _ascent(length=lambda x: 1.0)),
        Mistake("D in sqrt(D) counts every value of one image, channels included (C * H * W), "
                "not only its pixels (H * W)", _ascent(length=lambda x: math.sqrt(x[0, 0].numel()))),
        Mistake("the decay multiplies, x = (1 - l2_decay) * x: subtracting l2_decay shifts every pixel",
                _ascent(decay="minus")),
        Mistake("the decay is x = (1 - l2_decay) * x, not scaled by the learning rate",
                _ascent(decay="lr")),
        Mistake("clamp the image to [0, 1] after each step", _ascent(clamp=False)),
        Mistake("you ignored l2_decay: after each step (and the clamp) shrink the image, "
                "x = (1 - l2_decay) * x", _ascent(decay="none")),
        Mistake("the decay keeps (1 - l2_decay) of the image, x = (1 - l2_decay) * x, not "
                "l2_decay * x", _ascent(decay="kept")),
        Mistake("apply the decay after the step and the clamp, not before the step",
                _ascent(decay="before")),
    ),
)


def check_visualize_class(visualize_class) -> _engine.Result:
    """``visualize_class(model, x0, target, steps, lr, l2_decay=0.0)``: ``steps`` times
    ``x <- (1 - l2_decay) * clip(x + lr * sqrt(D) * g / ||g||_2, 0, 1)``, ``g`` the gradient of
    each image's target logit."""
    return _engine.run(VISUALIZE_CLASS, visualize_class)
