"""Checks for lesson 03 (adversarial examples): FGSM, the normalized-gradient step, PGD."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import attacks
from . import _engine
from ._cases import attack_inputs, describe, draw, image_shapes, images, other_classes, tiny_cnn
from ._engine import Case, Mistake, Spec
from ._mistakes import (always_rescale, attack_match, batch_l2, cross_entropy_gradient, in_eps_ball,
                        in_unit_range, input_gradient_of, l2_normalized, logit_gradient,
                        mean_cross_entropy_gradient, pgd_variant, probability_loss_gradient,
                        projected_at_the_end)

__all__ = ["check_fgsm", "check_gradient_step", "check_pgd"]

predicted_label_gradient = input_gradient_of(lambda z, y: F.cross_entropy(z, z.argmax(1), reduction="none"))


def moves_by_eps(out, case) -> str | None:
    """FGSM moves every pixel that is not stopped at 0 or 1 by exactly eps (or not at all)."""
    x, eps = case.args[1], case.args[3]
    free = (out > 1e-6) & (out < 1 - 1e-6)
    moved = (out - x).abs()[free & ((out - x).abs() > 1e-7)]
    typical = (moved.median() / eps).item() if len(moved) else 1.0
    if abs(typical - 1) > 1e-3:
        return (f"pixels move by about {typical:.2g} x eps: with the sign of the gradient every "
                f"pixel moves by exactly eps (before clamping)")
    return None


def _attack_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for model, x, y, classes, description in attack_inputs(generator):
        eps = round(0.03 + 0.12 * float(torch.rand(1, generator=generator)), 3)
        cases.append(Case((model, x, y, eps), describe=description + f", eps={eps}"))
    return cases


def _step(sign_of_step, direction, clamp=True):
    """``x + sign * eps * direction(grad)``, clamped to [0, 1] unless ``clamp`` is False."""
    def attack(model, x, y, eps, gradient_of=cross_entropy_gradient):
        moved = x + sign_of_step * eps * direction(gradient_of(model, x, y))
        return moved.clamp(0, 1) if clamp else moved
    return attack


def _raw_step(model, x, y, eps, gradient_of):
    return _step(+1, lambda g: g)(model, x, y, eps, gradient_of)


def _per_image_max(g):
    return g.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)


FGSM = Spec(
    name="check_fgsm",
    reference=attacks.fgsm,
    cases=_attack_cases,
    match=attack_match,
    constraints=(in_unit_range, moves_by_eps),
    delta_from=lambda case: case.args[1],
    mistakes=(
        Mistake("clamp the result to [0, 1]: x + eps * sign(grad) can leave the valid pixel range",
                _step(+1, torch.sign, clamp=False)),
        Mistake("you stepped down the loss: an untargeted attack goes up the gradient of the loss "
                "(x + eps * sign(grad))", _step(-1, torch.sign)),
        *(Mistake("use the sign of the gradient (every pixel moves by exactly eps), not the raw gradient",
                  functools.partial(_raw_step, gradient_of=gradient_of))
          for gradient_of in (cross_entropy_gradient, mean_cross_entropy_gradient)),
        Mistake("you returned the perturbation eps * sign(grad): return the adversarial image x + perturbation",
                lambda model, x, y, eps: eps * cross_entropy_gradient(model, x, y).sign()),
        Mistake("you passed probabilities (softmax) to cross_entropy, which expects logits: use "
                "F.cross_entropy(model(x), y) directly",
                lambda model, x, y, eps: _step(+1, torch.sign)(model, x, y, eps, probability_loss_gradient)),
        Mistake("you followed the gradient of the true class's logit, which makes the model more "
                "sure of it: FGSM goes up the cross-entropy loss",
                lambda model, x, y, eps: _step(+1, torch.sign)(model, x, y, eps, logit_gradient)),
        Mistake("you used the negative true logit (nll_loss on raw logits?) instead of the "
                "cross-entropy loss: use F.cross_entropy(model(x), y)",
                lambda model, x, y, eps: _step(-1, torch.sign)(model, x, y, eps, logit_gradient)),
        Mistake("you attacked the model's own prediction (argmax): use the true labels y that are passed in",
                lambda model, x, y, eps: _step(+1, torch.sign)(model, x, y, eps, predicted_label_gradient)),
    ),
)

GRADIENT_STEP = Spec(
    name="check_gradient_step",
    reference=attacks.gradient_step,
    cases=_attack_cases,
    match=attack_match,
    constraints=(in_unit_range,),
    delta_from=lambda case: case.args[1],
    mistakes=(
        Mistake("clamp the result to [0, 1]", _step(+1, lambda g: g / _per_image_max(g), clamp=False)),
        Mistake("divide each image's gradient by its own largest |g|, not by the largest in the whole batch",
                _step(+1, lambda g: g / g.abs().max())),
        Mistake("divide by the largest absolute value max|g|, not by max(g)",
                _step(+1, lambda g: g / g.flatten(1).amax(1).view(-1, 1, 1, 1))),
        Mistake("this step divides by max|g| (the largest entry), not by the L2 norm of the gradient",
                _step(+1, lambda g: g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1))),
        *(Mistake("normalize the gradient: divide it by its largest absolute value, so the biggest "
                  "pixel change is exactly eps",
                  functools.partial(_raw_step, gradient_of=gradient_of))
          for gradient_of in (cross_entropy_gradient, mean_cross_entropy_gradient)),
        Mistake("that is FGSM (the sign of the gradient): this step keeps the gradient's relative "
                "sizes, g / max|g|", _step(+1, torch.sign)),
        Mistake("you stepped down the loss: go up the gradient of the loss (x + eps * g / max|g|)",
                _step(-1, lambda g: g / _per_image_max(g))),
        Mistake("divide by the largest |g| of the whole image (all channels together), not of each "
                "channel on its own", _step(+1, lambda g: g / g.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-12))),
        Mistake("divide by the largest |g| of the image, not by the mean |g|",
                _step(+1, lambda g: g / g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1))),
    ),
)


def _pgd_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    shapes = image_shapes(generator)
    for (batch, channels, height, width), norm, targeted in zip(
            shapes + shapes[:1], ("linf", "l2", "linf", "l2"), (False, False, True, True)):
        classes = draw(generator, 4, 10)
        model = tiny_cnn(channels, classes)
        x = images(generator, batch, channels, height, width, saturated=0.4)
        y = torch.randint(classes, (batch,), generator=generator)
        if targeted:
            y = other_classes(generator, y, classes)
        low, high = (0.05, 0.1) if norm == "linf" else (0.4, 0.9)
        eps = round(low + (high - low) * float(torch.rand(1, generator=generator)), 3)
        steps = draw(generator, 3, 5)
        step_size = round(eps / 2.5, 4)
        cases.append(Case((model, x, y, eps, step_size, steps), {"norm": norm, "targeted": targeted},
                          describe=describe(batch, channels, height, width) +
                          f", norm={norm!r}, targeted={targeted}, eps={eps}, step_size={step_size}, steps={steps}"))
    return cases


def _step_of_eps(model, x, y, eps, step_size, steps, norm="linf", targeted=False):
    return attacks.pgd(model, x, y, eps, eps, steps, norm=norm, targeted=targeted)


PGD = Spec(
    name="check_pgd",
    reference=attacks.pgd,
    cases=_pgd_cases,
    match=attack_match,
    constraints=(in_unit_range, in_eps_ball),
    delta_from=lambda case: case.args[1],
    steps="steps",
    mistakes=(
        Mistake("after each step, project back onto the eps-ball around the original image x "
                "(clamp the perturbation for L-inf, rescale it for L2)", pgd_variant(project=None)),
        Mistake("project onto the eps-ball after every step, not once at the end", projected_at_the_end),
        Mistake("each step moves by step_size, not by eps (eps is the radius of the ball)", _step_of_eps),
        Mistake("after each step, clamp the image to [0, 1]", pgd_variant(clamp=False)),
        Mistake("for a targeted attack go down the loss of the target class (x - step), you went up",
                pgd_variant(ascend_targeted=True)),
        Mistake("for an untargeted attack go up the loss of the true class (x + step), you went down",
                pgd_variant(descend_untargeted=True)),
        Mistake("for norm='l2' step along grad / ||grad||_2 (of each image), not along its sign",
                pgd_variant(direction=lambda g, norm: g.sign())),
        Mistake("for norm='linf' step along the sign of the gradient",
                pgd_variant(direction=lambda g, norm: l2_normalized(g))),
        Mistake("only shrink perturbations longer than eps; shorter ones stay as they are",
                pgd_variant(project=always_rescale)),
        Mistake("normalize each image's gradient by its own L2 norm, not by the norm of the whole batch",
                pgd_variant(direction=batch_l2)),
        *(Mistake("normalize the step: sign(grad) for L-inf, grad / ||grad||_2 for L2 (the raw "
                  "gradient has an arbitrary size)", pgd_variant(direction=direction, gradient_of=gradient_of))
          for direction in (lambda g, norm: g, lambda g, norm: g.sign() if norm == "linf" else g)
          for gradient_of in (cross_entropy_gradient, mean_cross_entropy_gradient)),
    ),
)


def check_fgsm(fgsm) -> _engine.Result:
    """``fgsm(model, x, y, eps)``: ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``."""
    return _engine.run(FGSM, fgsm)


def check_gradient_step(gradient_step) -> _engine.Result:
    """``gradient_step(model, x, y, eps)``: ``clip(x + eps * g / max|g|, 0, 1)`` per image."""
    return _engine.run(GRADIENT_STEP, gradient_step)


def check_pgd(pgd) -> _engine.Result:
    """``pgd(model, x, y, eps, step_size, steps, norm="linf", targeted=False)``."""
    return _engine.run(PGD, pgd)
