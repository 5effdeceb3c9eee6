"""The adversaries of labkit.train.fit: PGD (Madry et al.), the FGSM mixed loss
alpha * J(x) + (1 - alpha) * J(x_adv) (Goodfellow et al.) and the consistent loss that adds
beta * ||phi(x) - phi(x_adv)||_2 on the representation (Dong et al., as in the seed slides)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attack_setup import fixed_images, standard_model
from labkit import attacks
from labkit.models import features
from labkit.train import ConsistencyAdversary, FGSMMixedAdversary, PGDAdversary

ADVERSARIES = {
    "pgd": PGDAdversary(eps=0.1, steps=2),
    "fgsm-mixed": FGSMMixedAdversary(eps=0.1),
    "consistency": ConsistencyAdversary(eps=0.1),
}


@pytest.fixture
def model():
    return standard_model()


@pytest.fixture(scope="module")
def batch():
    return fixed_images(16)


def test_defaults_are_the_seeds():
    assert FGSMMixedAdversary(eps=0.1).alpha == 0.5
    assert (ConsistencyAdversary(eps=0.1).alpha, ConsistencyAdversary(eps=0.1).beta) == (0.5, 0.1)


@pytest.mark.parametrize("name", ADVERSARIES)
def test_loss_is_finite_and_reaches_every_parameter(model, batch, name):
    x, y = batch
    model.train()
    loss = ADVERSARIES[name].loss(model, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name
    assert model.training


@pytest.mark.parametrize("name", ADVERSARIES)
def test_the_adversarial_example_is_in_the_scaled_eps_ball(model, batch, name):
    """Recorded at the model's input: the last forward pass trains on x_adv (the consistent
    loss on ``cat([x, x_adv])``); it lies within eps * eps_scale of x, in [0, 1], is crafted
    with dropout off, and raises the loss."""
    x, y = batch
    model.train()
    seen = []
    handle = model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    try:
        ADVERSARIES[name].loss(model, x, y, eps_scale=0.5)
    finally:
        handle.remove()
    x_adv = seen[-1][len(x):] if len(seen[-1]) == 2 * len(x) else seen[-1]
    distance = (x_adv - x).abs().amax()
    assert 0.5 * 0.05 < distance <= 0.05 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    if name != "pgd":
        assert torch.equal(x_adv, attacks.fgsm(model, x, y, eps=0.05))
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_alpha_one_is_clean_cross_entropy_and_zero_the_fgsm_one(model, batch):
    x, y = batch
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        fgsm = F.cross_entropy(model(attacks.fgsm(model, x, y, eps=0.1)), y)
        torch.testing.assert_close(FGSMMixedAdversary(eps=0.1, alpha=1.0).loss(model, x, y), clean)
        torch.testing.assert_close(FGSMMixedAdversary(eps=0.1, alpha=0.0).loss(model, x, y), fgsm)
        torch.testing.assert_close(FGSMMixedAdversary(eps=0.1, alpha=0.3).loss(model, x, y),
                                   0.3 * clean + 0.7 * fgsm)


def test_beta_zero_is_the_mixed_loss_and_beta_adds_the_representation_distance(model, batch):
    x, y = batch
    with torch.no_grad():
        mixed = FGSMMixedAdversary(eps=0.1, alpha=0.3).loss(model, x, y)
        torch.testing.assert_close(ConsistencyAdversary(eps=0.1, alpha=0.3, beta=0.0).loss(model, x, y), mixed)
        distance = (features(model, x) - features(model, attacks.fgsm(model, x, y, eps=0.1))).norm(dim=1).mean()
        torch.testing.assert_close(ConsistencyAdversary(eps=0.1, alpha=0.3, beta=0.5).loss(model, x, y),
                                   mixed + 0.5 * distance)


def test_consistency_term_vanishes_for_an_unperturbed_image_in_train_mode(model, batch):
    """Dropout draws a mask per image: phi must be read before it, or phi(x) - phi(x) != 0."""
    x, y = batch
    model.train()
    losses = []
    for beta in (0.0, 1.0):
        torch.manual_seed(0)
        losses.append(ConsistencyAdversary(eps=0.0, beta=beta).loss(model, x, y))
    torch.testing.assert_close(losses[1], losses[0])


def test_pgd_adversary_trains_on_the_pgd_attack(model, batch):
    x, y = batch
    adversary = PGDAdversary(eps=0.1, steps=3, random_start=False)
    with torch.no_grad():
        expected = F.cross_entropy(model(attacks.pgd(model, x, y, eps=0.1, step_size=2.5 * 0.1 / 3, steps=3)), y)
        torch.testing.assert_close(adversary.loss(model, x, y), expected)
