"""What the attribution modules share: argument checks and the batching of many model
evaluations into few forward passes. Private: the public functions call these."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .._core import batches, check_images, check_model, check_target, logits_for

# With batch_size=None a forward pass gets as many images as hold this many input values. On a
# CPU big batches are slower per image once activations outgrow the caches, and single images
# leave some speed unused (measured with one thread: FashionCNN forward 0.58 ms per image in
# batches of 334, 0.88 ms in 668; EfficientNet-Lite0 forward 19.5 ms per 224 x 224 image alone,
# 18-19 ms in batches of 2 to 4, forward + backward 59 ms in batches of 1 to 4, 102 ms in 27):
# 2**18 values but at least 2 images. Accelerators want big batches: 2**22 values, 27 images of
# 3 x 224 x 224 (EfficientNet-Lite0 then needs about 2.3 GB).
def default_per_forward(x: torch.Tensor) -> int:
    if x.device.type == "cpu":
        return max(2, 2**18 // x[0].numel())
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return batch_size


def chunks(total: int, size: int, progress: bool, desc: str):
    """Slices covering ``range(total)``, ``size`` at a time, with a progress bar when there
    is more than one."""
    slices = batches(total, size)
    return tqdm(slices, desc=desc, disable=not progress or len(slices) == 1, leave=False)


def checked_logits(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The model's ``B x classes`` logits, after checking the target classes against them."""
    logits = logits_for(model, inputs)
    check_target(target, inputs.shape[0], logits.shape[1])
    return logits


def target_logits(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The logit of each input's target class, ``B``."""
    return checked_logits(model, inputs, target).gather(1, target[:, None]).squeeze(1)


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_number(value, name: str, low: float = float("-inf"), high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


def check_reference(reference, x: torch.Tensor, name: str) -> torch.Tensor:
    """A reference image (baseline, fill): a number in [0, 1] or a tensor in [0, 1] that
    broadcasts to ``x``'s shape, on its device. Returns it expanded to ``x``'s shape."""
    if not isinstance(reference, torch.Tensor):
        value = check_number(reference, name, 0.0, 1.0)
        return torch.full((), value, dtype=x.dtype, device=x.device).expand_as(x)
    try:
        expanded = reference.expand_as(x)
    except RuntimeError as err:
        raise ValueError(f"{name} must be a number or a tensor that broadcasts to the images' "
                         f"shape {tuple(x.shape)}, got shape {tuple(reference.shape)}") from err
    check_images(expanded, name=name)
    if expanded.device != x.device:
        raise ValueError(f"{name} is on {expanded.device} but the images are on {x.device}")
    return expanded.detach().to(x.dtype)


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
