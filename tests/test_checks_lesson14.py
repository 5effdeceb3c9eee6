"""labkit.checks for lesson 14 (inside the network): the hook objective and Dong et al.'s
consistency; right answers pass on fresh inputs, each typical mistake gets its hint, a stub is
"not implemented yet", labkit's own functions are refused, hints show no reference values."""
import pytest
import torch
import torch.nn.functional as F

from labkit import checks, featvis
from labkit.checks import _engine, lesson14
from test_checks import assert_no_reference_values, expect_hint, run_check, stub


def channel_objective(model, x, layer, channel, read="output", reduce="mean", leave_hook=False, detach=False):
    """The right answer, or with one piece changed (for the mistakes)."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: captured.append(output if read == "output" else inputs[0]))
    try:
        model(x)
    finally:
        if not leave_hook:
            handle.remove()
    maps = captured[0][:, channel]
    value = maps.mean(dim=(1, 2)) if reduce == "mean" else maps.amax(dim=(1, 2)) if reduce == "max" else maps.sum(dim=(1, 2))
    return value.detach() if detach else value


def objective_variant(**changes):
    return lambda model, x, layer, channel: channel_objective(model, x, layer, channel, **changes)


def consistency(top_labels, similarity):
    p = F.one_hot(top_labels, len(similarity)).to(similarity.dtype).mean(dim=1)
    return ((p @ similarity) * p).sum(dim=1)


def test_right_answers_pass_on_fresh_inputs():
    for _ in range(3):
        assert run_check(checks.check_channel_objective, channel_objective) == (True, "")
        assert run_check(checks.check_consistency, consistency) == (True, "")


def test_the_references_are_labkits():
    with _engine.accepting_reference():
        assert run_check(checks.check_channel_objective, lesson14.channel_objective) == (True, "")
        assert run_check(checks.check_consistency, lesson14.consistency) == (True, "")


def test_the_hook_objective_equals_the_activation_read_directly(random_cnn):
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(channel_objective(random_cnn, x, "conv3", 5).detach(),
                               featvis.activation(random_cnn, x, featvis.Channel("conv3", 5)))
    with torch.no_grad():
        direct = random_cnn.conv1(random_cnn.normalize(x))[:, 2].mean(dim=(1, 2))
    torch.testing.assert_close(channel_objective(random_cnn, x, "conv1", 2).detach(), direct)


def test_stub_and_labkits_own_are_refused():
    for check in (checks.check_channel_objective, checks.check_consistency):
        passed, hint = run_check(check, stub)
        assert not passed and hint.startswith("not implemented yet")
    expect_hint(checks.check_consistency, featvis.consistency, "write your own implementation")
    expect_hint(checks.check_channel_objective, lesson14.channel_objective, "write your own implementation")
    expect_hint(checks.check_channel_objective,
                lambda m, x, layer, c: featvis.activation(m, x, featvis.Channel(layer, c)), "write your own")


OBJECTIVE_MISTAKES = [
    (objective_variant(reduce="max"), "not its maximum"),
    (objective_variant(reduce="sum"), "not the sum"),
    (objective_variant(read="input"), "not its input"),
    (objective_variant(leave_hook=True), "hook(s) registered"),
    (objective_variant(detach=True), "detached from x"),
    (lambda m, x, layer, c: m(x)[:, c], "the logits"),
    (lambda m, x, layer, c: channel_objective(m, x, layer, c)[:1], "one value per image"),
    (lambda m, x, layer, c: None, "forget the `return`"),
]
CONSISTENCY_MISTAKES = [
    (lambda t, a: consistency(t, a) * t.shape[1] ** 2, "divide each neuron's class counts by k"),
    (lambda t, a: consistency(t, a) * t.shape[1] ** 2 / len(a) ** 2, "not by the number of classes"),
    (lambda t, a: consistency(t, torch.eye(len(a))), "left out the similarity matrix"),
    (lambda t, a: consistency(t, a).sqrt(), "without a square root"),
    (lambda t, a: consistency(t.flatten()[None].expand(len(t), -1), a), "its own row"),
]


@pytest.mark.parametrize("wrong, hint", OBJECTIVE_MISTAKES, ids=[h for _, h in OBJECTIVE_MISTAKES])
def test_objective_mistakes_get_their_hint(wrong, hint):
    for _ in range(2):
        expect_hint(checks.check_channel_objective, wrong, hint)


@pytest.mark.parametrize("wrong, hint", CONSISTENCY_MISTAKES, ids=[h for _, h in CONSISTENCY_MISTAKES])
def test_consistency_mistakes_get_their_hint(wrong, hint):
    for _ in range(2):
        expect_hint(checks.check_consistency, wrong, hint)


def test_hints_never_show_reference_values(capsys):
    for wrong, _ in OBJECTIVE_MISTAKES:
        checks.check_channel_objective(wrong)
    for wrong, _ in CONSISTENCY_MISTAKES:
        checks.check_consistency(wrong)
    assert_no_reference_values(capsys.readouterr().out)


def test_the_grader_judges_the_hook_objective_through_the_sandbox_wall(tmp_path):
    """The grader rebuilds the check's models from arrays, applies the spec's adapter by name in
    the kernel and judges value and gradient outside: right passes, detached and hook-leaving fail."""
    from test_grade_exchange import through_the_kernel

    assert through_the_kernel("check_channel_objective", channel_objective, tmp_path / "a")["passed"]
    verdict = through_the_kernel("check_channel_objective", objective_variant(detach=True), tmp_path / "b")
    assert not verdict["passed"] and "gradient" in verdict["hint"]
    verdict = through_the_kernel("check_channel_objective", objective_variant(reduce="max"), tmp_path / "c")
    assert not verdict["passed"] and "maximum" in verdict["hint"]
    assert through_the_kernel("check_consistency", consistency, tmp_path / "d")["passed"]
