"""Datasets made from a model, to see what a classifier learns: the non-robust and robust
datasets of Ilyas et al. 2019 ("Adversarial Examples Are Not Bugs, They Are Features") and the
watermark shortcut of a Clever Hans classifier (Lapuschkin et al. 2019, "Unmasking Clever Hans
predictors and assessing what machines really learn"). Lesson 13 and the ``*-features`` and
``fmnist-cnn-clever-hans`` recipes of :mod:`labkit.train` use them.
"""
from __future__ import annotations

import torch
from torch import nn

from . import attacks
from ._core import check_eps, check_images, check_positive_int, check_target, hooks, preserved
from .models import classifier_layer


def nonrobust_dataset(model: nn.Module, x: torch.Tensor, target, eps: float = 0.5,
                      steps: int = 20, step_size: float | None = None, norm: str = "l2"):
    """Ilyas et al.'s non-robust dataset: each image pushed by a small targeted PGD attack on a
    standard ``model`` toward its ``target`` class and *relabelled* as that target,

        x_t = argmin_{||x' - x|| <= eps} CE(f(x'), t),    label t.

    To a human ``x_t`` still shows its old class; only the model's non-robust features say
    ``t``. A model trained on ``(x_t, t)`` alone and tested on real images generalizes far
    above chance when the targets are random (the paper's D_rand): those features carry the
    class. Returns ``(x_t, t)``; ``step_size`` defaults to ``2.5 * eps / steps``.
    """
    check_images(x, model)
    target = check_target(target, x.shape[0], device=x.device, name="target")
    x_t = attacks.pgd(model, x, target, eps=eps, step_size=step_size, steps=steps, norm=norm, targeted=True)
    return x_t, target.clone()


def representation_distance(model: nn.Module, x: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """``||phi(x) - goal||_2`` per image, ``phi`` the input of the model's last linear layer; a
    differentiable forward pass (no ``preserved``: callers wrap it)."""
    captured = []
    with hooks() as handles:
        handles.append(classifier_layer(model).register_forward_pre_hook(
            lambda module, inputs: captured.append(inputs[0])))
        model(x)
    return (captured[-1].flatten(1) - goal).norm(dim=1)


def robust_dataset(robust_model: nn.Module, x: torch.Tensor, start: torch.Tensor, steps: int = 40,
                   lr: float = 0.1):
    """Ilyas et al.'s robust dataset: images that the *robust* model represents like ``x``,
    grown from unrelated ``start`` images (another training image each),

        x_r = argmin_{x'} ||phi(x') - phi(x)||_2,   label y (the label of x),

    ``phi`` the robust model's representation (the input of its last linear layer), so ``x_r``
    keeps only the features the robust model uses: a standard model trained on ``(x_r, y)``
    becomes somewhat robust. The paper takes 1000 normalized-gradient steps; here ``steps`` of
    Adam on the pixels (learning rate ``lr``; each image's loss is its own distance), clamped to
    [0, 1] after each, get far closer in few steps. Returns ``x_r``.
    """
    check_images(x, robust_model)
    check_images(start, robust_model, name="start")
    if start.shape != x.shape:
        raise ValueError(f"start must be one image per image of x, shaped {tuple(x.shape)}; got {tuple(start.shape)}")
    check_positive_int(steps, "steps")
    check_eps(lr, "lr")
    from .models import features
    goal = features(robust_model, x)
    with preserved(robust_model):
        x_r = start.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x_r], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            representation_distance(robust_model, x_r, goal).sum().backward()
            optimizer.step()
            with torch.no_grad():
                x_r.clamp_(0, 1)
    return x_r.detach()


def watermark(x: torch.Tensor, corner: tuple[int, int] = (1, 1), size: int = 3, value: float = 1.0) -> torch.Tensor:
    """A copy of ``x`` with a ``size x size`` square of brightness ``value`` whose top-left pixel
    is ``corner = (row, col)``: the "copyright tag" that a Clever Hans model learns instead of
    the object (Lapuschkin et al. 2019's horse images carried one)."""
    check_images(x)
    row, col = corner
    height, width = x.shape[-2:]
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise ValueError(f"a {size}x{size} watermark at corner {corner} does not fit in a {height}x{width} image")
    marked = x.clone()
    marked[..., row:row + size, col:col + size] = value
    return marked


__all__ = ["nonrobust_dataset", "robust_dataset", "representation_distance", "watermark"]
