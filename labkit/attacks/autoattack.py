"""Robust accuracy to the field's standard: the AutoAttack-style worst case per image (Croce &
Hein 2020) over APGD-CE, APGD-T and the Square Attack, with AutoAttack's sanity flags."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .._core import (batches, check_choice, check_eps, check_images, check_model, check_positive_int, check_target,
                     logits_for, model_device, preserved)
from ..data import as_tensors
from ._common import NORMS
from .apgd import apgd
from .square import square

ATTACK_ORDER = ("apgd-ce", "apgd-t", "square")


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured: accuracies are fractions of all images."""
    clean: float
    after: dict            # attack name -> robust accuracy after it and all attacks before it
    final: float           # the worst case over all attacks (= after[last attack])
    flags: list = field(default_factory=list)  # sanity warnings (empty when all is well)
    robust: torch.Tensor = None  # per image: True where no attack succeeded

    def table(self) -> str:
        rows = [f"{'clean':>10}  {100 * self.clean:6.2f} %"]
        rows += [f"{'+ ' + name:>10}  {100 * acc:6.2f} %" for name, acc in self.after.items()]
        return "\n".join(rows + [f"{'final':>10}  {100 * self.final:6.2f} %"] + [f"FLAG: {f}" for f in self.flags])


def evaluate(model: nn.Module, data, eps: float, norm: str = "linf", steps: int = 100,
             queries: int = 5000, n_targets: int = 9, restarts: int = 1, batch_size: int = 500,
             limit: int | None = None, seed: int = 0, progress: bool = True) -> Evaluation:
    """AutoAttack-style robust accuracy (Croce & Hein 2020): each image counts as robust only
    if it survives every attack in turn, each attack running on the images still robust:

    1. APGD-CE (:func:`labkit.attacks.apgd`, ``steps``, ``restarts``),
    2. APGD-T: APGD with the targeted DLR loss towards each of the ``n_targets`` classes with
       the highest clean logits after the top one (9 for 10 classes: every other class),
    3. Square (:func:`labkit.attacks.square`, ``queries`` per image): black-box, no gradients.

    Returns an :class:`Evaluation` with the accuracy after each attack and the final one.
    Sanity flags (as AutoAttack raises them, also issued as warnings): at ``eps = 0`` the
    final accuracy must equal the clean one; the black-box Square attack lowering the
    accuracy left by the white-box APGD attacks by more than 0.2 points signals gradient
    masking; images with an all-zero input gradient make gradient attacks blind; a model whose
    outputs change between two identical calls is randomized. (FAB-T of
    the standard AutoAttack is left out.)
    """
    check_model(model)
    eps, norm = check_eps(eps), check_choice(norm, "norm", NORMS)
    steps, queries, restarts = (check_positive_int(v, n) for v, n in ((steps, "steps"), (queries, "queries"), (restarts, "restarts")))
    x_all, y_all = as_tensors(data, limit)
    check_images(x_all, None, name="data's images")
    device = model_device(model)
    robust, clean_correct, zero_grad, randomized = torch.zeros(len(y_all), dtype=torch.bool), 0, 0, 0
    removed = {name: 0 for name in ATTACK_ORDER}
    parts = batches(len(y_all), batch_size)
    with preserved(model), tqdm(total=len(parts) * (2 + n_targets), desc=f"evaluate {norm} eps={eps:g}",
                                disable=not progress) as bar:
        for part in parts:
            x, y = x_all[part].to(device), y_all[part].to(device)
            with torch.no_grad():
                logits = logits_for(model, x)
                randomized += int(not torch.equal(logits, logits_for(model, x)))
            y = check_target(y, len(x), logits.shape[1], name="data's labels")
            if not 1 <= n_targets < logits.shape[1]:
                raise ValueError(f"n_targets must be in [1, {logits.shape[1] - 1}], got {n_targets}")
            alive = logits.argmax(1) == y
            clean_correct += int(alive.sum())
            zero_grad += _zero_gradients(model, x, y)

            def attack(name, run):
                """Run ``run(x, y, index)`` on the images still robust; drop those it fools."""
                idx = alive.nonzero()[:, 0]
                if idx.numel():
                    with torch.no_grad():
                        fooled = logits_for(model, run(x[idx], y[idx], idx)).argmax(1) != y[idx]
                    removed[name] += int(fooled.sum())
                    alive[idx[fooled]] = False
                bar.update()

            attack("apgd-ce", lambda xs, ys, idx: apgd(model, xs, ys, eps, norm, steps, "ce",
                                                        restarts=restarts, seed=seed))
            runner_up = logits.argsort(dim=1, descending=True)
            for k in range(1, n_targets + 1):  # target: the k-th highest clean logit after the top one
                attack("apgd-t", lambda xs, ys, idx: apgd(model, xs, ys, eps, norm, steps, "dlr-targeted",
                                                           target=runner_up[idx, k], restarts=restarts, seed=seed))
            attack("square", lambda xs, ys, idx: square(model, xs, ys, eps, norm, queries, restarts, seed=seed))
            robust[part] = alive.cpu()
    n = len(y_all)
    after, left = {}, clean_correct
    for name in ATTACK_ORDER:
        left -= removed[name]
        after[name] = left / n
    clean = clean_correct / n
    flags = _flags(eps, clean, after, zero_grad, n, randomized)
    for flag in flags:
        warnings.warn(flag, stacklevel=2)
    return Evaluation(clean=clean, after=after, final=after[ATTACK_ORDER[-1]], flags=flags, robust=robust)


def _zero_gradients(model, x, y) -> int:
    """How many images have an all-zero cross-entropy gradient (gradient attacks cannot move them)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(logits_for(model, x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return int((grad.flatten(1).abs().amax(dim=1) == 0).sum())


def _flags(eps, clean, after, zero_grad, n, randomized, alpha=0.002) -> list[str]:
    flags = []
    if randomized:
        flags.append("the model gave different outputs for the same images: a randomized defence "
                     "needs attacks with expectation over transformation (EOT), not this evaluation")
    if eps == 0 and after[ATTACK_ORDER[-1]] != clean:
        flags.append(f"at eps = 0 the attacks changed the accuracy ({100 * clean:.2f} % clean, "
                     f"{100 * after[ATTACK_ORDER[-1]]:.2f} % after them): the model is randomized or an "
                     f"attack leaves the eps-ball")
    white_box = after["apgd-t"]
    if after["square"] < white_box - alpha:
        flags.append(f"the black-box Square attack lowered the accuracy left by the white-box APGD "
                     f"attacks from {100 * white_box:.2f} % to {100 * after['square']:.2f} %: a sign of "
                     f"gradient masking, so gradient-based robustness figures are unreliable")
    if zero_grad:
        flags.append(f"{zero_grad} of {n} images have an all-zero input gradient: gradient attacks "
                     f"cannot move them (gradient masking or saturated outputs)")
    return flags
