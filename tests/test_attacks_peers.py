"""labkit.attacks against torchattacks (a test-only peer) on FashionCNN.

Conventions that differ, and how the comparisons line them up:
- torchattacks averages the cross-entropy over the batch, labkit sums it (so an image's step
  does not depend on its batch-mates). Signs and unit directions are unchanged by the scale,
  and with a batch size that is a power of two the scale is exact, so L-inf results are
  bit-identical; hence BATCH = 64.
- Random starts: both draw from torch's global generator in the same order (uniform per pixel
  for L-inf; a normal direction, then a uniform radius for L2), so seeding torch alike before
  each call gives both the same start.
- PGDL2 adds ``eps_for_division=1e-10`` to the gradient norm, labkit clamps the norm at 1e-12
  instead; with ``eps_for_division=0`` the two are bit-identical. With the default, the 1e-10
  can move a ReLU or max-pool switch after a few steps, and single pixels drift apart.
- torchattacks switches the model to eval for the attack (and back to train afterwards);
  labkit does the same and warns. Its DeepFool calls ``.backward()``, which leaves gradients in
  the model's parameters (labkit leaves ``.grad`` untouched); it loops over images and classes,
  labkit over classes only, each backward pass batched over the images.
- DeepFool: torchattacks multiplies every step by (1 + overshoot) and clips it to [0, 1];
  labkit follows the paper's code (overshoot on the summed perturbation, each step 1e-4
  longer). The first steps agree to 2e-4 and are compared here; afterwards torchattacks'
  iterates can settle onto the decision boundary without crossing it (see the benchmark's
  fooled rates), so full runs are not compared pixel by pixel; labkit's success rate is a
  property test in test_attacks.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import labkit.attacks as attacks
from attack_setup import fixed_images, standard_model

torchattacks = pytest.importorskip("torchattacks")

pytestmark = pytest.mark.peers
BATCH = 64


@pytest.fixture(scope="module")
def model():
    return standard_model()


@pytest.fixture(scope="module")
def data():
    return fixed_images(BATCH)


def _fooled_rate(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


def _targets(y):
    return (y + 1 + torch.arange(len(y)) % 9) % 10  # a different target per image, never the label


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_is_identical(model, data, targeted):
    x, y = data
    labels = _targets(y) if targeted else y
    ours = attacks.fgsm(model, x, labels, eps=0.05, targeted=targeted)
    peer = torchattacks.FGSM(model, eps=0.05)
    if targeted:
        peer.set_mode_targeted_by_label(quiet=True)
    assert torch.equal(ours, peer(x, labels))


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_linf_with_the_same_random_start_is_identical(model, data, targeted):
    x, y = data
    labels = _targets(y) if targeted else y
    torch.manual_seed(7)
    ours = attacks.pgd(model, x, labels, eps=0.1, step_size=0.02, steps=8, targeted=targeted,
                       random_start=True)
    peer = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=8, random_start=True)
    if targeted:
        peer.set_mode_targeted_by_label(quiet=True)
    torch.manual_seed(7)
    theirs = peer(x, labels)
    assert torch.equal(ours, theirs)
    assert _fooled_rate(model, ours, y) == _fooled_rate(model, theirs, y)


def test_pgd_l2_with_the_same_random_start_is_identical(model, data):
    x, y = data
    torch.manual_seed(3)
    ours = attacks.pgd(model, x, y, eps=1.5, step_size=0.3, steps=8, norm="l2", random_start=True)
    torch.manual_seed(3)
    theirs = torchattacks.PGDL2(model, eps=1.5, alpha=0.3, steps=8, random_start=True,
                                eps_for_division=0)(x, y)
    assert torch.equal(ours, theirs)


def test_deepfool_first_step_is_allclose(model, data):
    """One step is the same linear algebra in both (Jacobian, nearest linearized boundary,
    overshoot, clip); labkit's step is 1e-4 longer in L2, as in the paper's code. torchattacks
    works on one image at a time, labkit on the batch, whose convolutions round differently
    (~1e-6), which on a rare image moves a ReLU or max-pool switch: so labkit is compared image
    by image, and its batched steps by direction."""
    x = data[0][:32]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    theirs = torchattacks.DeepFool(model, steps=1)(x, predicted)
    one_by_one = torch.cat([attacks.deepfool(model, x[i:i + 1], steps=1) for i in range(len(x))])
    torch.testing.assert_close(one_by_one, theirs, atol=2e-4, rtol=0)
    batched = attacks.deepfool(model, x, steps=1)
    cosine = F.cosine_similarity((batched - x).flatten(1), (theirs - x).flatten(1))
    assert (batched != x).any() and cosine.min() > 0.999
