"""Lesson 11's checks (eps-sweep sanity flags, the straight-through quantizer, IBP through Linear,
ReLU and a whole MLP): right answers pass on fresh inputs, each typical mistake gets its hint
(bounds swapped at negative weights, ReLU on the upper bound only, eps applied after the
normalization, ...), a stub is "not implemented", labkit's own code is refused, no hint shows
reference values. The student answers are written independently of the checks' mistake models."""
import pytest
import torch
from torch import nn

from labkit import certify, checks
from labkit.checks import lesson11
from test_checks import assert_no_reference_values, expect_hint, run_check, stub


# ------------------------------------------------------------------ independent student answers

def sweep_flags(eps, accuracy, clean_accuracy, chance):
    at_zero = accuracy[eps == 0]
    problems = [bool((at_zero != clean_accuracy).any()),
                any(later > earlier for earlier, later in zip(accuracy.tolist(), accuracy.tolist()[1:])),
                bool(accuracy[-1] > chance)]
    return torch.tensor(problems)


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, levels):
        return torch.round(x * (levels - 1)) / (levels - 1)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def quantize_bpda(x, levels):
    return StraightThrough.apply(x, levels)


def ibp_linear(lower, upper, weight, bias, *, naive=False, no_bias=False):
    if naive:  # the bounds pushed through W as if every weight were positive
        return lower @ weight.T + bias, upper @ weight.T + bias
    positive, negative = weight.clamp(min=0), weight.clamp(max=0)
    b = 0 if no_bias else bias
    return lower @ positive.T + upper @ negative.T + b, upper @ positive.T + lower @ negative.T + b


def ibp_relu(lower, upper, *, upper_only=False):
    return (lower if upper_only else torch.relu(lower)), torch.relu(upper)


def ibp_mlp(model, x, eps, *, after_normalization=False, clamp=True):
    lower, upper = x - eps, x + eps
    if clamp:
        lower, upper = lower.clamp(0, 1), upper.clamp(0, 1)
    for layer in model.children():
        if after_normalization and layer is next(model.children()):
            centre = layer(x)
            lower, upper = centre - eps, centre + eps
        elif isinstance(layer, nn.Linear):
            lower, upper = ibp_linear(lower, upper, layer.weight, layer.bias)
        elif isinstance(layer, nn.ReLU):
            lower, upper = ibp_relu(lower, upper)
        else:
            lower, upper = layer(lower), layer(upper)
    return lower.detach(), upper.detach()


CASES = [
    (checks.check_sweep_flags, lambda *args: sweep_flags(*args).logical_not(), "True where the sweep fails"),
    (checks.check_sweep_flags, lambda e, a, c, ch: torch.tensor([bool((a[e == 0] - c).abs().max() > 0.05),
                                                                 bool((a[1:] > a[:-1]).any()), bool(a[-1] > ch)]),
     "no tolerance"),
    (checks.check_sweep_flags, lambda e, a, c, ch: torch.tensor([bool((a[e == 0] != c).any()),
                                                                 bool(a[-1] > a[0]), bool(a[-1] > ch)]),
     "compare every eps with the one before"),
    (checks.check_straight_through, lambda x, levels: torch.round(x * (levels - 1)) / (levels - 1),
     "no gradient comes through"),
    (checks.check_straight_through, lambda x, levels: x * 1.0, "the forward pass must still quantize"),
    (checks.check_ibp_linear, lambda *args: ibp_linear(*args, naive=True), "negative"),
    (checks.check_ibp_linear, lambda *args: ibp_linear(*args, no_bias=True), "bias"),
    (checks.check_ibp_linear, lambda *args: ibp_linear(*args)[::-1], "swapped"),
    (checks.check_ibp_relu, lambda *args: ibp_relu(*args, upper_only=True), "a negative lower bound becomes 0"),
    (checks.check_ibp_mlp, lambda *args: ibp_mlp(*args, after_normalization=True), "pixel units"),
    (checks.check_ibp_mlp, lambda *args: ibp_mlp(*args, clamp=False), "[0, 1]"),
]


def test_right_answers_pass_on_many_fresh_inputs():
    for _ in range(3):
        assert run_check(checks.check_sweep_flags, sweep_flags) == (True, "")
        assert run_check(checks.check_straight_through, quantize_bpda) == (True, "")
        assert run_check(checks.check_ibp_linear, ibp_linear) == (True, "")
        assert run_check(checks.check_ibp_relu, ibp_relu) == (True, "")
        assert run_check(checks.check_ibp_mlp, ibp_mlp) == (True, "")


def test_other_right_answers_pass():
    """Centre and radius instead of positive and negative parts; the detach trick for BPDA;
    bounds still attached to the graph (the check detaches them)."""
    def centre_radius(lower, upper, weight, bias):
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        centre, radius = centre @ weight.T + bias, radius @ weight.abs().T
        return centre - radius, centre + radius

    def detach_trick(x, levels):
        return x + (torch.round(x * (levels - 1)) / (levels - 1) - x).detach()

    def attached_mlp(model, x, eps):
        lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        for layer in model.children():
            if isinstance(layer, nn.Linear):
                lower, upper = centre_radius(lower, upper, layer.weight, layer.bias)
            else:
                lower, upper = layer(lower), layer(upper)  # Normalize, Flatten and ReLU are increasing
        return lower, upper

    assert run_check(checks.check_ibp_linear, centre_radius) == (True, "")
    assert run_check(checks.check_straight_through, detach_trick) == (True, "")
    assert run_check(checks.check_ibp_mlp, attached_mlp) == (True, "")


@pytest.mark.parametrize("check, wrong, fragment", CASES)
def test_each_typical_mistake_gets_its_hint(check, wrong, fragment):
    expect_hint(check, wrong, fragment)


def test_a_detached_quantizer_is_told_it_has_no_gradient():
    def numpy_round(x, levels):
        return torch.from_numpy((x.detach().numpy() * (levels - 1)).round() / (levels - 1))
    expect_hint(checks.check_straight_through, numpy_round, "detached from x")


def test_not_a_pair_and_stubs():
    expect_hint(checks.check_ibp_relu, lambda lower, upper: None, "forget the `return`")
    expect_hint(checks.check_ibp_relu, lambda lower, upper: torch.relu(upper), "pair (lower, upper)")
    for check in (checks.check_sweep_flags, checks.check_straight_through, checks.check_ibp_linear,
                  checks.check_ibp_relu, checks.check_ibp_mlp):
        expect_hint(check, stub, "not implemented yet")


def test_labkits_own_code_is_refused():
    expect_hint(checks.check_ibp_mlp, lesson11.ibp_mlp, "labkit's own")
    expect_hint(checks.check_ibp_mlp, lambda model, x, eps: certify.interval_bounds(model, x, eps), "labkit's own")
    expect_hint(checks.check_ibp_linear, lesson11.ibp_linear, "labkit's own")


def test_references_agree_with_independent_computations():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = lesson11.tiny_mlp((1, 5, 5), 4, generator)
    x = torch.rand(3, 1, 5, 5)
    torch.testing.assert_close(lesson11.ibp_mlp(model, x, 0.05), torch.stack(ibp_mlp(model, x, 0.05)))
    eps, accuracy = torch.tensor([0.0, 0.1, 0.2]), torch.tensor([0.8, 0.85, 0.05])
    assert lesson11.sweep_flags(eps, accuracy, 0.8, 0.1).tolist() == [False, True, False]


def test_hints_never_show_reference_values(capsys):
    for check, wrong, _ in CASES:
        check(wrong)
    assert_no_reference_values(capsys.readouterr().out)
