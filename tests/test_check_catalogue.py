"""A catalogue of plausible student answers for every check of lessons 00-10, written from the
lesson texts rather than from the checks' own mistake lists: each wrong answer must fail its
check with a hint that names a cause (not the generic "values differ" fallback), each right
answer (an equivalent rewrite) must pass.

    PYTHONPATH=$PWD python tests/test_check_catalogue.py [seeds]

prints, over the given seeds (default 3), how many wrong answers passed and how many got only
the generic hint, then the variants concerned.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit import checks, models
from labkit.checks import _engine
from test_checks import assert_no_reference_values

GENERIC = "values differ from labkit's reference"
# the engine's coarse description when no pattern explains the difference: counted apart
COARSE = ("the pattern is right (", "points largely the opposite way", "is unrelated to the expected one")


@dataclass(frozen=True)
class Variant:
    check: str
    name: str
    function: Callable
    right: bool = False          # an equivalent rewrite of the right answer
    fragment: str | None = None  # a part the hint must contain


CATALOGUE: list[Variant] = []


def variant(check, name, right=False, fragment=None):
    def register(function):
        CATALOGUE.append(Variant(check, name, function, right, fragment))
        return function
    return register


def add(check, name, function, right=False, fragment=None):
    CATALOGUE.append(Variant(check, name, function, right, fragment))


# ------------------------------------------------------------------ building blocks (written apart)

def grad_of(model, x, score):
    """d score(model(x)).sum() / dx for a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(model(x)).sum(), x)
    return g


def pick(z, t):
    return z[torch.arange(len(z)), t]


def g_logit(model, x, t):
    return grad_of(model, x, lambda z: pick(z, t))


def g_loss(model, x, y, reduction="mean"):
    return grad_of(model, x, lambda z: F.cross_entropy(z, y, reduction=reduction))


def per_image(values, reduce):
    return reduce(values.flatten(1)).view(-1, *([1] * (values.dim() - 1)))


# ------------------------------------------------------------------ lesson 00: predict_proba

C = "check_predict_proba"
add(C, "softmax", lambda m, x: F.softmax(m(x), dim=1).detach(), right=True)
add(C, "exp over sum", lambda m, x: (lambda z: z.exp() / z.exp().sum(1, keepdim=True))(m(x).detach()), right=True)
add(C, "softmax dim=-1", lambda m, x: m(x).detach().softmax(-1), right=True)
add(C, "exp log_softmax", lambda m, x: m(x).detach().log_softmax(1).exp(), right=True)
add(C, "logits", lambda m, x: m(x).detach())
add(C, "softmax over batch", lambda m, x: m(x).detach().softmax(0))
add(C, "log_softmax", lambda m, x: m(x).detach().log_softmax(1))
add(C, "sigmoid", lambda m, x: m(x).detach().sigmoid())
add(C, "normalized by whole-batch sum", lambda m, x: (lambda e: e / e.sum())(m(x).detach().exp()))
add(C, "one-hot of argmax", lambda m, x: F.one_hot(m(x).argmax(1), m(x).shape[1]).float())
add(C, "argmax", lambda m, x: m(x).argmax(1), fragment="dtype")
add(C, "not detached", lambda m, x: m(x).softmax(1), fragment="requires grad")
add(C, "max with indices", lambda m, x: m(x).detach().softmax(1).max(1), fragment=".values")


@variant(C, "switches to train mode", fragment="mode")
def _(m, x):
    m.train()
    return m(x).detach().softmax(1)


# ------------------------------------------------------------------ lesson 01: gradient

C = "check_gradient"
add(C, "autograd.grad gather", g_logit, right=True)


add(C, "one-hot weighted", lambda m, x, t: grad_of(m, x, lambda z: (z * F.one_hot(t, z.shape[1])).sum(1)), right=True)
add(C, "loss gradient", lambda m, x, t: g_loss(m, x, t, "sum"))
add(C, "probability gradient", lambda m, x, t: grad_of(m, x, lambda z: pick(z.softmax(1), t)))
add(C, "predicted class", lambda m, x, t: grad_of(m, x, lambda z: z.max(1).values))
add(C, "batch mean", lambda m, x, t: grad_of(m, x, lambda z: pick(z, t).mean()))
add(C, "target[0] for all", lambda m, x, t: grad_of(m, x, lambda z: z[:, t[0]]))
add(C, "negated", lambda m, x, t: -g_logit(m, x, t), fragment="opposite sign")
add(C, "all logits summed", lambda m, x, t: grad_of(m, x, lambda z: z.sum(1)))
add(C, "absolute value", lambda m, x, t: g_logit(m, x, t).abs(), fragment="absolute")
add(C, "normalized per image", lambda m, x, t: (lambda g: g / per_image(g.abs(), lambda v: v.amax(1)))(g_logit(m, x, t)))
add(C, "times input", lambda m, x, t: g_logit(m, x, t) * x)
add(C, "doubled (sum of two passes)", lambda m, x, t: 2 * g_logit(m, x, t))


@variant(C, "requires_grad on the input itself", fragment="requires_grad")
def _(m, x, t):
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(pick(m(x), t).sum(), x)
    return g


@variant(C, "leaves parameter grads", fragment=".grad")
def _(m, x, t):
    x = x.detach().clone().requires_grad_(True)
    pick(m(x), t).sum().backward()
    return x.grad


@variant(C, "no requires_grad", fragment="does not require grad")
def _(m, x, t):
    (g,) = torch.autograd.grad(pick(m(x.detach()), t).sum(), x)
    return g


# ------------------------------------------------------------------ lesson 01: gradient x input

C = "check_gradient_x_input"
add(C, "grad times x", lambda m, x, t: g_logit(m, x, t) * x, right=True)
add(C, "x times grad (mul)", lambda m, x, t: torch.mul(x, g_logit(m, x, t)), right=True)
add(C, "plain gradient", g_logit)
add(C, "abs grad times x", lambda m, x, t: g_logit(m, x, t).abs() * x)
add(C, "grad times inverted", lambda m, x, t: g_logit(m, x, t) * (1 - x))
add(C, "loss gradient times x", lambda m, x, t: g_loss(m, x, t, "sum") * x)
add(C, "abs of product", lambda m, x, t: (g_logit(m, x, t) * x).abs(), fragment="|gradient|")
add(C, "grad plus x", lambda m, x, t: g_logit(m, x, t) + x)
add(C, "times first image", lambda m, x, t: g_logit(m, x, t) * x[:1])
add(C, "summed over channels", lambda m, x, t: (g_logit(m, x, t) * x).sum(1, keepdim=True))
add(C, "times mean of x", lambda m, x, t: g_logit(m, x, t) * x.mean())
add(C, "negated", lambda m, x, t: -g_logit(m, x, t) * x, fragment="opposite sign")
add(C, "predicted class times x", lambda m, x, t: grad_of(m, x, lambda z: z.max(1).values) * x)
add(C, "times x squared", lambda m, x, t: g_logit(m, x, t) * x * x)

# ------------------------------------------------------------------ lesson 01: saliency map

C = "check_saliency_map"
add(C, "amax of abs", lambda m, x, t: g_logit(m, x, t).abs().amax(1), right=True)
add(C, "max values of abs", lambda m, x, t: g_logit(m, x, t).abs().max(dim=1).values, right=True)
add(C, "max of abs min/max", lambda m, x, t: torch.maximum(g_logit(m, x, t).amax(1), -g_logit(m, x, t).amin(1)), right=True)
add(C, "max of signed", lambda m, x, t: g_logit(m, x, t).amax(1))
add(C, "abs of max", lambda m, x, t: g_logit(m, x, t).amax(1).abs())
add(C, "mean of abs", lambda m, x, t: g_logit(m, x, t).abs().mean(1))
add(C, "sum of abs", lambda m, x, t: g_logit(m, x, t).abs().sum(1))
add(C, "L2 over channels", lambda m, x, t: g_logit(m, x, t).norm(dim=1))
add(C, "squared max", lambda m, x, t: g_logit(m, x, t).pow(2).amax(1))
add(C, "first channel only", lambda m, x, t: g_logit(m, x, t)[:, 0].abs())
add(C, "min over channels", lambda m, x, t: g_logit(m, x, t).abs().amin(1))
add(C, "keepdim", lambda m, x, t: g_logit(m, x, t).abs().amax(1, keepdim=True), fragment="size 1")
add(C, "max over batch", lambda m, x, t: g_logit(m, x, t).abs().amax(0))
add(C, "max returns a tuple", lambda m, x, t: g_logit(m, x, t).abs().max(dim=1), fragment=".values")
add(C, "indices", lambda m, x, t: g_logit(m, x, t).abs().max(dim=1)[1], fragment="dtype")
add(C, "normalized", lambda m, x, t: (lambda s: s / s.amax())(g_logit(m, x, t).abs().amax(1)))
add(C, "loss gradient", lambda m, x, t: g_loss(m, x, t, "sum").abs().amax(1))

# ------------------------------------------------------------------ lesson 02: SmoothGrad

C = "check_smoothgrad"


def spread(x, sigma):
    return sigma * (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))


def smoothgrad_variant(noise_std=spread, draw=torch.randn_like, reduce=lambda gs: torch.stack(gs).mean(0),
                       grad=g_logit, samples=lambda n: n, same_noise=False, at_x=False):
    def smoothgrad(model, x, target, n_samples=50, sigma=0.15):
        grads, fixed = [], draw(x)
        for _ in range(samples(n_samples)):
            noise = fixed if same_noise else draw(x)
            noisy = x + noise * noise_std(x, sigma)
            g = grad(model, noisy, target)
            grads.append(g if not at_x else grad(model, x, target) + 0 * g)
        return reduce(grads)
    return smoothgrad


add(C, "loop", smoothgrad_variant(), right=True)


@variant(C, "one batched call", right=True)
def _(model, x, target, n_samples=50, sigma=0.15):
    b = len(x)
    noisy = x.repeat(n_samples, 1, 1, 1) + torch.randn(n_samples * b, *x.shape[1:]) * spread(x, sigma).repeat(n_samples, 1, 1, 1)
    g = g_logit(model, noisy, target.repeat(n_samples))
    return g.view(n_samples, b, *x.shape[1:]).mean(0)


add(C, "torch.normal", smoothgrad_variant(draw=lambda x: torch.normal(torch.zeros_like(x), 1.0)), right=True)
add(C, "sum", smoothgrad_variant(reduce=lambda gs: torch.stack(gs).sum(0)))
add(C, "squared", smoothgrad_variant(reduce=lambda gs: torch.stack(gs).pow(2).mean(0)))
add(C, "abs", smoothgrad_variant(reduce=lambda gs: torch.stack(gs).abs().mean(0)))
add(C, "sigma alone", smoothgrad_variant(noise_std=lambda x, s: s))
add(C, "batch range", smoothgrad_variant(noise_std=lambda x, s: s * (x.max() - x.min())))
add(C, "uniform noise", smoothgrad_variant(draw=torch.rand_like))
add(C, "one noise for all samples", smoothgrad_variant(same_noise=True))
add(C, "n_samples - 1", smoothgrad_variant(samples=lambda n: n - 1))
add(C, "sigma * max", smoothgrad_variant(noise_std=lambda x, s: s * x.amax(dim=(1, 2, 3), keepdim=True)))
add(C, "per-channel range", smoothgrad_variant(noise_std=lambda x, s: s * (x.amax(dim=(2, 3), keepdim=True) - x.amin(dim=(2, 3), keepdim=True))))
add(C, "divided by n + 1", smoothgrad_variant(reduce=lambda gs: torch.stack(gs).sum(0) / (len(gs) + 1)))
add(C, "probability gradient", smoothgrad_variant(grad=lambda m, x, t: grad_of(m, x, lambda z: pick(z.softmax(1), t))))
add(C, "gradient at x each time", smoothgrad_variant(at_x=True))
add(C, "no noise", lambda m, x, t, n_samples=50, sigma=0.15: g_logit(m, x, t))

# ------------------------------------------------------------------ lesson 02: integrated gradients

C = "check_integrated_gradients"


def ig_variant(alphas=lambda n: torch.arange(1, n + 1) / n, point=lambda b, x, a: b + a * (x - b),
               times=lambda x, b: x - b, reduce=lambda total, n: total / n, grad=g_logit):
    def ig(model, x, target, baseline, steps=50):
        total = torch.zeros_like(x)
        for a in alphas(steps):
            total += grad(model, point(baseline, x, float(a)), target)
        return times(x, baseline) * reduce(total, steps)
    return ig


add(C, "right Riemann", ig_variant(), right=True)
add(C, "left Riemann", ig_variant(alphas=lambda n: torch.arange(n) / n), right=True)
add(C, "midpoint", ig_variant(alphas=lambda n: (torch.arange(n) + 0.5) / n), right=True)
add(C, "linspace 0..1", ig_variant(alphas=lambda n: torch.linspace(0, 1, n + 1), reduce=lambda t, n: t / (n + 1)), right=True)


@variant(C, "batched over alphas", right=True)
def _(model, x, target, baseline, steps=50):
    alphas = (torch.arange(steps) + 1.0) / steps
    points = (baseline[None] + alphas.view(-1, 1, 1, 1, 1) * (x - baseline)[None]).flatten(0, 1)
    g = g_logit(model, points, target.repeat(steps)).view(steps, *x.shape)
    return (x - baseline) * g.mean(0)


add(C, "no (x - baseline)", ig_variant(times=lambda x, b: 1))
add(C, "times x", ig_variant(times=lambda x, b: x))
add(C, "sum not mean", ig_variant(reduce=lambda t, n: t))
add(C, "reversed difference", ig_variant(times=lambda x, b: b - x), fragment="opposite sign")
add(C, "path ignores baseline", ig_variant(point=lambda b, x, a: a * x))
add(C, "path forgets minus", ig_variant(point=lambda b, x, a: b + a * x))
add(C, "gradient at x", lambda m, x, t, b, steps=50: g_logit(m, x, t) * (x - b))
add(C, "gradient at baseline", lambda m, x, t, b, steps=50: g_logit(m, b, t) * (x - b))
add(C, "alpha squared", ig_variant(alphas=lambda n: (torch.arange(1, n + 1) / n) ** 2))
add(C, "half the path", ig_variant(alphas=lambda n: torch.arange(1, n + 1) / (2 * n)))
add(C, "probability gradient", ig_variant(grad=lambda m, x, t: grad_of(m, x, lambda z: pick(z.softmax(1), t))))
add(C, "divide by steps twice", ig_variant(reduce=lambda t, n: t / n / n))
add(C, "from x to baseline path, x - b", ig_variant(point=lambda b, x, a: x + a * (b - x), alphas=lambda n: torch.arange(n) / n), right=True)

# ------------------------------------------------------------------ lesson 03: FGSM

C = "check_fgsm"


def fgsm_variant(direction=torch.sign, sign=+1, clamp=lambda v: v.clamp(0, 1), grad=g_loss, scale=1.0):
    def fgsm(model, x, y, eps):
        return clamp(x + sign * scale * eps * direction(grad(model, x, y)))
    return fgsm


add(C, "mean loss", fgsm_variant(), right=True)
add(C, "sum loss", fgsm_variant(grad=lambda m, x, y: g_loss(m, x, y, "sum")), right=True)
add(C, "torch.clip", fgsm_variant(clamp=lambda v: torch.clip(v, min=0.0, max=1.0)), right=True)
add(C, "no clamp", fgsm_variant(clamp=lambda v: v))
add(C, "clamp above only", fgsm_variant(clamp=lambda v: v.clamp(max=1)))
add(C, "clamp below only", fgsm_variant(clamp=lambda v: v.clamp(min=0)))
add(C, "descends", fgsm_variant(sign=-1))
add(C, "raw gradient", fgsm_variant(direction=lambda g: g))
add(C, "perturbation only", lambda m, x, y, eps: eps * g_loss(m, x, y).sign())
add(C, "half eps", fgsm_variant(scale=0.5))
add(C, "softmax into CE", fgsm_variant(grad=lambda m, x, y: grad_of(m, x, lambda z: F.cross_entropy(z.softmax(1), y))))
add(C, "true logit", fgsm_variant(grad=lambda m, x, y: grad_of(m, x, lambda z: pick(z, y))))
add(C, "predicted label", fgsm_variant(grad=lambda m, x, y: g_loss(m, x, m(x).argmax(1))))
add(C, "clamp to [0, 255]", fgsm_variant(clamp=lambda v: v.clamp(0, 255)))
add(C, "L2-normalized gradient", fgsm_variant(direction=lambda g: g / per_image(g, lambda v: v.norm(dim=1))))
add(C, "clamps the perturbation to eps, no sign", fgsm_variant(direction=lambda g: g.clamp(-1, 1)))

# ------------------------------------------------------------------ lesson 03: gradient step

C = "check_gradient_step"


def step_variant(normalize=lambda g: g / per_image(g.abs(), lambda v: v.amax(1)), sign=+1,
                 clamp=lambda v: v.clamp(0, 1), grad=g_loss):
    def gradient_step(model, x, y, eps):
        return clamp(x + sign * eps * normalize(grad(model, x, y)))
    return gradient_step


add(C, "per-image max|g|", step_variant(), right=True)
add(C, "amax over dims", step_variant(normalize=lambda g: g / g.abs().amax(dim=(1, 2, 3), keepdim=True)), right=True)
add(C, "sum loss", step_variant(grad=lambda m, x, y: g_loss(m, x, y, "sum")), right=True)
add(C, "batch max", step_variant(normalize=lambda g: g / g.abs().max()))
add(C, "signed max", step_variant(normalize=lambda g: g / per_image(g, lambda v: v.amax(1))))
add(C, "L2 norm", step_variant(normalize=lambda g: g / per_image(g, lambda v: v.norm(dim=1))))
add(C, "raw gradient", step_variant(normalize=lambda g: g))
add(C, "sign", step_variant(normalize=torch.sign))
add(C, "descends", step_variant(sign=-1))
add(C, "no clamp", step_variant(clamp=lambda v: v))
add(C, "per-pixel max over channels", step_variant(normalize=lambda g: g / g.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)))
add(C, "per-channel max", step_variant(normalize=lambda g: g / g.abs().amax(dim=(2, 3), keepdim=True)))
add(C, "mean |g|", step_variant(normalize=lambda g: g / per_image(g.abs(), lambda v: v.mean(1))))
add(C, "max over batch per pixel", step_variant(normalize=lambda g: g / g.abs().amax(dim=0, keepdim=True).clamp_min(1e-12)))

# ------------------------------------------------------------------ lesson 03: PGD


def l2n(g):
    return g / per_image(g, lambda v: v.norm(dim=1)).clamp_min(1e-12)


def project_l2(d, eps):
    return d * (eps / per_image(d, lambda v: v.norm(dim=1)).clamp_min(1e-12)).clamp(max=1)


def pgd_variant(direction=None, project=None, clamp=True, down=None, once=False, anchor="x",
                steps_of=lambda s: s, step=lambda ss, eps: ss, grad=g_loss, project_each=True):
    def pgd(model, x, y, eps, step_size, steps, norm="linf", targeted=False):
        dirn = direction or (lambda g, n: g.sign() if n == "linf" else l2n(g))
        proj = project or (lambda d, e, n: d.clamp(-e, e) if n == "linf" else project_l2(d, e))
        going_down = targeted if down is None else down(targeted)
        x_adv, first = x.clone(), None
        for _ in range(steps_of(steps)):
            g = grad(model, x_adv, y) if not (once and first is not None) else first
            first = g
            prev = x_adv
            x_adv = x_adv + (-1 if going_down else 1) * step(step_size, eps) * dirn(g, norm)
            if project_each:
                start = x if anchor == "x" else prev
                x_adv = start + proj(x_adv - start, eps, norm)
            if clamp:
                x_adv = x_adv.clamp(0, 1)
        if not project_each:
            x_adv = (x + proj(x_adv - x, eps, norm)).clamp(0, 1)
        return x_adv
    return pgd


C = "check_pgd"
add(C, "reference-like", pgd_variant(), right=True)
add(C, "sum loss", pgd_variant(grad=lambda m, x, y: g_loss(m, x, y, "sum")), right=True)
add(C, "no projection", pgd_variant(project=lambda d, e, n: d))
add(C, "no clamp", pgd_variant(clamp=False))
add(C, "targeted goes up", pgd_variant(down=lambda t: False))
add(C, "untargeted goes down", pgd_variant(down=lambda t: True))
add(C, "sign for L2", pgd_variant(direction=lambda g, n: g.sign()))
add(C, "L2 step for linf", pgd_variant(direction=lambda g, n: l2n(g)))
add(C, "always rescale", pgd_variant(project=lambda d, e, n: d.clamp(-e, e) if n == "linf" else l2n(d) * e))
add(C, "batch norm", pgd_variant(direction=lambda g, n: g.sign() if n == "linf" else g / g.norm()))
add(C, "raw gradient", pgd_variant(direction=lambda g, n: g))
add(C, "gradient once", pgd_variant(once=True))
add(C, "projection around previous iterate", pgd_variant(anchor="prev"))
add(C, "step_size = eps", pgd_variant(step=lambda ss, eps: eps))
add(C, "one step too few", pgd_variant(steps_of=lambda s: s - 1))
add(C, "one step too many", pgd_variant(steps_of=lambda s: s + 1))
add(C, "linf projection for L2", pgd_variant(project=lambda d, e, n: d.clamp(-e, e)))
add(C, "project only at the end", pgd_variant(project_each=False))


@variant(C, "random start")
def _(model, x, y, eps, step_size, steps, norm="linf", targeted=False):
    start = (x + torch.empty_like(x).uniform_(-eps, eps) * (norm == "linf")).clamp(0, 1)
    return pgd_variant()(model, start, y, eps, step_size, steps, norm, targeted)


# ------------------------------------------------------------------ lesson 04: targeted L2 PGD

C = "check_targeted_l2_pgd"


def tl2(**options):
    attack = pgd_variant(**options)
    return lambda m, x, t, eps, ss, steps: attack(m, x, t, eps, ss, steps, "l2", True)


add(C, "reference-like", tl2(), right=True)
add(C, "sum loss", tl2(grad=lambda m, x, y: g_loss(m, x, y, "sum")), right=True)
add(C, "no projection", tl2(project=lambda d, e, n: d))
add(C, "no clamp", tl2(clamp=False))
add(C, "goes up", tl2(down=lambda t: False))
add(C, "sign step", tl2(direction=lambda g, n: g.sign()))
add(C, "always rescale", tl2(project=lambda d, e, n: l2n(d) * e))
add(C, "unit length", tl2(project=lambda d, e, n: l2n(d)))
add(C, "batch norm", tl2(direction=lambda g, n: g / g.norm()))
add(C, "raw gradient", tl2(direction=lambda g, n: g))
add(C, "gradient once", tl2(once=True))
add(C, "projection around previous iterate", tl2(anchor="prev"))
add(C, "linf clamp as projection", tl2(project=lambda d, e, n: d.clamp(-e, e)))
add(C, "one step too few", tl2(steps_of=lambda s: s - 1))
add(C, "project only at the end", tl2(project_each=False))

# ------------------------------------------------------------------ lesson 05: edge map and correlation

C = "check_edge_map"
SX = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edges(grey=lambda x: x.mean(1, keepdim=True), kx=SX, combine=lambda gx, gy: (gx ** 2 + gy ** 2).sqrt(),
          pad=lambda img: F.pad(img, (1, 1, 1, 1)), per_channel=False):
    def edge_map(x):
        if per_channel:
            return torch.stack([edges(grey=lambda v, c=c: v[:, c:c + 1], kx=kx, combine=combine, pad=pad)(x)
                                for c in range(x.shape[1])]).mean(0)
        img = pad(grey(x))
        gx = F.conv2d(img, kx.view(1, 1, 3, 3))
        gy = F.conv2d(img, kx.T.contiguous().view(1, 1, 3, 3))
        return combine(gx, gy)[:, 0]
    return edge_map


add(C, "conv2d with pad", edges(), right=True)
add(C, "swapped Gx/Gy", edges(kx=SX.T.contiguous()), right=True)
add(C, "flipped kernels", edges(kx=-SX), right=True)
add(C, "hypot", edges(combine=torch.hypot), right=True)
add(C, "only Gx", edges(combine=lambda gx, gy: gx.abs()))
add(C, "squared magnitude", edges(combine=lambda gx, gy: gx ** 2 + gy ** 2))
add(C, "|Gx| + |Gy|", edges(combine=lambda gx, gy: gx.abs() + gy.abs()))
add(C, "Gx + Gy", edges(combine=lambda gx, gy: gx + gy))
add(C, "sum of channels", edges(grey=lambda x: x.sum(1, keepdim=True)))
add(C, "first channel", edges(grey=lambda x: x[:, :1]))
add(C, "per-channel edges", edges(per_channel=True))
add(C, "replicate padding", edges(pad=lambda img: F.pad(img, (1, 1, 1, 1), mode="replicate")))
add(C, "no padding", edges(pad=lambda img: img), fragment="shape")
add(C, "luminance weights", edges(grey=lambda x: (x * torch.tensor([0.299, 0.587, 0.114])[:x.shape[1]].view(1, -1, 1, 1)).sum(1, keepdim=True) if x.shape[1] == 3 else x))
add(C, "Prewitt kernel", edges(kx=torch.tensor([[-1.0, 0.0, 1.0]] * 3)))
add(C, "divided by 8", edges(combine=lambda gx, gy: (gx ** 2 + gy ** 2).sqrt() / 8))
add(C, "max over channels", edges(grey=lambda x: x.amax(1, keepdim=True)))
add(C, "normalized", lambda x: (lambda e: e / e.amax())(edges()(x)))
add(C, "transposed output", lambda x: edges()(x).transpose(1, 2))

C = "check_correlation"


def centred(t):
    t = t.flatten(1)
    return t - t.mean(1, keepdim=True)


def pearson(a, b):
    a, b = centred(a), centred(b)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


add(C, "sum over norms", pearson, right=True)
add(C, "cosine of centred", lambda a, b: F.cosine_similarity(centred(a), centred(b), dim=1), right=True)
add(C, "mean over population std", lambda a, b: (centred(a) * centred(b)).mean(1) / (a.flatten(1).std(1, unbiased=False) * b.flatten(1).std(1, unbiased=False)), right=True)
add(C, "corrcoef per pair", lambda a, b: torch.stack([torch.corrcoef(torch.stack([p.flatten(), q.flatten()]))[0, 1] for p, q in zip(a, b)]), right=True)
add(C, "cosine", lambda a, b: F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1))
add(C, "covariance", lambda a, b: (centred(a) * centred(b)).mean(1))
add(C, "batch-centred", lambda a, b: (lambda p, q: (p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1)))(a.flatten(1) - a.mean(), b.flatten(1) - b.mean()))
add(C, "whole batch", lambda a, b: pearson(a.reshape(1, -1), b.reshape(1, -1)).expand(len(a)))
add(C, "negated", lambda a, b: -pearson(a, b))
add(C, "absolute", lambda a, b: pearson(a, b).abs())
add(C, "squared (r^2)", lambda a, b: pearson(a, b) ** 2)
add(C, "unbiased std with mean", lambda a, b: (centred(a) * centred(b)).mean(1) / (a.flatten(1).std(1) * b.flatten(1).std(1)))
add(C, "centred by a's mean only", lambda a, b: (lambda p, q: (p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1)))(centred(a), b.flatten(1) - a.flatten(1).mean(1, keepdim=True)))
add(C, "mean over pairs", lambda a, b: pearson(a, b).mean().expand(len(a)))
add(C, "scalar mean", lambda a, b: pearson(a, b).mean(), fragment="shape")

# ------------------------------------------------------------------ lesson 06: visualize_class

C = "check_visualize_class"


def ascent(grad=g_logit, direction=lambda g: g / per_image(g, lambda v: v.norm(dim=1)), sign=+1,
           length=lambda x: math.sqrt(x[0].numel()), clamp=True, decay="after", once=False,
           steps_of=lambda s: s):
    def visualize_class(model, x0, target, steps, lr, l2_decay=0.0):
        x, first = x0.clone(), None
        for _ in range(steps_of(steps)):
            if decay == "before":
                x = (1 - l2_decay) * x
            g = first if (once and first is not None) else grad(model, x, target)
            first = g
            x = x + sign * lr * length(x) * direction(g)
            if clamp:
                x = x.clamp(0, 1)
            if decay == "after":
                x = (1 - l2_decay) * x
            elif decay == "minus":
                x = x - l2_decay
            elif decay == "lr":
                x = (1 - lr * l2_decay) * x
        return x
    return visualize_class


add(C, "reference-like", ascent(), right=True)
add(C, "descends", ascent(sign=-1))
add(C, "probability", ascent(grad=lambda m, x, t: grad_of(m, x, lambda z: pick(z.softmax(1), t))))
add(C, "predicted class", ascent(grad=lambda m, x, t: grad_of(m, x, lambda z: z.max(1).values)))
add(C, "target[0]", ascent(grad=lambda m, x, t: grad_of(m, x, lambda z: z[:, t[0]])))
add(C, "batch norm", ascent(direction=lambda g: g / g.norm()))
add(C, "sign step", ascent(direction=torch.sign, length=lambda x: 1.0))
add(C, "raw gradient", ascent(direction=lambda g: g, length=lambda x: 1.0))
add(C, "no sqrt(D)", ascent(length=lambda x: 1.0))
add(C, "sqrt(H*W) without channels", ascent(length=lambda x: math.sqrt(x[0, 0].numel())))
add(C, "no clamp", ascent(clamp=False))
add(C, "no decay", ascent(decay="none"))
add(C, "decay before", ascent(decay="before"))
add(C, "decay subtracted", ascent(decay="minus"))
add(C, "decay times lr", ascent(decay="lr"))
add(C, "gradient once", ascent(once=True))
add(C, "one step too few", ascent(steps_of=lambda s: s - 1))

# ------------------------------------------------------------------ lesson 07: Grad-CAM and guided backprop

C = "check_grad_cam"


def cam_variant(score=lambda z, t: pick(z, t), capture="output", weights=lambda g: g.mean(dim=(2, 3), keepdim=True),
                combine=lambda w, a: (w * a).sum(1, keepdim=True), relu_first=True, mode="bilinear",
                align=False, normalize=False, layer_of=lambda layer: layer):
    def grad_cam(model, x, target, layer):
        stored = {}

        def hook(module, inputs, output):
            stored["a"] = output if capture == "output" else inputs[0]
        handle = model.get_submodule(layer_of(layer)).register_forward_hook(hook)
        try:
            with torch.enable_grad():
                z = model(x.detach().clone().requires_grad_(True))
                (g,) = torch.autograd.grad(score(z, target).sum(), stored["a"])
        finally:
            handle.remove()
        cam = combine(weights(g), stored["a"].detach())
        if relu_first:
            cam = cam.relu()
        options = {"align_corners": align} if mode == "bilinear" else {}
        cam = F.interpolate(cam, size=x.shape[-2:], mode=mode, **options)
        if not relu_first:
            cam = cam.relu()
        if normalize:
            cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return cam
    return grad_cam


add(C, "reference-like", cam_variant(), right=True)
def _raw_cam(m, x, t, layer):
    stored = {}
    handle = m.get_submodule(layer).register_forward_hook(lambda mod, i, o: stored.update(a=o))
    try:
        z = m(x.detach().clone().requires_grad_(True))
        (g,) = torch.autograd.grad(pick(z, t).sum(), stored["a"])
    finally:
        handle.remove()
    return (g.mean(dim=(2, 3), keepdim=True) * stored["a"].detach()).sum(1, keepdim=True)


add(C, "no ReLU", lambda m, x, t, layer: F.interpolate(_raw_cam(m, x, t, layer), size=x.shape[-2:], mode="bilinear", align_corners=False))
add(C, "abs instead of ReLU", lambda m, x, t, layer: F.interpolate(_raw_cam(m, x, t, layer).abs(), size=x.shape[-2:], mode="bilinear", align_corners=False))
add(C, "elementwise", cam_variant(weights=lambda g: g))
add(C, "sum of gradients", cam_variant(weights=lambda g: g.sum(dim=(2, 3), keepdim=True)))
add(C, "mean over channels (wrong dim)", cam_variant(weights=lambda g: g.mean(dim=1, keepdim=True)))
add(C, "ReLU on weights", cam_variant(weights=lambda g: g.mean(dim=(2, 3), keepdim=True).relu()))
add(C, "probability", cam_variant(score=lambda z, t: pick(z.softmax(1), t)))
add(C, "predicted class", cam_variant(score=lambda z, t: z.max(1).values))
add(C, "target[0]", cam_variant(score=lambda z, t: z[:, t[0]]))
add(C, "nearest", cam_variant(mode="nearest"))
add(C, "align_corners", cam_variant(align=True))
add(C, "normalized per image", cam_variant(normalize=True))
add(C, "ReLU after upsampling", cam_variant(relu_first=False))
add(C, "layer's input", cam_variant(capture="input"))
add(C, "always the last conv", cam_variant(layer_of=lambda layer: "2"))
add(C, "mean of activations", cam_variant(combine=lambda w, a: a.mean(1, keepdim=True) + 0 * w.sum()))
add(C, "log-probability", cam_variant(score=lambda z, t: pick(z.log_softmax(1), t)))

C = "check_guided_backprop"


def guided(types=(nn.ReLU, nn.ReLU6), rule=lambda gi, go: (gi[0].clamp_min(0),), score=lambda z, t: pick(z, t),
           then=lambda g, x: g, backward_hook="full"):
    def guided_backprop(model, x, target):
        handles = []
        for module in model.modules():
            if isinstance(module, types):
                register = (module.register_full_backward_hook if backward_hook == "full"
                            else module.register_backward_hook)
                handles.append(register(lambda m, gi, go: rule(gi, go)))
        try:
            return then(grad_of(model, x, lambda z: score(z, target)), x)
        finally:
            for h in handles:
                h.remove()
    return guided_backprop


add(C, "full backward hooks", guided(), right=True)


@variant(C, "tensor hooks on outputs", right=True)
def _(model, x, target):
    handles = []

    def forward_hook(module, inputs, output):
        output.register_hook(lambda g: g.clamp_min(0))
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            handles.append(module.register_forward_hook(forward_hook))
    try:
        return g_logit(model, x, target)
    finally:
        for h in handles:
            h.remove()


add(C, "plain gradient", g_logit)
add(C, "nn.ReLU only", guided(types=(nn.ReLU,)))
add(C, "deconvnet", guided(rule=lambda gi, go: (go[0].clamp_min(0),)))
add(C, "clamp at the end", lambda m, x, t: g_logit(m, x, t).clamp_min(0))
add(C, "negative kept", guided(rule=lambda gi, go: (gi[0].clamp_max(0),)))
add(C, "abs at ReLUs", guided(rule=lambda gi, go: (gi[0].abs(),)))
add(C, "probability", guided(score=lambda z, t: pick(z.softmax(1), t)))
add(C, "predicted class", guided(score=lambda z, t: z.max(1).values))
add(C, "times input", guided(then=lambda g, x: g * x))
add(C, "hooks on conv layers", guided(types=(nn.Conv2d,)))
add(C, "abs at the end", lambda m, x, t: guided()(m, x, t).abs())


@variant(C, "hooks left registered", fragment="hook")
def _(model, x, target):
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            module.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp_min(0),))
    return g_logit(model, x, target)


# ------------------------------------------------------------------ lesson 08: LRP-epsilon

C = "check_lrp_epsilon"


def lrp(sign=lambda z: torch.where(z >= 0, 1.0, -1.0), times_a=True, start="logit", bias=1.0, layers_eps="all",
        relu_pass="ok"):
    def lrp_epsilon(model, x, target, epsilon):
        linears = [m for m in model if isinstance(m, nn.Linear)]
        acts, a = [], x.flatten(1)
        for i, layer in enumerate(linears):
            acts.append(a)
            a = layer(a)
            if i < len(linears) - 1:
                a = a.relu()
        one_hot = F.one_hot(target, a.shape[1]).to(a)
        r = {"logit": a * one_hot, "one": one_hot, "all": a, "probability": a.softmax(1) * one_hot}[start]
        for i, (layer, a_in) in enumerate(zip(reversed(linears), reversed(acts))):
            z = a_in @ layer.weight.T + bias * layer.bias
            eps = epsilon if (layers_eps == "all" or i == 0) else 0.0
            s = r / (z + eps * sign(z))
            c = s @ layer.weight
            r = a_in * c if times_a else c
        return r.view_as(x).detach()
    return lrp_epsilon


add(C, "sign(0) = +1", lrp(), right=True)
add(C, "torch.sign", lrp(sign=torch.sign))
add(C, "+epsilon always", lrp(sign=lambda z: torch.ones_like(z)))
add(C, "no stabilizer (LRP-0)", lrp(sign=lambda z: torch.zeros_like(z)))
add(C, "no activation factor", lrp(times_a=False))
add(C, "start from 1", lrp(start="one"))
add(C, "start from all logits", lrp(start="all"))
add(C, "start from probability", lrp(start="probability"))
add(C, "bias twice", lrp(bias=2.0))
add(C, "no bias", lrp(bias=0.0))
add(C, "epsilon only at the top", lrp(layers_eps="top"))
add(C, "plain gradient", lambda m, x, t, eps: g_logit(m, x, t))
add(C, "gradient x input", lambda m, x, t, eps: g_logit(m, x, t) * x)
add(C, "sign(z) >= 0 as bool", lrp(sign=lambda z: (z > 0).float()))

# ------------------------------------------------------------------ lesson 09: mixed loss, representation distance

C = "check_fgsm_mixed_loss"


def mixed(w_clean=lambda a: a, w_adv=lambda a: 1 - a, step=+1, direction=torch.sign, clamp=True,
          loss=F.cross_entropy, mix_images=False, label=lambda m, x, y: y, eps_scale=1.0, detach=False):
    def fgsm_mixed_loss(model, x, y, eps, alpha):
        g = g_loss(model, x, label(model, x, y))
        x_adv = x + step * eps_scale * eps * direction(g)
        x_adv = x_adv.clamp(0, 1) if clamp else x_adv
        if mix_images:
            out = loss(model(alpha * x + (1 - alpha) * x_adv), y)
        else:
            out = w_clean(alpha) * loss(model(x), y) + w_adv(alpha) * loss(model(x_adv), y)
        return out.detach() if detach else out
    return fgsm_mixed_loss


add(C, "reference-like", mixed(), right=True)
add(C, "swapped weights", mixed(w_clean=lambda a: 1 - a, w_adv=lambda a: a))
add(C, "plain sum", mixed(w_clean=lambda a: 1.0, w_adv=lambda a: 1.0))
add(C, "adversarial only", mixed(w_clean=lambda a: 0.0, w_adv=lambda a: 1.0))
add(C, "clean only", mixed(w_clean=lambda a: 1.0, w_adv=lambda a: 0.0))
add(C, "equal halves", mixed(w_clean=lambda a: 0.5, w_adv=lambda a: 0.5))
add(C, "descends", mixed(step=-1))
add(C, "no clamp", mixed(clamp=False))
add(C, "raw gradient", mixed(direction=lambda g: g))
add(C, "sum reduction", mixed(loss=lambda z, y: F.cross_entropy(z, y, reduction="sum")))
add(C, "softmax into CE", mixed(loss=lambda z, y: F.cross_entropy(z.softmax(1), y)))
add(C, "mixes images", mixed(mix_images=True))
add(C, "FGSM on predicted labels", mixed(label=lambda m, x, y: m(x).argmax(1)))
add(C, "half eps", mixed(eps_scale=0.5))
add(C, "detached", mixed(detach=True), fragment="detached")
add(C, "returns a tuple", lambda m, x, y, eps, alpha: (mixed()(m, x, y, eps, alpha), x), fragment="tuple")

C = "check_representation_distance"


def phi(model, x):
    return models.features(model, x)


add(C, "features norm", lambda m, x, xa: (phi(m, x) - phi(m, xa)).norm(dim=1), right=True)
add(C, "model[:-1]", lambda m, x, xa: torch.no_grad()(lambda: (m[:-1](x) - m[:-1](xa)).norm(dim=1))(), right=True)
add(C, "squared", lambda m, x, xa: (phi(m, x) - phi(m, xa)).pow(2).sum(1))
add(C, "L1", lambda m, x, xa: (phi(m, x) - phi(m, xa)).abs().sum(1))
add(C, "relative", lambda m, x, xa: (phi(m, x) - phi(m, xa)).norm(dim=1) / phi(m, x).norm(dim=1))
add(C, "logits", lambda m, x, xa: torch.no_grad()(lambda: (m(x) - m(xa)).norm(dim=1))())
add(C, "images", lambda m, x, xa: (x - xa).flatten(1).norm(dim=1))
add(C, "MSE", lambda m, x, xa: (phi(m, x) - phi(m, xa)).pow(2).mean(1))
add(C, "difference of norms", lambda m, x, xa: phi(m, x).norm(dim=1) - phi(m, xa).norm(dim=1))
add(C, "Linf", lambda m, x, xa: (phi(m, x) - phi(m, xa)).abs().amax(1))
add(C, "cosine distance", lambda m, x, xa: 1 - F.cosine_similarity(phi(m, x), phi(m, xa), dim=1))
add(C, "norm over the batch", lambda m, x, xa: (phi(m, x) - phi(m, xa)).norm(dim=0), fragment="shape")
add(C, "mean over batch", lambda m, x, xa: (phi(m, x) - phi(m, xa)).norm(dim=1).mean().expand(len(x)))
add(C, "mean distance per feature", lambda m, x, xa: (phi(m, x) - phi(m, xa)).norm(dim=1) / phi(m, x).shape[1])


# ------------------------------------------------------------------ held out
# written after the checks were improved against the variants above, to measure on answers the
# improvements were not tuned to: they must fail; how many get a specific hint is measured
HELD_OUT_START = len(CATALOGUE)
add("check_predict_proba", "softmax at temperature 2", lambda m, x: (m(x).detach() / 2).softmax(1))
add("check_gradient", "target indexes a B x B block", lambda m, x, t: grad_of(m, x, lambda z: z[:, t].sum(1)))
add("check_gradient_x_input", "divided by max of x", lambda m, x, t: g_logit(m, x, t) * x / x.max())
add("check_saliency_map", "squeeze drops the batch", lambda m, x, t: g_logit(m, x, t).abs().amax(1, keepdim=True).squeeze())
add("check_smoothgrad", "variance instead of std", smoothgrad_variant(noise_std=lambda x, s: spread(x, s) ** 2))
add("check_smoothgrad", "clean gradient averaged in",
    smoothgrad_variant(reduce=lambda gs: torch.stack(gs).sum(0) / (len(gs) + 1)))
add("check_integrated_gradients", "reversed path, x - baseline kept",
    ig_variant(point=lambda b, x, a: x + a * (b - x), alphas=lambda n: torch.arange(1, n + 1) / n, times=lambda x, b: b - x))
add("check_fgsm", "clamp before the step", lambda m, x, y, eps: x.clamp(0, 1) + eps * g_loss(m, x, y).sign())
add("check_fgsm", "2 eps", fgsm_variant(scale=2.0))
add("check_gradient_step", "large stabilizer", step_variant(normalize=lambda g: g / (per_image(g.abs(), lambda v: v.amax(1)) + 1e-1 * per_image(g.abs(), lambda v: v.amax(1)))))


@variant("check_pgd", "every step starts at x")
def _(model, x, y, eps, step_size, steps, norm="linf", targeted=False):
    x_adv = x.clone()
    for _ in range(steps):
        g = g_loss(model, x_adv, y)
        step = g.sign() if norm == "linf" else l2n(g)
        x_adv = x + (-1 if targeted else 1) * step_size * step
        d = x_adv - x
        d = d.clamp(-eps, eps) if norm == "linf" else project_l2(d, eps)
        x_adv = (x + d).clamp(0, 1)
    return x_adv


add("check_pgd", "step 1.5 x step_size", lambda m, x, y, eps, ss, steps, norm="linf", targeted=False:
    pgd_variant()(m, x, y, eps, ss * 1.5, steps, norm, targeted))
add("check_targeted_l2_pgd", "eps as step size", lambda m, x, t, eps, ss, steps: tl2()(m, x, t, eps, eps, steps))
add("check_edge_map", "correlation with flipped and transposed kernel", edges(kx=-SX.T.contiguous()), right=True)
add("check_edge_map", "magnitude / 2", edges(combine=lambda gx, gy: (gx ** 2 + gy ** 2).sqrt() / 2))
add("check_correlation", "centred over the batch per pixel",
    lambda a, b: (lambda p, q: (p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1)))(a.flatten(1) - a.flatten(1).mean(0), b.flatten(1) - b.flatten(1).mean(0)))
add("check_correlation", "unbiased std and n - 1", lambda a, b: (centred(a) * centred(b)).sum(1) / (a.flatten(1).shape[1] - 1) / (a.flatten(1).std(1) * b.flatten(1).std(1)), right=True)
add("check_visualize_class", "max-normalized step", ascent(direction=lambda g: g / per_image(g.abs(), lambda v: v.amax(1))))
add("check_visualize_class", "clamp only at the end", lambda m, x0, t, s, lr, d=0.0: ascent(clamp=False)(m, x0, t, s, lr, d).clamp(0, 1))
add("check_grad_cam", "ReLU on the gradient", cam_variant(weights=lambda g: g.relu().mean(dim=(2, 3), keepdim=True)))
add("check_grad_cam", "weights averaged over the batch too", cam_variant(weights=lambda g: g.mean(dim=(0, 2, 3), keepdim=True)))
add("check_guided_backprop", "guided gradient of the loss", guided(score=lambda z, t: -F.cross_entropy(z, t, reduction="none")))
add("check_lrp_epsilon", "relevance halved", lambda m, x, t, eps: lrp()(m, x, t, eps) * 0.5)
add("check_lrp_epsilon", "epsilon squared", lambda m, x, t, eps: lrp()(m, x, t, eps ** 2))
add("check_fgsm_mixed_loss", "halved", lambda m, x, y, eps, alpha: mixed()(m, x, y, eps, alpha) / 2)
add("check_fgsm_mixed_loss", "per-image losses", mixed(loss=lambda z, y: F.cross_entropy(z, y, reduction="none")))
add("check_representation_distance", "whole-batch distance", lambda m, x, xa: torch.dist(phi(m, x), phi(m, xa)))
add("check_representation_distance", "squared then halved", lambda m, x, xa: (phi(m, x) - phi(m, xa)).pow(2).sum(1) / 2)
HELD_OUT = CATALOGUE[HELD_OUT_START:]

# a second set, written after every change to the checks was made and measured once
HELD_OUT_2_START = len(CATALOGUE)
add("check_predict_proba", "float64 softmax", lambda m, x: m(x).detach().double().softmax(1), fragment="dtype")
add("check_gradient", "margin over the best other class",
    lambda m, x, t: grad_of(m, x, lambda z: pick(z, t) - z.scatter(1, t[:, None], -1e9).max(1).values))
add("check_gradient_x_input", "summed to one number", lambda m, x, t: (g_logit(m, x, t) * x).sum(), fragment="shape")
add("check_saliency_map", "range over channels", lambda m, x, t: g_logit(m, x, t).amax(1) - g_logit(m, x, t).amin(1))
add("check_smoothgrad", "noise scaled by the image's std", smoothgrad_variant(noise_std=lambda x, s: s * x.flatten(1).std(1).view(-1, 1, 1, 1)))
add("check_integrated_gradients", "gradient times (point - baseline)",
    lambda m, x, t, b, steps=50: sum(g_logit(m, b + k / steps * (x - b), t) * (k / steps) * (x - b) for k in range(1, steps + 1)) / steps)
add("check_fgsm", "MSE on one-hot", fgsm_variant(grad=lambda m, x, y: grad_of(m, x, lambda z: ((z - F.one_hot(y, z.shape[1])) ** 2).sum(1))))
add("check_gradient_step", "L1-normalized", step_variant(normalize=lambda g: g / per_image(g.abs(), lambda v: v.sum(1))))
add("check_pgd", "L2 step normalized per pixel", pgd_variant(direction=lambda g, n: g.sign() if n == "linf" else g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)))
add("check_pgd", "renorm projection", pgd_variant(project=lambda d, e, n: d.clamp(-e, e) if n == "linf" else d.renorm(2, 0, e)), right=True)
add("check_targeted_l2_pgd", "vector_norm with keepdim", tl2(direction=lambda g, n: g / torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True)), right=True)
add("check_edge_map", "padding='same'", lambda x: (lambda g: g.norm(dim=1))(F.conv2d(x.mean(1, keepdim=True), torch.stack([SX, SX.T])[:, None], padding="same")), right=True)
add("check_edge_map", "Scharr kernel", edges(kx=torch.tensor([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]])))
add("check_correlation", "b centred by its max", lambda a, b: (lambda p, q: (p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1)))(centred(a), b.flatten(1) - b.flatten(1).amax(1, keepdim=True)))
add("check_visualize_class", "normalized per channel", ascent(direction=lambda g: g / g.norm(dim=(2, 3), keepdim=True).clamp_min(1e-12)))
add("check_grad_cam", "upsampled to a square", lambda m, x, t, layer: F.interpolate(
    _raw_cam(m, x, t, layer).relu(), size=(x.shape[-2], x.shape[-2]), mode="bilinear", align_corners=False))
add("check_guided_backprop", "legacy register_backward_hook", guided(backward_hook="legacy"), right=True)
# equivalent: a neuron the ReLU switches off has a = 0 and passes no relevance either way
add("check_lrp_epsilon", "z after the ReLU", lambda m, x, t, eps: _lrp_relu_z(m, x, t, eps), right=True)
add("check_fgsm_mixed_loss", "FGSM towards another class", mixed(label=lambda m, x, y: (y + 1) % m(x).shape[1]))
add("check_representation_distance", "unit feature vectors", lambda m, x, xa: (F.normalize(phi(m, x), dim=1) - F.normalize(phi(m, xa), dim=1)).norm(dim=1))


def _lrp_relu_z(model, x, target, epsilon):
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts, a = [], x.flatten(1)
    for i, layer in enumerate(linears):
        acts.append(a)
        a = layer(a)
        if i < len(linears) - 1:
            a = a.relu()
    r = a * F.one_hot(target, a.shape[1]).to(a)
    for i, (layer, a_in) in enumerate(zip(reversed(linears), reversed(acts))):
        z = layer(a_in) if i == 0 else layer(a_in).relu()
        r = a_in * ((r / (z + epsilon * torch.where(z >= 0, 1.0, -1.0))) @ layer.weight)
    return r.view_as(x).detach()


HELD_OUT_2 = CATALOGUE[HELD_OUT_2_START:]


# ------------------------------------------------------------------ running

def run(v: Variant, seed: int) -> tuple[bool, str]:
    check = getattr(checks, v.check)
    before = len(checks.results())
    _engine_run = _engine.run
    # every check calls _engine.run(SPEC, fn): run it with a fixed seed instead of a fresh one
    _engine.run = lambda spec, fn, seed_=None: _engine_run(spec, fn, seed=seed)
    try:
        check(v.function)
    finally:
        _engine.run = _engine_run
    result = checks.results()[-1]
    assert len(checks.results()) == before + 1
    return result["passed"], result["hint"]


ONE_NUMBER_PER_IMAGE = {"check_correlation", "check_representation_distance", "check_fgsm_mixed_loss"}
IDS = [f"{v.check.removeprefix('check_')}-{v.name}" for v in CATALOGUE]


@pytest.mark.parametrize("v", CATALOGUE, ids=IDS)
def test_catalogue(v: Variant, capsys):
    for seed in (1, 2):
        passed, hint = run(v, seed)
        if v.right:
            assert passed, f"a right answer failed (seed {seed}): {hint}"
            continue
        assert not passed, f"a wrong answer passed (seed {seed})"
        if v in HELD_OUT or v in HELD_OUT_2:  # measured, not tuned to: see measure()
            continue
        assert GENERIC not in hint, f"only the generic hint (seed {seed}): {hint}"
        assert "on " in hint and "(" in hint, f"the hint does not name the case: {hint}"
        if v.fragment:
            assert v.fragment in hint, f"expected {v.fragment!r} in {hint!r}"
        assert_no_reference_values(hint)
        if v.check in ONE_NUMBER_PER_IMAGE:  # a factor, an offset or an error size would give it away
            assert "times the expected" not in hint and "%" not in hint, hint


def measure(seeds, catalogue=None) -> None:
    import contextlib
    import io
    catalogue = CATALOGUE[:HELD_OUT_START] if catalogue is None else catalogue
    wrong = [v for v in catalogue if not v.right]
    passes, generic, coarse, right_fail = [], [], [], []
    for v in catalogue:
        for seed in seeds:
            with contextlib.redirect_stdout(io.StringIO()):
                passed, hint = run(v, seed)
            if v.right and not passed:
                right_fail.append((v, seed, hint))
            elif not v.right and passed:
                passes.append((v, seed, ""))
            elif not v.right and GENERIC in hint:
                generic.append((v, seed, hint))
            elif not v.right and any(c in hint for c in COARSE):
                coarse.append((v, seed, hint))
    runs = len(wrong) * len(seeds)
    print(f"{len(wrong)} wrong variants x {len(seeds)} seeds = {runs} runs; "
          f"{len(catalogue) - len(wrong)} right variants")
    print(f"wrong answers that passed: {len(passes)} ({len(passes) / runs:.1%}); "
          f"distinct variants: {len({(v.check, v.name) for v, _, _ in passes})}")
    print(f"wrong answers with only the generic hint: {len(generic)} ({len(generic) / runs:.1%}); "
          f"distinct variants: {len({(v.check, v.name) for v, _, _ in generic})}")
    print(f"wrong answers with only a coarse description (same signs / opposite / unrelated): "
          f"{len(coarse)} ({len(coarse) / runs:.1%}); distinct variants: {len({(v.check, v.name) for v, _, _ in coarse})}")
    print(f"right answers that failed: {len(right_fail)}")
    for label, items in (("PASSED", passes), ("GENERIC", generic), ("COARSE", coarse), ("RIGHT FAILED", right_fail)):
        for v, seed, hint in items:
            print(f"  {label}: {v.check} / {v.name} (seed {seed}) {hint[:160]}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--hints":
        import contextlib
        import io
        for v in CATALOGUE:
            with contextlib.redirect_stdout(io.StringIO()):
                passed, hint = run(v, int(sys.argv[1]))
            print(f"{'RIGHT' if v.right else 'WRONG'} {'pass' if passed else 'fail'} {v.check} / {v.name}: {hint}")
    else:
        seeds = range(1, 1 + (int(sys.argv[1]) if len(sys.argv) > 1 else 3))
        measure(seeds)
        print("\nheld out (written after the improvements):")
        measure(seeds, HELD_OUT)
        print("\nsecond held-out set (written after every change, measured once):")
        measure(seeds, HELD_OUT_2)
