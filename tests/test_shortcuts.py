"""labkit.shortcuts: the non-robust and robust data sets of Ilyas et al. 2019 and the Clever
Hans watermark. The targeted attack reaches its target on the model it attacks, the
representation distance falls (exactly as predicted for a model whose representation is the
image itself), and every call leaves the model as it was."""
import pytest
import torch
from torch import nn

from attack_setup import fixed_images, trained_model
from labkit import attacks, shortcuts
from labkit.models import features
from test_attribution import assert_same_state, model_state


def prepared(model):
    """In train mode, with a user's hook and a .grad set: what a call must leave alone."""
    model.train()
    model.conv1.register_forward_hook(lambda *args: None)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    return model


def test_nonrobust_images_reach_their_target_and_are_relabelled():
    model = trained_model("fmnist-cnn")
    x, y = fixed_images(32)
    target = (y + 1 + torch.arange(32) % 9) % 10
    x_t, labels = shortcuts.nonrobust_dataset(model, x, target, eps=2.0, steps=10)
    assert torch.equal(labels, target) and not torch.equal(labels, y)
    assert (x_t - x).flatten(1).norm(dim=1).max() <= 2.0 + 1e-4 and 0 <= x_t.min() and x_t.max() <= 1
    with torch.no_grad():
        before, after = model(x).argmax(1), model(x_t).argmax(1)
    assert (before == target).float().mean() < 0.2  # the targets are other classes...
    assert (after == target).float().mean() >= 0.9  # ...that the small attack reaches
    # it is targeted PGD, nothing else
    assert torch.equal(x_t, attacks.pgd(model, x, target, eps=2.0, steps=10, norm="l2", targeted=True))


def test_robust_dataset_takes_adams_first_step_on_a_linear_representation():
    """phi(x) = x (one linear layer on the flattened image): the gradient of ||x_r - x|| is the
    unit vector (x_r - x) / ||x_r - x||, and Adam's first step, bias-corrected, is lr times the
    sign of the gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    x, start = torch.rand(4, 1, 6, 6), torch.rand(4, 1, 6, 6)
    x_r = shortcuts.robust_dataset(model, x, start, steps=1, lr=0.1)
    assert torch.allclose(x_r, (start - 0.1 * (start - x).sign()).clamp(0, 1), atol=1e-5)
    more = shortcuts.robust_dataset(model, x, start, steps=30, lr=0.05)
    assert ((more - x).flatten(1).norm(dim=1) < 0.5 * (start - x).flatten(1).norm(dim=1)).all()


def test_robust_dataset_lowers_the_robust_models_representation_distance():
    model = trained_model("fmnist-cnn-robust")
    x, _ = fixed_images(8)
    start, _ = fixed_images(8, start=100)
    goal = features(model, x)
    x_r = shortcuts.robust_dataset(model, x, start, steps=30, lr=0.1)
    with torch.no_grad():
        before = shortcuts.representation_distance(model, start, goal)
        after = shortcuts.representation_distance(model, x_r, goal)
    assert (after < 0.6 * before).all()
    assert 0 <= x_r.min() and x_r.max() <= 1


@pytest.mark.parametrize("call", ["nonrobust", "robust"])
def test_calls_leave_the_model_as_it_was(call):
    torch.manual_seed(0)
    from labkit.models import FashionCNN
    model = prepared(FashionCNN())
    x = torch.rand(3, 1, 28, 28)
    before = model_state(model)
    with pytest.warns(UserWarning, match="train mode"):
        if call == "nonrobust":
            shortcuts.nonrobust_dataset(model, x, torch.tensor([1, 2, 3]), eps=0.5, steps=2)
        else:
            shortcuts.robust_dataset(model, x, torch.rand(3, 1, 28, 28), steps=2)
    assert_same_state(before, model_state(model))


def test_bad_inputs_say_what_was_expected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="one class per image"):
        shortcuts.nonrobust_dataset(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one image per image of x"):
        shortcuts.robust_dataset(model, x, torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        shortcuts.watermark(x, corner=(2, 2), size=3)


def test_watermark_marks_exactly_the_square_on_a_copy():
    x = torch.zeros(2, 1, 8, 8)
    marked = shortcuts.watermark(x, corner=(5, 4), size=3, value=0.9)
    assert x.abs().sum() == 0  # the input is left alone
    assert torch.equal(marked[:, :, 5:8, 4:7], torch.full((2, 1, 3, 3), 0.9))
    assert marked.sum().item() == pytest.approx(2 * 9 * 0.9)
