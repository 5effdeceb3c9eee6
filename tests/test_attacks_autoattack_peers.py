"""labkit.attacks.apgd / square against torchattacks' APGD, APGDT and Square (test-only peers):
with the same budget, robust accuracy within 1 point on 1,000 test images of the shipped
fmnist-cnn-robust at L-inf eps = 0.1.

Budgets are cut to fit CI on two cores (each test runs both libraries): APGD-CE 10 steps,
APGD-T 10 steps towards each of the 2 highest-scoring wrong classes, Square 60 queries; one
restart each. The implementations draw different random numbers (torchattacks seeds torch's
global generator, and its Square shares one square per iteration across the batch where labkit
draws one per image, as the paper's own code does), so the figures agree statistically, not
image by image.
"""
from __future__ import annotations

import pytest
import torch

import labkit.attacks as attacks
from attack_setup import fixed_images, trained_model

torchattacks = pytest.importorskip("torchattacks")

pytestmark = [pytest.mark.peers, pytest.mark.slow]
N, EPS = 1000, 0.1


@pytest.fixture(scope="module")
def robust():
    return trained_model("fmnist-cnn-robust")


@pytest.fixture(scope="module")
def data():
    return fixed_images(N)


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _agree(ours: float, peer: float) -> None:
    print(f"robust accuracy: labkit {100 * ours:.1f} %, torchattacks {100 * peer:.1f} %")  # shown with -s
    assert abs(ours - peer) <= 0.01


def test_apgd_ce_matches_torchattacks(robust, data):
    x, y = data
    ours = attacks.apgd(robust, x, y, eps=EPS, steps=10)
    peer = torchattacks.APGD(robust, norm="Linf", eps=EPS, steps=10, loss="ce", seed=0)(x, y)
    _agree(_accuracy(robust, ours, y), _accuracy(robust, peer, y))


def test_apgd_targeted_matches_torchattacks(robust, data):
    x, y = data
    n_targets = 2
    # torchattacks' APGDT attacks the classes ranked 2nd .. (n_classes)th by the clean logits
    peer = torchattacks.APGDT(robust, norm="Linf", eps=EPS, steps=10, n_classes=n_targets + 1, seed=0)(x, y)
    with torch.no_grad():
        ranked = robust(x).argsort(dim=1, descending=True)
        robust_now = ranked[:, 0] == y
    for k in range(1, n_targets + 1):
        idx = robust_now.nonzero()[:, 0]
        adv = attacks.apgd(robust, x[idx], y[idx], eps=EPS, steps=10, loss="dlr-targeted", target=ranked[idx, k])
        with torch.no_grad():
            robust_now[idx[robust(adv).argmax(1) != y[idx]]] = False
    _agree(robust_now.float().mean().item(), _accuracy(robust, peer, y))


def test_square_linf_matches_torchattacks(robust, data):
    x, y = data
    ours = attacks.square(robust, x, y, eps=EPS, queries=60)
    peer = torchattacks.Square(robust, norm="Linf", eps=EPS, n_queries=60, seed=0)(x, y)
    _agree(_accuracy(robust, ours, y), _accuracy(robust, peer, y))


def test_square_l2_pattern_is_torchattacks_eta():
    from labkit.attacks.square import square_pattern
    peer = torchattacks.Square.__new__(torchattacks.Square)
    peer.device = "cpu"
    for s in (3, 5, 7, 25):
        eta = peer.eta(s)  # torchattacks transposes it at random
        ours = square_pattern(s)
        assert min((eta - ours).abs().max(), (eta - ours.T).abs().max()) < 1e-6
