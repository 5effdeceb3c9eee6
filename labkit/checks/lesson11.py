"""Checks for lesson 11 (how robust is it really?): the sanity flags of an eps-sweep, the
straight-through (BPDA) quantizer, and interval bound propagation through Linear and ReLU
layers and through a whole MLP."""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from .. import certify, train
from ..models import Normalize
from . import _engine
from ._cases import draw, images
from ._engine import Case, Mistake, Spec

__all__ = ["check_sweep_flags", "check_straight_through", "check_ibp_linear", "check_ibp_relu",
           "check_ibp_mlp"]

FLAG_NAMES = ("the accuracy at eps = 0 differs from the clean accuracy",
              "the accuracy rises somewhere as eps grows",
              "the accuracy at the largest eps stays above chance")


# ---------------------------------------------------------------- 1. sanity flags of an eps-sweep

def sweep_flags(eps, accuracy, clean_accuracy, chance):
    """Reference: ``[accuracy at eps = 0 != clean, accuracy rises between neighbouring eps,
    accuracy at the largest eps > chance]`` as a bool tensor."""
    return torch.stack([(accuracy[eps == 0] != clean_accuracy).any(),
                        (accuracy[1:] > accuracy[:-1]).any(),
                        accuracy[-1] > chance])


def _sweep_cases(generator: torch.Generator) -> list[Case]:
    """One healthy sweep, then one per problem, and sweeps where the shortcuts differ: a rise in
    the middle that first-versus-last misses, a dip below chance before the end, an eps = 0
    accuracy one image off."""
    cases = []
    n = draw(generator, 200, 500)
    for kind in ("healthy", "eps0 off by one image", "rise in the middle", "dip then above chance",
                 "all three", "falls to zero"):
        steps = draw(generator, 5, 7)
        eps = torch.linspace(0, 0.05 * steps, steps)
        clean = draw(generator, n // 2, n) / n
        drops = torch.rand(steps - 1, generator=generator) + 0.2
        accuracy = torch.cat([torch.tensor([clean]), clean * (1 - torch.cumsum(drops, 0) / drops.sum())])
        accuracy[-1] = 0.0
        if kind in ("eps0 off by one image", "all three"):
            accuracy[0] = clean - 1 / n
        if kind in ("rise in the middle", "all three"):
            accuracy[2] = accuracy[1] + 2 / n
        if kind in ("dip then above chance", "all three"):
            accuracy[-2], accuracy[-1] = 0.02, 0.15
        accuracy = (accuracy * n).round() / n
        if kind not in ("eps0 off by one image", "all three"):
            accuracy[0] = clean
        cases.append(Case((eps, accuracy.float(), clean, 0.1), describe=f"a sweep with {kind}"))
    return cases


def _flags(zero, rises, above):
    return lambda eps, accuracy, clean, chance: torch.stack([
        torch.as_tensor(zero(eps, accuracy, clean)), torch.as_tensor(rises(accuracy)),
        torch.as_tensor(above(accuracy, chance))])


_zero = lambda eps, accuracy, clean: (accuracy[eps == 0] != clean).any()  # noqa: E731
_rises = lambda accuracy: (accuracy[1:] > accuracy[:-1]).any()  # noqa: E731
_above = lambda accuracy, chance: accuracy[-1] > chance  # noqa: E731


def _flag_constraint(out, case) -> str | None:
    ref = sweep_flags(*case.args)
    wrong = [name for name, a, b in zip(FLAG_NAMES, out.tolist(), ref.tolist()) if a != b]
    return f"this flag is wrong: '{wrong[0]}'" if wrong else None


SWEEP = Spec(
    name="check_sweep_flags",
    reference=sweep_flags,
    cases=_sweep_cases,
    dims=("flag",),
    match=lambda a, b, case: a.dtype == b.dtype and torch.equal(a, b),
    mistakes=(
        Mistake("at eps = 0 the attack may not move the image at all, so its accuracy must equal the "
                "clean accuracy exactly: one image of difference already means a bug, no tolerance",
                _flags(lambda e, a, c: (a[e == 0] - c).abs().max() > 0.01, _rises, _above)),
        Mistake("flag a rise of the accuracy between neighbouring eps (a stronger perturbation "
                "can never help the model); a fall is what should happen",
                _flags(_zero, lambda a: (a[1:] < a[:-1]).any(), _above)),
        Mistake("comparing only the first and the last eps misses a rise in between: compare every "
                "eps with the one before", _flags(_zero, lambda a: a[-1] > a[0], _above)),
        Mistake("the chance test is about the largest eps (the last accuracy of the sweep), not "
                "the lowest accuracy anywhere", _flags(_zero, _rises, lambda a, c: a.min() > c)),
        Mistake("the flags say what is wrong: True where the sweep fails a test, False where it passes",
                lambda *args: ~sweep_flags(*args)),
    ),
    constraints=(_flag_constraint,),
)


def check_sweep_flags(sweep_flags) -> _engine.Result:
    """``sweep_flags(eps, accuracy, clean_accuracy, chance)``: three booleans, True where an
    eps-sweep fails a sanity test (eps = 0 equals clean, never rises, ends at chance)."""
    return _engine.run(SWEEP, sweep_flags)


# ---------------------------------------------------------------- 2. BPDA: the straight-through quantizer

def quantize(x, levels):
    """``round(x (levels - 1)) / (levels - 1)``: the input quantization of the lesson's defence."""
    return torch.round(x * (levels - 1)) / (levels - 1)


def straight_through(x, levels, weights):
    """Reference: the quantized image and the gradient of ``sum(weights * q(x))`` with the
    straight-through backward (BPDA, Athalye et al. 2018): ``d q / d x := 1``, so the gradient is
    ``weights``. Stacked ``2 x B x C x H x W``."""
    return torch.stack([quantize(x, levels), weights])


def _bpda_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for batch, size in ((1, draw(generator, 5, 9)), (draw(generator, 2, 4), draw(generator, 6, 10))):
        levels = draw(generator, 3, 9)
        x = images(generator, batch, 1, size, size, saturated=0.2)
        weights = torch.randn(x.shape, generator=generator)
        cases.append(Case((x, levels, weights), describe=f"{batch} image(s), {levels} levels"))
    return cases


BPDA = Spec(
    name="check_straight_through",
    adapter="output_and_gradient",
    reference=straight_through,
    cases=_bpda_cases,
    dims=("forward/gradient", "batch", "channel", "height", "width"),
    mistakes=(
        Mistake("no gradient comes through: rounding has derivative 0 almost everywhere (that is the "
                "masking); the backward pass must pass grad_output through unchanged",
                lambda x, levels, weights: torch.stack([quantize(x, levels), torch.zeros_like(x)])),
        Mistake("the forward pass must still quantize (the defended model sees quantized images); "
                "only the backward pass is replaced by the identity",
                lambda x, levels, weights: torch.stack([x, weights])),
        Mistake("the backward pass is the identity: return grad_output as it is, not scaled by the "
                "number of levels", lambda x, levels, weights: torch.stack([quantize(x, levels), weights * (levels - 1)])),
    ),
)


def check_straight_through(quantize_bpda) -> _engine.Result:
    """``quantize_bpda(x, levels)``: quantizes in the forward pass, identity in the backward."""
    if not callable(quantize_bpda):
        return _engine.run(BPDA, quantize_bpda)
    attached = []
    run = _engine.output_and_gradient(quantize_bpda, attached)

    def differentiable(out, case):
        if attached and not attached[-1]:
            return ("the result is detached from x (torch.no_grad, .detach() or a NumPy round trip): "
                    "PGD needs a gradient, so the output must come from x through autograd")
        return None

    return _engine.run(dataclasses.replace(BPDA, requirements=(differentiable,)), run)


# ---------------------------------------------------------------- 3. interval bound propagation

def _run_bounds(spec: Spec, student) -> _engine.Result:
    if not callable(student):
        return _engine.run(spec, student)
    stacked = _engine.stack_pair(student)

    def checked(*args):
        out = stacked(*args)
        if isinstance(out, _engine.NotAPair):
            got = "None (did you forget the `return`?)" if out.out is None else f"a {type(out.out).__name__}"
            raise ValueError(f"{student.__name__} must return the pair (lower, upper) of two tensors of "
                             f"the same shape; it returned {got}")
        return out
    return _engine.run(spec, functools.wraps(student)(checked))


def ibp_linear(lower, upper, weight, bias):
    """Reference: the box ``[lower, upper]`` through ``x @ weight.T + bias``, stacked."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight), layer.bias.copy_(bias)
        return torch.stack(certify.propagate([layer], lower, upper))


def _box_cases(generator: torch.Generator, linear: bool) -> list[Case]:
    cases = []
    for batch in (1, draw(generator, 2, 5), draw(generator, 2, 5)):
        n_in, n_out = draw(generator, 3, 12), draw(generator, 2, 8)
        centre = torch.randn(batch, n_in, generator=generator)
        radius = torch.rand(batch, n_in, generator=generator) * 0.8
        radius[:, 0] = 0  # a point: its bounds must meet
        args = (centre - radius, centre + radius)
        if linear:
            weight = torch.randn(n_out, n_in, generator=generator)
            weight[0] = -weight[0].abs()  # an output with negative weights only
            args += (weight, torch.randn(n_out, generator=generator))
        cases.append(Case(args, describe=f"a batch of {batch} boxes in {n_in} dimensions"))
    return cases


def _linear_naive(lower, upper, weight, bias):
    return torch.stack([lower @ weight.T + bias, upper @ weight.T + bias])


def _swapped(reference):
    return Mistake("the pair is swapped: return (lower, upper), lower first",
                   lambda *args: reference(*args).flip(0))


LINEAR = Spec(
    name="check_ibp_linear",
    adapter="pair",
    reference=ibp_linear,
    cases=lambda generator: _box_cases(generator, linear=True),
    dims=("lower/upper", "batch", "unit"),
    forbidden=(certify.propagate, certify.interval_bounds),
    mistakes=(
        Mistake("where a weight is negative, the output's upper bound comes from the input's lower "
                "bound (and vice versa): W l + b and W u + b are right only for positive weights; use "
                "the centre and radius, with the radius multiplied by |W|",
                _linear_naive),
        Mistake("the radius goes through |W| and the centre through W: both bounds need the bias "
                "added once", lambda l, u, w, b: ibp_linear(l, u, w, torch.zeros_like(b))),
        _swapped(ibp_linear),
    ),
)


def ibp_relu(lower, upper):
    """Reference: ``(relu(lower), relu(upper))``, stacked."""
    return torch.stack(certify.propagate([nn.ReLU()], lower, upper))


RELU = Spec(
    name="check_ibp_relu",
    adapter="pair",
    reference=ibp_relu,
    cases=lambda generator: _box_cases(generator, linear=False),
    dims=("lower/upper", "batch", "unit"),
    forbidden=(certify.propagate, certify.interval_bounds),
    mistakes=(
        Mistake("the ReLU applies to both bounds: a negative lower bound becomes 0 too (ReLU is "
                "increasing, so each bound goes through it on its own)",
                lambda l, u: torch.stack([l, u.clamp(min=0)])),
        Mistake("the upper bound also goes through the ReLU",
                lambda l, u: torch.stack([l.clamp(min=0), u])),
        Mistake("the ReLU of an interval is [relu(lower), relu(upper)]: nothing else changes",
                lambda l, u: torch.stack([l.clamp(min=0), u.abs()])),
        _swapped(ibp_relu),
    ),
)


def check_ibp_linear(ibp_linear) -> _engine.Result:
    """``ibp_linear(lower, upper, weight, bias)``: the bounds of ``x @ weight.T + bias`` over the box."""
    return _run_bounds(LINEAR, ibp_linear)


def check_ibp_relu(ibp_relu) -> _engine.Result:
    """``ibp_relu(lower, upper)``: the bounds of ``relu(x)`` over the box."""
    return _run_bounds(RELU, ibp_relu)


# ---------------------------------------------------------------- 4. a whole MLP, eps in pixel space

def ibp_mlp(model, x, eps):
    """Reference: :func:`labkit.certify.interval_bounds`, stacked."""
    return torch.stack(certify.interval_bounds(model, x, eps))


def tiny_mlp(shape, classes, generator) -> nn.Module:
    """Normalize (a mean and std far from 0 and 1, so where eps is applied shows) -> Flatten ->
    Linear -> ReLU -> Linear -> ReLU -> Linear; weights from the seeded global generator."""
    features, hidden = shape[0] * shape[1] * shape[2], draw(generator, 6, 16)
    mean = 0.2 + 0.3 * float(torch.rand(1, generator=generator))
    std = 0.2 + 0.2 * float(torch.rand(1, generator=generator))
    return nn.Sequential(Normalize([mean], [std]), nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)).eval()


def _mlp_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for batch in (1, draw(generator, 2, 4), draw(generator, 2, 4)):
        size, classes = draw(generator, 4, 7), draw(generator, 3, 8)
        model = tiny_mlp((1, size, size), classes, generator)
        x = images(generator, batch, 1, size, size, saturated=0.5)
        eps = round(0.02 + 0.08 * float(torch.rand(1, generator=generator)), 3)
        cases.append(Case((model, x, eps), describe=f"{batch} grey {size}x{size} image(s), eps={eps}"))
    return cases


def _propagate_box(model, lower, upper):
    with torch.no_grad():
        return torch.stack(certify.propagate(list(model.children())[1:], lower, upper))


def _eps_after_normalization(model, x, eps):
    z = model[0](x)
    return _propagate_box(model, z - eps, z + eps)


def _no_clamp(model, x, eps):
    with torch.no_grad():
        return torch.stack(certify.propagate(list(model.children()), x - eps, x + eps))


def _no_normalization(model, x, eps):
    return _propagate_box(model, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))


MLP = Spec(
    name="check_ibp_mlp",
    adapter="pair",
    reference=ibp_mlp,
    cases=_mlp_cases,
    dims=("lower/upper", "batch", "class"),
    forbidden=(certify.interval_bounds, certify.propagate, certify.margin_lower_bounds,
               train.IBPAdversary.loss),
    mistakes=(
        Mistake("eps is in pixel units: build the box [x - eps, x + eps] on the image in [0, 1] and "
                "send it through the model's Normalize layer, not around the normalized image "
                "(there the box would be std times too small)", _eps_after_normalization),
        Mistake("the box must stay inside the valid images: cut [x - eps, x + eps] to [0, 1] first",
                _no_clamp),
        Mistake("the model normalizes inside: its first layer (Normalize) is part of the chain and "
                "needs bounds too (it is increasing, so apply it to each bound)", _no_normalization),
        _swapped(ibp_mlp),
    ),
)


def check_ibp_mlp(ibp_mlp) -> _engine.Result:
    """``ibp_mlp(model, x, eps)``: lower and upper logit bounds over the box around ``x``."""
    return _run_bounds(MLP, ibp_mlp)
