"""Lesson 04's check (targeted L2 PGD): a right answer passes on fresh inputs, each typical
mistake gets its hint, a stub is "not implemented", labkit's PGD is refused, and the hints show
no values of the reference."""
import pytest
import torch
import torch.nn.functional as F

from labkit import attacks, checks
from labkit.checks import _engine, lesson04
from test_checks import assert_no_reference_values, expect_hint, run_check, stub


def loss_gradient(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), target), x)
    return grad


def lengths(t):
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def targeted_l2_pgd(model, x, target, eps, step_size, steps, direction=lambda g: g / lengths(g),
                    project=lambda d, eps: d * (eps / lengths(d)).clamp(max=1), sign=-1, clamp=True):
    x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv + sign * step_size * direction(loss_gradient(model, x_adv, target))
        if project is not None:
            x_adv = x + project(x_adv - x, eps)
        if clamp:
            x_adv = x_adv.clamp(0, 1)
    return x_adv


def variant(**changes):
    def wrong(model, x, target, eps, step_size, steps):
        return targeted_l2_pgd(model, x, target, eps, step_size, steps, **changes)
    return wrong


MISTAKES = [
    (variant(project=None), "project back onto the L2 ball"),
    (variant(clamp=False), "clamp the image to [0, 1]"),
    (variant(sign=+1), "went up the loss of the target class"),
    (variant(direction=torch.sign), "not along its sign"),
    (variant(project=lambda d, eps: d * eps / lengths(d)), "only shrink"),
    (variant(project=lambda d, eps: d / lengths(d)), "not to length 1"),
    (variant(direction=lambda g: g / g.norm()), "not by the norm of the whole batch"),
    (variant(direction=lambda g: g), "normalize the step"),
    (lambda m, x, t, eps, ss, steps: x + (lambda d: d * (eps / lengths(d)).clamp(max=1))(
        variant(project=None)(m, x, t, eps, ss, steps) - x), "not once at the end"),
    (lambda m, x, t, eps, ss, steps: targeted_l2_pgd(m, x, t, eps, eps, steps), "not by eps"),
    (lambda m, x, t, eps, ss, steps: targeted_l2_pgd(m, x, t, eps, ss / 2, steps), "the pattern is right"),
]


def test_right_answer_passes_on_many_fresh_inputs():
    for _ in range(4):
        assert run_check(checks.check_targeted_l2_pgd, targeted_l2_pgd) == (True, "")


def test_reference_passes_when_allowed_and_equals_a_hand_written_pgd():
    with _engine.accepting_reference():
        assert run_check(checks.check_targeted_l2_pgd, lesson04.targeted_l2_pgd) == (True, "")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x, target = torch.rand(2, 1, 4, 4), torch.tensor([1, 2])
    assert torch.allclose(lesson04.targeted_l2_pgd(model, x, target, 0.5, 0.2, 4),
                          targeted_l2_pgd(model, x, target, 0.5, 0.2, 4), atol=1e-6)


def test_labkits_pgd_is_refused():
    expect_hint(checks.check_targeted_l2_pgd, lesson04.targeted_l2_pgd, "write your own implementation")
    expect_hint(checks.check_targeted_l2_pgd,
                lambda m, x, t, eps, ss, steps: attacks.pgd(m, x, t, eps, ss, steps, norm="l2", targeted=True),
                "write your own implementation")


def test_the_placeholder_is_not_implemented_yet(capsys):
    passed, hint = run_check(checks.check_targeted_l2_pgd, stub)
    assert not passed and hint.startswith("not implemented yet")
    assert capsys.readouterr().out.count("\n") == 1


def test_every_typical_mistake_of_the_spec_is_tested():
    assert len(MISTAKES) - 1 >= len({m.hint for m in lesson04.TARGETED_L2_PGD.mistakes})


@pytest.mark.parametrize("wrong, hint", MISTAKES, ids=[h for _, h in MISTAKES])
def test_typical_mistake_gets_its_hint(wrong, hint):
    for _ in range(2):  # on two sets of fresh inputs
        expect_hint(checks.check_targeted_l2_pgd, wrong, hint)


def test_hints_never_show_reference_values(capsys):
    for wrong, _ in MISTAKES:
        checks.check_targeted_l2_pgd(wrong)
    assert_no_reference_values(capsys.readouterr().out)
