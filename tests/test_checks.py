"""labkit.checks: right answers pass, typical wrong answers get their hint, stubs say "not
implemented yet", labkit's own reference is refused, nothing of the reference is printed, and
every result is recorded where the grader reads it."""
import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import labkit
from labkit import attacks, attribution, checks
from labkit.checks import _engine, lesson00, lesson01


def run_check(check, function):
    """Run a check; return (passed, hint) of the result it recorded."""
    before = len(checks.results())
    check(function)
    results = checks.results()
    assert len(results) == before + 1, "a check records exactly one result"
    return results[-1]["passed"], results[-1]["hint"]


def expect_hint(check, function, *fragments):
    passed, hint = run_check(check, function)
    assert not passed
    for fragment in fragments:
        assert fragment in hint, f"expected {fragment!r} in the hint, got {hint!r}"


def stub(*args, **kwargs):
    raise NotImplementedError("replace this line with your code")


# ------------------------------------------------------------------ correct student answers

def rows(n):
    return torch.arange(n)


def predict_proba(model, x):
    with torch.no_grad():
        return F.softmax(model(x), dim=1)


def gradient(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[rows(len(x)), target].sum(), x)
    return grad


def gradient_x_input(model, x, target):
    return gradient(model, x, target) * x


def saliency_map(model, x, target):
    return gradient(model, x, target).abs().amax(dim=1)


def smoothgrad(model, x, target, n_samples=50, sigma=0.15):
    spread = sigma * (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))
    total = torch.zeros_like(x)
    for _ in range(n_samples):
        total += gradient(model, x + torch.randn_like(x) * spread, target)
    return total / n_samples


def integrated_gradients(model, x, target, baseline, steps=50):
    total = torch.zeros_like(x)
    for k in range(1, steps + 1):
        total += gradient(model, baseline + k / steps * (x - baseline), target)
    return (x - baseline) * total / steps


def loss_gradient(model, x, y):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


def fgsm(model, x, y, eps):
    return (x + eps * loss_gradient(model, x, y).sign()).clamp(0, 1)


def per_image_max(g):
    return g.abs().flatten(1).amax(dim=1).view(-1, 1, 1, 1)


def gradient_step(model, x, y, eps):
    g = loss_gradient(model, x, y)
    return (x + eps * g / per_image_max(g)).clamp(0, 1)


def l2_normalized(g):
    return g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def l2_projected(delta, eps):
    return delta * (eps / delta.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)


def pgd(model, x, y, eps, step_size, steps, norm="linf", targeted=False, project=True, clamp=True,
        l2_direction=l2_normalized, l2_project=l2_projected, always_down=False):
    x_adv = x.clone()
    for _ in range(steps):
        g = loss_gradient(model, x_adv, y)
        step = g.sign() if norm == "linf" else l2_direction(g)
        x_adv = x_adv - step_size * step if (targeted or always_down) else x_adv + step_size * step
        delta = x_adv - x
        if project and norm == "linf":
            delta = delta.clamp(-eps, eps)
        elif project:
            delta = l2_project(delta, eps)
        x_adv = x + delta
        if clamp:
            x_adv = x_adv.clamp(0, 1)
    return x_adv


EXERCISES = {  # check: (right answer, labkit's reference)
    checks.check_predict_proba: (predict_proba, lesson00._predict_proba),
    checks.check_gradient: (gradient, attribution.gradient),
    checks.check_gradient_x_input: (gradient_x_input, attribution.gradient_x_input),
    checks.check_saliency_map: (saliency_map, lesson01.saliency_map),
    checks.check_smoothgrad: (smoothgrad, attribution.smoothgrad),
    checks.check_integrated_gradients: (integrated_gradients, attribution.integrated_gradients),
    checks.check_fgsm: (fgsm, attacks.fgsm),
    checks.check_gradient_step: (gradient_step, attacks.gradient_step),
    checks.check_pgd: (pgd, attacks.pgd),
}
ids = [check.__name__ for check in EXERCISES]


# ------------------------------------------------------------------ the general behaviour

@pytest.mark.parametrize("check", EXERCISES, ids=ids)
def test_right_answers_pass_on_many_fresh_inputs(check):
    right, _ = EXERCISES[check]
    for _ in range(4):
        assert run_check(check, right) == (True, "")


@pytest.mark.parametrize("check", EXERCISES, ids=ids)
def test_labkits_reference_passes_when_allowed(check):
    _, reference = EXERCISES[check]
    with _engine.accepting_reference():
        assert run_check(check, reference) == (True, "")


@pytest.mark.parametrize("check", EXERCISES, ids=ids)
def test_labkits_reference_is_refused(check):
    _, reference = EXERCISES[check]
    expect_hint(check, reference, "write your own implementation")
    expect_hint(check, lambda *args, **kwargs: reference(*args, **kwargs), "write your own implementation")


@pytest.mark.parametrize("check", EXERCISES, ids=ids)
def test_the_placeholder_is_not_implemented_yet(check, capsys):
    passed, hint = run_check(check, stub)
    assert not passed and hint.startswith("not implemented yet")
    printed = capsys.readouterr()
    assert printed.out.count("\n") == 1 and "Traceback" not in printed.out + printed.err


def test_a_helper_that_is_not_implemented_is_named():
    def helper_not_written(model, x, target):
        raise NotImplementedError("replace this line with your code")

    def uses_helper(model, x, target):
        return helper_not_written(model, x, target) * x

    expect_hint(checks.check_gradient_x_input, uses_helper, "not implemented yet", "helper_not_written")


def test_other_errors_are_one_line_with_the_students_line(capsys):
    def typo(model, x, target):
        grad = gradient(model, x, target)
        return grad.detatch()

    expect_hint(checks.check_gradient, typo, "AttributeError", "detatch", "line", "return grad.detatch()")
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "Traceback" not in printed


def test_an_error_inside_torch_is_not_mistaken_for_a_stub():
    def wrong_shapes(model, x, target):
        return gradient(model, x, target) @ torch.ones(3, 3, 3)

    passed, hint = run_check(checks.check_gradient, wrong_shapes)
    assert not passed and hint.startswith("your code raised RuntimeError")


def test_not_a_function():
    expect_hint(checks.check_gradient, torch.zeros(3), "pass your function itself")


def test_pass_and_fail_lines_printed(capsys):
    checks.check_gradient(gradient)
    checks.check_gradient(lambda m, x, t: -gradient(m, x, t))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "✅ check_gradient: passed"
    assert lines[1].startswith("❌ check_gradient: the result has the opposite sign")


def test_results_go_to_the_log_file_as_json_lines(tmp_path, monkeypatch):
    log = tmp_path / "checks.jsonl"
    monkeypatch.setenv("LABKIT_CHECK_LOG", str(log))
    checks.check_gradient(gradient)
    checks.check_fgsm(stub)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["check"], e["passed"]) for e in entries] == [("check_gradient", True), ("check_fgsm", False)]
    assert set(entries[0]) == {"check", "passed", "hint", "time", "seed"}
    assert entries[0]["hint"] == "" and entries[1]["hint"].startswith("not implemented yet")
    assert checks.results()[-2:] == entries


def test_the_seed_reproduces_a_failure():
    def flaky(model, x, target):  # wrong only for batches of 3 RGB images
        grad = gradient(model, x, target)
        return -grad if x.shape[1] == 3 else grad

    _engine.run(lesson01.GRADIENT, flaky)
    first = checks.results()[-1]
    _engine.run(lesson01.GRADIENT, flaky, seed=first["seed"])
    assert checks.results()[-1]["hint"] == first["hint"]


def test_a_check_leaves_the_notebooks_random_state_alone():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = torch.rand(2), np.random.rand(), random.random()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    checks.check_smoothgrad(smoothgrad)
    assert torch.equal(torch.rand(2), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


def test_inputs_differ_between_calls():
    shapes = []

    def spy(model, x, target):
        shapes.append((tuple(x.shape), x.sum().item()))
        return gradient(model, x, target)

    checks.check_gradient(spy)
    checks.check_gradient(spy)
    assert len(shapes) == 6 and len(set(shapes)) == 6


# ------------------------------------------------------------------ kind of result

def test_generic_result_hints():
    check = checks.check_gradient
    expect_hint(check, lambda m, x, t: None, "returned None")
    expect_hint(check, lambda m, x, t: gradient(m, x, t).numpy(), "NumPy array")
    expect_hint(check, lambda m, x, t: (gradient(m, x, t),), "returned a tuple")
    expect_hint(check, lambda m, x, t: gradient(m, x, t).tolist(), "returned a list")
    expect_hint(check, lambda m, x, t: gradient(m, x, t).double(), "dtype torch.float64")
    expect_hint(check, lambda m, x, t: torch.empty_like(x, device="meta"), "is on meta", "on cpu")
    expect_hint(check, lambda m, x, t: gradient(m, x, t) * float("nan"), "NaN")
    expect_hint(checks.check_predict_proba, lambda m, x: predict_proba(m, x)[0], "batch dimension is missing")
    expect_hint(check, lambda m, x, t: gradient(m, x, t)[..., 1:], "shape")  # one column short


def test_model_and_input_changes_are_caught():
    def backward(model, x, target):
        x = x.detach().clone().requires_grad_(True)
        model(x)[rows(len(x)), target].sum().backward()
        return x.grad

    def train_mode(model, x, target):
        model.train()
        return gradient(model, x, target)

    def hook_left(model, x, target):
        model[0].register_forward_hook(lambda *a: None)
        return gradient(model, x, target)

    def frozen(model, x, target):
        model.requires_grad_(False)
        return gradient(model, x, target)

    def in_place(model, x, target):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x)[rows(len(x)), target].sum(), x)
        return grad

    def scaled_input(model, x, target):
        x.mul_(1.0).add_(0.0)
        x[..., 0, 0] = 0.5
        return gradient(model, x, target)

    check = checks.check_gradient
    expect_hint(check, backward, "left gradients in the model's parameters")
    expect_hint(check, train_mode, "train/eval mode")
    expect_hint(check, hook_left, "hook", "handle.remove()")
    expect_hint(check, frozen, "requires_grad of the model's parameters")
    expect_hint(check, in_place, "set requires_grad on its input `x`")
    expect_hint(check, scaled_input, "changed its input `x` in place")


# ------------------------------------------------------------------ typical mistakes per exercise

def wrong_predict_proba(transform):
    def wrong(model, x):
        with torch.no_grad():
            return transform(model(x))
    return wrong


PREDICT_PROBA_MISTAKES = [
    (wrong_predict_proba(lambda z: z), "these are the logits"),
    (wrong_predict_proba(lambda z: z.softmax(dim=0)), "wrong dimension"),
    (wrong_predict_proba(lambda z: z.log_softmax(dim=1)), "log-probabilities"),
    (wrong_predict_proba(torch.sigmoid), "sigmoid"),
    (wrong_predict_proba(lambda z: z / z.sum(1, keepdim=True)), "softmax exponentiates"),
    (wrong_predict_proba(lambda z: z.argmax(1)), "dtype torch.int64"),
    (lambda model, x: model(x).softmax(1), "requires grad"),
]


def score_gradient(score):
    def wrong(model, x, target):
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(model(x), target), x)
        return grad
    return wrong


def picked(z, t):
    return z[rows(len(t)), t]


GRADIENT_MISTAKES = [
    (score_gradient(lambda z, t: picked(z.softmax(1), t).sum()), "softmax probability"),
    (score_gradient(lambda z, t: picked(z.log_softmax(1), t).sum()), "log-probability"),
    (score_gradient(lambda z, t: F.cross_entropy(z, t)), "cross-entropy loss"),
    (score_gradient(lambda z, t: z.max(1).values.sum()), "predicted class"),
    (score_gradient(lambda z, t: picked(z, t).mean()), "averaged over the batch"),
    (score_gradient(lambda z, t: z[:, t[0]].sum()), "target[0]"),
    (lambda m, x, t: gradient(m, x, t).abs(), "absolute value"),
    (lambda m, x, t: -gradient(m, x, t), "opposite sign"),
    (lambda m, x, t: 2 * gradient(m, x, t), "constant factor: about 2 times"),
    (lambda m, x, t: gradient(m, x, t).sum(1), "channel dimension is missing"),
]

GRADIENT_X_INPUT_MISTAKES = [
    (gradient, "plain gradient"),
    (lambda m, x, t: gradient(m, x, t).abs() * x, "|gradient|"),
    (lambda m, x, t: gradient(m, x, t) * (1 - x), "(1 - x)"),
    (lambda m, x, t: score_gradient(lambda z, t: picked(z.softmax(1), t).sum())(m, x, t) * x, "softmax probability"),
    (lambda m, x, t: score_gradient(lambda z, t: F.cross_entropy(z, t))(m, x, t) * x, "cross-entropy"),
    (lambda m, x, t: (gradient(m, x, t) * x).sum(1), "channel dimension is missing"),
    (lambda m, x, t: gradient(m, x, t) * x / per_image_max(gradient(m, x, t) * x), "normalized"),
]

SALIENCY_MISTAKES = [
    (lambda m, x, t: gradient(m, x, t).amax(1), "absolute value of the gradient first"),
    (lambda m, x, t: gradient(m, x, t).amax(1).abs(), "before the maximum"),
    (lambda m, x, t: gradient(m, x, t).abs().mean(1), "averaged |gradient|"),
    (lambda m, x, t: gradient(m, x, t).abs().sum(1), "summed |gradient|"),
    (lambda m, x, t: gradient(m, x, t).norm(dim=1), "L2 norm"),
    (lambda m, x, t: (gradient(m, x, t) * x).abs().amax(1), "gradient x input"),
    (lambda m, x, t: gradient(m, x, t).abs().amax(1, keepdim=True), "extra dimension of size 1"),
    (lambda m, x, t: gradient(m, x, t).abs(), "shape"),
    (lambda m, x, t: score_gradient(lambda z, t: F.cross_entropy(z, t))(m, x, t).abs().amax(1), "log-probability"),
    (lambda m, x, t: labkit.attribution.to_heatmap(gradient(m, x, t)), "write your own implementation"),
]


def value_range(x):
    return x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True)


def smoothgrad_variant(spread=None, reduce=lambda total, n: total / n, noise=torch.randn_like,
                       post=lambda g: g, samples=None, fixed_noise=False, score=None):
    def wrong(model, x, target, n_samples=50, sigma=0.15):
        s = spread(x, sigma) if spread else sigma * value_range(x)
        n = samples or n_samples
        first = noise(x)
        total = torch.zeros_like(x)
        for _ in range(n):
            noisy = x + (first if fixed_noise else noise(x)) * s
            total += post((score or gradient)(model, noisy, target))
        return reduce(total, n)
    return wrong


SMOOTHGRAD_MISTAKES = [
    (smoothgrad_variant(reduce=lambda total, n: total), "divide by n_samples"),
    (smoothgrad_variant(post=torch.square), "squared gradients"),
    (smoothgrad_variant(post=torch.abs), "|gradient|"),
    (smoothgrad_variant(spread=lambda x, sigma: sigma), "you used sigma itself"),
    (smoothgrad_variant(spread=lambda x, sigma: sigma * (x.max() - x.min())), "each image's own value range"),
    (smoothgrad_variant(spread=lambda x, sigma: sigma ** 2 * value_range(x)),
     "times too weak"),
    (smoothgrad_variant(noise=torch.rand_like), "not centred on 0"),
    (smoothgrad_variant(fixed_noise=True), "draw fresh noise for every sample"),
    (smoothgrad_variant(samples=20), "asks for"),
    (lambda m, x, t, n_samples, sigma: gradient(m, x, t), "no noise reached the model"),
    (smoothgrad_variant(score=score_gradient(lambda z, t: picked(z.softmax(1), t).sum())), "softmax probability"),
]


def ig_variant(rule="right", times=lambda x, b: x - b, reduce=lambda total, steps: total / steps,
               start=lambda x, b: b, score=None):
    def wrong(model, x, target, baseline, steps=50):
        b = start(x, baseline)
        total = torch.zeros_like(x)
        for k in range(steps):
            alpha = {"right": (k + 1) / steps, "left": k / steps, "middle": (k + 0.5) / steps}[rule]
            total += (score or gradient)(model, b + alpha * (x - b), target)
        return times(x, b) * reduce(total, steps)
    return wrong


IG_MISTAKES = [
    (ig_variant(times=lambda x, b: 1), "average gradient alone"),
    (ig_variant(times=lambda x, b: x), "not by x"),
    (ig_variant(reduce=lambda total, steps: total), "divide by the number of steps"),
    (lambda m, x, t, b, steps: gradient(m, x, t) * (x - b), "gradient at x only"),
    (lambda m, x, t, b, steps: gradient(m, b, t) * (x - b), "gradient at the baseline only"),
    (ig_variant(start=lambda x, b: torch.zeros_like(x)), "ignored the `baseline`"),
    (ig_variant(score=score_gradient(lambda z, t: picked(z.softmax(1), t).sum())), "softmax probability"),
    (lambda m, x, t, b, steps: -integrated_gradients(m, x, t, b, steps), "opposite sign"),
]


def test_integrated_gradients_accepts_every_riemann_rule():
    for rule in ("left", "middle", "right"):
        assert run_check(checks.check_integrated_gradients, ig_variant(rule=rule)) == (True, "")


def step_attack(direction, sign=+1, clamp=True, gradient_of=loss_gradient):
    def wrong(model, x, y, eps):
        moved = x + sign * eps * direction(gradient_of(model, x, y))
        return moved.clamp(0, 1) if clamp else moved
    return wrong


FGSM_MISTAKES = [
    (step_attack(torch.sign, clamp=False), "clamp the result to [0, 1]"),
    (step_attack(torch.sign, sign=-1), "stepped down the loss"),
    (step_attack(lambda g: g), "not the raw gradient"),
    (lambda m, x, y, eps: eps * loss_gradient(m, x, y).sign(), "returned the perturbation"),
    (step_attack(torch.sign, gradient_of=lambda m, x, y: loss_gradient(lambda v: m(v).softmax(1), x, y)),
     "passed probabilities (softmax) to cross_entropy"),
    (step_attack(torch.sign, gradient_of=lambda m, x, y: gradient(m, x, y)), "true class's logit"),
    (step_attack(torch.sign, gradient_of=score_gradient(lambda z, y: F.nll_loss(z, y))), "nll_loss"),
    (step_attack(lambda g: 2 * g.sign()), "about 2 x eps"),
    (lambda m, x, y, eps: (x + eps * loss_gradient(m, x, y).sign()).clamp(0, 0.9), "values differ"),
]

GRADIENT_STEP_MISTAKES = [
    (step_attack(lambda g: g / per_image_max(g), clamp=False), "clamp the result"),
    (step_attack(lambda g: g / g.abs().max()), "not by the largest in the whole batch"),
    (step_attack(lambda g: g / g.flatten(1).amax(1).view(-1, 1, 1, 1)), "not by max(g)"),
    (step_attack(l2_normalized), "not by the L2 norm"),
    (step_attack(lambda g: g), "normalize the gradient"),
    (step_attack(torch.sign), "that is FGSM"),
    (step_attack(lambda g: g / per_image_max(g), sign=-1), "stepped down the loss"),
]


def pgd_variant(**changes):
    def wrong(model, x, y, eps, step_size, steps, norm="linf", targeted=False):
        return pgd(model, x, y, eps, step_size, steps, norm, targeted, **changes)
    return wrong


PGD_MISTAKES = [
    (pgd_variant(project=False), "project back onto the eps-ball"),
    (pgd_variant(clamp=False), "clamp the image to [0, 1]"),
    (lambda m, x, y, eps, ss, steps, norm="linf", targeted=False: pgd(m, x, y, eps, ss, steps, norm, not targeted),
     "went"),
    (pgd_variant(always_down=True), "go up the loss of the true class"),
    (pgd_variant(l2_direction=torch.sign), "not along its sign"),
    (pgd_variant(l2_project=lambda d, eps: d * eps / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)), "only shrink"),
    (pgd_variant(l2_direction=lambda g: g / g.norm()), "not by the norm of the whole batch"),
    (pgd_variant(l2_direction=lambda g: g), "normalize the step"),
]

MISTAKES = {
    checks.check_predict_proba: PREDICT_PROBA_MISTAKES,
    checks.check_gradient: GRADIENT_MISTAKES,
    checks.check_gradient_x_input: GRADIENT_X_INPUT_MISTAKES,
    checks.check_saliency_map: SALIENCY_MISTAKES,
    checks.check_smoothgrad: SMOOTHGRAD_MISTAKES,
    checks.check_integrated_gradients: IG_MISTAKES,
    checks.check_fgsm: FGSM_MISTAKES,
    checks.check_gradient_step: GRADIENT_STEP_MISTAKES,
    checks.check_pgd: PGD_MISTAKES,
}
CASES = [(check, wrong, hint) for check, mistakes in MISTAKES.items() for wrong, hint in mistakes]


def test_every_exercise_has_at_least_five_typical_mistakes():
    assert set(MISTAKES) == set(EXERCISES)
    assert all(len(mistakes) >= 5 for mistakes in MISTAKES.values())


@pytest.mark.parametrize("check, wrong, hint", CASES,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_typical_mistake_gets_its_hint(check, wrong, hint):
    for _ in range(2):  # on two sets of fresh inputs
        expect_hint(check, wrong, hint)


# ------------------------------------------------------------------ nothing of the reference shows

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def significant_digits(number: str) -> int:
    mantissa = number.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def assert_no_reference_values(printed: str) -> None:
    """What checks printed shows no tensor and no precise number (which could be the reference's)."""
    assert "tensor(" not in printed and "[[" not in printed
    for line in printed.splitlines():
        hint = line.split(" (on ")[0]  # the input description names shapes, eps, sigma: inputs
        long_numbers = [n for n in NUMBER.findall(hint) if significant_digits(n) > 3]
        assert not long_numbers, f"a hint shows precise numbers: {line}"


def test_hints_never_show_reference_values(capsys):
    for check, wrong, _ in CASES:
        check(wrong)
    assert_no_reference_values(capsys.readouterr().out)


def test_lessons_import_only_shared_modules():
    """Each lesson's checks stand alone: a lessonNN module imports no other lesson module (nor
    its private names), so editing one lesson's checks cannot change another lesson's grading."""
    import ast
    import pathlib
    folder = pathlib.Path(checks.__file__).parent
    lessons = sorted(folder.glob("lesson*.py"))
    assert len(lessons) >= 10
    for path in lessons:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported = [node.module or ""] + [a.name for a in node.names if not node.module]
                assert not any(name.startswith("lesson") for name in imported), \
                    f"{path.name} imports {imported}: move what it shares to _mistakes.py or _cases.py"
