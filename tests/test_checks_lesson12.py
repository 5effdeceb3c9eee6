"""labkit.checks for lesson 12 (measuring attributions): right answers pass, each typical
infidelity and Gini mistake gets its hint, a stub is "not implemented yet", labkit's own
metrics are refused, and no hint shows the reference's values."""
import pytest
import torch

from labkit import checks
from labkit.attribution import metrics
from labkit.checks import _engine, lesson12
from test_checks import assert_no_reference_values, expect_hint, run_check, stub


def infidelity(model, x, target, attr, perturbations, score=lambda z, t: z[torch.arange(len(t)), t],
               sign=1.0, loss=lambda e: e ** 2):
    """A student's loop over the perturbations."""
    errors = []
    with torch.no_grad():
        original = score(model(x), target)
        for k in range(perturbations.shape[1]):
            noise = perturbations[:, k]
            change = original - score(model(x - sign * noise), target)
            errors.append(loss((noise * attr).sum(dim=(1, 2, 3)) - change))
    return torch.stack(errors, dim=1).mean(dim=1)


def gini(attr, magnitude=torch.abs, descending=False, first=1):
    values = magnitude(attr).flatten(1).sort(dim=1, descending=descending).values
    n = values.shape[1]
    i = torch.arange(first, n + first, dtype=values.dtype)
    return ((2 * i - n - 1) * values).sum(dim=1) / (n * values.sum(dim=1))


EXERCISES = {checks.check_infidelity: (infidelity, lesson12.infidelity, metrics.infidelity),
             checks.check_gini: (gini, lesson12.gini, metrics.sparseness)}


@pytest.mark.parametrize("check", EXERCISES, ids=[c.__name__ for c in EXERCISES])
def test_right_answer_passes_and_labkits_is_refused(check):
    right, reference, public = EXERCISES[check]
    for _ in range(3):
        assert run_check(check, right) == (True, "")
    with _engine.accepting_reference():
        assert run_check(check, reference) == (True, "")
    expect_hint(check, public, "write your own implementation")
    expect_hint(check, lambda *args: public(*args), "write your own implementation")
    passed, hint = run_check(check, stub)
    assert not passed and hint.startswith("not implemented yet")


def test_the_reference_is_zero_for_a_linear_model_and_its_weights():
    """f = w.x + b: I . w = f(x) - f(x - I) for every I, so the gradient has infidelity 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x, target = torch.rand(2, 1, 3, 4), torch.tensor([2, 0])
    weights = model[1].weight.detach()[target].view(2, 1, 3, 4)
    perturbations = torch.randn(2, 5, 1, 3, 4)
    assert lesson12.infidelity(model, x, target, weights, perturbations).abs().max() < 1e-10
    assert lesson12.infidelity(model, x, target, -weights, perturbations).min() > 1e-3


INFIDELITY_MISTAKES = [
    (lambda *a: infidelity(*a, sign=-1.0), "not x + I"),
    (lambda *a: _flipped(*a), "the other way round"),
    (lambda *a: infidelity(*a, loss=torch.abs), "absolute value"),
    (lambda *a: infidelity(*a) * a[4].shape[1], "not the sum"),
    (lambda *a: infidelity(*a, score=lambda z, t: z.softmax(1)[torch.arange(len(t)), t]), "softmax probability"),
    (lambda *a: infidelity(*a, score=lambda z, t: z.max(1).values), "predicted class"),
    (lambda *a: infidelity(*a, loss=lambda e: e).square(), "not the square of the mean"),
    (lambda m, x, t, a, p: infidelity(m, x, t, a / a[0].numel(), p), "you took the mean"),
]


def _flipped(model, x, target, attr, perturbations):
    """(I . attr - (f(x - I) - f(x)))^2: the score change the wrong way round."""
    rows = torch.arange(len(x))
    with torch.no_grad():
        original = model(x)[rows, target]
        errors = [((perturbations[:, k] * attr).sum(dim=(1, 2, 3))
                   - (model(x - perturbations[:, k])[rows, target] - original)) ** 2
                  for k in range(perturbations.shape[1])]
    return torch.stack(errors, 1).mean(1)


GINI_MISTAKES = [
    (lambda a: gini(a, magnitude=lambda v: v), "absolute value"),
    (lambda a: gini(a, descending=True), "ascending order"),
    (lambda a: gini(a, first=0), "from 1 to n"),
    (lambda a: gini(a) * a[0].numel(), "not by the sum alone"),
]
CASES = [(checks.check_infidelity, wrong, hint) for wrong, hint in INFIDELITY_MISTAKES] + \
        [(checks.check_gini, wrong, hint) for wrong, hint in GINI_MISTAKES]


@pytest.mark.parametrize("check, wrong, hint", CASES, ids=[f"{c.__name__}-{hint}" for c, _, hint in CASES])
def test_typical_mistake_gets_its_hint(check, wrong, hint):
    for _ in range(2):  # on two sets of fresh inputs
        expect_hint(check, wrong, hint)


def test_a_wrong_shape_is_named():
    expect_hint(checks.check_gini, lambda a: gini(a)[:, None], "shape")
    expect_hint(checks.check_infidelity, lambda *a: infidelity(*a)[:, None], "shape")


def test_hints_never_show_reference_values(capsys):
    for check, wrong, _ in CASES:
        check(wrong)
    assert_no_reference_values(capsys.readouterr().out)
