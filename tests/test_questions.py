"""Concept questions (labkit/checks/_questions.py): each is answered right by its own answer,
wrong by every other choice or a clearly different number, with a hint that does not give the
answer away; each lesson 00-10 asks two to four, in cells the grader counts and the student
notebook leaves blank."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import nbformat
import pytest

from labkit import checks
from labkit.checks import _engine
from labkit.checks._questions import QUESTIONS, Question
from labkit.grade import check_calls
from labkit.notebooks import student_notebook

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def wrong_answers(q: Question) -> list:
    if q.choices:
        return [c for c in q.choices if c != q.answer]
    step = max(10 * q.tolerance, 0.1 * abs(q.answer), 1.0)
    return [q.answer + step, q.answer - step, -q.answer - 1, q.answer * 10 + 1]


@pytest.mark.parametrize("q", QUESTIONS, ids=lambda q: q.name)
def test_the_answer_passes_and_others_fail_without_a_leak(q):
    assert q.judge(q.answer) == (True, "")
    if q.choices:
        assert q.judge(f" ({q.answer.upper()}) ")[0]  # a letter as students write it
    for wrong in wrong_answers(q):
        passed, hint = q.judge(wrong)
        assert not passed and hint
        if q.choices:  # the hint never names the right letter as an option
            assert not re.search(rf"(?<![\w']){q.answer}\)|\"{q.answer}\"|'{q.answer}'", hint), hint
        else:  # nor the right number
            numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", hint)]
            assert all(abs(n - q.answer) > q.tolerance + 1e-9 for n in numbers), hint


@pytest.mark.parametrize("answer, message", [
    (None, "not implemented yet"), (True, "answer with a number"), ("many", "answer with a number"),
    (float("nan"), "answer with a number"), ([784], "answer with a number")])
def test_a_number_question_says_what_it_expects(answer, message):
    passed, hint = checks._questions.QUESTIONS[0].judge(answer)
    assert not passed and message in hint


def test_a_choice_question_says_what_it_expects():
    q = next(q for q in QUESTIONS if q.choices == "abc")
    assert "one letter as a string" in q.judge(1)[1]
    assert "one of the letters a, b, c" in q.judge("z")[1]
    assert "one of the letters" in q.judge("ab")[1]
    assert q.judge(None)[1].startswith("not implemented yet")  # the student notebook's stub


def test_a_question_check_prints_and_records_like_every_check(capsys):
    _engine.clear_results()
    checks.check_q01_black_pixel("b")
    checks.check_q01_black_pixel("a")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "✅ check_q01_black_pixel: passed" and out[1].startswith("❌ check_q01_black_pixel: ")
    assert [(r["check"], r["passed"]) for r in _engine.results()] == [
        ("check_q01_black_pixel", True), ("check_q01_black_pixel", False)]
    _engine.clear_results()


def test_every_lesson_asks_two_to_four_questions_the_grader_counts():
    asked = Counter()
    for path in LESSONS:
        solution = nbformat.read(path, as_version=4)
        calls = [call.check for call in check_calls(solution) if call.check.startswith("check_q")]
        assert 2 <= len(calls) <= 4, f"{path.name}: {len(calls)} concept questions"
        for call in calls:
            assert call[len("check_q"):len("check_q") + 2] == path.name[:2], f"{call} in {path.name}"
            asked[call] += 1
        student = student_notebook(solution)
        for cell in student.cells:  # the student's copy has the question but not the answer
            if cell.get("id", "").startswith("q-") and cell.get("id", "").endswith("-answer"):
                assert "raise NotImplementedError" in cell.source
                name = cell.id[2:-len("-answer")]
                answer = next(q.answer for q in QUESTIONS if q.name == name)
                assert f"{name} = {answer!r}" not in cell.source
    assert set(asked) == {f"check_{q.name}" for q in QUESTIONS} and set(asked.values()) == {1}
    assert len(LESSONS) >= 11
