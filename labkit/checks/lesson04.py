"""Checks for lesson 04 (large-eps attacks on robust models): the targeted L2 PGD attack."""
from __future__ import annotations

import torch

from .. import attacks
from . import _engine
from ._cases import attack_inputs, draw, other_classes
from ._engine import Case, Mistake, Spec
from ._mistakes import (always_rescale, attack_match, batch_l2, cross_entropy_gradient, in_eps_ball,
                        in_unit_range, l2_normalized, mean_cross_entropy_gradient, pgd_variant,
                        projected_at_the_end)

__all__ = ["check_targeted_l2_pgd"]


def targeted_l2_pgd(model, x, target, eps, step_size, steps):
    """Reference: labkit's PGD, L2 ball, descending the loss of ``target``, from ``x`` itself."""
    return attacks.pgd(model, x, target, eps, step_size, steps, norm="l2", targeted=True)


def _l2_targeted(variant):
    """A PGD variant (lesson 03's mistakes) with this exercise's signature: always L2, targeted."""
    def attack(model, x, target, eps, step_size, steps):
        return variant(model, x, target, eps, step_size, steps, norm="l2", targeted=True)
    return attack


def _cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for model, x, y, classes, description in attack_inputs(generator):
        target = other_classes(generator, y, classes)
        eps = round(0.4 + 0.5 * float(torch.rand(1, generator=generator)), 3)
        steps = draw(generator, 3, 5)
        step_size = round(eps / 2.5, 4)  # the first steps stay inside the ball, the last ones leave it
        cases.append(Case((model, x, target, eps, step_size, steps),
                          describe=description + f", eps={eps}, step_size={step_size}, steps={steps}"))
    return cases


def _in_l2_ball(out, case) -> str | None:
    return in_eps_ball(out, Case(case.args, {"norm": "l2"}))


def _unit_length(delta, eps, norm):
    return l2_normalized(delta)


TARGETED_L2_PGD = Spec(
    name="check_targeted_l2_pgd",
    reference=targeted_l2_pgd,
    forbidden=(attacks.pgd,),
    cases=_cases,
    match=attack_match,
    constraints=(in_unit_range, _in_l2_ball),
    delta_from=lambda case: case.args[1],
    steps="steps",
    mistakes=(
        Mistake("after each step, project back onto the L2 ball around the original image x: "
                "rescale delta = x_adv - x to length eps when it is longer",
                _l2_targeted(pgd_variant(project=None))),
        Mistake("after each step, clamp the image to [0, 1]", _l2_targeted(pgd_variant(clamp=False))),
        Mistake("project onto the L2 ball after every step, not once at the end",
                _l2_targeted(projected_at_the_end)),
        Mistake("each step moves by step_size, not by eps (eps is the radius of the ball)",
                lambda model, x, target, eps, step_size, steps: targeted_l2_pgd(model, x, target, eps, eps, steps)),
        Mistake("you went up the loss of the target class: a targeted attack goes down it "
                "(x_adv - step_size * direction), towards the target",
                _l2_targeted(pgd_variant(ascend_targeted=True))),
        Mistake("step along grad / ||grad||_2 of each image, not along its sign (that is the L-inf step)",
                _l2_targeted(pgd_variant(direction=lambda g, norm: g.sign()))),
        Mistake("only shrink perturbations longer than eps; shorter ones stay as they are "
                "(multiply by min(1, eps / ||delta||_2))", _l2_targeted(pgd_variant(project=always_rescale))),
        Mistake("you divided delta by its length without multiplying by eps: the projection "
                "rescales delta to length eps, not to length 1",
                _l2_targeted(pgd_variant(project=_unit_length))),
        Mistake("normalize each image's gradient by its own L2 norm, not by the norm of "
                "the whole batch", _l2_targeted(pgd_variant(direction=batch_l2))),
        *(Mistake("normalize the step: grad / ||grad||_2 per image (the raw gradient has an arbitrary size)",
                  _l2_targeted(pgd_variant(direction=lambda g, norm: g, gradient_of=gradient_of)))
          for gradient_of in (cross_entropy_gradient, mean_cross_entropy_gradient)),
    ),
)


def check_targeted_l2_pgd(targeted_l2_pgd) -> _engine.Result:
    """``targeted_l2_pgd(model, x, target, eps, step_size, steps)``: PGD in the L2 eps-ball
    around ``x``, descending the cross-entropy of ``target``, starting at ``x``."""
    return _engine.run(TARGETED_L2_PGD, targeted_l2_pgd)
