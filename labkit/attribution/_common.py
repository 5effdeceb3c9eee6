"""What the attribution modules share: the check of model, images and target, how many model
evaluations go into one forward pass (the loop itself is :func:`labkit._core.batched`), the
target logits, and the row type of the method table (:class:`Method`, :class:`Option`).
Private module: the public functions call these; ``Method`` and ``Option`` are exported by
:mod:`labkit.attribution`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._core import check_images, check_model, check_positive_int, check_target, logits_for

# With batch_size=None a forward pass gets as many images as hold this many input values. On a
# CPU big batches are slower per image once activations outgrow the caches, and single images
# leave some speed unused. Measured with one thread (process time, FashionCNN, 1336 images):
# forward 1.63 s in batches of 668, 1.30 s in 334, 1.22 s in 167, 0.93 s in 83, 0.92 s in 41;
# forward + backward (640 images) 1.39 s in one batch, 0.99 s in 334, 0.88 s in 80 or 40.
# EfficientNet-Lite0: forward 19.5 ms per 224 x 224 image alone, 18-19 ms in batches of 2 to 4,
# forward + backward 59 ms in batches of 1 to 4, 102 ms in 27. Hence 2**16 values (83 images of
# 28 x 28) but at least 2 images. Accelerators want big batches: 2**22 values, 27 images of
# 3 x 224 x 224 (EfficientNet-Lite0 then needs about 2.3 GB).
def default_per_forward(x: torch.Tensor) -> int:
    if x.device.type == "cpu":
        return max(2, 2**16 // x[0].numel())
    return max(1, 2**22 // x[0].numel())


def prepare(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Check model, images and target (type and length; the class range is checked once the
    model's output says how many classes there are). Returns the target as a LongTensor on
    ``x``'s device."""
    check_model(model)
    check_images(x, model)
    return check_target(target, x.shape[0], device=x.device)


def per_forward(x: torch.Tensor, batch_size) -> int:
    """How many model evaluations go into one forward pass."""
    if batch_size is None:
        return default_per_forward(x)
    return check_positive_int(batch_size, "batch_size")


def checked_logits(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The model's ``B x classes`` logits, after checking the target classes against them."""
    logits = logits_for(model, inputs)
    check_target(target, inputs.shape[0], logits.shape[1])
    return logits


def target_logits(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The logit of each input's target class, ``B``."""
    return checked_logits(model, inputs, target).gather(1, target[:, None]).squeeze(1)


# ---- the method table: each family module lists its methods in ``METHODS``; the package joins
# them in ``labkit.attribution.METHODS``, which the explorer, the tests and the benchmarks iterate.

@dataclass(frozen=True)
class Option:
    """A setting of a method that the explorer offers as a control: a number in ``[low, high]``
    (an int slider when ``default`` is an int), one of ``choices`` (a name -> the keyword
    arguments it stands for), or, with ``layer``, one of the model's layers."""
    default: Any = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: Mapping[str, dict] | None = None
    layer: bool = False


@dataclass(frozen=True)
class Method:
    """One attribution method: its ``function(model, x, target, **options)``, the ``label``
    people read, how its map becomes a heatmap (``heatmap``: :func:`to_heatmap`'s ``reduce``,
    ``"sum"`` where the sign carries meaning, ``"max_abs"`` otherwise), the ``options`` the
    explorer offers, and ``quick``: options for a cheap call (tests, device checks)."""
    name: str
    function: Callable
    label: str
    heatmap: str
    options: Mapping[str, Option] = field(default_factory=dict)
    quick: Mapping[str, Any] = field(default_factory=dict)


SCORES = ("probability", "logit")


def check_score(score) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score


def class_score(model: nn.Module, images: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """The target class's softmax ``"probability"`` or ``"logit"``, ``B``."""
    logits = checked_logits(model, images, target)
    if score == "probability":
        logits = logits.softmax(dim=1)
    return logits.gather(1, target[:, None]).squeeze(1)


def pixel_scores(attr, x: torch.Tensor, reduce: str) -> torch.Tensor:
    """One finite value per pixel of ``x``, ``B x H x W``: a ``B x H x W`` heatmap as it is,
    ``B x C x H x W`` attributions reduced over channels by :func:`to_heatmap`'s ``reduce``."""
    from .evaluation import to_heatmap  # evaluation imports this module
    if isinstance(attr, torch.Tensor) and attr.dim() == 3 and attr.is_floating_point():
        heat = attr.detach()
    else:
        heat = to_heatmap(attr, reduce)
    if heat.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"attr must give one value per pixel of x {tuple(x.shape)}: "
                         f"B x C x H x W or B x H x W, got shape {tuple(attr.shape)}")
    check_images(heat[:, None], name="attr", unit_range=False)
    return heat.to(x.device)
