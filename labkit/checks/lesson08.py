"""Checks for lesson 08 (layer-wise relevance propagation): the LRP-epsilon rule on a small
fully connected ReLU network."""
from __future__ import annotations

import torch
from torch import nn

from .. import attribution
from . import _engine
from ._cases import describe, draw, images, targets
from ._engine import Case, Mistake, Spec
from ._mistakes import logit_gradient

__all__ = ["check_lrp_epsilon"]


def dense_relu_net(features: int, widths: list[int], classes: int) -> nn.Module:
    """``Flatten, (Linear, ReLU) per width, Linear``: random weights and biases (the biases large
    enough that what they absorb shows), in eval mode."""
    layers, size = [nn.Flatten()], features
    for width in widths:
        layers += [nn.Linear(size, width), nn.ReLU()]
        size = width
    layers.append(nn.Linear(size, classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(3.0)
                layer.bias.normal_(0.0, 0.3)
    return model.eval()


def _cases(generator: torch.Generator) -> list[Case]:
    """Two or three hidden layers; epsilon from tiny (LRP-0) to the size of typical |z|."""
    cases = []
    for number, (batch, epsilon) in enumerate(((1, 1e-6), (draw(generator, 3, 5), 0.25), (draw(generator, 3, 5), 1.0))):
        height, width = draw(generator, 3, 6), draw(generator, 3, 6)
        classes = draw(generator, 3, 6)
        widths = [draw(generator, 6, 12) for _ in range(draw(generator, 2, 3))]
        model = dense_relu_net(height * width, widths, classes)
        x = images(generator, batch, 1, height, width, saturated=0.2)
        target = targets(generator, model, x, classes)
        _make_first_target_logit_negative(model, x, target)
        if number == 2:  # a hidden neuron with z = 0 exactly, where the text's sign(0) = +1 matters
            with torch.no_grad():
                dead = draw(generator, 0, widths[0] - 1)
                model[1].weight[dead] = 0.0
                model[1].bias[dead] = 0.0
        cases.append(Case((model, x, target, epsilon),
                          describe=describe(batch, 1, height, width) + f", {len(widths)} hidden layers, "
                                                                       f"epsilon={epsilon:g}"
                          + (", a hidden neuron with z = 0" if number == 2 else "")))
    return cases


def _make_first_target_logit_negative(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """Lower the output bias of image 0's target class until its logit is negative. Below the
    output, relevance only reaches neurons with z > 0 (the others are switched off by the
    ReLU), so the target logit is the one z whose sign tells ``z + epsilon * sign(z)`` from
    a plain ``z + epsilon``."""
    with torch.no_grad():
        logit = model(x[:1])[0, target[0]]
        if logit >= 0:
            model[-1].bias[target[0]] -= logit + 0.5


def lrp_epsilon(model, x, target, epsilon):
    """Reference: labkit's LRP with the epsilon rule on every dense layer."""
    return attribution.lrp(model, x, target, rule=attribution.Epsilon(epsilon))


def _variant(denominator=None, times_input=True, start="logit", bias_scale=1.0, divide=True, top_only=False):
    """LRP-epsilon with one piece changed, for the mistakes: ``denominator(z, epsilon)``,
    whether relevance is multiplied by the activations, how it starts at the output, how much
    of the bias goes into z, whether to divide by z at all."""
    denominator = denominator or (lambda z, eps: z + eps * torch.where(z >= 0, 1.0, -1.0))

    def relevance(model, x, target, epsilon):
        linears = [m for m in model if isinstance(m, nn.Linear)]
        activations, a = [], x.flatten(1)
        for layer in linears:
            activations.append(a)
            a = layer(a)
            if layer is not linears[-1]:
                a = a.relu()
        logits = a
        picked = logits.gather(1, target[:, None])
        scale = {"logit": picked, "one": torch.ones_like(picked),
                 "probability": logits.softmax(1).gather(1, target[:, None])}
        if start == "all logits":
            r = logits
        else:
            r = torch.zeros_like(logits).scatter(1, target[:, None], scale[start])
        for layer, a in zip(reversed(linears), reversed(activations)):
            z = a @ layer.weight.T + bias_scale * layer.bias
            eps = 0.0 if top_only and layer is not linears[-1] else epsilon
            s = r / denominator(z, eps) if divide else r
            c = s @ layer.weight
            r = a * c if times_input else c
        return r.reshape(x.shape).detach()
    return relevance


MISTAKES = (
    # first: where z = 0 both this and LRP-0 give 0 / 0, and NaN spreads to every pixel
    Mistake("the result is NaN where a neuron has z = 0: torch.sign(0) is 0, so z + epsilon * sign(z) "
            "is 0 there; count sign(0) as +1, e.g. torch.where(z >= 0, 1.0, -1.0)",
            _variant(denominator=lambda z, eps: z + eps * torch.sign(z))),
    Mistake("the stabilizer must take the sign of z: divide by z + epsilon * sign(z) (with sign(0) "
            "counted as +1); adding +epsilon to every z pushes negative z towards 0 and blows their "
            "share up", _variant(denominator=lambda z, eps: z + eps)),
    Mistake("that is LRP-0 (on a ReLU net the same as gradient x input): the stabilizer is missing; "
            "divide by z + epsilon * sign(z), not by z alone (epsilon > 0 absorbs weak, "
            "contradictory contributions)", _variant(denominator=lambda z, eps: z)),
    Mistake("multiply by the activation a_j of the layer below: R_j = a_j * sum_k w_jk R_k / (z_k + "
            "eps sign z_k); without a_j the relevance is a (scaled) gradient, not a share of z_k",
            _variant(times_input=False)),
    Mistake("divide each neuron's relevance by its pre-activation z_k (stabilized) before passing "
            "it down: R_j = a_j sum_k w_jk R_k / (z_k + eps sign z_k); without it relevance is not "
            "conserved", _variant(divide=False)),
    Mistake("z_k counts the bias twice: nn.Linear already adds layer.bias, so use "
            "z = layer(a), or a @ W.T + b, not layer(a) + layer.bias", _variant(bias_scale=2.0)),
    Mistake("the denominator z_k must include the bias: z_k = sum_j a_j w_jk + b_k (the layer's "
            "output before the ReLU); without b_k the bias absorbs nothing", _variant(bias_scale=0.0)),
    Mistake("sign(z) is -1 for negative z: (z > 0) or (z >= 0) as a number gives 0 there, which "
            "drops the stabilizer for negative z", _variant(denominator=lambda z, eps: z + eps * (z >= 0).to(z.dtype))),
    Mistake("use the stabilizer epsilon at every layer, not only at the output layer",
            _variant(top_only=True)),
    Mistake("start from the target's logit f_t(x) on the target class (zeros elsewhere), not from 1",
            _variant(start="one")),
    Mistake("start from the target's logit, not its softmax probability", _variant(start="probability")),
    Mistake("start from the target's logit only (zeros for the other classes), not from all logits",
            _variant(start="all logits")),
    Mistake("that is gradient x input, the same as LRP-0 on a ReLU net: divide by the stabilized "
            "z + epsilon * sign(z) at every layer (epsilon > 0 absorbs weak, contradictory contributions)",
            lambda model, x, target, epsilon: logit_gradient(model, x, target) * x),
    Mistake("that is the plain gradient of the logit: LRP multiplies by the activations at every "
            "layer and divides by the stabilized z_k",
            lambda model, x, target, epsilon: logit_gradient(model, x, target)),
)

LRP_EPSILON = Spec(
    name="check_lrp_epsilon",
    reference=lrp_epsilon,
    cases=_cases,
    forbidden=(attribution.lrp,),
    mistakes=MISTAKES,
)


def check_lrp_epsilon(lrp_epsilon) -> _engine.Result:
    """``lrp_epsilon(model, x, target, epsilon)``: LRP-epsilon relevance of the target logit on an
    ``nn.Sequential(Flatten, Linear, ReLU, ..., Linear)``, shaped like ``x``."""
    return _engine.run(LRP_EPSILON, lrp_epsilon)
