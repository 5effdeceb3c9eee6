"""What every labkit method needs, written once: input validation and a context that leaves the
model exactly as it was (mode, ``requires_grad``, hooks, ``.grad``), also when the call raises.

Private: public functions call these; notebooks and students do not.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


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
    return x


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


def cam_layer_name(model: nn.Module) -> str:
    """Grad-CAM's default layer: the model's ``gradcam_layer`` attribute when it has one, else
    the last ``nn.Conv2d`` in registration order. labkit's models point ``gradcam_layer`` at
    their last *rectified* feature maps, as in the paper: before the ReLU, a map whose
    weighted sum is negative everywhere gives an all-zero Grad-CAM (on FashionCNN's ``conv5``,
    for about half of the test images)."""
    if getattr(model, "gradcam_layer", None):
        return model.gradcam_layer
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no nn.Conv2d layer; pass layer= explicitly")
    return convs[-1]


def _hook_snapshot(modules: list[nn.Module]):
    return [(m, name, list(hook_dict)) for m in modules
            for name in _HOOK_DICTS if (hook_dict := m.__dict__.get(name)) is not None]


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


def input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the selected logits (summed over the batch, so each sample gets its own
    gradient) with respect to ``x``. Returns ``(gradient, logits)``, both detached."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # also under a caller's torch.no_grad(): a gradient needs the graph
        logits = logits_for(model, x)
        target = check_target(target, x.shape[0], logits.shape[1], device=logits.device)
        selected = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(selected, x, create_graph=create_graph)
    return grad.detach(), logits.detach()


def batches(n: int, batch_size: int | None) -> Sequence[slice]:
    """Slices that cover ``range(n)`` in chunks of at most ``batch_size`` (all at once if None)."""
    if batch_size is None:
        return [slice(0, n)]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
