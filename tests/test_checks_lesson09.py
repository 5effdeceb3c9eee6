"""Lesson 09's checks (the FGSM mixed loss, the representation distance): a right answer
passes, each typical mistake gets its hint, a stub is "not implemented yet", labkit's own
implementation is refused. The student answers here are written independently of the checks'
mistake models."""
import pytest
import torch
import torch.nn.functional as F

from labkit import checks, models, train
from labkit.checks import _engine, lesson09


def run_check(check, function):
    before = len(checks.results())
    check(function)
    results = checks.results()
    assert len(results) == before + 1
    return results[-1]["passed"], results[-1]["hint"]


def stub(*args, **kwargs):
    raise NotImplementedError("replace this line with your code")


# ------------------------------------------------------------------ the FGSM mixed loss

def fgsm_mixed_loss(model, x, y, eps, alpha, *, weights=None, step=1.0, sign=True, clamp=True,
                    reduction="mean", softmax=False, detach=False):
    """A student's mixed loss, with switches for the typical mistakes."""
    x_copy = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_copy), y), x_copy)
    x_adv = x + step * eps * (grad.sign() if sign else grad)
    if clamp:
        x_adv = x_adv.clamp(0, 1)

    def loss(images):
        logits = model(images)
        return F.cross_entropy(logits.softmax(1) if softmax else logits, y, reduction=reduction)

    clean_weight, adversarial_weight = weights(alpha) if weights else (alpha, 1 - alpha)
    total = clean_weight * loss(x) + adversarial_weight * loss(x_adv.detach())
    return total.detach() if detach else total


def with_options(**options):
    return lambda model, x, y, eps, alpha: fgsm_mixed_loss(model, x, y, eps, alpha, **options)


def test_a_right_mixed_loss_passes_on_many_fresh_inputs_and_can_train():
    for _ in range(4):
        assert run_check(checks.check_fgsm_mixed_loss, fgsm_mixed_loss) == (True, "")


def test_the_mixed_loss_reference_is_labkits_training_loss():
    """The check's reference agrees with an independent computation, and the loss trains."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    expected = fgsm_mixed_loss(model, x, y, 0.1, 0.3)
    torch.testing.assert_close(lesson09.fgsm_mixed_loss(model, x, y, 0.1, 0.3), expected.detach())
    expected.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_detached_mixed_loss_is_told_it_cannot_train():
    passed, hint = run_check(checks.check_fgsm_mixed_loss, with_options(detach=True))
    assert not passed and "detached from the model" in hint
    passed, hint = run_check(checks.check_fgsm_mixed_loss,
                             lambda *args: fgsm_mixed_loss(*args).item())
    assert not passed and "returned a float" in hint


def test_a_mixed_loss_that_calls_backward_is_told_to_leave_grad_alone():
    def with_backward(model, x, y, eps, alpha):
        x_copy = x.detach().clone().requires_grad_(True)
        F.cross_entropy(model(x_copy), y).backward()
        x_adv = (x + eps * x_copy.grad.sign()).clamp(0, 1)
        return alpha * F.cross_entropy(model(x), y) + (1 - alpha) * F.cross_entropy(model(x_adv), y)

    passed, hint = run_check(checks.check_fgsm_mixed_loss, with_backward)
    assert not passed and ".grad" in hint


MIXED_MISTAKES = [
    (dict(weights=lambda a: (1 - a, a)), "the weights are swapped"),
    (dict(weights=lambda a: (1.0, 1.0)), "not their plain sum"),
    (dict(weights=lambda a: (0.0, 1.0)), "on the FGSM images alone"),
    (dict(weights=lambda a: (1.0, 0.0)), "on the clean images alone"),
    (dict(weights=lambda a: (a, 0.0)), "clean part alone"),
    (dict(step=-1.0), "step down the loss"),
    (dict(clamp=False), "clamp the FGSM images"),
    (dict(sign=False), "not the raw gradient"),
    (dict(reduction="sum"), "do not sum it"),
    (dict(softmax=True), "do not apply softmax"),
]


@pytest.mark.parametrize("options, hint", MIXED_MISTAKES, ids=[h for _, h in MIXED_MISTAKES])
def test_typical_mixed_loss_mistake_gets_its_hint(options, hint):
    for _ in range(2):
        passed, got = run_check(checks.check_fgsm_mixed_loss, with_options(**options))
        assert not passed and hint in got, got


# ------------------------------------------------------------------ the representation distance

def representation(model, x):
    """phi(x) with a hook on the last linear layer, as a student might write it."""
    captured = []
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    handle = last.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return captured[0].flatten(1), logits


def representation_distance(model, x, x_adv, *, power=None, relative=False, use_logits=False):
    (phi, logits), (phi_adv, logits_adv) = representation(model, x), representation(model, x_adv)
    if use_logits:
        phi, phi_adv = logits, logits_adv
    difference = phi - phi_adv
    distance = difference.abs().sum(1) if power == 1 else difference.pow(2).sum(1) if power == 2 \
        else difference.norm(dim=1)
    return distance / phi.norm(dim=1) if relative else distance


def test_a_right_distance_passes_also_through_labkits_features():
    for _ in range(3):
        assert run_check(checks.check_representation_distance, representation_distance) == (True, "")
    with_features = lambda model, x, x_adv: (models.features(model, x) - models.features(model, x_adv)).norm(dim=1)
    assert run_check(checks.check_representation_distance, with_features) == (True, "")


def test_the_distance_of_an_image_to_itself_is_zero():
    model = lesson09.tiny_cnn(1, 4)
    x = torch.rand(3, 1, 8, 8)
    assert lesson09.representation_distance(model, x, x.clone()).abs().max() == 0


DISTANCE_MISTAKES = [
    (dict(power=2), "squared distance"),
    (dict(power=1), "L1 distance"),
    (dict(relative=True), "not divided by"),
    (dict(use_logits=True), "not the logits"),
]


@pytest.mark.parametrize("options, hint", DISTANCE_MISTAKES, ids=[h for _, h in DISTANCE_MISTAKES])
def test_typical_distance_mistake_gets_its_hint(options, hint):
    for _ in range(2):
        passed, got = run_check(checks.check_representation_distance,
                                lambda model, x, x_adv: representation_distance(model, x, x_adv, **options))
        assert not passed and hint in got, got


def test_the_image_distance_and_a_batch_mean_are_named():
    passed, hint = run_check(checks.check_representation_distance,
                             lambda model, x, x_adv: (x - x_adv).flatten(1).norm(dim=1))
    assert not passed and "distance between the images" in hint
    passed, hint = run_check(checks.check_representation_distance,
                             lambda model, x, x_adv: representation_distance(model, x, x_adv).mean())
    assert not passed and "batch dimension is missing" in hint


# ------------------------------------------------------------------ both checks

def labkits_training_loss(model, x, y, eps, alpha):
    return train.FGSMMixedAdversary(eps, alpha).loss(model, x, y)


BOTH = {  # check: (labkit's answer, as a student would hand it in; what labkit's check compares with)
    checks.check_fgsm_mixed_loss: (labkits_training_loss, lesson09.fgsm_mixed_loss),
    checks.check_representation_distance: (lesson09.representation_distance, lesson09.representation_distance),
}


@pytest.mark.parametrize("check", BOTH, ids=[c.__name__ for c in BOTH])
def test_labkits_own_answer_passes_when_allowed_and_is_refused_otherwise(check):
    answer, reference = BOTH[check]
    with _engine.accepting_reference():
        assert run_check(check, answer) == (True, "")
    for refused in (answer, reference, lambda *args: reference(*args)):
        passed, hint = run_check(check, refused)
        assert not passed and "write your own implementation" in hint


@pytest.mark.parametrize("check", BOTH, ids=[c.__name__ for c in BOTH])
def test_the_placeholder_is_not_implemented_yet(check):
    passed, hint = run_check(check, stub)
    assert not passed and hint.startswith("not implemented yet")


def test_not_a_function_gets_the_engines_hint():
    passed, hint = run_check(checks.check_fgsm_mixed_loss, 0.5)
    assert not passed and "pass your function itself" in hint
