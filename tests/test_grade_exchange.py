"""What crosses the sandbox wall (labkit._exchange), for every check of every lesson, in one process:
the grader's inputs encoded as arrays and JSON, rebuilt as the sandbox would, the student's
function called there, its output and side effects sent back as numbers and judged by the
grader's engine. A correct function passes, a wrong one and a model-changing one fail with the
engine's hints; nothing but arrays and JSON is read back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labkit import _exchange, grade
from labkit.checks import _engine

SPECS = grade.check_specs()


def through_the_wall(spec, student, folder, seed=3):
    """Make the cases, send them, run ``student`` on the rebuilt ones, judge what comes back: the hint or None."""
    inbox, outbox = folder / "in", folder / "out"
    inbox.mkdir(parents=True)
    outbox.mkdir(parents=True)
    with _engine.case_context(seed):
        cases = _engine.cases_for(spec, seed)
    encoded = json.loads(json.dumps(_exchange.encode_cases(cases, _exchange.Arrays(inbox))))
    inputs, outputs, observations = _exchange.Arrays(inbox), _exchange.Arrays(outbox), []
    for case_json in encoded:
        args = tuple(_exchange._decode(a, inputs) for a in case_json["args"])
        kwargs = {k: _exchange._decode(v, inputs) for k, v in case_json["kwargs"].items()}
        try:
            out = _engine.call_student(student, _engine.Case(args, kwargs))
        except _engine.Failure as failure:
            observations.append({"raised": str(failure)})
            break
        observations.append(_exchange._observe(out, args, outputs))
    item = grade.Prepared(grade.CheckCall(spec.name, "f"), spec, seed, cases)
    observations = json.loads(json.dumps(observations))
    verdict = grade.judge([item], [{"check": spec.name, "cases": observations}], outputs)[0]
    return None if verdict["passed"] else verdict["hint"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_reference_passes_through_the_wall(name, tmp_path):
    spec = SPECS[name]
    assert through_the_wall(spec, spec.reference, tmp_path) is None


@pytest.mark.parametrize("name", ["check_gradient", "check_smoothgrad", "check_fgsm", "check_grad_cam"])
def test_a_wrong_answer_gets_the_same_hint_as_in_the_notebook(name, tmp_path):
    spec = SPECS[name]

    def negated(*args, **kwargs):
        return -spec.reference(*args, **kwargs)

    hint = through_the_wall(spec, negated, tmp_path, seed=11)
    with pytest.raises(_engine.Failure) as in_process, _engine.accepting_reference():
        _engine._check(spec, negated, 11)  # the in-notebook check on the same inputs
    assert hint and hint == str(in_process.value)


def test_side_effects_come_back(tmp_path):
    spec = SPECS["check_gradient"]

    def trains_the_model(model, x, target):
        model.train()
        return spec.reference(model, x, target)

    def leaves_a_hook(model, x, target):
        model.register_forward_hook(lambda *args: None)
        return spec.reference(model, x, target)

    def changes_x(model, x, target):
        out = spec.reference(model, x, target)
        x.mul_(0.5)
        return out

    assert "train/eval mode" in through_the_wall(spec, trains_the_model, tmp_path / "a")
    assert "hook" in through_the_wall(spec, leaves_a_hook, tmp_path / "b")
    assert "changed its input `x` in place" in through_the_wall(spec, changes_x, tmp_path / "c")


def test_what_comes_back_is_plain_numbers(tmp_path):
    class Sneaky(torch.Tensor):
        pass

    spec = SPECS["check_gradient"]
    outbox = tmp_path / "out"
    outbox.mkdir()
    x = torch.rand(2, 3)
    observed = _exchange._observe(x.as_subclass(Sneaky).requires_grad_(False), (), _exchange.Arrays(outbox))
    back = _exchange.returned_value(observed["out"], _exchange.Arrays(outbox), torch.device("cpu"))
    assert type(back) is torch.Tensor and torch.equal(back, x)
    np.save(outbox / "9.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        _exchange.Arrays(outbox).get("9.npy")
    for bad in ("../etc/passwd", "x.npy", "1.npz"):
        with pytest.raises(ValueError):
            _exchange.Arrays(outbox).get(bad)
    assert spec  # the check itself is untouched by any of this


def test_a_notebooks_leftover_global_state_is_undone():
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)
    try:
        _exchange.reset_global_state()
        assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32
    finally:
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float32)


def test_a_forged_hook_count_cannot_stall_the_grader(tmp_path):
    spec = SPECS["check_gradient"]
    folder = tmp_path / "x"
    folder.mkdir()
    arrays = _exchange.Arrays(folder)
    with _engine.case_context(1):
        case = _engine.cases_for(spec, 1)[0]
    _, before = _engine.prepare_case(spec, case)
    observation = _exchange._observe(spec.reference(*case.args), case.args, arrays)
    observation["model"]["hooks"] = 10**12
    _exchange.apply_observation(case, observation, arrays)
    with pytest.raises(_engine.Failure, match="hook"):
        _engine.judge_case(spec, case, spec.reference(*case.args), before, spec.reference(*case.args),
                           _engine.argument_names(spec))


@pytest.mark.parametrize("answer, passed", [("b", True), (" (B) ", True), ("a", False), (None, False),
                                            (3, False), (torch.tensor(1.0), False), ([1], False)])
def test_a_concept_question_is_judged_outside_from_the_plain_answer(answer, passed, tmp_path):
    """The sandbox sends back only the answer (a string, a number, None or a type's name); the
    grader judges it with its own copy of the question, and gets the notebook's verdict and hint."""
    from labkit.checks import _questions
    question = _questions.QUESTIONS_BY_CHECK["check_q01_sanity"]
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    outbox.mkdir()
    prepared = grade.prepare([grade.CheckCall("check_q01_sanity", "q01_sanity")], SPECS, inbox)
    _exchange.kernel_main({"q01_sanity": answer}, str(inbox), str(outbox), str(tmp_path))
    sent = json.loads((outbox / _exchange.RESULT).read_text())
    assert set(sent[0]) == {"check", "cases", "answer"}
    verdict = grade.judge(prepared, sent, _exchange.Arrays(outbox))[0]
    expected_pass, expected_hint = question.judge(answer)
    assert verdict["passed"] is passed is expected_pass
    if not isinstance(answer, torch.Tensor):  # a 0-d tensor crosses as its number
        assert verdict["hint"] == expected_hint


def through_the_kernel(check: str, student, folder):
    """The real sandbox path in one process: the grader's manifest, the kernel's side
    (:func:`labkit._exchange.kernel_main` on a namespace holding ``student``), the grader's verdict."""
    inbox, outbox = folder / "in", folder / "out"
    inbox.mkdir(parents=True)
    outbox.mkdir(parents=True)
    prepared = grade.prepare([grade.CheckCall(check, "answer")], SPECS, inbox)
    _exchange.kernel_main({"answer": student}, str(inbox), str(outbox), str(folder))
    sent = json.loads((outbox / _exchange.RESULT).read_text())
    return grade.judge(prepared, sent, _exchange.Arrays(outbox))[0]


def test_answers_that_are_not_one_tensor_are_adapted_in_the_sandbox_as_the_check_does(tmp_path):
    """Lesson 11: bounds come back as a ``(lower, upper)`` pair and the straight-through quantizer
    is judged by its backward pass; the sandbox applies the spec's adapter by name."""
    from labkit.checks import lesson11

    def ibp_linear(lower, upper, weight, bias):
        return tuple(lesson11.ibp_linear(lower, upper, weight, bias))

    def swapped(lower, upper, weight, bias):
        low, high = lesson11.ibp_linear(lower, upper, weight, bias)
        return high, low

    def quantize_bpda(x, levels):
        return x + (lesson11.quantize(x, levels) - x).detach()

    def no_gradient(x, levels):
        return lesson11.quantize(x, levels).detach()

    assert through_the_kernel("check_ibp_linear", ibp_linear, tmp_path / "a")["passed"]
    assert not through_the_kernel("check_ibp_linear", swapped, tmp_path / "b")["passed"]
    assert through_the_kernel("check_straight_through", quantize_bpda, tmp_path / "c")["passed"]
    verdict = through_the_kernel("check_straight_through", no_gradient, tmp_path / "d")
    assert not verdict["passed"] and "gradient" in verdict["hint"]




def _lesson_plans():
    """``(lesson, spec, removed | kept)`` for every check of every solution notebook."""
    from pathlib import Path

    import nbformat

    from labkit import sandbox
    solutions = Path(__file__).resolve().parents[1] / "solutions"
    for name, lesson in sorted(grade.load_lessons(solutions).items()):
        nb = nbformat.read(solutions / f"{name}.ipynb", as_version=4)
        specs = [SPECS[c] for c in lesson.checks if c in SPECS]
        removed, kept = sandbox.plan_view(specs, [c.source for c in nb.cells if c.cell_type == "code"])
        for spec in specs:
            yield pytest.param(spec, sorted(removed | kept), id=f"{name}-{spec.name}")


@pytest.mark.parametrize("spec, withheld", list(_lesson_plans()))
def test_no_labkit_function_computes_an_exercise_while_the_student_is_called(spec, withheld):
    """The class "a wrapper around labkit's own function": every check whose reference calls labkit
    (``lesson08.lrp_epsilon`` calls ``attribution.lrp``) finds that function removed from the
    sandbox's copy or withheld while the student's functions run, in every lesson."""
    from labkit import sandbox
    functions, by_name = sandbox._call_graph(sandbox.LABKIT_DIR)
    calls_labkit = sandbox.reference_functions([spec]) or sandbox._returned_calls(spec.reference, by_name)
    if not calls_labkit:
        pytest.skip(f"{spec.name}'s reference is plain torch: no labkit function gives its answer")
    with _engine.case_context(0):
        case = _engine.cases_for(spec, 0)[0]
    with pytest.raises(RuntimeError, match="not available while the grader calls your functions"):
        with _exchange.withheld(withheld):
            spec.reference(*case.args, **case.kwargs)
    spec.reference(*case.args, **case.kwargs)  # and back to normal afterwards


def test_withheld_functions_raise_through_names_bound_before():
    from labkit import attribution, train
    early, adversary = attribution.gradient, train.FGSMMixedAdversary(eps=0.1)
    loss = adversary.loss
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    keys = [("attribution/gradients.py", "gradient"), ("train.py", "FGSMMixedAdversary.loss")]
    with _exchange.withheld(keys):
        for call in (lambda: early(model, x, y), lambda: loss(model, x, y)):
            with pytest.raises(RuntimeError, match="not available"):
                call()
    assert early(model, x, y).shape == x.shape and torch.isfinite(loss(model, x, y))


def test_the_call_graph_keeps_only_what_a_lesson_reaches():
    """``fit`` calls ``adversary.loss`` and ``attacks.accuracy`` calls its ``attack`` parameter:
    neither reaches labkit's PGD unless the lesson names an adversary that uses it (lesson 03
    trains a surrogate with ``fit`` and must not keep labkit's ``fgsm``/``pgd``)."""
    from labkit import sandbox
    functions, by_name = sandbox._call_graph(sandbox.LABKIT_DIR)
    fit = by_name["fit"]
    plain = sandbox._closure(fit, functions, by_name, mentioned={"fit"})
    assert not {key[1] for key in plain} & {"pgd", "fgsm"}
    adversarial = sandbox._closure(fit, functions, by_name, mentioned={"fit", "PGDAdversary"})
    assert "pgd" in {key[1] for key in adversarial}
    names = sandbox.labkit_names_used(["from labkit import attacks\n%matplotlib inline", "attacks.deepfool(m, x)"])
    assert "deepfool" in names  # an import in one cell names the module in later cells, magics aside


def _mixed_loss(detach: bool):
    def fgsm_mixed_loss(model, x, y, eps, alpha):
        import torch.nn.functional as F
        x_copy = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_copy), y), x_copy)
        x_adv = (x + eps * grad.sign()).clamp(0, 1).detach()
        loss = alpha * F.cross_entropy(model(x), y) + (1 - alpha) * F.cross_entropy(model(x_adv), y)
        return loss.detach() if detach else loss
    return fgsm_mixed_loss


def test_a_loss_that_must_keep_its_graph_is_judged_alike_in_the_notebook_and_the_grader(tmp_path):
    """Lesson 09's mixed loss is returned attached (training backpropagates through it): the
    lesson's solution passes in the grader as in the notebook, and a detached loss fails both."""
    from labkit import checks
    spec = SPECS["check_fgsm_mixed_loss"]
    assert checks.check_fgsm_mixed_loss(_mixed_loss(detach=False)).passed
    assert through_the_wall(spec, _mixed_loss(detach=False), tmp_path / "a") is None
    notebook = checks.check_fgsm_mixed_loss(_mixed_loss(detach=True))
    grader = through_the_wall(spec, _mixed_loss(detach=True), tmp_path / "b")
    assert not notebook.passed and "detached from the model" in notebook.hint and "detached from the model" in grader
def test_lesson_13_answers_are_adapted_in_the_sandbox_as_the_check_does(tmp_path):
    """Lesson 13: a data set comes back as ``(images, labels)`` and a place as ``(row, col)``;
    the sandbox applies the spec's adapter by name, and a kept label is still caught."""
    from labkit import attacks
    from labkit.checks import lesson13

    def nonrobust_batch(model, x, y, target, eps, steps):
        return attacks.pgd(model, x, target, eps=eps, steps=steps, norm="l2", targeted=True), target

    def labels_kept(model, x, y, target, eps, steps):
        return nonrobust_batch(model, x, y, target, eps, steps)[0], y

    def suspicious_region(maps, size):
        return tuple(int(v) for v in lesson13.suspicious_region(maps, size))

    assert through_the_kernel("check_nonrobust_batch", nonrobust_batch, tmp_path / "a")["passed"]
    verdict = through_the_kernel("check_nonrobust_batch", labels_kept, tmp_path / "b")
    assert not verdict["passed"] and "target class" in verdict["hint"]
    assert through_the_kernel("check_suspicious_region", suspicious_region, tmp_path / "c")["passed"]
    assert not through_the_kernel("check_suspicious_region", lambda m, s: suspicious_region(m, s)[::-1],
                                  tmp_path / "d")["passed"]
