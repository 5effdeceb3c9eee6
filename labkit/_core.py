"""What every labkit method needs, written once: the device, seeding, input validation and a
context that leaves the model exactly as it was (mode, ``requires_grad``, hooks, ``.grad``),
also when the call raises.

Private: public functions call these; notebooks and students do not.

Validation policy (every ``check_*`` here, used by every module; a method-specific check lives
with its method and follows the same rule):

- a value of the wrong *type* raises ``TypeError`` (``steps=2.0``, ``eps="0.1"``, a bool where
  a number belongs, a NumPy array where a tensor belongs, a float target);
- a value of the right type but outside what is allowed raises ``ValueError`` (``steps=0``,
  ``eps=-1``, an unknown name, a wrong shape, pixels outside [0, 1], NaN, a tensor on another
  device, an image whose channels the model does not take);
- the message names the argument, what was expected and what came in, and is raised before
  the model runs.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
import random
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def get_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU.

    ``$LABKIT_DEVICE`` (e.g. ``cpu``, ``cuda:1``) overrides the choice.
    """
    override = os.environ.get("LABKIT_DEVICE")
    if override:
        try:
            return torch.device(override)
        except RuntimeError as err:
            raise ValueError(f"LABKIT_DEVICE must name a torch device such as 'cpu' or 'cuda', "
                             f"got {override!r}") from err
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a parameter-free model."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_images(x, model: nn.Module | None = None, name: str = "x", *, rank: int = 4,
                 unit_range: bool = True) -> torch.Tensor:
    """Check a batch of images: a float tensor, ``B x C x H x W``, finite, in [0, 1], on the
    model's device. Returns ``x`` unchanged."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        hint = " (convert with x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}{hint}")
    if x.dim() != rank:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == rank - 1 else ""
        raise ValueError(f"{name} must have {rank} dimensions (B x C x H x W), "
                         f"got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if unit_range:
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} must hold pixel values in [0, 1] (models normalize inside), "
                             f"got values in [{lo:.3g}, {hi:.3g}]")
    if model is not None:
        device = model_device(model)
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the model is on {device}; "
                             f"move it with {name}.to({str(device)!r})")
        channels = input_channels(model)
        if channels is not None and x.shape[1] != channels:
            hint = (" (a grey image: repeat it, x.expand(-1, 3, -1, -1))" if x.shape[1] == 1 and channels == 3
                    else " (an RGB image: convert it to grey, e.g. x.mean(1, keepdim=True))"
                    if x.shape[1] == 3 and channels == 1 else "")
            raise ValueError(f"the model takes {channels}-channel images but {name} has {x.shape[1]} "
                             f"channels (shape {tuple(x.shape)}){hint}")
    return x


def input_channels(model: nn.Module) -> int | None:
    """How many channels the model's images have: its ``in_channels`` attribute when it has one,
    else the ``in_channels`` of its first convolution (registration order); ``None`` when it has
    neither (then the images are not checked for it)."""
    channels = getattr(model, "in_channels", None)
    if isinstance(channels, int):
        return channels
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def check_positive_int(value, name: str) -> int:
    """An int >= 1 (steps, samples, epochs, a batch size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_number(value, name: str, low: float = float("-inf"), high: float = float("inf")) -> float:
    """A real number in ``[low, high]`` (NaN is in no interval)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


def check_eps(value, name: str = "eps") -> float:
    """A number >= 0 (``math.inf`` allowed: no ball at all)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value}")
    return float(value)


def check_choice(value, name: str, choices: Sequence) -> str:
    """One of ``choices`` (a norm, a method, a score)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


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


def check_target(target, batch: int, num_classes: int | None = None, device=None,
                 name: str = "target") -> torch.Tensor:
    """Turn an int, a list of ints or a 1-D integer tensor into a LongTensor of length ``batch``."""
    if isinstance(target, bool):
        raise TypeError(f"{name} must be an int, a list of ints or a LongTensor, got bool")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long)
    elif isinstance(target, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in target):
            raise TypeError(f"{name} as a list must hold ints, got {[type(v).__name__ for v in target][:5]}")
        t = torch.tensor(target, dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices, got dtype {target.dtype}")
        t = target.reshape(-1).long() if target.dim() == 0 else target.long()
        if t.dim() == 1 and t.numel() == 1 and batch > 1:
            t = t.expand(batch)
    else:
        raise TypeError(f"{name} must be an int, a list of ints or a LongTensor, got {type(target).__name__}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must give one class per image: expected length {batch}, "
                         f"got shape {tuple(t.shape)}")
    if num_classes is not None and ((t < 0).any() or (t >= num_classes).any()):
        raise ValueError(f"{name} must be class indices in [0, {num_classes - 1}], "
                         f"got values in [{t.min().item()}, {t.max().item()}]")
    return t.to(device) if device is not None else t


def resolve_layer(model: nn.Module, layer) -> nn.Module:
    """A submodule given itself or by its dotted name (as in ``model.named_modules()``)."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"layer must be an nn.Module or its dotted name, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        names = [n for n in modules if n]
        close = [n for n in names if layer.split(".")[-1] in n][:5] or names[-5:]
        raise ValueError(f"the model has no layer named {layer!r}; some that exist: {close}")
    return modules[layer]


def _hook_snapshot(modules: list[nn.Module]):
    return [(m, name, list(hook_dict)) for m in modules
            for name in HOOK_DICTS if (hook_dict := m.__dict__.get(name)) is not None]


@contextlib.contextmanager
def preserved(model: nn.Module, *, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Use ``model`` inside the block and leave it exactly as it was afterwards; gradients are
    enabled inside, also under a caller's ``torch.no_grad()``.

    Restores every module's train/eval flag, every parameter's ``requires_grad`` and ``.grad``,
    and removes any hook registered on any submodule during the block, also when it raises.
    With ``eval_mode`` a model in train mode is switched to eval for the block, with a warning
    (dropout and batch-norm statistics would otherwise make attributions random and change the
    model's buffers). With ``freeze`` parameters stop requiring grad, so backward passes compute
    only input gradients (faster, and nothing accumulates in ``.grad``).
    """
    check_model(model)
    modules = list(model.modules())
    modes = [(m, m.training) for m in modules]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    hooks = _hook_snapshot(modules)
    try:
        if eval_mode and model.training:
            warnings.warn("the model was in train mode; labkit evaluates it in eval mode for this "
                          "call and then restores train mode", stacklevel=3)
            model.eval()
        if freeze:
            for p, _, _ in params:
                p.requires_grad_(False)
        with torch.enable_grad():  # a caller's torch.no_grad() must not break gradient methods
            yield model
    finally:
        # Restore only what changed: per-call overhead counts for small models on a GPU.
        for m, training in modes:
            if m.training != training:
                m.training = training
        for p, requires_grad, grad in params:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        for m, name, keys in hooks:
            hook_dict = getattr(m, name)
            for key in [k for k in hook_dict if k not in keys]:
                del hook_dict[key]


@contextlib.contextmanager
def hooks() -> Iterator[list]:
    """Collect hook handles (``handles.append(module.register_forward_hook(...))``) and remove
    them all when the block ends, however it ends."""
    handles: list = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def logits_for(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward pass that checks the model returns ``B x num_classes`` logits."""
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return B x num_classes logits, got {shape}")
    return out


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each sample, shaped ``B x 1 x 1 x 1`` to broadcast, kept away from 0."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def batches(n: int, batch_size: int | None) -> Sequence[slice]:
    """Slices that cover ``range(n)`` in chunks of at most ``batch_size`` (all at once if None)."""
    if batch_size is None:
        return [slice(0, n)]
    check_positive_int(batch_size, "batch_size")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def batched(function: Callable, items: Iterable[tuple], size: int, count: int | None = None,
            progress: bool = False, desc: str | None = None) -> Iterator[torch.Tensor]:
    """``function(*rows)`` for every item, evaluated ``size`` rows at a time: the batching loop of
    every method that evaluates the model many times, written once.

    ``items``: tuples of tensors with the same number of rows (e.g. ``(noisy images, targets)``
    for one noise sample, one path point or one occlusion window), typically a generator, so
    that a method reads as the textbook loop over its samples, steps or windows. Consecutive
    items are joined (or split) into calls of exactly ``size`` rows, the last call taking what
    is left; yields each item's rows of the result, in order. Memory: the rows of about one call
    plus one item. ``count`` (the number of items) sizes the progress bar, shown with
    ``progress`` when there is more than one call.
    """
    check_positive_int(size, "batch_size")
    waiting, waiting_rows, lengths, done, bar = [], 0, [], None, None
    for item in itertools.chain(items, [None]):
        if item is not None:
            waiting.append(item)
            waiting_rows += len(item[0])
            lengths.append(len(item[0]))
        while waiting_rows >= size or (item is None and waiting_rows):
            if bar is None:  # no bar when everything fits in one call
                bar = tqdm(total=count, desc=desc, leave=False, disable=not progress or item is None)
            columns = [torch.cat(column) if len(waiting) > 1 else column[0] for column in zip(*waiting)]
            result = function(*(column[:size] for column in columns))
            waiting = [tuple(column[size:] for column in columns)] if waiting_rows > size else []
            waiting_rows = max(0, waiting_rows - size)
            done = result if done is None else torch.cat([done, result])
            while lengths and len(done) >= lengths[0]:
                yield done[:lengths[0]]
                done = done[lengths.pop(0):]
                bar.update()
    if bar is not None:
        bar.close()
