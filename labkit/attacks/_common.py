"""What every attack shares: argument checks, the eps-ball (projection and random starts) and the
gradient of the attack loss."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .._core import check_target, logits_for

NORMS = ("linf", "l2")


def check_eps(value, name: str = "eps") -> float:
    """A number >= 0 (``math.inf`` allowed: no ball at all)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value}")
    return float(value)


def check_steps(steps, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{name} must be an int >= 1, got {steps!r}")
    return int(steps)


def check_norm(norm) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each sample, shaped ``B x 1 x 1 x 1`` to broadcast, kept away from 0."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project perturbations onto the eps-ball: clamp each pixel for L-inf; for L2 scale each
    sample down to norm ``eps`` when it is longer."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / per_sample_norm(delta)).clamp(max=1.0)


def random_delta(x: torch.Tensor, eps: float, norm: str, generator=None) -> torch.Tensor:
    """A random start in the eps-ball around ``x``: uniform in ``[-eps, eps]`` per pixel for
    L-inf; for L2 a uniformly random direction with a radius uniform in ``[0, eps]`` (the
    convention of torchattacks and Madry et al.'s code; not uniform over the ball's volume,
    which would put almost every start near the sphere in 784 dimensions). Drawn in the same
    order as torchattacks, so seeding torch alike gives both the same start."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    direction = torch.empty_like(x).normal_(generator=generator)
    radius = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).uniform_(0, 1, generator=generator)
    return direction * (radius / per_sample_norm(direction) * eps)


def loss_gradient(model, x: torch.Tensor, y: torch.Tensor, loss_fn=None, check_classes: bool = False):
    """``(grad_x loss, logits)`` at ``x``. The default loss is the cross-entropy of the logits
    summed over the batch (each image's gradient is its own, whatever the batch size); then
    ``check_classes`` checks that ``y`` holds class indices of the model before it is used, and
    the logits come back (``None`` for a custom ``loss_fn(model, x, y)``)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        if loss_fn is None:
            logits = logits_for(model, x)
            if check_classes:
                check_target(y, x.shape[0], logits.shape[1], name="y")
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:
            logits, loss = None, loss_fn(model, x, y)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, None if logits is None else logits.detach()
