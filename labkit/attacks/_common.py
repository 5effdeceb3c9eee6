"""What every attack shares: the eps-ball (projection and random starts) and the gradient of the
attack loss. Argument checks: labkit._core."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._core import check_target, logits_for, per_sample_norm

NORMS = ("linf", "l2")


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
