"""labkit.checks for lesson 13 (features and shortcuts): right answers pass, each typical
mistake of the non-robust data set, the robust data set and the search for a Clever Hans
model's shortcut gets its hint, a stub is "not implemented yet", labkit's own functions are
refused, and no hint shows the reference's values."""
import pytest
import torch
import torch.nn.functional as F

from labkit import attacks, checks, models, shortcuts
from labkit.checks import _engine, lesson13
from test_checks import assert_no_reference_values, expect_hint, run_check, stub


# ------------------------------------------------------------------ answers written apart from the reference

def nonrobust_batch(model, x, y, target, eps, steps, labels="target", targeted=True, goal="target", norm="l2"):
    aim = target if goal == "target" else y
    moved = attacks.pgd(model, x, aim, eps=eps, steps=steps, norm=norm, targeted=targeted)
    return moved, (target if labels == "target" else y)


def nonrobust_by_hand(model, x, y, target, eps, steps):
    """A student's own loop: targeted L2 PGD written out."""
    x_t = x.clone()
    for _ in range(steps):
        x_t.requires_grad_(True)
        loss = F.cross_entropy(model(x_t), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_t)
        g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = x_t.detach() - 2.5 * eps / steps * g - x
        delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
        x_t = (x + delta).clamp(0, 1)
    return x_t.detach(), target.clone()


def phi(model, x):
    captured = []
    handle = models.classifier_layer(model).register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1)


def robust_batch(model, x, start, steps, lr, maximize=False, clamp=True, power=1, backward=False):
    with torch.no_grad():
        goal = phi(model, x)
    x_r = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_r], lr=lr, maximize=maximize)
    for _ in range(steps):
        loss = ((phi(model, x_r) - goal).norm(dim=1) ** power).sum()
        if backward:
            optimizer.zero_grad()
            loss.backward()
        else:
            (x_r.grad,) = torch.autograd.grad(loss, x_r)
        optimizer.step()
        if clamp:
            with torch.no_grad():
                x_r.clamp_(0, 1)
    return x_r.detach()


def suspicious_region(maps, size, signed=False, first=False):
    """A student's double loop over the windows."""
    chosen = maps[:1] if first else maps
    mean = chosen.mean(0) if signed else chosen.abs().mean(0)
    best, where = None, None
    for r in range(mean.shape[0] - size + 1):
        for c in range(mean.shape[1] - size + 1):
            value = mean[r:r + size, c:c + size].sum()
            if best is None or value > best:
                best, where = value, (r, c)
    return where


EXERCISES = {checks.check_nonrobust_batch: (nonrobust_batch, lesson13.nonrobust_batch,
                                            lambda m, x, y, t, e, s: shortcuts.nonrobust_dataset(m, x, t, eps=e, steps=s)),
             checks.check_robust_batch: (robust_batch, lesson13.robust_batch,
                                         lambda m, x, s, n, lr: shortcuts.robust_dataset(m, x, s, steps=n, lr=lr)),
             checks.check_suspicious_region: (suspicious_region, None, None)}


@pytest.mark.parametrize("check", EXERCISES, ids=[c.__name__ for c in EXERCISES])
def test_right_answer_passes_and_labkits_is_refused(check):
    right, reference, public = EXERCISES[check]
    for _ in range(3):
        assert run_check(check, right) == (True, "")
    if public is not None:
        expect_hint(check, public, "write your own implementation")
    passed, hint = run_check(check, stub)
    assert not passed and hint.startswith("not implemented yet")


def test_equivalent_answers_pass():
    assert run_check(checks.check_nonrobust_batch, nonrobust_by_hand) == (True, "")
    assert run_check(checks.check_suspicious_region, lambda m, s: torch.tensor(suspicious_region(m, s))) == (True, "")
    assert run_check(checks.check_suspicious_region, lambda m, s: list(suspicious_region(m, s))) == (True, "")
    # Adam does not care about a constant factor of the loss: the mean over the images is as good
    assert run_check(checks.check_robust_batch, lambda m, x, s, n, lr: _mean_loss(m, x, s, n, lr)) == (True, "")


def _mean_loss(model, x, start, steps, lr):
    with torch.no_grad():
        goal = phi(model, x)
    x_r = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_r], lr=lr)
    for _ in range(steps):
        (x_r.grad,) = torch.autograd.grad((phi(model, x_r) - goal).norm(dim=1).mean() * len(x), x_r)
        optimizer.step()
        with torch.no_grad():
            x_r.clamp_(0, 1)
    return x_r.detach()


def test_the_references_are_labkits_functions():
    with _engine.accepting_reference():
        for check in (checks.check_robust_batch, checks.check_suspicious_region):
            assert run_check(check, getattr(lesson13, check.__name__.removeprefix("check_"))) == (True, "")
        assert run_check(checks.check_nonrobust_batch,
                         lambda m, x, y, t, e, s: shortcuts.nonrobust_dataset(m, x, t, eps=e, steps=s)) == (True, "")


CASES = [
    (checks.check_nonrobust_batch, lambda *a: nonrobust_batch(*a, labels="y"), "is its target class"),
    (checks.check_nonrobust_batch, lambda *a: nonrobust_batch(*a, targeted=False), "must be targeted"),
    (checks.check_nonrobust_batch, lambda *a: nonrobust_batch(*a, targeted=False, goal="y"), "away from its own class"),
    (checks.check_nonrobust_batch, lambda *a: nonrobust_batch(*a, norm="linf"), "L2 attack"),
    (checks.check_nonrobust_batch, lambda m, x, y, t, e, s: nonrobust_batch(m, x, y, t, e, s - 1), "one step too few"),
    (checks.check_nonrobust_batch, lambda m, x, y, t, e, s: nonrobust_batch(m, x, y, t, e, s)[0], "(images, labels)"),
    (checks.check_nonrobust_batch, lambda m, x, y, t, e, s: (attacks.pgd(m, x, t, eps=e, step_size=e / s, steps=s,
                                                                          norm="l2", targeted=True), t), "2.5 * eps / steps"),
    (checks.check_nonrobust_batch, lambda m, x, y, t, e, s: (attacks.pgd(m, x, t, eps=2 * e, steps=s, norm="l2",
                                                                          targeted=True), t), "further than eps"),
    (checks.check_robust_batch, lambda *a: robust_batch(*a, maximize=True), "you climbed it"),
    (checks.check_robust_batch, lambda *a: robust_batch(*a, clamp=False), "clamp to [0, 1]"),
    (checks.check_robust_batch, lambda *a: robust_batch(*a, power=2), "not its square"),
    (checks.check_robust_batch, lambda m, x, s, n, lr: robust_batch(m, s, x, n, lr), "swapped"),
    (checks.check_robust_batch, lambda m, x, s, n, lr: robust_batch(m, x, x, n, lr), "start from `start`"),
    (checks.check_robust_batch, lambda m, x, s, n, lr: s.clone(), "start image unchanged"),
    (checks.check_robust_batch, lambda *a: robust_batch(*a, backward=True), "left gradients"),
    (checks.check_robust_batch, lambda m, x, s, n, lr: robust_batch(m, x, s, n + 1, lr), "one step too many"),
    (checks.check_suspicious_region, lambda m, s: suspicious_region(m, s)[::-1], "(col, row)"),
    (checks.check_suspicious_region, lambda m, s: suspicious_region(m, s, signed=True), "magnitude"),
    (checks.check_suspicious_region, lambda m, s: suspicious_region(m.mean(0, keepdim=True).abs(), s), "magnitude"),
    (checks.check_suspicious_region, lambda m, s: suspicious_region(m, s, first=True), "one image can mislead"),
    (checks.check_suspicious_region, lambda m, s: suspicious_region(m, 1), "not single pixels"),
    (checks.check_suspicious_region, lambda m, s: tuple(v + s // 2 for v in suspicious_region(m, s)), "top-left"),
    (checks.check_suspicious_region, lambda m, s: None, "(row, col)"),
    (checks.check_suspicious_region, lambda m, s: (1.5, 2.0), "(row, col)"),
]


@pytest.mark.parametrize("check, wrong, hint", CASES, ids=[f"{c.__name__}-{hint}" for c, _, hint in CASES])
def test_typical_mistake_gets_its_hint(check, wrong, hint):
    for _ in range(2):  # on two sets of fresh inputs
        expect_hint(check, wrong, hint)


def test_hints_never_show_reference_values(capsys):
    for check, wrong, _ in CASES:
        check(wrong)
    assert_no_reference_values(capsys.readouterr().out)
