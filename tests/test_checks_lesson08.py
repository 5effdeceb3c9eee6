"""Lesson 08's check (LRP-epsilon on a dense ReLU net): a right answer passes, each typical
mistake gets its hint, a stub is "not implemented yet", labkit's lrp is refused. The student
answers here are written independently of the check's own mistake models."""
import pytest
import torch
from torch import nn

from labkit import attribution, checks
from labkit.checks import _engine, lesson08


def run_check(function):
    before = len(checks.results())
    checks.check_lrp_epsilon(function)
    results = checks.results()
    assert len(results) == before + 1
    return results[-1]["passed"], results[-1]["hint"]


def stub(model, x, target, epsilon):
    raise NotImplementedError("replace this line with your code")


def lrp_epsilon(model, x, target, epsilon, *, sign=lambda z: torch.where(z >= 0, 1.0, -1.0),
                use_activation=True, divide=True, bias_times=1, start="logit", relevance_start=None):
    """A student's LRP-epsilon, one layer at a time, with switches for the typical mistakes."""
    inputs, a = [], x.flatten(1)
    for layer in model:
        if isinstance(layer, nn.Linear):
            inputs.append((layer, a))
        a = layer(a)
    with torch.no_grad():
        logits = a
        rows = torch.arange(len(x))
        relevance = torch.zeros_like(logits)
        if start == "logit":
            relevance[rows, target] = logits[rows, target]
        elif start == "one":
            relevance[rows, target] = 1.0
        elif start == "all":
            relevance = logits.clone()
        for layer, a in reversed(inputs):
            bias = layer.bias if layer.bias is not None else 0.0
            z = a @ layer.weight.T + bias_times * bias
            share = relevance / (z + epsilon * sign(z)) if divide else relevance
            back = share @ layer.weight
            relevance = a * back if use_activation else back
    return relevance.reshape(x.shape)


def gradient(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[torch.arange(len(x)), target].sum(), x)
    return grad


def test_right_answers_pass_on_many_fresh_inputs():
    for _ in range(4):
        assert run_check(lrp_epsilon) == (True, "")


def test_an_answer_with_torch_sign_fails_where_z_is_zero():
    # sign(0) = 0 differs from the text's sign(0) = +1 only where z is exactly 0: a case has such a neuron
    for _ in range(2):
        passed, hint = run_check(lambda model, x, target, epsilon: lrp_epsilon(
            model, x, target, epsilon, sign=torch.sign))
        assert not passed and "sign(0)" in hint and "z = 0" in hint, hint


def test_the_right_answer_conserves_relevance_on_a_bias_free_net():
    """With no biases and a tiny epsilon nothing absorbs relevance: it sums to the logit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12, bias=False), nn.ReLU(),
                          nn.Linear(12, 5, bias=False)).eval()
    x, target = torch.rand(3, 1, 4, 4), torch.tensor([0, 2, 4])
    relevance = lrp_epsilon(model, x, target, 1e-9)
    logit = model(x)[torch.arange(3), target].detach()
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), logit, rtol=1e-4, atol=1e-5)


def test_labkits_reference_passes_when_allowed_and_is_refused_otherwise():
    with _engine.accepting_reference():
        assert run_check(lesson08.lrp_epsilon) == (True, "")
    for reference in (lesson08.lrp_epsilon, attribution.lrp,
                      lambda model, x, target, epsilon: attribution.lrp(
                          model, x, target, rule=attribution.Epsilon(epsilon))):
        passed, hint = run_check(reference)
        assert not passed and "write your own implementation" in hint


def test_the_placeholder_is_not_implemented_yet():
    passed, hint = run_check(stub)
    assert not passed and hint.startswith("not implemented yet")


MISTAKES = [
    (dict(sign=lambda z: 1.0), "take the sign of z"),
    (dict(sign=lambda z: 0.0), "the stabilizer is missing"),
    (dict(use_activation=False), "multiply by the activation a_j"),
    (dict(divide=False), "not conserved"),
    (dict(bias_times=2), "counts the bias twice"),
    (dict(bias_times=0), "must include the bias"),
    (dict(start="one"), "not from 1"),
    (dict(start="all"), "not from all logits"),
]


@pytest.mark.parametrize("options, hint", MISTAKES, ids=[h for _, h in MISTAKES])
def test_typical_mistake_gets_its_hint(options, hint):
    for _ in range(2):
        passed, got = run_check(lambda model, x, target, epsilon: lrp_epsilon(model, x, target, epsilon, **options))
        assert not passed and hint in got, got


@pytest.mark.parametrize("answer, hint", [
    (lambda model, x, target, epsilon: gradient(model, x, target) * x, "the same as gradient x input"),
    (lambda model, x, target, epsilon: gradient(model, x, target), "plain gradient"),
])
def test_gradient_answers_are_named(answer, hint):
    passed, got = run_check(answer)
    assert not passed and hint in got, got


def test_a_flat_result_gets_a_shape_hint():
    passed, hint = run_check(lambda model, x, target, epsilon: lrp_epsilon(model, x, target, epsilon).flatten(1))
    assert not passed and "shape" in hint
