"""Square Attack (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search"): random search over square-shaped updates that uses
only the model's scores, never its gradients."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._core import (check_choice, check_eps, check_images, check_positive_int, check_target, logits_for,
                     per_sample_norm, preserved)
from ._common import NORMS


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i`` per image: negative once the image is misclassified."""
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return logits.gather(1, y[:, None])[:, 0] - others


def square_fraction(i: int, queries: int, p_init: float = 0.8) -> float:
    """The fraction ``p`` of pixels a square covers at iteration ``i``: ``p_init`` halved at
    iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10,000-query budget, the
    schedule rescaled to ``queries`` (the paper's schedule)."""
    i = int(i / queries * 10000)
    halvings = sum(i > boundary for boundary in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2 ** halvings


def _windows(n, h, w, s, generator, device):
    """One random ``s x s`` window per image as a ``n x 1 x h x w`` boolean mask, and its corner."""
    top = torch.randint(0, h - s + 1, (n,), generator=generator).to(device)
    left = torch.randint(0, w - s + 1, (n,), generator=generator).to(device)
    rows = (torch.arange(h, device=device) - top[:, None])  # n x h, position inside the window
    cols = (torch.arange(w, device=device) - left[:, None])
    inside = ((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :]
    return inside[:, None], rows.clamp(0, s - 1), cols.clamp(0, s - 1)


def _signs(shape, generator, device):
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float().to(device)


def square_pattern(s: int) -> torch.Tensor:
    """The L2 update's ``s x s`` pattern (Andriushchenko et al. 2020, Sec. 3.2): two halves of
    opposite sign, each made of concentric rectangles; a pixel at Chebyshev distance ``d`` from
    its half's centre gets ``sum_{k >= d} 1 / (k + 1)^2``. Each half and the whole have unit L2 norm."""
    def half(rows):
        k = max(rows // 2 + 1, s // 2 + 1)
        weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float32) ** 2
        tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} 1 / (k + 1)^2
        d = torch.maximum((torch.arange(rows) - rows // 2).abs()[:, None], (torch.arange(s) - s // 2).abs()[None])
        return tail[d] / tail[d].norm()
    pattern = torch.cat([half(s // 2), -half(s - s // 2)])
    return pattern / pattern.norm()


def _linf_step(x0, best, eps, s, generator):
    """Set one random square to ``x0 +- eps`` (one sign per channel), the rest stays."""
    n, c, h, w = x0.shape
    inside, _, _ = _windows(n, h, w, s, generator, x0.device)
    return torch.where(inside, x0 + eps * _signs((n, c, 1, 1), generator, x0.device), best).clamp(0, 1)


def _l2_step(x0, best, eps, s, generator):
    """Move the perturbation's mass from a second random square into a first one, with a new
    pattern of random sign added there (Algorithm 3), then rescale to norm eps."""
    n, c, h, w = x0.shape
    delta = best - x0
    first, rows, cols = _windows(n, h, w, s, generator, x0.device)
    second, _, _ = _windows(n, h, w, s, generator, x0.device)
    flip = torch.rand(n, generator=generator).to(x0.device) > 0.5  # the pattern, or its transpose
    pattern = square_pattern(s).to(x0.device)
    placed = torch.where(flip[:, None, None], pattern.T[rows[:, :, None], cols[:, None, :]],
                         pattern[rows[:, :, None], cols[:, None, :]])[:, None] * first
    old = delta * first
    new = placed * _signs((n, c, 1, 1), generator, x0.device) + old / old.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None]
    # the new square gets the mass of both squares plus what is left of the budget eps
    budget = ((eps ** 2 - per_sample_norm(delta) ** 2).clamp_min(0) / c
              + per_sample_norm(delta * (first | second)) ** 2).sqrt()
    new = new / new.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None] * budget
    delta = torch.where(first, new, torch.where(second, 0.0, delta))
    return (x0 + eps * delta / per_sample_norm(delta)).clamp(0, 1)


def _l2_start(x0, eps, generator):
    """A grid of 5 x 5 squares of side h // 5 with the L2 pattern and random signs, norm eps."""
    n, c, h, w = x0.shape
    s = h // 5
    signs = _signs((n, c, 5, 5), generator, x0.device)
    grid = signs.repeat_interleave(s, 2).repeat_interleave(s, 3) * square_pattern(s).to(x0.device).repeat(5, 5)
    top, left = (h - 5 * s) // 2, (w - 5 * s) // 2
    delta = torch.nn.functional.pad(grid, (left, w - 5 * s - left, top, h - 5 * s - top))
    return (x0 + eps * delta / per_sample_norm(delta)).clamp(0, 1)


def _run(model, x0, y, eps, norm, queries, p_init, generator):
    n, c, h, w = x0.shape
    if norm == "linf":  # vertical stripes of +-eps
        best = (x0 + eps * _signs((n, c, 1, w), generator, x0.device)).clamp(0, 1)
    else:
        best = _l2_start(x0, eps, generator)
    with torch.no_grad():
        best_margin = margin(logits_for(model, best), y)
    for i in range(queries):
        todo = (best_margin > 0).nonzero()[:, 0]  # only images not yet misclassified are queried
        if todo.numel() == 0:
            break
        side = min(int(round(math.sqrt(square_fraction(i, queries, p_init) * h * w))), h, w)
        if norm == "linf":
            candidate = _linf_step(x0[todo], best[todo], eps, max(side, 1), generator)
        else:  # odd, at least 3: the pattern needs a centre
            s = max(side, 3)
            candidate = _l2_step(x0[todo], best[todo], eps, min(s + (s % 2 == 0), h, w), generator)
        with torch.no_grad():
            m = margin(logits_for(model, candidate), y[todo])
        improved = m < best_margin[todo]
        best[todo[improved]], best_margin[todo[improved]] = candidate[improved], m[improved]
    return best, best_margin <= 0


def square(model: nn.Module, x: torch.Tensor, y, eps: float, norm: str = "linf", queries: int = 5000,
           restarts: int = 1, p_init: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Square Attack (Andriushchenko et al. 2020): minimize the margin
    ``L(x) = z_y(x) - max_{i != y} z_i(x)`` by random search, calling the model only forward:

        x_new = P(x_best + delta),  delta nonzero on one random square of side sqrt(p * h * w),
        x_best <- x_new  if L(x_new) < L(x_best)

    L-inf: the square is set to ``x0 +- eps`` (one random sign per channel; the start is
    vertical stripes of ``+-eps``). L2: :func:`square_pattern` in the square, with the mass of
    a second square moved into it, the whole perturbation kept at norm ``eps``. ``p`` shrinks
    from ``p_init`` by :func:`square_fraction`. Each image is queried ``queries`` times after
    its start, or until misclassified; ``restarts`` reruns on the images still correct.
    Random squares and signs are drawn on the CPU from a generator seeded with ``seed``
    (the same result on every device; torch's global generator is untouched).
    """
    check_images(x, model)
    eps, norm = check_eps(eps), check_choice(norm, "norm", NORMS)
    queries, restarts = check_positive_int(queries, "queries"), check_positive_int(restarts, "restarts")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    x0 = x.detach()
    generator = torch.Generator().manual_seed(seed)
    with preserved(model):
        with torch.no_grad():
            y = check_target(y, len(x0), logits_for(model, x0[:1]).shape[1], device=x0.device, name="y")
        out, todo = x0.clone(), torch.arange(len(x0), device=x0.device)
        for _ in range(restarts):
            adv, fooled = _run(model, x0[todo], y[todo], eps, norm, queries, p_init, generator)
            out[todo] = adv
            todo = todo[~fooled]
            if todo.numel() == 0:
                break
    return out.detach()
