"""Building blocks of the checks' known mistakes, shared by every lesson: the scores a student
may differentiate by mistake, the gradient variants built from them, the typical wrong steps
of an attack (a PGD with one piece changed) and the properties an adversarial image must have.

A lesson's check module (``lessonNN.py``) imports from here, :mod:`._cases` and :mod:`._engine`
only, never from another lesson, so editing one lesson's checks cannot change another's grading.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import attacks
from ._engine import Case, Mistake

# ---------------------------------------------------------------- scores: (logits, target) -> B


def picked(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each row's entry at its own target, ``B``."""
    return values.gather(1, target[:, None]).squeeze(1)


def probability(z, t):
    return picked(z.softmax(1), t)


def log_probability(z, t):
    return picked(z.log_softmax(1), t)


def cross_entropy(z, t):
    return F.cross_entropy(z, t, reduction="none")


def predicted(z, t):
    """The largest logit: explaining the prediction instead of the target."""
    return z.max(1).values


def first_target(z, t):
    """Every image scored at ``target[0]``."""
    return picked(z, t[:1].expand_as(t))


def input_gradient_of(score):
    """``d score(logits, target) / dx`` per image (the scores summed over the batch), detached:
    the gradient of some scalar per image, right or wrong, for building mistakes."""
    def gradient(model, x, target):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score(model(x), target).sum(), x)
        return grad
    return gradient


logit_gradient = input_gradient_of(picked)
probability_gradient = input_gradient_of(probability)
log_probability_gradient = input_gradient_of(log_probability)
cross_entropy_gradient = input_gradient_of(cross_entropy)
predicted_gradient = input_gradient_of(predicted)
first_target_gradient = input_gradient_of(first_target)
batch_mean_gradient = input_gradient_of(lambda z, t: picked(z, t).mean())
# F.cross_entropy's default averages over the batch: the same direction, 1/B the size
mean_cross_entropy_gradient = input_gradient_of(lambda z, y: F.cross_entropy(z, y) * torch.ones_like(y) / len(y))
probability_loss_gradient = input_gradient_of(lambda z, y: F.cross_entropy(z.softmax(1), y, reduction="none"))


def gradient_mistakes(then=lambda grad, x: grad):
    """Mistakes every gradient-based exercise can make; ``then(grad, x)`` turns the gradient
    into the exercise's answer."""
    def via(gradient):
        return lambda model, x, target: then(gradient(model, x, target), x)
    return (
        Mistake("you differentiated the softmax probability: explain the logit, the model's raw "
                "output before softmax (the softmax mixes in all other classes)", via(probability_gradient)),
        Mistake("you differentiated the log-probability (log_softmax, or the cross-entropy loss, "
                "its negative): explain the raw logit of the target class", via(log_probability_gradient)),
        Mistake("you differentiated the cross-entropy loss: saliency explains the target "
                "class's logit, model(x)[i, target[i]]", via(cross_entropy_gradient)),
        Mistake("you explained the predicted class (the largest logit), not the `target` passed in",
                via(predicted_gradient)),
        Mistake("you averaged over the batch (.mean()): sum the target logits instead, so each "
                "image's gradient does not depend on the batch size", via(batch_mean_gradient)),
        Mistake("every image used target[0]: pick each image's own target, e.g. "
                "logits.gather(1, target[:, None]) or logits[range(B), target]", via(first_target_gradient)),
    )


# ---------------------------------------------------------------- per-image normalizations


def per_image_l2(g: torch.Tensor) -> torch.Tensor:
    """Each image's L2 norm, ``B x 1 x 1 x 1``, kept away from 0."""
    return g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def l2_normalized(g: torch.Tensor) -> torch.Tensor:
    return g / per_image_l2(g)


# ---------------------------------------------------------------- adversarial images


def attack_match(out: torch.Tensor, ref: torch.Tensor, case: Case) -> bool:
    """Equal but for at most 0.2 % of the pixels (a gradient entry within rounding of 0 may take
    the other sign along another, equally right, code path)."""
    if out.shape != ref.shape:
        return False
    differ = ((out - ref).abs() > 1e-5).sum().item()
    return differ <= 0.002 * out.numel()


def in_unit_range(out, case) -> str | None:
    if out.min() < -1e-6 or out.max() > 1 + 1e-6:
        return ("some pixels are outside [0, 1]: clamp the adversarial image to the valid range "
                "(.clamp(0, 1)) so it is still an image")
    return None


def in_eps_ball(out, case) -> str | None:
    """For cases ``(model, x, y, eps, ...)`` with ``norm`` among the keyword arguments (default L-inf)."""
    x, eps, norm = case.args[1], case.args[3], case.kwargs.get("norm", "linf")
    delta = (out - x).flatten(1)
    if norm == "linf" and delta.abs().max() > eps + 1e-5:
        return ("some pixels moved further than eps from the original image: clamp the "
                "perturbation x_adv - x to [-eps, eps] (project onto the eps-ball around the original x)")
    if norm == "l2" and (delta.norm(dim=1) > eps * (1 + 1e-4) + 1e-6).any():
        return ("some images moved further than eps (in L2 norm) from the original: rescale the "
                "perturbation x_adv - x back to length eps whenever it is longer")
    return None


def pgd_variant(direction=None, project=attacks.project, clamp=True, descend_untargeted=False,
                ascend_targeted=False, gradient_of=cross_entropy_gradient):
    """PGD with one piece changed: ``direction(grad, norm)``, ``project(delta, eps, norm)``."""
    def default_direction(g, norm):
        return g.sign() if norm == "linf" else l2_normalized(g)
    direction = direction or default_direction

    def attack(model, x, y, eps, step_size, steps, norm="linf", targeted=False):
        x_adv = x.clone()
        for _ in range(steps):
            step = direction(gradient_of(model, x_adv, y), norm)
            down = targeted != ascend_targeted if targeted else descend_untargeted
            x_adv = x_adv - step_size * step if down else x_adv + step_size * step
            if project is not None:
                x_adv = x + project(x_adv - x, eps, norm)
            if clamp:
                x_adv = x_adv.clamp(0, 1)
        return x_adv
    return attack



def projected_at_the_end(model, x, y, eps, step_size, steps, norm="linf", targeted=False):
    """PGD that projects onto the eps-ball once, after the last step, instead of after each."""
    x_adv = pgd_variant(project=None)(model, x, y, eps, step_size, steps, norm, targeted)
    return (x + attacks.project(x_adv - x, eps, norm)).clamp(0, 1)

def always_rescale(delta, eps, norm):
    """A projection that also stretches perturbations shorter than eps."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * eps / per_image_l2(delta)


def batch_l2(g, norm):
    """A step direction normalized by the norm of the whole batch."""
    return g.sign() if norm == "linf" else g / g.norm()
