"""Adversarial attacks in pixel space: images in [0, 1], the model normalizes inside.

Every attack returns images that stay in the eps-ball around ``x`` (in the attack's norm) and in
[0, 1], detached, on the model's device, and leaves the model exactly as it was.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._core import check_images, check_target, logits_for, preserved

NORMS = ("linf", "l2")


def _check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(eps).__name__}")
    if eps < 0:
        raise ValueError(f"{name} must be >= 0, got {eps}")
    return float(eps)


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default attack loss: cross-entropy of the logits, summed over the batch (so every
    sample's gradient is its own, whatever the batch size)."""
    return F.cross_entropy(logits_for(model, x), y, reduction="sum")


def _loss_gradient(model, x, y, loss_fn) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = loss_fn(model, x, y)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad


def _prepare(model, x, y, eps):
    check_images(x, model)
    eps = _check_eps(eps)
    with torch.no_grad():
        num_classes = logits_for(model, x[:1]).shape[1]
    return check_target(y, x.shape[0], num_classes, device=x.device, name="y"), eps


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project perturbations onto the eps-ball: clamp for L-inf, rescale for L2."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


def random_delta(x: torch.Tensor, eps: float, norm: str, generator=None) -> torch.Tensor:
    """A random start inside the eps-ball: uniform per pixel for L-inf; for L2 a uniformly
    random direction with a radius uniform in [0, eps]."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * noise - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator,
                        device=x.device, dtype=x.dtype)
    return direction / _per_sample_norm(direction) * radius * eps


def fgsm(model: nn.Module, x: torch.Tensor, y, eps: float, targeted: bool = False) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015, "Explaining and Harnessing
    Adversarial Examples"): ``x' = clip(x + eps * sign(grad_x J(x, y)), 0, 1)``.

    Targeted (``y`` = target class): step against the gradient, ``x - eps * sign(grad)``.
    """
    y, eps = _prepare(model, x, y, eps)
    with preserved(model):
        grad = _loss_gradient(model, x, y, cross_entropy_loss)
    step = -eps if targeted else eps
    return (x + step * grad.sign()).clamp(0, 1).detach()


def gradient_step(model: nn.Module, x: torch.Tensor, y, eps: float) -> torch.Tensor:
    """The normalized-gradient step of the seed blog post: ``x' = x + eps * g / max|g|`` with
    ``g = grad_x J(x, y)``, max taken per image, clipped to [0, 1]. Unlike FGSM it keeps the
    gradient's relative sizes: only the largest pixel moves by a full eps."""
    y, eps = _prepare(model, x, y, eps)
    with preserved(model):
        grad = _loss_gradient(model, x, y, cross_entropy_loss)
    scale = grad.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + eps * grad / scale).clamp(0, 1).detach()


def pgd(model: nn.Module, x: torch.Tensor, y, eps: float, step_size: float, steps: int,
        norm: str = "linf", targeted: bool = False, random_start=False, loss_fn=None,
        early_stop: bool = False, progress: bool = False, generator=None) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks"): repeat ``steps`` times

        x <- Proj_{B_eps(x0) and [0,1]}( x + step_size * d ),

    with ``d = sign(grad)`` for ``norm="linf"`` and ``d = grad / ||grad||_2`` for ``norm="l2"``;
    untargeted ascends ``loss_fn`` for the true class ``y``, targeted descends it for the
    target ``y``. ``loss_fn(model, x, y)`` (default: cross-entropy) can be any objective, e.g. a
    feature to maximize. ``random_start``: ``True`` for a random point in the ball, or a tensor
    perturbation to start from. ``early_stop`` freezes each image once it is misclassified
    (targeted: classified as the target).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    step_size = _check_eps(step_size, "step_size")
    y, eps = _prepare(model, x, y, eps)
    loss_fn = cross_entropy_loss if loss_fn is None else loss_fn
    x0 = x.detach()
    if isinstance(random_start, torch.Tensor):
        delta = project(random_start.to(x0), eps, norm)
    elif random_start:
        delta = random_delta(x0, eps, norm, generator)
    else:
        delta = torch.zeros_like(x0)
    x_adv = (x0 + delta).clamp(0, 1)
    active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    with preserved(model):
        for _ in tqdm(range(steps), desc="PGD", disable=not progress, leave=False):
            grad = _loss_gradient(model, x_adv, y, loss_fn)
            direction = grad.sign() if norm == "linf" else grad / _per_sample_norm(grad)
            if targeted:
                direction = -direction
            if early_stop:
                direction = direction * active.view(-1, 1, 1, 1)
            step = x_adv + step_size * direction
            x_adv = (x0 + project(step - x0, eps, norm)).clamp(0, 1).detach()
            if early_stop:
                with torch.no_grad():
                    pred = logits_for(model, x_adv).argmax(1)
                active = (pred != y) if targeted else (pred == y)
                if not active.any():
                    break
    return x_adv


_ATTACKS = {"fgsm": fgsm, "pgd": pgd, "gradient_step": gradient_step}


def _as_tensors(data, limit=None):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    elif hasattr(data, "tensors"):
        x, y = data.tensors()
    else:
        items = [data[i] for i in range(len(data))]
        x = torch.stack([item[0] for item in items])
        y = torch.as_tensor([int(item[1]) for item in items])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def accuracy(model: nn.Module, data, attack=None, batch_size: int = 500, limit: int | None = None,
             progress: bool = True, **attack_options) -> float:
    """Accuracy of ``model`` on ``data`` (a dataset or an ``(images, labels)`` pair), clean or
    under ``attack`` (a function like :func:`pgd`, or its name) with ``attack_options``."""
    if isinstance(attack, str):
        if attack not in _ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {sorted(_ATTACKS)}")
        attack = _ATTACKS[attack]
    x_all, y_all = _as_tensors(data, limit)
    from ._core import model_device
    device = model_device(model)
    correct = 0
    for start in tqdm(range(0, len(y_all), batch_size), desc="accuracy", disable=not progress, leave=False):
        x = x_all[start:start + batch_size].to(device)
        y = y_all[start:start + batch_size].to(device)
        if attack is not None:
            x = attack(model, x, y, **attack_options)
        with preserved(model), torch.no_grad():
            correct += (logits_for(model, x).argmax(1) == y).sum().item()
    return correct / len(y_all)
