"""Measuring attributions: numbers that say how faithful, robust, sparse or class-specific a map
is. Each metric answers one narrow question, and they often rank methods differently.

Faithfulness: :func:`road` (remove pixels, impute them, watch the score), :func:`infidelity`
(does ``attr . I`` predict the score change under a perturbation ``I``),
:func:`completeness_gap` (do the attributions add up to ``f(x) - f(x')``). Robustness:
:func:`max_sensitivity`. Complexity: :func:`sparseness` (Gini) and :func:`complexity`
(entropy). Randomisation: :func:`random_logit`. :func:`summary` prints a few in one line.

Every function takes images ``B x C x H x W`` in [0, 1] and their attributions and returns one
number per image (``B``, on the model's device), evaluating the model in eval mode, without
gradients to its parameters, and leaving it exactly as it was.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tqdm.auto import tqdm

from .._core import (batches, check_images, check_number, check_positive_int, check_reference, check_target,
                     preserved)
from ._common import check_score, class_score, per_forward, pixel_scores, prepare
from .evaluation import spearman, to_heatmap
from .gradients import completeness_gap  # noqa: F401  (re-exported: a metric too, defined with IG)

__all__ = ["road", "impute", "infidelity", "max_sensitivity", "sparseness", "complexity",
           "completeness_gap", "random_logit", "summary"]

# ROAD's neighbour weights (Rong et al. 2022): 1/6 for the 4 edge neighbours, 1/12 for the
# 4 corners, the centre 0.
_NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _check_map(attr, x: torch.Tensor, name: str = "attr") -> torch.Tensor:
    """Attributions for ``x``: a finite float tensor shaped like ``x``, or one value per pixel
    (``B x 1 x H x W``, used for every channel). Returns it ``B x C' x H x W`` on ``x``'s device."""
    if not isinstance(attr, torch.Tensor) or not attr.is_floating_point():
        kind = f"a {attr.dtype} tensor" if isinstance(attr, torch.Tensor) else type(attr).__name__
        raise TypeError(f"{name} must be a float tensor shaped like x {tuple(x.shape)}, got {kind}")
    if attr.dim() != 4 or attr.shape[0] != x.shape[0] or attr.shape[1] not in (1, x.shape[1]) \
            or attr.shape[2:] != x.shape[2:]:
        raise ValueError(f"{name} must be shaped like x {tuple(x.shape)} (or B x 1 x H x W), "
                         f"got shape {tuple(attr.shape)}")
    check_images(attr, name=name, unit_range=False)
    return attr.detach().to(x.device)


def _check_generator(generator, x: torch.Tensor) -> None:
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {x.device}; "
                         f"create it with torch.Generator(device={x.device.type!r})")


def _neighbours(u: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n u_n`` over each pixel's in-image neighbours, for ``N x 1 x H x W``."""
    return F.conv2d(u, _NEIGHBOURS.to(u)[None, None], padding=1)


def _system(hole: torch.Tensor):
    """The imputation's linear operator on the removed pixels, ``u -> hole (W u - N(hole u))``
    (``W``: the summed weights of the in-image neighbours), and ``W``."""
    weight = _neighbours(torch.ones_like(hole[:1]))
    return (lambda u: hole * (weight * u - _neighbours(hole * u))), weight


def _multigrid(r: torch.Tensor, hole: torch.Tensor, sweeps: int = 2, omega: float = 0.8) -> torch.Tensor:
    """One symmetric multigrid V-cycle, an approximate inverse of :func:`_system` (Briggs et al.
    2000, "A Multigrid Tutorial"): damped Jacobi sweeps, the residual summed onto a half-size
    grid whose removed pixels are the 2 x 2 blocks removed entirely, solved there the same way,
    copied back, more sweeps. It makes conjugate gradients converge in about 10 iterations
    whatever the size of the holes (several hundred without it on 224 x 224 images)."""
    system, weight = _system(hole)
    z = omega * r / weight
    for _ in range(sweeps - 1):
        z = z + omega * (r - system(z)) / weight
    height, width = hole.shape[-2:]
    if min(height, width) > 4:
        pad = (0, width % 2, 0, height % 2)
        coarse = (F.avg_pool2d(F.pad(hole, pad), 2) == 1).to(hole.dtype)
        if coarse.any():
            residual = 4 * F.avg_pool2d(F.pad(r - system(z), pad), 2) * coarse
            z = z + hole * F.interpolate(_multigrid(residual, coarse, sweeps, omega), scale_factor=2.0,
                                         mode="nearest")[..., :height, :width]
    for _ in range(sweeps):
        z = z + omega * (r - system(z)) / weight
    return z


def impute(x: torch.Tensor, keep: torch.Tensor, noise: float = 0.01, generator=None,
           tol: float = 1e-6, max_iter: int = 500) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022): every removed pixel (``keep`` False)
    becomes the weighted mean of its 8 neighbours, ``v_p = sum_n w_n v_n / sum_n w_n`` (edges
    1/6, corners 1/12, neighbours outside the image left out), removed neighbours included, so
    the removed region holds the smooth (discrete harmonic) fill of its border; then
    ``noise * N(0, 1)`` is added to the removed pixels. Unlike a constant fill, the removed
    region carries no shape the model could recognise.

    ``x``: ``B x C x H x W``; ``keep``: ``B x 1 x H x W`` or ``B x H x W`` booleans. The
    linear system is solved for every image and channel at once, on ``x``'s device, by conjugate
    gradients in float64 to relative residual ``tol``, preconditioned by :func:`_multigrid`.
    """
    keep = (keep if keep.dim() == 4 else keep[:, None]).to(x.device)
    hole = (~keep).repeat_interleave(x.shape[1], dim=0).to(torch.float64)
    v = x.detach().to(torch.float64).flatten(0, 1)[:, None]      # (B*C) x 1 x H x W
    system, _ = _system(hole)
    hole_low = hole.to(x.dtype)  # the preconditioner needs no float64
    precondition = lambda r: _multigrid(r.to(x.dtype), hole_low).to(torch.float64)
    dot = lambda a, b: (a * b).sum((1, 2, 3), keepdim=True)
    rhs = hole * _neighbours((1 - hole) * v)
    u, r = torch.zeros_like(v), rhs
    z = precondition(r)
    p, rz = z, dot(r, z)
    stop = tol**2 * dot(rhs, rhs)
    for _ in range(max_iter):
        if (dot(r, r) <= stop).all():
            break
        ap = system(p)
        alpha = rz / dot(p, ap).clamp_min(1e-300)
        u, r = u + alpha * p, r - alpha * ap
        z = precondition(r)
        rz, rz_old = dot(r, z), rz
        p = z + rz / rz_old.clamp_min(1e-300) * p
    filled = torch.where(hole.bool(), u, v).view_as(x).to(x.dtype)
    if noise:
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        filled = torch.where(keep, filled, filled + noise * fresh)
    return filled


def road(model: nn.Module, x: torch.Tensor, target, attr, order: str = "morf",
         fractions=ROAD_FRACTIONS, score: str = "logit", noise: float = 0.01, reduce: str = "sum",
         generator: torch.Generator | None = None, batch_size: int | None = None,
         progress: bool = True) -> torch.Tensor:
    """ROAD, RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation
    Strategy for Attribution Methods"): remove a fraction ``f`` of the pixels, the most
    (``order="morf"``) or least (``"lerf"``) attributed first, fill them by noisy linear
    :func:`impute`, and return the change of the target ``score`` ("logit" or softmax
    "probability"), ``s(x_imputed) - s(x)``: ``B x len(fractions)``.

    A faithful map makes MoRF fall fast (low is good) and LeRF stay flat (high is good).
    Imputing instead of painting pixels black keeps the removed region from leaking the mask's
    shape to the model (the "class information leakage" the paper measures).

    Pixels with heat ``>=`` the ``(1 - f)`` quantile are removed for MoRF, ``<=`` the ``f``
    quantile for LeRF (pytorch-grad-cam's ROADMostRelevantFirst / LeastRelevantFirst at
    percentile ``100 (1 - f)``). ``attr``: ``B x C x H x W`` (reduced by :func:`to_heatmap`'s
    ``reduce``) or a ``B x H x W`` heatmap. The ``B x len(fractions)`` imputed images run
    ``batch_size`` per forward pass.
    """
    target = prepare(model, x, target)
    check_score(score)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' (most relevant first) or 'lerf', got {order!r}")
    fractions = torch.as_tensor(fractions, dtype=torch.float64)
    if fractions.dim() != 1 or len(fractions) == 0 or not ((fractions > 0) & (fractions < 1)).all():
        raise ValueError(f"fractions must be a non-empty list of numbers in (0, 1), got {fractions.tolist()}")
    check_number(noise, "noise", 0.0)
    _check_generator(generator, x)
    heat = pixel_scores(attr, x, reduce).flatten(1)
    heat = heat if order == "morf" else -heat
    levels = torch.quantile(heat.double(), (1 - fractions).to(x.device), dim=1).T   # B x F
    remove = heat[:, None, :] >= levels[..., None].to(heat.dtype)                   # B x F x HW
    batch, steps = x.shape[0], len(fractions)
    scores = torch.empty(batch * steps, dtype=x.dtype, device=x.device)
    with preserved(model), torch.no_grad():
        before = class_score(model, x, target, score)
        for part in tqdm(batches(batch * steps, per_forward(x, batch_size)), desc="ROAD", leave=False,
                         disable=not progress):
            index = torch.arange(part.start, part.stop, device=x.device)
            image = index // steps
            keep = ~remove.flatten(0, 1)[index].view(-1, 1, *x.shape[-2:])
            imputed = impute(x[image], keep, noise, generator)
            scores[part] = class_score(model, imputed, target[image], score) - before[image]
    return scores.view(batch, steps)


def infidelity(model: nn.Module, x: torch.Tensor, target, attr, n_perturb: int = 32,
               baseline=None, sigma: float = 0.1, fraction: float = 0.25, score: str = "logit",
               normalize: bool = True, perturb: Callable | None = None,
               generator: torch.Generator | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Infidelity (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations"):
    ``INFD = E_I[(I . attr - (f(x) - f(x - I)))^2]`` over random perturbations ``I``, with ``f``
    the target ``score`` ("logit" or softmax "probability"): how badly the map, read as a linear
    model, predicts what perturbing the input does. Low is good.

    ``I``, ``n_perturb`` per image: with ``baseline=None`` Gaussian noise ``N(0, sigma^2)``;
    with a baseline ``x0`` (number or tensor in [0, 1]) each pixel, all channels, is set to
    ``x0`` with probability ``fraction``, ``I = m (x - x0)`` (removal, as the paper's square
    removal, by pixel). ``perturb``: your own, ``perturb(xs) -> (I, xs - I)`` on the images
    repeated ``n_perturb`` times each (row ``b * n_perturb + k``), captum's ``perturb_func``
    convention. ``normalize`` first scales the map by the best ``beta``,
    ``E[(I.a)(df)] / E[(I.a)^2]`` (captum's ``normalize=True``), so maps are compared by their
    shape, not their scale.
    """
    target = prepare(model, x, target)
    attr = _check_map(attr, x)
    check_positive_int(n_perturb, "n_perturb")
    check_score(score)
    check_number(sigma, "sigma", 0.0)
    _check_generator(generator, x)
    xs = x.detach().repeat_interleave(n_perturb, dim=0)
    if perturb is None:
        if baseline is None:
            noise = sigma * torch.randn(xs.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            check_number(fraction, "fraction", 0.0, 1.0)
            reference = check_reference(baseline, x, "baseline").repeat_interleave(n_perturb, dim=0)
            drop = torch.rand((xs.shape[0], 1, *xs.shape[2:]), generator=generator, device=x.device)
            noise = (drop < fraction) * (xs - reference)
        perturbed = xs - noise
    else:
        noise, perturbed = perturb(xs)
    predicted = (attr.repeat_interleave(n_perturb, dim=0) * noise).flatten(1).sum(1).view(-1, n_perturb)
    rows = torch.arange(len(xs), device=x.device) // n_perturb
    with preserved(model), torch.no_grad():
        change = class_score(model, x, target, score)[rows] - torch.cat([
            class_score(model, perturbed[part], target[rows[part]], score)
            for part in batches(len(xs), per_forward(x, batch_size))])
    change = change.view(-1, n_perturb)
    if normalize:
        beta = (predicted * change).mean(1, keepdim=True) / (predicted.square().mean(1, keepdim=True))
        predicted = predicted * torch.nan_to_num(beta, nan=0.0, posinf=0.0, neginf=0.0)
    return (predicted - change).square().mean(1)


def max_sensitivity(method: Callable, model: nn.Module, x: torch.Tensor, target, n_perturb: int = 10,
                    radius: float = 0.02, perturb: Callable | None = None,
                    generator: torch.Generator | None = None, batch_size: int | None = None,
                    **method_options) -> torch.Tensor:
    """Max-sensitivity (Yeh et al. 2019): ``max_{|y - x|_inf <= r} |attr(y) - attr(x)| / |attr(x)|``
    (Frobenius norms), estimated over ``n_perturb`` points ``y = clip(x + U(-r, r), 0, 1)`` per
    image: how much the explanation ``method(model, x, target, **method_options)`` changes
    under a change of the input too small to matter. Low is good. ``perturb(xs) -> ys``: your
    own, on the images repeated ``n_perturb`` times each (captum's ``sensitivity_max``
    convention); a zero map counts as norm 1, as in captum. ``batch_size``: neighbours per call of
    ``method`` (default: labkit's per-forward size; a randomized method draws anew per call).
    """
    if not callable(method):
        raise TypeError(f"method must be an attribution function like gradient, got {type(method).__name__}")
    target = prepare(model, x, target)
    check_positive_int(n_perturb, "n_perturb")
    check_number(radius, "radius", 0.0)
    _check_generator(generator, x)
    xs = x.detach().repeat_interleave(n_perturb, dim=0)
    if perturb is None:
        step = torch.rand(xs.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        ys = xs + radius * step
    else:
        ys = perturb(xs)
    ys = ys.clamp(0, 1)
    original = method(model, x, target, **method_options).flatten(1)
    # the neighbours in calls of per_forward images: one huge batch is slower on a CPU
    targets = target.repeat_interleave(n_perturb)
    moved = torch.cat([method(model, ys[part], targets[part], **method_options).flatten(1)
                       for part in batches(len(ys), per_forward(x, batch_size))])
    norm = original.norm(dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    change = (moved - original.repeat_interleave(n_perturb, dim=0)).norm(dim=1).view(-1, n_perturb)
    return change.amax(1) / norm


def _flat_magnitudes(attr) -> torch.Tensor:
    if not isinstance(attr, torch.Tensor) or not attr.is_floating_point():
        kind = f"a {attr.dtype} tensor" if isinstance(attr, torch.Tensor) else type(attr).__name__
        raise TypeError(f"attr must be a float tensor B x C x H x W or B x H x W, got {kind}")
    if attr.dim() not in (3, 4):
        raise ValueError(f"attr must be B x C x H x W or B x H x W, got shape {tuple(attr.shape)}")
    check_images(attr if attr.dim() == 4 else attr[:, None], name="attr", unit_range=False)
    return attr.detach().flatten(1).abs()


def sparseness(attr) -> torch.Tensor:
    """Sparseness (Chalasani et al. 2020, "Concise Explanations of Neural Networks using
    Adversarial Training"): the Gini index of ``|attr|`` per image, with the values sorted
    ascending ``a_(1) <= ... <= a_(n)``,
    ``G = sum_i (2i - n - 1) a_(i) / (n sum_i a_(i))``: 0 when every value is equal, ``1 - 1/n``
    when one value holds everything. High means a few pixels carry the map. An all-zero map is 0.
    """
    a = _flat_magnitudes(attr).sort(dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(1)
    return torch.where(total > 0, ((2 * i - n - 1) * a).sum(1) / (n * total), torch.zeros_like(total))


def complexity(attr) -> torch.Tensor:
    """Complexity (Bhatt et al. 2020, "Evaluating and Aggregating Feature-based Model
    Explanations"): the entropy of the fractional contributions ``p_i = |a_i| / sum_j |a_j|``,
    ``H = -sum_i p_i log p_i`` (nats, ``0 log 0 = 0``) per image: ``log n`` when every value is
    equal, 0 when one value holds everything. Low means a simpler map. An all-zero map is 0.
    """
    a = _flat_magnitudes(attr)
    p = a / a.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return -torch.special.xlogy(p, p).sum(1)


def random_logit(method: Callable, model: nn.Module, x: torch.Tensor, target, other=None,
                 reduce: str = "sum", generator: torch.Generator | None = None,
                 **method_options) -> torch.Tensor:
    """Random logit test (Sixt et al. 2020, "When Explanations Lie: Why Many Modified BP
    Attributions Fail"): the Spearman rank correlation between the heatmap that explains the
    target class and the one that explains another class, ``other`` (default: one drawn
    uniformly from the remaining classes with ``generator``). A method that explains the
    class, not just the image, gives low values; one near 1 shows the same picture whatever
    it is asked. Heatmaps: :func:`to_heatmap` with ``reduce``.
    """
    if not callable(method):
        raise TypeError(f"method must be an attribution function like gradient, got {type(method).__name__}")
    target = prepare(model, x, target)
    _check_generator(generator, x)
    with preserved(model), torch.no_grad():
        classes = model(x[:1]).shape[1]
    if other is None:
        if classes < 2:
            raise ValueError(f"random_logit needs a model with at least 2 classes, got {classes}")
        shift = torch.randint(1, classes, (len(target),), generator=generator, device=x.device)
        other = (target + shift) % classes           # uniform over the classes != target
    else:
        other = check_target(other, len(target), classes, device=x.device, name="other")
        if (other == target).any():
            raise ValueError("other must differ from target for every image")
    maps = [to_heatmap(method(model, x, t, **method_options), reduce) for t in (target, other)]
    return spearman(*maps)


def summary(model: nn.Module, x: torch.Tensor, target, attr, score: str = "logit") -> str:
    """A short line of metrics of a map (the explorer prints it under the heatmap): ROAD MoRF
    and LeRF (mean change of the target ``score`` with 20/50/80 % removed), infidelity (Gaussian
    noise, normalized), the Gini index and the entropy, each averaged over the images."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    if not isinstance(attr, torch.Tensor) or attr.dim() not in (3, 4):
        raise ValueError(f"attr must be B x C x H x W or B x H x W, got {getattr(attr, 'shape', type(attr))}")
    heat = attr if attr.dim() == 3 else to_heatmap(attr, "sum")
    morf, lerf = (road(model, x, target, heat, order, (0.2, 0.5, 0.8), score, generator=generator,
                       progress=False).mean().item() for order in ("morf", "lerf"))
    infd = infidelity(model, x, target, heat[:, None], n_perturb=16, score=score, generator=generator)
    return (f"ROAD MoRF {morf:+.3g}, LeRF {lerf:+.3g} · infidelity {infd.mean().item():.3g} · "
            f"Gini {sparseness(heat).mean().item():.2f} · entropy {complexity(heat).mean().item():.2f}")
