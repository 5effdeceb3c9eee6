"""Checks for lesson 14 (inside the network): a channel's activation read with a forward hook,
and Dong et al.'s consistency of a neuron."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .. import featvis
from . import _engine
from ._cases import describe, draw, image_shapes, images, tiny_cnn
from ._engine import Case, Mistake, Spec

__all__ = ["check_channel_objective", "check_consistency"]


# ------------------------------------------------------------------ 1. the hook objective

def _hooked(model, x, layer, read):
    """``read(output, input)`` of ``layer`` in one forward pass, hook removed afterwards."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: captured.append(read(output, inputs[0])))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[-1], logits


def channel_objective(model, x, layer, channel):
    """Reference: channel ``channel`` of ``layer``'s output averaged over positions, one value
    per image, on the autograd graph (labkit's :class:`~labkit.featvis.Channel` unit)."""
    return featvis._unit_values(model, x, [featvis.Channel(layer, channel)] * len(x))


def _objective_variant(read=lambda out, inp, c: out[:, c].mean(dim=(1, 2))):
    def wrong(model, x, layer, channel):
        value, _ = _hooked(model, x, layer, lambda out, inp: read(out, inp, channel))
        return value
    return wrong


def _objective_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for batch, channels, height, width in image_shapes(generator):
        model = tiny_cnn(channels, draw(generator, 6, 8))  # more classes than channels drawn
        x = images(generator, max(batch, 2), channels, height, width)
        layer = str(draw(generator, 1, 3))  # ReLU, strided conv, ReLU: inputs of 6 or 8 channels
        channel = draw(generator, 1, 5)
        cases.append(Case((model, x, layer, channel),
                          describe=describe(max(batch, 2), channels, height, width) + f", layer={layer!r}, channel={channel}"))
    return cases


_adapt = _engine.value_and_gradient
_DETACHED = ("the values are detached from x (torch.no_grad, .detach() or .item()): gradient ascent "
             "differentiates them, so keep them on the autograd graph")


def _one_per_image(out, ref, case):
    """What came back instead of ``B`` values (the adapter passes it on unchanged)."""
    batch = len(case.args[1])
    if out.dim() == 2 and out.shape[0] == batch:
        return None
    return (f"return one value per image, a tensor of shape ({batch},); got shape {tuple(out.shape)}"
            + (": average over the positions too" if out.dim() == 3 else ""))


CHANNEL_OBJECTIVE = Spec(
    name="check_channel_objective",
    adapter="value_and_gradient",
    reference=_adapt(channel_objective),
    cases=_objective_cases,
    forbidden=(featvis.activation, featvis.feature_maps, featvis._unit_values, channel_objective),
    dims=("batch", "value and gradient"),
    shape_hints=(_one_per_image,),
    mistakes=(
        # the grader sees only the numbers: detached values come back with a zero gradient
        Mistake(_DETACHED, _adapt(lambda model, x, layer, channel: channel_objective(model, x, layer, channel).detach())),
        Mistake("average the channel's map over its positions (.mean over height and width), not its "
                "maximum", _adapt(_objective_variant(lambda out, inp, c: out[:, c].amax(dim=(1, 2))))),
        Mistake("average the channel's map over its positions (.mean), not the sum",
                _adapt(_objective_variant(lambda out, inp, c: out[:, c].sum(dim=(1, 2))))),
        Mistake("a forward hook gets (module, input, output): read the layer's *output* (the third "
                "argument), not its input", _adapt(_objective_variant(lambda out, inp, c: inp[:, c].mean(dim=(1, 2))))),
        Mistake("the channels are dimension 1 of the B x C x H x W output: output[:, channel]; "
                "output[channel] picks an image", _adapt(_objective_variant(
                    lambda out, inp, c: out[c % len(out)].mean().expand(len(out))))),
        Mistake("one channel, not all of them: take output[:, channel] before averaging",
                _adapt(_objective_variant(lambda out, inp, c: out.mean(dim=(1, 2, 3))))),
        Mistake("read the layer's output with the hook; the model's own output (the logits) is "
                "another unit", _adapt(lambda model, x, layer, channel: _hooked(model, x, layer, lambda o, i: o)[1][:, channel])),
    ),
)


def check_channel_objective(channel_objective) -> _engine.Result:
    """``channel_objective(model, x, layer, channel)``: channel ``channel`` of the output of the
    layer named ``layer`` (read with a forward hook), averaged over positions; ``B`` values that
    stay on the autograd graph."""
    if not callable(channel_objective):
        return _engine.run(CHANNEL_OBJECTIVE, channel_objective)
    attached = []
    run = _engine.value_and_gradient(channel_objective, attached)

    def differentiable(out, case):
        if attached and not attached[-1]:
            return _DETACHED
        return None

    return _engine.run(dataclasses.replace(CHANNEL_OBJECTIVE, requirements=(differentiable,)), run)


# ------------------------------------------------------------------ 2. Dong et al.'s consistency

def consistency(top_labels, similarity):
    """Reference: ``p^T A p`` per neuron, ``p`` the class frequencies among its top images."""
    return featvis.consistency(top_labels, similarity.shape[0], similarity)


def _frequencies(top_labels, similarity, scale=1.0):
    return F.one_hot(top_labels, similarity.shape[0]).to(similarity.dtype).sum(dim=1) / scale


def _quadratic(p, a):
    return torch.einsum("ni,ij,nj->n", p, a, p)


def _consistency_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for _ in range(3):
        classes, neurons, k = draw(generator, 4, 8), draw(generator, 3, 7), draw(generator, 9, 14)
        # k > classes: dividing the counts by k or by the number of classes is told apart
        # some neurons with one dominant class, some spread out, as real neurons are
        favourite = torch.randint(0, classes, (neurons, 1), generator=generator)
        spread = torch.randint(0, classes, (neurons, k), generator=generator)
        keep = torch.rand(neurons, k, generator=generator) < torch.linspace(0.2, 0.9, neurons)[:, None]
        top_labels = torch.where(keep, favourite, spread)
        a = torch.rand(classes, classes, generator=generator) * 0.6
        a = (a + a.T) / 2
        a.fill_diagonal_(1.0)
        cases.append(Case((top_labels, a), describe=f"{neurons} neurons x top {k} images, {classes} classes"))
    return cases


CONSISTENCY = Spec(
    name="check_consistency",
    reference=consistency,
    cases=_consistency_cases,
    forbidden=(featvis.consistency,),
    dims=("neuron",),
    mistakes=(
        Mistake("p holds frequencies: divide each neuron's class counts by k, its number of top images",
                lambda t, a: _quadratic(_frequencies(t, a), a)),
        Mistake("p is divided by k (the number of top images of a neuron), not by the number of classes",
                lambda t, a: _quadratic(_frequencies(t, a, a.shape[0]), a)),
        Mistake("consis(n) = p^T A p: you left out the similarity matrix A (p^T p)",
                lambda t, a: _quadratic(_frequencies(t, a, t.shape[1]), torch.eye(len(a), dtype=a.dtype))),
        Mistake("consis(n) is the squared A-norm p^T A p, without a square root",
                lambda t, a: _quadratic(_frequencies(t, a, t.shape[1]), a).sqrt()),
        Mistake("count each neuron's classes over its own row of top_labels (one row per neuron), not "
                "over the whole tensor", lambda t, a: _quadratic(
                    F.one_hot(t.flatten(), len(a)).to(a.dtype).mean(0).expand(len(t), -1), a)),
    ),
)


def check_consistency(consistency) -> _engine.Result:
    """``consistency(top_labels, similarity)``: for each row of ``top_labels`` (``N x k`` class
    indices), ``p^T A p`` with ``p`` the fraction of the row in each class and ``A`` =
    ``similarity``; ``N`` values."""
    return _engine.run(CONSISTENCY, consistency)
