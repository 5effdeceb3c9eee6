"""Measuring attacks: accuracy on clean or attacked data, accuracy against eps, and the
black-box transfer attack."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .._core import (batches, check_eps, check_images, check_model, check_target, logits_for, model_device,
                     preserved)
from ..data import as_tensors
from .apgd import apgd
from .gradient import fgsm, gradient_step, pgd
from .minimal import deepfool
from .square import square

ATTACKS = {"fgsm": fgsm, "gradient_step": gradient_step, "pgd": pgd, "deepfool": deepfool, "apgd": apgd,
           "square": square}


def _resolve_attack(attack):
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {sorted(ATTACKS)}")
        return ATTACKS[attack]
    if not callable(attack):
        raise TypeError(f"attack must be a function like labkit.attacks.pgd or its name, "
                        f"got {type(attack).__name__}")
    return attack


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many of ``x`` the model classifies as ``y``."""
    check_images(x, model)
    with preserved(model), torch.no_grad():
        return (logits_for(model, x).argmax(1) == y).sum().item()


def accuracy(model: nn.Module, data, attack=None, batch_size: int = 500, limit: int | None = None,
             progress: bool = True, **attack_options) -> float:
    """Accuracy of ``model`` on ``data`` (a dataset or an ``(images, labels)`` pair), clean or
    on ``attack(model, x, y=y, **attack_options)`` (a function like :func:`pgd`, or its name),
    in batches of ``batch_size`` moved to the model's device."""
    check_model(model)
    attack = None if attack is None else _resolve_attack(attack)
    x_all, y_all = as_tensors(data, limit)
    device, correct = model_device(model), 0
    for part in tqdm(batches(len(y_all), batch_size), desc="accuracy", disable=not progress, leave=False):
        x, y = x_all[part].to(device), y_all[part].to(device)
        if attack is not None:
            x = attack(model, x, y=y, **attack_options)
        correct += _correct(model, x, y)
    return correct / len(y_all)


def robustness_curve(model: nn.Module, data, attack, eps_list, batch_size: int = 500,
                     limit: int | None = None, progress: bool = True, **attack_options) -> dict:
    """Accuracy against attack size, the curve of Madry et al. 2018 (Fig. 4): the accuracy of
    ``model`` on ``data`` attacked by ``attack(model, x, y=y, eps=eps, **attack_options)`` for
    each ``eps`` in ``eps_list`` (eps = 0 is the clean accuracy). Each batch goes to the device
    once and meets every eps. Returns ``{eps: accuracy}`` in the order of ``eps_list``, which
    :func:`labkit.plot.robustness_plot` draws: ``robustness_plot({"standard": curve, ...})``.

    For ``pgd`` the step size follows eps (``2.5 * eps / steps``) unless ``step_size`` is given.
    """
    check_model(model)
    attack = _resolve_attack(attack)
    eps_list = [check_eps(eps) for eps in eps_list]
    if not eps_list or len(set(eps_list)) != len(eps_list):
        raise ValueError(f"eps_list must hold distinct eps values, got {eps_list}")
    x_all, y_all = as_tensors(data, limit)
    device, correct = model_device(model), [0] * len(eps_list)
    parts = batches(len(y_all), batch_size)
    with tqdm(total=len(parts) * len(eps_list), desc="robustness", disable=not progress, leave=False) as bar:
        for part in parts:
            x, y = x_all[part].to(device), y_all[part].to(device)
            for i, eps in enumerate(eps_list):
                x_eps = attack(model, x, y=y, eps=eps, **attack_options) if eps > 0 else x
                correct[i] += _correct(model, x_eps, y)
                bar.update()
    return {eps: count / len(y_all) for eps, count in zip(eps_list, correct)}


@dataclass(frozen=True)
class TransferResult:
    """What :func:`transfer` measured."""
    adversarial: torch.Tensor     # the surrogate's adversarial images, on the surrogate's device
    victim_accuracy: float        # the victim's accuracy on them: what the black-box attack left
    victim_clean_accuracy: float  # the victim's accuracy on the clean images
    surrogate_accuracy: float     # the surrogate's accuracy on them (the white-box attack)


def transfer(surrogate: nn.Module, victim: nn.Module, x: torch.Tensor, y, attack,
             **attack_options) -> TransferResult:
    """Black-box attack through a surrogate (Papernot et al. 2017, "Practical Black-Box Attacks
    against Machine Learning"): craft ``attack(surrogate, x, y=y, **attack_options)`` with
    white-box access to the surrogate only, and measure how well those images fool ``victim``,
    whose gradients are never used. The surrogate is typically trained (e.g. with
    :func:`labkit.train.fit`) on a few in-domain images labelled by the victim's predictions;
    it needs to mimic the victim's decision boundaries, not to match its accuracy.

    ``x`` lives on the surrogate's device; the victim may sit on another one.
    """
    check_model(surrogate), check_model(victim)
    check_images(x, surrogate)
    y = check_target(y, x.shape[0], device=x.device, name="y")
    adversarial = _resolve_attack(attack)(surrogate, x, y=y, **attack_options)
    device = model_device(victim)
    return TransferResult(
        adversarial=adversarial,
        victim_accuracy=_correct(victim, adversarial.to(device), y.to(device)) / len(y),
        victim_clean_accuracy=_correct(victim, x.to(device), y.to(device)) / len(y),
        surrogate_accuracy=_correct(surrogate, adversarial, y) / len(y),
    )
