"""Minimal-perturbation attacks: DeepFool looks for the smallest L2 change that flips the label,
with no eps to choose."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .._core import batches, check_eps, check_images, check_positive_int, check_target, logits_for, preserved


def _candidate_classes(logits: torch.Tensor, label: torch.Tensor, candidates) -> torch.Tensor:
    """``B x m``: each image's label first, then the ``m - 1`` other classes it scores highest,
    in class order (all classes when ``candidates`` is None)."""
    num_classes = logits.shape[1]
    count = num_classes if candidates is None else check_positive_int(candidates, "candidates")
    if not 2 <= count <= num_classes:
        raise ValueError(f"candidates must be None or an int in [2, {num_classes}] (the model's "
                         f"classes), got {candidates!r}")
    ranked = logits.argsort(dim=1, descending=True)
    others = ranked[ranked != label[:, None]].view(len(label), num_classes - 1)
    return torch.cat([label[:, None], others[:, :count - 1].sort(dim=1).values], dim=1)


def _boundary_differences(model: nn.Module, x: torch.Tensor, classes: torch.Tensor):
    """``f'_k = f_k - f_l`` (``b x (m-1)``) and ``w'_k = grad_x f'_k`` (``b x (m-1) x C x H x W``)
    for each image's other classes (``classes[:, 0]`` is its label): one forward pass, then one
    backward pass per class, each batched over the images. (Vectorizing the backward passes
    with vmap, ``is_grads_batched``, was 1.4x slower on CPU for FashionCNN.)"""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_for(model, x).gather(1, classes)
        f_diff = logits[:, 1:] - logits[:, :1]
        last = f_diff.shape[1] - 1
        w_diff = [torch.autograd.grad(f_diff[:, k].sum(), x, retain_graph=k < last)[0]
                  for k in range(f_diff.shape[1])]
    return f_diff.detach(), torch.stack(w_diff, dim=1)


# The reference code's extra L2 length per step: when [0, 1] clipping eats part of each step the
# iterates can otherwise settle onto the decision boundary without ever crossing it.
_PUSH = 1e-4


def _linearized_boundary_step(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The step to the nearest boundary of the model linearized at ``x``, ``_PUSH`` longer:
    ``(|f'_k*| / ||w'_k*|| + _PUSH) * w'_k* / ||w'_k*||`` (see :func:`deepfool`)."""
    f_diff, w_diff = _boundary_differences(model, x, classes)
    w_norm = w_diff.flatten(2).norm(dim=2).clamp_min(1e-12)
    nearest = (f_diff.abs() / w_norm).argmin(dim=1)
    rows = torch.arange(len(x), device=x.device)
    scale = (f_diff[rows, nearest].abs() / w_norm[rows, nearest] + _PUSH) / w_norm[rows, nearest]
    return scale.view(-1, *([1] * (x.dim() - 1))) * w_diff[rows, nearest]


def deepfool(model: nn.Module, x: torch.Tensor, steps: int = 50, overshoot: float = 0.02, *,
             y=None, candidates: int | None = None, batch_size: int | None = None,
             progress: bool = False) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al. 2016, "DeepFool: a simple and accurate method to fool
    deep neural networks"): walk to the nearest decision boundary of the model linearized at
    the current point. With ``l`` the label and, for every other class ``k``,

        f'_k = f_k(x_i) - f_l(x_i),   w'_k = grad f_k(x_i) - grad f_l(x_i),
        k* = argmin_k |f'_k| / ||w'_k||_2,   r_i = (|f'_k*| / ||w'_k*||_2 + 1e-4) * w'_k* / ||w'_k*||_2,
        x_{i+1} = clip(x_0 + (1 + overshoot) * (r_0 + ... + r_i), 0, 1),

    until the model no longer predicts ``l`` at ``x_i`` or ``steps`` steps are done; each image
    stops on its own. Returns the adversarial images; ``x' - x`` is DeepFool's L2-small
    perturbation, with no eps to choose.

    ``y``: the labels to move away from (default: the model's predictions on ``x``, as in the
    paper; images the model already gets wrong then stay as they are). ``candidates``: consider
    only this many of each image's highest-scoring classes, its label included (the paper's
    ImageNet code uses 10; default: all classes). ``batch_size`` caps how many images share one
    Jacobian computation (memory: images x classes x pixels).

    As in the paper's code, the overshoot scales the summed perturbation, the next step is
    computed at that overshot point, and every step is 1e-4 longer than the linearization asks;
    the [0, 1] clip, which the paper does not have, applies to the overshot point. torchattacks
    scales and clips every step and drops the 1e-4: its first step is the same up to that 1e-4,
    but where clipping eats part of each step its iterates settle onto the decision boundary
    without crossing it, which on fmnist-cnn leaves many test images unflipped after 50 steps.
    """
    check_images(x, model)
    steps, overshoot = check_positive_int(steps, "steps"), check_eps(overshoot, "overshoot")
    with preserved(model):
        with torch.no_grad():
            logits = logits_for(model, x)
        label = logits.argmax(1) if y is None else check_target(y, x.shape[0], logits.shape[1],
                                                                device=x.device, name="y")
        classes = _candidate_classes(logits, label, candidates)
        x0, total = x.detach(), torch.zeros_like(x)
        x_adv = x0.clone()
        active = torch.arange(x.shape[0], device=x.device)
        for i in tqdm(range(steps), desc="DeepFool", disable=not progress, leave=False):
            if i > 0:
                with torch.no_grad():
                    logits = logits_for(model, x_adv[active])
            active = active[logits.argmax(1) == label[active]]
            if active.numel() == 0:
                break
            for part in batches(active.numel(), batch_size):
                rows = active[part]
                total[rows] += _linearized_boundary_step(model, x_adv[rows], classes[rows])
                x_adv[rows] = (x0[rows] + (1 + overshoot) * total[rows]).clamp(0, 1)
    return x_adv.detach()
