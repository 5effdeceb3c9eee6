"""Checks for lesson 02 (SmoothGrad and friends): SmoothGrad, integrated gradients.

SmoothGrad is random, so its check does not compare against a second random run: the model
given to the student's function records every input it is evaluated on, and the check tests
the noise found there (mean 0, the right spread, ``n_samples`` fresh copies per image) and that
the result is the average gradient over exactly those noisy copies.
"""
from __future__ import annotations

import torch

from .. import attribution
from . import _engine
from ._cases import Recording, describe, draw, images, tiny_cnn
from ._engine import Case, Mistake, Spec
from ._mistakes import logit_gradient, probability_gradient

__all__ = ["check_smoothgrad", "check_integrated_gradients"]


def _smoothgrad_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for batch, channels in ((1, 1), (2, 3), (3, 1)):
        height, width = draw(generator, 6, 10), draw(generator, 6, 10)
        classes = draw(generator, 4, 10)
        model = Recording(tiny_cnn(channels, classes))
        # each image its own value range, all far from a range of 1 and the batch's range too,
        # so that a noise level taken from the wrong range (none, the batch's) shows; the
        # channels of an RGB image have ranges of their own (a per-channel range shows)
        x = torch.cat([torch.cat([images(generator, 1, 1, height, width,
                                         low=(low := 0.2 + 0.2 * float(torch.rand(1, generator=generator))),
                                         high=low + 0.1 + 0.3 * float(torch.rand(1, generator=generator)))
                                  for _ in range(channels)], dim=1)
                       for _ in range(batch)])
        target = torch.randint(classes, (batch,), generator=generator)
        n_samples = draw(generator, 8, 16)
        sigma = round(0.1 + 0.2 * float(torch.rand(1, generator=generator)), 3)
        cases.append(Case((model, x, target), {"n_samples": n_samples, "sigma": sigma},
                          describe=describe(batch, channels, height, width) +
                          f", n_samples={n_samples}, sigma={sigma}",
                          reset=model.seen.clear))
    return cases


def _evaluations(model: Recording, x: torch.Tensor):
    """The noisy inputs the student's code evaluated: ``(rows, owner)``, ``owner[k]`` the image
    that row ``k`` is a noisy copy of (the nearest one); exact copies of an image are left out."""
    if not model.seen:
        return x[:0], torch.zeros(0, dtype=torch.long, device=x.device)
    rows = torch.cat([s.reshape(-1, *x.shape[1:]) for s in model.seen if s[0].shape == x[0].shape])
    owner = torch.cdist(rows.flatten(1).cpu().double(), x.flatten(1).cpu().double()).argmin(dim=1).to(x.device)
    noisy = (rows != x[owner]).flatten(1).any(dim=1)
    return rows[noisy], owner[noisy]


def _noise_requirements(out, case: Case) -> str | None:
    x, n_samples, sigma = case.args[1], case.kwargs["n_samples"], case.kwargs["sigma"]
    rows, owner = _evaluations(case.args[0], x)
    if len(rows) == 0:
        return ("no noise reached the model: evaluate the gradient at noisy copies x + noise "
                "(your function only ran the model on x itself)")
    counts = torch.bincount(owner, minlength=len(x))
    if (counts != n_samples).any():
        low, high = counts.min().item(), counts.max().item()
        found = f"{low}" if low == high else f"between {low} and {high}"
        return (f"your function evaluated the model on {found} noisy copies per image; "
                f"n_samples={n_samples} asks for {n_samples} each")
    for image in range(len(x)):
        if len(torch.unique(rows[owner == image], dim=0)) < n_samples:
            return "some noisy copies of an image are identical: draw fresh noise for every sample"
    noise = rows - x[owner]
    spread = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    means = torch.stack([noise[owner == b].mean() for b in range(len(x))])
    stds = torch.stack([noise[owner == b].std() for b in range(len(x))])
    if (means.abs() > 0.5 * stds).any():  # Gaussian noise: |mean| ~ std / sqrt(n * pixels)
        return ("the noise is not centred on 0: draw it with torch.randn (mean 0), "
                "not torch.rand (uniform in [0, 1))")
    ratio = stds / spread
    if ((ratio - 1).abs() <= 0.15).all():
        return None
    if ((stds / sigma - 1).abs() <= 0.15).all():
        return ("the noise's standard deviation should be sigma x (max - min) of each image; "
                "you used sigma itself")
    if ((stds / (sigma * (x.max() - x.min())) - 1).abs() <= 0.15).all():
        return ("use each image's own value range (its max - min over channels and pixels) for "
                "the noise level, not the whole batch's")
    if x.shape[1] > 1:  # the noise level of each channel: its own range instead of the image's?
        per_channel = torch.stack([noise[owner == b].transpose(0, 1).flatten(1).std(dim=1) for b in range(len(x))])
        channel_spread = sigma * (x.amax(dim=(2, 3)) - x.amin(dim=(2, 3)))
        if ((per_channel / channel_spread - 1).abs() <= 0.2).all():
            return ("use the image's range over all its channels (max - min over channels and pixels), "
                    "not each channel's own range")
    typical = ratio.median().item()
    strength = f"{typical:.2g} times too strong" if typical > 1 else f"{1 / typical:.2g} times too weak"
    return (f"the noise is about {strength}: its standard deviation should be "
            f"sigma x (max - min) of each image")


def _average_over_evaluations(gradient_of, then=lambda g: g, per_image=lambda total, counts: total / counts):
    def average(model, x, target, **_):
        rows, owner = _evaluations(model, x)
        grads = then(gradient_of(model.model, rows, target[owner]))
        total = torch.zeros_like(x).index_add_(0, owner, grads)
        counts = torch.bincount(owner, minlength=len(x)).clamp_min(1).view(-1, 1, 1, 1).to(x.dtype)
        return per_image(total, counts)
    return average


_expected_smoothgrad = _average_over_evaluations(logit_gradient)

SMOOTHGRAD = Spec(
    name="check_smoothgrad",
    reference=attribution.smoothgrad,
    cases=_smoothgrad_cases,
    requirements=(_noise_requirements,),
    expected=lambda case: _expected_smoothgrad(*case.args),
    mistakes=(
        Mistake("you added up the gradients: divide by n_samples to average them",
                _average_over_evaluations(logit_gradient, per_image=lambda total, counts: total)),
        Mistake("you averaged the squared gradients (that is SmoothGrad-Squared): average the "
                "gradients themselves", _average_over_evaluations(logit_gradient, then=torch.square)),
        Mistake("you averaged |gradient|: SmoothGrad averages the signed gradients",
                _average_over_evaluations(logit_gradient, then=torch.abs)),
        Mistake("you differentiated the softmax probability: SmoothGrad averages gradients of "
                "the target's logit", _average_over_evaluations(probability_gradient)),
        Mistake("that is the gradient at x itself: evaluate the gradient at each noisy copy x + noise "
                "and average those", lambda model, x, target, **_: logit_gradient(model.model, x, target)),
    ),
)


def _ig_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for batch, channels, baseline in ((1, 1, "zeros"), (2, 3, "random"), (3, 1, "grey")):
        height, width = draw(generator, 6, 10), draw(generator, 6, 10)
        classes = draw(generator, 4, 10)
        model = tiny_cnn(channels, classes, smooth=True)
        x = images(generator, batch, channels, height, width)
        base = {"zeros": torch.zeros_like(x), "grey": torch.full_like(x, 0.5),
                "random": images(generator, batch, channels, height, width)}[baseline]
        target = torch.randint(classes, (batch,), generator=generator)
        cases.append(Case((model, x, target, base), {"steps": 64},
                          describe=describe(batch, channels, height, width) + f", a {baseline} baseline"))
    return cases


def path_average(model, x, target, baseline, steps=64, gradient_of=logit_gradient):
    """The gradient averaged along the straight path from ``baseline`` to ``x`` (midpoints)."""
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    total = torch.zeros_like(x)
    for alpha in alphas:
        total += gradient_of(model, baseline + alpha * (x - baseline), target)
    return total / steps


def _path(points):
    """Integrated gradients along a wrong path: ``points(baseline, x, alpha)``, midpoints."""
    def wrong(model, x, target, baseline, steps):
        total = torch.zeros_like(x)
        for k in range(steps):
            total += logit_gradient(model, points(baseline, x, (k + 0.5) / steps), target)
        return (x - baseline) * total / steps
    return wrong


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


INTEGRATED_GRADIENTS = Spec(
    name="check_integrated_gradients",
    reference=attribution.integrated_gradients,
    cases=_ig_cases,
    # any Riemann rule with the given steps is within 2 % of the exact integral on these models
    match=lambda out, ref, case: relative_error(out, ref) <= 0.02,
    mistakes=(
        Mistake("multiply the averaged gradient by (x - baseline): you returned the average "
                "gradient alone", lambda m, x, t, b, steps: path_average(m, x, t, b, steps)),
        Mistake("multiply by (x - baseline), not by x",
                lambda m, x, t, b, steps: path_average(m, x, t, b, steps) * x),
        Mistake("you added up the gradients along the path: divide by the number of steps",
                lambda m, x, t, b, steps: path_average(m, x, t, b, steps) * (x - b) * steps),
        Mistake("you used the gradient at x only: average the gradients at points "
                "baseline + alpha (x - baseline) for alpha from 0 to 1",
                lambda m, x, t, b, steps: logit_gradient(m, x, t) * (x - b)),
        Mistake("you used the gradient at the baseline only: average along the whole path",
                lambda m, x, t, b, steps: logit_gradient(m, b, t) * (x - b)),
        Mistake("you ignored the `baseline` argument (your path starts at black)",
                lambda m, x, t, b, steps: path_average(m, x, t, torch.zeros_like(x), steps) * x),
        Mistake("you integrated the gradient of the softmax probability: explain the target's logit",
                lambda m, x, t, b, steps: path_average(m, x, t, b, steps, probability_gradient) * (x - b)),
        Mistake("the path points are baseline + alpha * (x - baseline): yours, alpha * x, ignore the baseline",
                _path(lambda b, x, a: a * x)),
        Mistake("the path points are baseline + alpha * (x - baseline): yours, baseline + alpha * x, "
                "miss the `- baseline`", _path(lambda b, x, a: b + a * x)),
        Mistake("space the alphas evenly from 0 to 1 (k / steps): your points crowd at one end of the path",
                _path(lambda b, x, a: b + a * a * (x - b))),
        Mistake("the alphas run from 0 to 1: your path stops halfway between baseline and x",
                _path(lambda b, x, a: b + a / 2 * (x - b))),
    ),
)


def check_smoothgrad(smoothgrad) -> _engine.Result:
    """``smoothgrad(model, x, target, n_samples, sigma)``: the target logit's gradient averaged
    over ``n_samples`` copies of ``x`` with Gaussian noise of std ``sigma * (max - min)``."""
    return _engine.run(SMOOTHGRAD, smoothgrad)


def check_integrated_gradients(integrated_gradients) -> _engine.Result:
    """``integrated_gradients(model, x, target, baseline, steps)``."""
    return _engine.run(INTEGRATED_GRADIENTS, integrated_gradients)
