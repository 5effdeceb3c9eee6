"""Gradient attributions: the gradient, gradient x input, SmoothGrad and integrated gradients.

Every function explains the *logit* (pre-softmax output) of the target class, ``f_t(x)``: the
softmax couples all classes, so its gradient mixes in the evidence for the others. Each returns
a tensor shaped like ``x``, detached, on the model's device, and leaves the model as it was (a
model in train mode is evaluated in eval mode, with a warning: dropout would make the
attributions random and batch-norm would update its statistics).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from .._core import batched, check_number, check_positive_int, check_reference, preserved
from ._common import Method, Option, per_forward, prepare, target_logits


def _logit_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``df_t(x)/dx`` of each image, detached: the target logits summed over the batch, so each
    image gets its own gradient whatever the batch size (the target classes are checked
    against the model's output)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(target_logits(model, x, target).sum(), x)
    return grad


def gradient(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Saliency: the gradient of the target logit with respect to the input pixels,
    ``df_t(x) / dx`` (Simonyan et al. 2014, "Deep Inside Convolutional Networks").

    Signed, as the model computes it; take ``.abs()`` (or :func:`to_heatmap`) for the
    paper's saliency map.
    """
    target = prepare(model, x, target)
    with preserved(model):
        grad = _logit_gradient(model, x, target)
    return grad


def gradient_x_input(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Gradient x input, ``x * df_t(x) / dx`` (Shrikumar et al. 2016, "Not Just a Black Box";
    Ancona et al. 2018, "Towards Better Understanding of Gradient-based Attribution Methods").

    For a linear model ``f_t(x) = w.x + b`` it is exactly each pixel's contribution ``w_i x_i``.
    """
    grad = gradient(model, x, target)
    return x.detach() * grad


def smoothgrad(model: nn.Module, x: torch.Tensor, target, n_samples: int = 50,
               sigma: float = 0.15, squared: bool = False, batch_size: int | None = None,
               generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise"): the
    gradient averaged over noisy copies of the input,
    ``1/n sum_k df_t(x + e_k)/dx`` with ``e_k ~ N(0, s^2)``, ``s = sigma * (max(x) - min(x))``.

    ``sigma`` is a fraction of each image's own value range, as in the paper (0.10-0.20 works
    well); a constant image gets no noise. Noisy copies are not clipped to [0, 1]. ``squared``
    averages the squared gradients instead (SmoothGrad-Squared, Hooker et al. 2019).

    The noise is drawn at once as ``torch.randn(B * n_samples, C, H, W, generator=generator)``
    on the model's device, row ``b * n_samples + k`` for sample ``k`` of image ``b`` (captum
    NoiseTunnel's layout), so a seeded ``generator`` reproduces it and ``batch_size`` -- at most
    that many noisy copies per forward pass, bounding memory (None: sized for the device, see
    :mod:`labkit.attribution`) -- changes the result only by rounding. The noise itself takes
    ``n_samples`` copies of ``x`` in memory.
    """
    target = prepare(model, x, target)
    check_positive_int(n_samples, "n_samples")
    check_number(sigma, "sigma", 0.0)
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {x.device}; "
                         f"create it with torch.Generator(device={x.device.type!r})")
    x = x.detach()
    spread = (sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))).view(-1, 1, 1, 1)
    noise = torch.randn((x.shape[0] * n_samples, *x.shape[1:]), generator=generator,
                        device=x.device, dtype=x.dtype).view(x.shape[0], n_samples, *x.shape[1:])
    noisy_copies = ((x + noise[:, k] * spread, target) for k in range(n_samples))
    total = torch.zeros_like(x)
    with preserved(model):
        for grad in batched(functools.partial(_logit_gradient, model), noisy_copies,
                            per_forward(x, batch_size), n_samples, progress, "SmoothGrad"):
            total += grad.square() if squared else grad
    return total / n_samples


PATH_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
                "riemann_middle")


def path_points(steps: int, method: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``alpha_k`` in [0, 1] and weights ``w_k`` of the rule that approximates
    ``integral_0^1 g(alpha) d alpha ~ sum_k w_k g(alpha_k)``, in float64 (the rules and
    names of captum's IntegratedGradients ``method``)."""
    check_positive_int(steps, "steps")
    if method not in PATH_METHODS:
        raise ValueError(f"method must be one of {PATH_METHODS}, got {method!r}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1], weights sum to 2
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    k = torch.arange(steps, dtype=torch.float64)
    if method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError(f"riemann_trapezoid needs steps >= 2, got {steps}")
        weights = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return (k + offset) / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target, baseline=None,
                         steps: int = 50, method: str = "gausslegendre",
                         batch_size: int | None = None, progress: bool = True) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep
    Networks"): ``(x - x') * integral_0^1 df_t(x' + a (x - x'))/dx da``, the integral taken
    with the ``steps``-point rule ``method`` (see :func:`path_points`; Gauss-Legendre, captum's
    default, is exact for polynomials of degree ``2 steps - 1`` along the path).

    ``baseline`` ``x'``: ``None`` (black, 0), a number in [0, 1], or a tensor in [0, 1] that
    broadcasts to ``x``. Completeness: the attributions sum to ``f_t(x) - f_t(x')`` up to the
    integration error, which :func:`completeness_gap` measures. The ``steps x B`` path points
    run ``batch_size`` per forward pass (bounding memory; None: sized for the device, see
    :mod:`labkit.attribution`); the result changes only by rounding.
    """
    target = prepare(model, x, target)
    baseline = check_reference(0.0 if baseline is None else baseline, x, "baseline")
    alphas, weights = (t.to(x.dtype).to(x.device) for t in path_points(steps, method))  # MPS: no float64
    x, total = x.detach(), torch.zeros_like(x)
    path = ((baseline + alpha * (x - baseline), target) for alpha in alphas)
    with preserved(model):
        for grad, weight in zip(batched(functools.partial(_logit_gradient, model), path,
                                        per_forward(x, batch_size), steps, progress,
                                        "Integrated gradients"), weights):
            total += grad * weight
    return (x - baseline) * total


def completeness_gap(model: nn.Module, x: torch.Tensor, target, attributions: torch.Tensor,
                     baseline=None) -> torch.Tensor:
    """``sum_i attr_i - (f_t(x) - f_t(x'))`` per image (``B``): how far attributions are from
    completeness (Sundararajan et al. 2017). Integrated gradients drives it to 0 as ``steps``
    grows; gradient x input reaches 0 for a bias-free linear model with ``x' = 0``."""
    target = prepare(model, x, target)
    baseline = check_reference(0.0 if baseline is None else baseline, x, "baseline")
    if not isinstance(attributions, torch.Tensor) or attributions.shape != x.shape:
        shape = (tuple(attributions.shape) if isinstance(attributions, torch.Tensor)
                 else type(attributions).__name__)
        raise ValueError(f"attributions must be shaped like x {tuple(x.shape)}, got {shape}")
    if attributions.device != x.device:
        raise ValueError(f"attributions are on {attributions.device} but x is on {x.device}")
    with preserved(model), torch.no_grad():
        gain = target_logits(model, x, target) - target_logits(model, baseline.contiguous(), target)
    return attributions.detach().flatten(1).sum(1) - gain


METHODS = (
    Method("gradient", gradient, "gradient", "max_abs"),
    Method("gradient_x_input", gradient_x_input, "gradient × input", "sum"),
    Method("smoothgrad", smoothgrad, "SmoothGrad", "max_abs",
           options={"n_samples": Option(20, 1, 100), "sigma": Option(0.15, 0.0, 0.5, 0.01)},
           quick={"n_samples": 2, "progress": False}),
    Method("integrated_gradients", integrated_gradients, "integrated gradients", "sum",
           quick={"steps": 3, "progress": False}),
)
