"""Checks for lesson 09 (adversarial training): the FGSM mixed loss and the representation
distance of the consistency metric."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import attacks, models, train
from . import _engine
from ._cases import describe, draw, image_shapes, images, tiny_cnn
from ._engine import Case, Mistake, Spec
from ._mistakes import cross_entropy_gradient

__all__ = ["check_fgsm_mixed_loss", "check_representation_distance"]


def _alpha(generator: torch.Generator, low: float, high: float) -> float:
    return round(low + (high - low) * float(torch.rand(1, generator=generator)), 2)


def _mixed_loss_cases(generator: torch.Generator) -> list[Case]:
    """alpha = 0.5 once, then below and above it, so swapped weights show."""
    cases = []
    for (batch, channels, height, width), alpha in zip(
            image_shapes(generator), (0.5, _alpha(generator, 0.15, 0.4), _alpha(generator, 0.6, 0.85))):
        classes = draw(generator, 4, 10)
        model = tiny_cnn(channels, classes)
        x = images(generator, batch, channels, height, width, saturated=0.4)
        y = torch.randint(classes, (batch,), generator=generator)
        eps = round(0.05 + 0.1 * float(torch.rand(1, generator=generator)), 3)
        cases.append(Case((model, x, y, eps, alpha), describe=describe(batch, channels, height, width)
                          + f", eps={eps}, alpha={alpha}"))
    return cases


def fgsm_mixed_loss(model, x, y, eps, alpha):
    """Reference: labkit's FGSM mixed loss, ``alpha J(x, y) + (1 - alpha) J(x_fgsm, y)``, attached
    to the model's graph as training needs it."""
    return train.FGSMMixedAdversary(eps=eps, alpha=alpha).loss(model, x, y)


def _mixed(clean_weight, adversarial_weight, step=+1, direction=torch.sign, clamp=True, score=None,
           labels=lambda model, x, y: y):
    """A mixed loss with one piece changed: the weights ``(alpha) -> float``, the FGSM step's
    sign, size and direction, the clamp, the loss ``score(logits, y)``, the labels FGSM attacks."""
    score = score or F.cross_entropy

    def loss(model, x, y, eps, alpha):
        with torch.no_grad():
            attacked = labels(model, x, y)
        x_adv = x + step * eps * direction(cross_entropy_gradient(model, x, attacked))
        x_adv = x_adv.clamp(0, 1) if clamp else x_adv
        with torch.no_grad():
            return clean_weight(alpha) * score(model(x), y) + adversarial_weight(alpha) * score(model(x_adv), y)
    return loss


def _mixed_images(model, x, y, eps, alpha):
    x_adv = (x + eps * cross_entropy_gradient(model, x, y).sign()).clamp(0, 1)
    with torch.no_grad():
        return F.cross_entropy(model(alpha * x + (1 - alpha) * x_adv), y)


def _alpha_weights():
    return (lambda alpha: alpha), (lambda alpha: 1 - alpha)


MIXED_LOSS = Spec(
    name="check_fgsm_mixed_loss",
    reference=fgsm_mixed_loss,
    cases=_mixed_loss_cases,
    dims=(),
    forbidden=(train.FGSMMixedAdversary.loss, train.ConsistencyAdversary.loss),
    attached=("the loss is detached from the model (computed under torch.no_grad(), or .detach()-ed): "
              "training calls loss.backward(), so return it with its graph"),
    mistakes=(
        Mistake("the weights are swapped: alpha goes with the loss on the clean images, 1 - alpha "
                "with the loss on the FGSM images", _mixed(lambda a: 1 - a, lambda a: a)),
        Mistake("weight the two losses: alpha * J(x) + (1 - alpha) * J(x_adv), not their plain sum",
                _mixed(lambda a: 1.0, lambda a: 1.0)),
        Mistake("that is the loss on the FGSM images alone: add alpha * J(x) on the clean images and "
                "weight the adversarial part by 1 - alpha", _mixed(lambda a: 0.0, lambda a: 1.0)),
        Mistake("that is the loss on the clean images alone (or the FGSM images equal x): the "
                "adversarial part is J at x + eps * sign(grad_x J)", _mixed(lambda a: 1.0, lambda a: 0.0)),
        Mistake("that is the clean part alone, alpha * J(x): add (1 - alpha) * J(x_adv)",
                _mixed(lambda a: a, lambda a: 0.0)),
        Mistake("the FGSM images step down the loss: x_adv = x + eps * sign(grad), up the gradient "
                "of the loss", _mixed(*_alpha_weights(), step=-1)),
        Mistake("clamp the FGSM images to [0, 1]", _mixed(*_alpha_weights(), clamp=False)),
        Mistake("FGSM steps along the sign of the gradient, not the raw gradient",
                _mixed(*_alpha_weights(), direction=lambda g: g)),
        Mistake("average the cross-entropy over the batch (F.cross_entropy's default), do not sum it",
                _mixed(*_alpha_weights(), score=lambda z, y: F.cross_entropy(z, y, reduction="sum"))),
        Mistake("F.cross_entropy takes the logits: do not apply softmax first",
                _mixed(*_alpha_weights(), score=lambda z, y: F.cross_entropy(z.softmax(1), y))),
        Mistake("weight the two losses by alpha and 1 - alpha, not half and half",
                _mixed(lambda a: 0.5, lambda a: 0.5)),
        Mistake("you mixed the images (one loss at alpha * x + (1 - alpha) * x_adv): mix the two "
                "losses, alpha * J(x) + (1 - alpha) * J(x_adv)", _mixed_images),
        Mistake("the FGSM images attack the true labels y, not the model's predictions",
                _mixed(*_alpha_weights(), labels=lambda model, x, y: model(x).argmax(1))),
        Mistake("the FGSM images move by eps (x + eps * sign(grad)), not by a fraction of it",
                _mixed(*_alpha_weights(), step=0.5)),
    ),
)


def check_fgsm_mixed_loss(fgsm_mixed_loss) -> _engine.Result:
    """``fgsm_mixed_loss(model, x, y, eps, alpha)``: ``alpha * CE(model(x), y) + (1 - alpha) *
    CE(model(x_fgsm), y)``, a scalar tensor that training can backpropagate through."""
    return _engine.run(MIXED_LOSS, fgsm_mixed_loss)


# ---------------------------------------------------------------- the consistency distance

def _distance_cases(generator: torch.Generator) -> list[Case]:
    cases = []
    for batch, channels, height, width in image_shapes(generator):
        classes = draw(generator, 4, 10)
        model = tiny_cnn(channels, classes)
        x = images(generator, batch, channels, height, width, saturated=0.3)
        y = torch.randint(classes, (batch,), generator=generator)
        x_adv = attacks.fgsm(model, x, y, eps=0.1)
        cases.append(Case((model, x, x_adv), describe=describe(batch, channels, height, width)))
    return cases


def representation_distance(model, x, x_adv):
    """Reference: ``||phi(x) - phi(x_adv)||_2`` per image, phi = :func:`labkit.models.features`."""
    return (models.features(model, x) - models.features(model, x_adv)).norm(dim=1)


def _phi_difference(model, x, x_adv):
    return models.features(model, x) - models.features(model, x_adv)


def _logits(model, x):
    with torch.no_grad():
        return model(x)


DISTANCE = Spec(
    name="check_representation_distance",
    reference=representation_distance,
    cases=_distance_cases,
    dims=("batch",),
    mistakes=(
        Mistake("that is the squared distance: take the square root, ||phi(x) - phi(x_adv)||_2",
                lambda model, x, x_adv: _phi_difference(model, x, x_adv).pow(2).sum(1)),
        Mistake("that is the L1 distance (sum of |differences|): take the Euclidean (L2) norm",
                lambda model, x, x_adv: _phi_difference(model, x, x_adv).abs().sum(1)),
        Mistake("return the raw distance, not divided by ||phi(x)||",
                lambda model, x, x_adv: _phi_difference(model, x, x_adv).norm(dim=1)
                / models.features(model, x).norm(dim=1)),
        Mistake("phi is the representation, the input of the last linear layer "
                "(labkit.models.features), not the logits",
                lambda model, x, x_adv: (_logits(model, x) - _logits(model, x_adv)).norm(dim=1)),
        Mistake("that is the distance between the images: compare their representations phi(x)",
                lambda model, x, x_adv: (x - x_adv).flatten(1).norm(dim=1)),
        Mistake("that is the largest |difference| (the L-inf distance): take the Euclidean (L2) norm",
                lambda model, x, x_adv: _phi_difference(model, x, x_adv).abs().amax(1)),
        Mistake("that is the difference of the two lengths ||phi(x)|| - ||phi(x_adv)||: take the "
                "length of the difference, ||phi(x) - phi(x_adv)||",
                lambda model, x, x_adv: models.features(model, x).norm(dim=1) - models.features(model, x_adv).norm(dim=1)),
        Mistake("that is a cosine distance (it ignores lengths): take the Euclidean distance ||phi(x) - phi(x_adv)||",
                lambda model, x, x_adv: 1 - F.cosine_similarity(models.features(model, x), models.features(model, x_adv), dim=1)),
    ),
)


def check_representation_distance(representation_distance) -> _engine.Result:
    """``representation_distance(model, x, x_adv)``: ``||phi(x) - phi(x_adv)||_2`` per image."""
    return _engine.run(DISTANCE, representation_distance)
