"""labkit.checks for lesson 06 (feature visualization): the right gradient ascent passes, each
typical mistake gets its hint, a stub is "not implemented yet", labkit's own maximize is refused."""
import math

import pytest
import torch

from labkit import checks, featvis
from labkit.checks import _engine, lesson06
from test_checks import assert_no_reference_values, expect_hint, run_check, stub


def visualize_class(model, x0, target, steps, lr, l2_decay=0.0, score=None, sign=+1, per_image=True,
                    clamp=True, decay="after", step_length=None):
    """The right answer, or with one piece changed (for the mistakes)."""
    x = x0.clone()
    for _ in range(steps):
        if decay == "before":
            x = (1 - l2_decay) * x
        x_copy = x.detach().requires_grad_(True)
        logits = model(x_copy)
        chosen = (score or (lambda z, t: z))(logits, target)[torch.arange(len(x)), target]
        (g,) = torch.autograd.grad(chosen.sum(), x_copy)
        norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if per_image else g.norm()
        length = math.sqrt(x[0].numel()) if step_length is None else step_length
        x = x + sign * lr * length * g / norm
        if clamp:
            x = x.clamp(0, 1)
        if decay == "after":
            x = (1 - l2_decay) * x
        elif decay == "kept":
            x = l2_decay * x
    return x.detach()


def variant(**changes):
    def wrong(model, x0, target, steps, lr, l2_decay=0.0):
        return visualize_class(model, x0, target, steps, lr, l2_decay, **changes)
    return wrong


def labkit_maximize(model, x0, target, steps, lr, l2_decay=0.0):
    return featvis.maximize(model, [featvis.ClassLogit(int(t)) for t in target], x0=x0, steps=steps, lr=lr,
                            regularization=featvis.Regularization(l2_decay=l2_decay), progress=False)


def test_right_answer_passes_on_fresh_inputs():
    for _ in range(4):
        assert run_check(checks.check_visualize_class, visualize_class) == (True, "")


def test_the_reference_is_maximize_with_the_l2_prior():
    with _engine.accepting_reference():
        assert run_check(checks.check_visualize_class, lesson06.visualize_class) == (True, "")


def test_the_ascent_raises_the_target_logit():
    torch.manual_seed(0)
    model = checks._cases.tiny_cnn(1, 5)
    x0 = torch.rand(4, 1, 8, 8) * 0.5
    target = torch.tensor([0, 1, 2, 3])
    x = visualize_class(model, x0, target, 10, 0.05)
    with torch.no_grad():
        assert (model(x)[torch.arange(4), target] > model(x0)[torch.arange(4), target]).all()


def test_stub_and_labkits_own_are_refused():
    passed, hint = run_check(checks.check_visualize_class, stub)
    assert not passed and hint.startswith("not implemented yet")
    expect_hint(checks.check_visualize_class, labkit_maximize, "write your own implementation")
    expect_hint(checks.check_visualize_class, lesson06.visualize_class, "write your own implementation")


MISTAKES = [
    (variant(sign=-1), "went down the gradient"),
    (variant(score=lambda z, t: z.softmax(1)), "softmax probability"),
    (variant(score=lambda z, t: z.log_softmax(1)), "softmax probability (or its log"),
    (lambda m, x0, t, s, lr, d=0.0: variant()(m, x0, t[:1].expand_as(t), s, lr, d), "target[0]"),
    (variant(per_image=False), "not by the norm of the whole batch"),
    (variant(step_length=1.0), "left out sqrt(D)"),
    (variant(clamp=False), "clamp the image to [0, 1]"),
    (variant(decay="none"), "ignored l2_decay"),
    (variant(decay="kept"), "not l2_decay * x"),
    (variant(decay="before"), "not before the step"),
    (lambda m, x0, t, s, lr, d=0.0: x0.clone(), "compute the gradient anew at every step"),
]


@pytest.mark.parametrize("wrong, hint", MISTAKES, ids=[hint for _, hint in MISTAKES])
def test_typical_mistake_gets_its_hint(wrong, hint):
    for _ in range(2):
        expect_hint(checks.check_visualize_class, wrong, hint)


def test_a_gradient_left_on_the_input_is_caught():
    def in_place(model, x0, target, steps, lr, l2_decay=0.0):
        x0.requires_grad_(True)
        return visualize_class(model, x0.detach(), target, steps, lr, l2_decay)

    expect_hint(checks.check_visualize_class, in_place, "set requires_grad on its input `x0`")


def test_hints_never_show_reference_values(capsys):
    for wrong, _ in MISTAKES:
        checks.check_visualize_class(wrong)
    assert_no_reference_values(capsys.readouterr().out)
