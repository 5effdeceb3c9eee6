"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): PGD with momentum and a step size that halves when progress
stalls, with the cross-entropy or the (targeted) difference-of-logits-ratio loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._core import (check_choice, check_eps, check_images, check_positive_int, check_target, logits_for,
                     per_sample_norm, preserved)
from ._common import NORMS, project

LOSSES = ("ce", "dlr", "dlr-targeted")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio per image (Croce & Hein 2020, eq. 6 and 7), with ``z`` sorted
    so that ``z_pi1 >= z_pi2 >= ...``:

        untargeted  DLR   = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
        targeted    DLR-T = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)

    Both are invariant to shifting and scaling the logits, so a model cannot hide behind large
    logits (a form of gradient masking that fools the cross-entropy)."""
    ranked = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is None:
        others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return -(z_y - others) / (ranked[:, 0] - ranked[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (ranked[:, 0] - (ranked[:, 2] + ranked[:, 3]) / 2 + 1e-12)


def _loss_and_gradient(model, x, y, loss, target):
    """Per-image loss, its input gradient, and the logits (each image's gradient is its own)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_for(model, x)
        if loss == "ce":
            values = F.cross_entropy(logits, y, reduction="none")
        else:
            values = dlr_loss(logits, y, target if loss == "dlr-targeted" else None)
        (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad, logits.detach()


def checkpoints(steps: int) -> list[int]:
    """The iterations after which APGD checks its progress: ``w_j = ceil(p_j * steps)`` with
    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (in whole steps,
    as the authors' code: first interval 22 %, each next 3 % shorter, never below 6 %)."""
    first, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, interval = [first], first
    while True:
        interval = max(interval - shrink, shortest)
        if points[-1] + interval > steps:
            return points
        points.append(points[-1] + interval)


def _random_start(x0, eps, norm, generator):
    """A random point on the border of the eps-ball (drawn on the CPU: the same start on every device)."""
    if norm == "linf":
        t = torch.rand(x0.shape, generator=generator).to(x0.device) * 2 - 1
        t = t / t.flatten(1).abs().amax(dim=1).view(-1, 1, 1, 1)
    else:
        t = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = t / per_sample_norm(t)
    return (x0 + eps * t).clamp(0, 1)


def _run(model, x0, y, eps, norm, steps, loss, target, rho, generator):
    """One APGD run; returns (images, fooled): a misclassified iterate where one was found,
    else the iterate of highest loss."""
    def step(x, direction, size):  # Proj_{B_eps(x0) and [0,1]}(x + size * direction)
        return (x0 + project(x + size * direction - x0, eps, norm)).clamp(0, 1)

    def unit(g):
        return g.sign() if norm == "linf" else g / per_sample_norm(g)

    x = _random_start(x0, eps, norm, generator)
    values, grad, logits = _loss_and_gradient(model, x, y, loss, target)
    fooled = logits.argmax(1) != y
    found = x.clone()
    best, best_values, best_grad = x.clone(), values.clone(), grad.clone()
    eta = torch.full((len(y), 1, 1, 1), 2.0 * eps, device=x.device)  # step size, eta_0 = 2 eps
    x_prev, last = x.clone(), values.clone()
    increases = torch.zeros(len(y), device=x.device)
    checks = checkpoints(steps)
    last_check_best, reduced_last = best_values.clone(), torch.ones(len(y), dtype=torch.bool, device=x.device)
    for i in range(steps):
        # z = P(x_k + eta * d);  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))
        z = step(x, unit(grad), eta)
        alpha = 1.0 if i == 0 else 0.75
        x, x_prev = step(x, alpha * (z - x) + (1 - alpha) * (x - x_prev), 1.0), x
        values, grad, logits = _loss_and_gradient(model, x, y, loss, target)
        newly = (logits.argmax(1) != y) & ~fooled
        found[newly], fooled = x[newly], fooled | newly
        increases += (values > last).float()
        last = values
        better = values > best_values
        best[better], best_values[better], best_grad[better] = x[better], values[better], grad[better]
        if i + 1 in checks:
            # Halve eta where (1) the loss rose in at most rho of the steps since the last
            # checkpoint, or (2) eta was not halved last time and the best loss did not improve;
            # those images restart from their best point.
            interval = (i + 1) - ([0] + checks)[checks.index(i + 1)]
            halve = (increases <= rho * interval) | (~reduced_last & (best_values <= last_check_best))
            eta[halve] /= 2
            x[halve], grad[halve] = best[halve], best_grad[halve]
            increases.zero_()
            reduced_last, last_check_best = halve, best_values.clone()
    return torch.where(fooled.view(-1, 1, 1, 1), found, best), fooled


def apgd(model: nn.Module, x: torch.Tensor, y, eps: float, norm: str = "linf", steps: int = 100,
         loss: str = "ce", target=None, restarts: int = 1, rho: float = 0.75, seed: int = 0) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1): PGD from a random point on the ball's border,
    first step ``eta_0 = 2 eps``, then with momentum ``alpha = 0.75``:

        z_{k+1} = P(x_k + eta_k * d(grad f(x_k)))
        x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1}))

    (``d`` = sign for L-inf, the unit L2 direction for L2; ``P`` projects onto the eps-ball and
    [0, 1]). At :func:`checkpoints` the step size halves for images whose loss rose in at most
    ``rho`` of the steps since the last checkpoint, or that made no progress after a checkpoint
    that kept eta; they restart from their best point.

    ``loss``: ``"ce"`` (cross-entropy of the true classes ``y``), ``"dlr"``, or ``"dlr-targeted"``
    with ``target`` the classes to push towards (never ``y``). The aim is always to misclassify:
    an image that is misclassified at any iterate returns that iterate, otherwise the iterate
    of highest loss. ``restarts`` reruns the attack on the images not yet fooled, with new
    random starts drawn from a generator seeded with ``seed`` (torch's global one is untouched).
    """
    check_images(x, model)
    eps, norm = check_eps(eps), check_choice(norm, "norm", NORMS)
    steps, restarts = check_positive_int(steps, "steps"), check_positive_int(restarts, "restarts")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    x0 = x.detach()
    generator = torch.Generator().manual_seed(seed)
    with preserved(model):
        with torch.no_grad():
            num_classes = logits_for(model, x0[:1]).shape[1]
        y = check_target(y, len(x0), num_classes, device=x0.device, name="y")
        if loss == "dlr-targeted":
            if target is None:
                raise ValueError("loss='dlr-targeted' needs target=, the classes to push each image towards")
            target = check_target(target, len(x0), num_classes, device=x0.device, name="target")
            if (target == y).any():
                raise ValueError("target must differ from the true class y for every image")
        elif target is not None:
            raise ValueError(f"target= is for loss='dlr-targeted', not loss={loss!r}")
        if num_classes < 4 and loss != "ce":
            raise ValueError(f"the DLR losses need at least 4 classes, the model has {num_classes}")
        out, todo = x0.clone(), torch.arange(len(x0), device=x0.device)
        for _ in range(restarts):
            adv, fooled = _run(model, x0[todo], y[todo], eps, norm, steps, loss,
                               None if target is None else target[todo], rho, generator)
            out[todo] = adv
            todo = todo[~fooled]
            if todo.numel() == 0:
                break
    return out.detach()
