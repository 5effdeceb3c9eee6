"""Certified robustness with interval bound propagation (IBP).

An attack that fails proves nothing; a certificate does. IBP (Gowal et al. 2018, "On the
Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models"; Kolter &
Madry's NeurIPS 2019 tutorial "Adversarial Robustness: Theory and Practice", chapter 4) pushes the
whole L-inf box ``[x - eps, x + eps] ∩ [0, 1]`` through the network, one layer at a time, as
elementwise lower and upper bounds ``l <= z <= u``:

- affine layers (Linear, Conv2d, BatchNorm in eval mode, the models' ``Normalize``), in centre and
  radius form ``m = (u + l) / 2``, ``r = (u - l) / 2``:  ``m' = W m + b``, ``r' = |W| r``;
- monotone layers (ReLU, max and average pooling, Flatten, Dropout as identity): ``l' = f(l)``,
  ``u' = f(u)``.

Every point of the box gives logits inside the bounds (tested on random and PGD samples).
The models normalize inside, so eps is in pixel units and the box is cut to [0, 1] before the
``Normalize`` layer turns it into ``[(l - mean) / std, (u - mean) / std]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._core import batches, check_images, check_model, check_target, logits_for, model_device, preserved
from .data import as_tensors
from .models import Normalize

_MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
             nn.Flatten)
_IDENTITY = (nn.Dropout, nn.Identity)  # dropout is the identity in eval mode
_SUPPORTED = "Linear, Conv2d, ReLU, Flatten, max/average pooling, Normalize, BatchNorm2d, Dropout"


def layers(model: nn.Module) -> list[nn.Module]:
    """The model's leaf modules in registration order (``nn.Sequential`` unpacked): the chain IBP
    walks. Raises ``TypeError`` naming the first layer it cannot bound."""
    check_model(model)
    chain = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue  # a container: its leaves come next in named_modules()
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, Normalize) + _MONOTONE + _IDENTITY):
            raise TypeError(f"interval_bounds cannot bound layer {name or 'model'!r} of type "
                            f"{type(module).__name__}; supported: {_SUPPORTED}")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise TypeError(f"interval_bounds supports zero padding only; layer {name!r} pads "
                            f"with {module.padding_mode!r}")
        chain.append(module)
    return chain


def _channel_affine(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``layer(x) = x * scale + shift`` per channel (``1 x C x 1 x 1``)."""
    if isinstance(layer, Normalize):
        return 1 / layer.std, -layer.mean / layer.std
    scale = 1 / torch.sqrt(layer.running_var + layer.eps)  # BatchNorm2d with running statistics
    shift = -layer.running_mean * scale
    if layer.affine:
        scale, shift = scale * layer.weight, shift * layer.weight + layer.bias
    return scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)


def _affine(layer: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    """``m' = layer(m)``, ``r' = |W| r``: the tightest box around the image of a box."""
    mid, rad = (upper + lower) / 2, (upper - lower) / 2
    if isinstance(layer, nn.Linear):
        mid, rad = layer(mid), F.linear(rad, layer.weight.abs())
    elif isinstance(layer, nn.Conv2d):
        mid = layer(mid)
        rad = F.conv2d(rad, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        scale, shift = _channel_affine(layer)
        mid, rad = mid * scale + shift, rad * scale.abs()
    return mid - rad, mid + rad


def propagate(chain: list[nn.Module], lower: torch.Tensor, upper: torch.Tensor):
    """Push the box ``lower <= x <= upper`` through ``chain`` (see :func:`layers`); returns the
    output box. Differentiable (IBP training backpropagates through it); no checks."""
    for layer in chain:
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, Normalize)):
            lower, upper = _affine(layer, lower, upper)
        elif isinstance(layer, _MONOTONE):
            lower, upper = layer(lower), layer(upper)
    return lower, upper


def margin_lower_bounds(chain: list[nn.Module], lower: torch.Tensor, upper: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
    """Lower bounds of the margins ``z_y - z_j`` (``B x K``; column ``y`` is 0) over the box.

    The last Linear layer is folded into the margins, ``c_j = W_y - W_j``, before bounding:
    ``z_y - z_j >= c_j m - |c_j| r + b_y - b_j``. This is tighter than ``l_y - u_j`` from
    plain logit bounds, which lets ``z_y`` and ``z_j`` take their worst values at different
    points of the box (Gowal et al. 2018, section 3: the elision of the last layer).
    Differentiable; a chain that does not end in Linear falls back to ``l_y - u_j``."""
    if not isinstance(chain[-1], nn.Linear):
        low, up = propagate(chain, lower, upper)
        return low.gather(1, y[:, None]) - up
    last = chain[-1]
    low, up = propagate(chain[:-1], lower, upper)
    mid, rad = (up + low) / 2, (up - low) / 2
    c = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)           # B x K x D
    bias = 0 if last.bias is None else last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)
    return torch.einsum("bkd,bd->bk", c, mid) - torch.einsum("bkd,bd->bk", c.abs(), rad) + bias


def _box(x: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number (pixel units, images in [0, 1]), got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _checked_chain(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The layer chain, after making sure it computes what the model computes (a model whose
    ``forward`` is not the chain of its layers, e.g. with a residual, would get wrong bounds)."""
    chain = layers(model)
    z, out = x, logits_for(model, x)
    for layer in chain:
        z = layer(z)
    if z.shape != out.shape or not torch.allclose(z, out, rtol=1e-4, atol=1e-5):
        raise TypeError(f"{type(model).__name__}.forward is not the plain chain of its layers "
                        f"(a residual or a functional call?); interval_bounds needs a layer chain")
    return chain


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds on every logit over the box ``[x - eps, x + eps] ∩ [0, 1]``.

    IBP (Gowal et al. 2018): ``m' = W m + b``, ``r' = |W| r`` through affine layers,
    ``[f(l), f(u)]`` through monotone ones. Returns ``(lower, upper)``, each ``B x K``, detached.
    eps = 0 gives ``lower == upper == model(x)``. The model is evaluated in eval mode and left as
    it was; an unsupported layer raises ``TypeError`` naming it."""
    check_model(model)
    check_images(x, model)
    lower, upper = _box(x, eps)
    with preserved(model), torch.no_grad():
        chain = _checked_chain(model, x)
        return propagate(chain, lower, upper)


def certified_accuracy(model: nn.Module, data, eps: float, *, batch_size: int = 500) -> float:
    """The fraction of images whose label IBP *proves* cannot change anywhere in the box: a
    lower bound on the robust accuracy (an attack gives an upper bound).

    ``data``: ``(x, y)`` tensors or a dataset of ``(image, label)``. An image counts when every
    margin lower bound ``z_y - z_j`` (:func:`margin_lower_bounds`, tighter than comparing the
    logit bounds of :func:`interval_bounds`) is positive for all ``j != y``."""
    check_model(model)
    x_all, y_all = as_tensors(data)
    device = model_device(model)
    check_images(x_all, None)
    _box(x_all[:1], eps)  # eps checked before any work
    certified = 0
    with preserved(model), torch.no_grad():
        chain = None
        for part in batches(len(y_all), batch_size):
            x, y = x_all[part].to(device), y_all[part].to(device)
            chain = chain or _checked_chain(model, x)
            y = check_target(y, len(x), None, device)
            margins = margin_lower_bounds(chain, *_box(x, eps), y)
            margins.scatter_(1, y[:, None], float("inf"))
            certified += (margins > 0).all(1).sum().item()
    return certified / len(y_all)


__all__ = ["interval_bounds", "certified_accuracy", "margin_lower_bounds", "propagate", "layers"]
