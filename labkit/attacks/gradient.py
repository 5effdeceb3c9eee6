"""Attacks that follow the loss gradient inside an eps-ball: FGSM, the normalized-gradient step
and PGD."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .._core import (check_choice, check_eps, check_images, check_positive_int, check_target, per_sample_norm,
                     preserved)
from ._common import NORMS, loss_gradient, project, random_delta


def _class_targets(x: torch.Tensor, y) -> torch.Tensor:
    return check_target(y, x.shape[0], device=x.device, name="y")


def fgsm(model: nn.Module, x: torch.Tensor, y, eps: float, targeted: bool = False) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015, "Explaining and Harnessing
    Adversarial Examples"): ``x' = clip(x + eps * sign(grad_x J(x, y)), 0, 1)``, with ``J`` the
    cross-entropy and ``y`` the true classes.

    Targeted (``y`` = the classes to reach): step down the target's loss, ``x - eps * sign(grad)``.
    """
    check_images(x, model)
    eps, y = check_eps(eps), _class_targets(x, y)
    with preserved(model):
        grad, _ = loss_gradient(model, x, y, check_classes=True)
    step = -eps if targeted else eps
    return (x + step * grad.sign()).clamp(0, 1).detach()


def gradient_step(model: nn.Module, x: torch.Tensor, y, eps: float) -> torch.Tensor:
    """The normalized-gradient step of the seed blog post: ``x' = clip(x + eps * g / max|g|, 0, 1)``
    with ``g = grad_x J(x, y)`` and the max taken per image (the post divides by ``max(g)``; the
    absolute value keeps the step's sign when the largest entry is negative). Unlike FGSM it
    keeps the gradient's relative sizes: only the most sensitive pixel moves by a full eps."""
    check_images(x, model)
    eps, y = check_eps(eps), _class_targets(x, y)
    with preserved(model):
        grad, _ = loss_gradient(model, x, y, check_classes=True)
    scale = grad.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + eps * grad / scale).clamp(0, 1).detach()


def _start(x0: torch.Tensor, eps: float, norm: str, random_start, generator) -> torch.Tensor:
    if isinstance(random_start, torch.Tensor):
        if random_start.shape != x0.shape:
            raise ValueError(f"random_start as a tensor is the perturbation to start from, shaped "
                             f"like x {tuple(x0.shape)}; got {tuple(random_start.shape)}")
        delta = project(random_start.to(x0), eps, norm)
    elif random_start:
        if math.isinf(eps):
            raise ValueError("random_start=True draws from the eps-ball, which needs a finite eps")
        delta = random_delta(x0, eps, norm, generator)
    else:
        return x0.clone()
    return (x0 + delta).clamp(0, 1)


def _ascent_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float,
                 eps: float, norm: str) -> torch.Tensor:
    """One step along the gradient (its sign for L-inf, its unit L2 direction for L2; a negative
    ``step_size`` descends), projected back onto the eps-ball around ``x0`` and onto [0, 1]."""
    direction = grad.sign() if norm == "linf" else grad / per_sample_norm(grad)
    return (x0 + project(x + step_size * direction - x0, eps, norm)).clamp(0, 1)


def pgd(model: nn.Module, x: torch.Tensor, y, eps: float, step_size: float | None = None,
        steps: int = 10, norm: str = "linf", targeted: bool = False, random_start=False,
        loss_fn=None, early_stop: bool = False, progress: bool = False, generator=None) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks"): repeat ``steps`` times

        x <- Proj_{B_eps(x0) and [0,1]}( x + step_size * d ),

    with ``d = sign(grad)`` for ``norm="linf"`` and ``d = grad / ||grad||_2`` for ``norm="l2"``;
    untargeted ascends the loss of the true classes ``y``, targeted descends the loss of the
    target classes ``y``. ``step_size`` defaults to ``2.5 * eps / steps`` (Madry et al.).

    ``loss_fn(model, x, y)`` (default: cross-entropy of the logits) can be any objective to
    ascend, e.g. a feature to maximize; ``y`` is then handed to it as given. ``random_start``:
    ``True`` for a random point in the ball (:func:`random_delta`, drawn from ``generator``),
    or a tensor: the perturbation to start from. ``early_stop`` freezes each image as soon as
    it is misclassified (targeted: classified as its target) and drops it from the batch, so
    the result is the first fooling iterate (the usual robust-accuracy evaluation) and easy
    images cost nothing once fooled.
    """
    check_images(x, model)
    eps, norm, steps = check_eps(eps), check_choice(norm, "norm", NORMS), check_positive_int(steps, "steps")
    step_size = 2.5 * eps / steps if step_size is None else check_eps(step_size, "step_size")
    if early_stop and loss_fn is not None:
        raise ValueError("early_stop watches the model's classification, which needs the default "
                         "cross-entropy loss; pass loss_fn=None or early_stop=False")
    y = _class_targets(x, y) if loss_fn is None else y
    signed_step = -step_size if targeted else step_size
    x0 = x.detach()
    x_adv = _start(x0, eps, norm, random_start, generator)
    active = torch.arange(x0.shape[0], device=x0.device) if early_stop else None
    with preserved(model):
        for i in tqdm(range(steps), desc="PGD", disable=not progress, leave=False):
            if active is None:
                grad, _ = loss_gradient(model, x_adv, y, loss_fn, check_classes=i == 0)
                x_adv = _ascent_step(x_adv, x0, grad, signed_step, eps, norm)
                continue
            grad, logits = loss_gradient(model, x_adv[active], y[active], check_classes=i == 0)
            fooled = (logits.argmax(1) == y[active]) if targeted else (logits.argmax(1) != y[active])
            active, grad = active[~fooled], grad[~fooled]
            if active.numel() == 0:
                break
            x_adv[active] = _ascent_step(x_adv[active], x0[active], grad, signed_step, eps, norm)
    return x_adv.detach()
