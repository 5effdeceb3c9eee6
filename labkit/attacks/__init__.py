"""Adversarial attacks in pixel space: images in [0, 1], the model normalizes inside.

Every attack returns images that stay in the eps-ball around ``x`` (in the attack's norm) and
in [0, 1], detached, on the model's device, and leaves the model exactly as it was (also when
it raises). Families: :mod:`.gradient` (FGSM, the normalized-gradient step, PGD),
:mod:`.minimal` (DeepFool), :mod:`.evaluation` (accuracy, accuracy against eps, the black-box
transfer attack), :mod:`.apgd` (Auto-PGD), :mod:`.square` (the Square Attack, black-box) and
:mod:`.autoattack` (``evaluate``: the AutoAttack-style worst case over them).
"""
from __future__ import annotations

from ._common import NORMS, project, random_delta
from .evaluation import ATTACKS, TransferResult, accuracy, robustness_curve, transfer
from .apgd import apgd
from .autoattack import Evaluation, evaluate
from .gradient import fgsm, gradient_step, pgd
from .minimal import deepfool
from .square import square

__all__ = ["fgsm", "gradient_step", "pgd", "deepfool", "transfer", "TransferResult", "accuracy",
           "robustness_curve", "apgd", "square", "evaluate", "Evaluation", "project", "random_delta", "NORMS", "ATTACKS"]
