"""labkit.grade: a folder of generated submissions graded into the expected gradebook.

The submissions come from lesson 00 (solutions/00_*.ipynb; a small stand-in lesson with the real
``check_predict_proba`` while that notebook does not exist): the solution, the untouched student
version, and one of each failure the grader must survive. Grading runs the real command line
(`python -m labkit.grade`) in two processes at once: everything with a generous time limit,
and the notebook that loops forever with a short one. Those tests are marked ``grading``:
deselect them with ``-m "not grading"``.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit import grade
from labkit.notebooks import student_notebook

ROOT = Path(__file__).resolve().parents[1]
LOOP_TIMEOUT = 20


def stand_in_lesson() -> nbformat.NotebookNode:
    """A one-exercise lesson with a real labkit check, shaped like the practicum's lessons."""
    return new_notebook(cells=[
        new_markdown_cell("# 00 Warm-up"),
        new_code_cell("import torch\nimport labkit\nfrom labkit.checks import check_predict_proba"),
        new_markdown_cell("Return the class probabilities of a batch."),
        new_code_cell("def predict_proba(model, x):\n    ### BEGIN SOLUTION\n    with torch.no_grad():\n"
                      "        return model(x).softmax(dim=1)\n    ### END SOLUTION"),
        new_code_cell("check_predict_proba(predict_proba)"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def lesson_00(folder: Path) -> Path:
    real = sorted((ROOT / "solutions").glob("00_*.ipynb"))
    if real:
        return real[0]
    path = folder / "00_warmup.ipynb"
    nbformat.write(stand_in_lesson(), path)
    return path


def with_cell(nb, source: str, before_first_code: bool = False):
    """A copy of ``nb`` with a code cell inserted after (or before) its first code cell; and the
    inserted cell's number (1-based, as the gradebook counts)."""
    nb = copy.deepcopy(nb)
    first = next(i for i, cell in enumerate(nb.cells) if cell.cell_type == "code")
    index = first if before_first_code else first + 1
    nb.cells.insert(index, new_code_cell(source))
    return nb, index + 1


def handed_in_calls(lesson: grade.Lesson) -> list:
    """The calls whose argument a forger can replace by labkit's reference: a function exercise
    (a concept question, ``check_qNN_*``, takes an answer and has no reference)."""
    return [call for call in lesson.calls if call.arguments.isidentifier() and not call.check.startswith("check_q")]


def forgery_source(lesson: grade.Lesson) -> str:
    """Every cheap way to fake a pass: print it, define the checks, patch labkit.checks and its
    engine, record fake results, shadow labkit with a package in the working directory, and hand
    in labkit's own reference implementations."""
    names = lesson.checks
    hand_in = "\n".join(f"{call.arguments} = references[{call.check!r}]"
                        for call in handed_in_calls(lesson))
    fake_checks = "".join(f"def {n}(*args, **kwargs):\n    print('✅ {n}: passed')\n" for n in names)
    return f"""\
import importlib, os, pkgutil, sys
import labkit.checks
import labkit.checks._engine as engine
references = {{}}
for info in pkgutil.iter_modules(labkit.checks.__path__):
    module = importlib.import_module("labkit.checks." + info.name)
    references.update({{v.name: v.reference for v in vars(module).values() if isinstance(v, engine.Spec)}})
{hand_in}
for name in {names!r}:
    print(f"✅ {{name}}: passed")
    setattr(labkit.checks, name, lambda *args, **kwargs: print("✅ passed"))
    engine.record(name, True)
engine.close = lambda *args, **kwargs: True
engine._ACCEPT_REFERENCE = True
engine.run = lambda spec, student, seed=None: engine.record(spec.name, True) or True
{fake_checks}
os.makedirs("labkit/checks", exist_ok=True)
open("labkit/__init__.py", "w").write("")
open("labkit/checks/__init__.py", "w").write({fake_checks!r})
sys.path.insert(0, os.getcwd())
for name in [n for n in sys.modules if n.startswith("labkit")]:
    del sys.modules[name]
"""


def fake_outputs(nb, checks):
    """Stored outputs claiming every check passed (the grader must not read them)."""
    claim = "".join(f"✅ {check}: passed\n" for check in checks)
    for number, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = number + 1
        cell.outputs = [new_output("stream", name="stdout", text=claim)]
    return nb


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_gradebook(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return {row["student"]: row for row in csv.DictReader(file)}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grading")
    lesson_path = lesson_00(folder)
    solution = nbformat.read(lesson_path, as_version=4)
    lesson = grade.load_lessons(lesson_path)[lesson_path.stem]
    subs, loops = folder / "submissions", folder / "loops"
    (subs / "student").mkdir(parents=True)
    loops.mkdir()
    raises, raise_cell = with_cell(solution, "raise RuntimeError('boom')")
    looping, loop_cell = with_cell(solution, "while True:\n    pass", before_first_code=True)
    forger = student_notebook(solution)
    forger.cells.append(new_code_cell(forgery_source(lesson)))
    notebooks = {
        subs / "solution.ipynb": solution,
        subs / "student" / lesson_path.name: student_notebook(solution),  # id from the folder
        subs / "raises.ipynb": raises,
        subs / "deletes.ipynb": with_cell(solution, (
            "import os\nfor name in os.listdir('.'):\n    os.remove(name)\nassert not os.listdir('.')"))[0],
        subs / "megabytes.ipynb": with_cell(solution, "for _ in range(200):\n    print('x' * 100_000)")[0],
        subs / "memory_hog.ipynb": with_cell(solution, (
            "import numpy as np\nhog = np.empty(7 * 2**30, dtype=np.uint8)  # more than --memory allows"))[0],
        subs / "forger.ipynb": fake_outputs(forger, lesson.checks),
        loops / "looping.ipynb": looping,
    }
    for path, nb in notebooks.items():
        nbformat.write(nb, path)
    (subs / "not_json.ipynb").write_text('{"cells": [ this is not JSON', encoding="utf-8")
    before = {path: digest(path) for path in [*notebooks, subs / "not_json.ipynb"]}

    command = [sys.executable, "-m", "labkit.grade", "--lessons", str(lesson_path), "--no-progress"]
    main = subprocess.Popen(command + [str(subs), "--out", str(folder / "grades.csv"), "--jobs", "2",
                                       "--summary", str(folder / "summary"), "--executed", str(folder / "executed")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        loop = subprocess.run(command + [str(loops), "--out", str(folder / "loops.csv"), "--jobs", "1",
                                         "--timeout", str(LOOP_TIMEOUT)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        log = main.communicate(timeout=600)[0]
    finally:
        main.terminate()  # no-op when it finished; stops its kernels when the test gave up on it
    assert main.returncode == 0 and loop.returncode == 0, log + loop.stdout
    rows = read_gradebook(folder / "grades.csv") | read_gradebook(folder / "loops.csv")
    return SimpleNamespace(rows=rows, checks=lesson.checks, before=before, folder=folder,
                           raise_cell=raise_cell, loop_cell=loop_cell, lesson=lesson)


def results(row, checks):
    return [row[check] for check in checks]


@pytest.mark.grading
def test_every_submission_has_one_row_named_by_the_convention(graded):
    assert set(graded.rows) == {"solution", "student", "raises", "deletes", "megabytes", "memory_hog",
                                "forger", "not_json", "looping"}
    assert graded.checks, "the lesson calls no check"
    assert all(row["lesson"] == graded.lesson.name for row in graded.rows.values())


@pytest.mark.grading
def test_the_solution_passes_everything(graded):
    row = graded.rows["solution"]
    assert results(row, graded.checks) == ["pass"] * len(graded.checks)
    assert (row["status"], row["error"], row["score"]) == ("ok", "", "1.000")
    assert row["passed"] == row["total"] == str(len(graded.checks))


@pytest.mark.grading
def test_the_untouched_student_version_fails_every_check_as_not_implemented(graded):
    row = graded.rows["student"]
    assert results(row, graded.checks) == ["fail"] * len(graded.checks)
    assert row["score"] == "0.000" and row["status"] in ("ok", "cell errors")
    summary = (graded.folder / "summary" / "student.md").read_text(encoding="utf-8")
    assert summary.count("not implemented yet") == len(graded.checks)


@pytest.mark.grading
def test_a_raising_cell_is_reported_and_the_rest_still_runs(graded):
    row = graded.rows["raises"]
    assert (row["status"], row["score"]) == ("cell errors", "1.000")
    assert row["error"].startswith(f"cell {graded.raise_cell}: RuntimeError: boom")


@pytest.mark.grading
def test_an_endless_loop_times_out_and_the_checks_still_run(graded):
    row = graded.rows["looping"]
    assert row["status"] == "timeout"
    assert row["error"].startswith(f"timeout: stopped after {LOOP_TIMEOUT} s, in cell {graded.loop_cell}")
    # interrupted before the exercises were defined: every check ran, and failed
    assert results(row, graded.checks) == ["fail"] * len(graded.checks)


@pytest.mark.grading
def test_deleting_its_files_costs_nothing_and_submissions_stay_unchanged(graded):
    row = graded.rows["deletes"]
    assert (row["status"], row["score"]) == ("ok", "1.000")
    assert {path: digest(path) for path in graded.before} == graded.before


@pytest.mark.grading
def test_megabytes_of_output_are_truncated(graded):
    row = graded.rows["megabytes"]
    assert (row["status"], row["score"]) == ("ok", "1.000")
    executed = graded.folder / "executed" / "megabytes.ipynb"
    text = executed.read_text(encoding="utf-8")
    assert "[labkit.grade: output truncated" in text
    assert len(text.encode()) < (grade.DEFAULT_MAX_OUTPUT_KB + 512) * 1024  # printed: 20 MB


@pytest.mark.grading
def test_the_memory_limit_turns_a_huge_allocation_into_a_memory_error(graded):
    row = graded.rows["memory_hog"]
    assert (row["status"], row["score"]) == ("cell errors", "1.000")
    assert "MemoryError: Unable to allocate 7.00 GiB" in row["error"]


@pytest.mark.grading
def test_invalid_json_costs_only_its_row(graded):
    row = graded.rows["not_json"]
    assert row["status"] == "invalid notebook" and "not a valid notebook" in row["error"]
    assert results(row, graded.checks) == [""] * len(graded.checks)
    assert (row["passed"], row["score"]) == ("0", "0.000")


@pytest.mark.grading
def test_printing_redefining_or_patching_checks_does_not_forge_a_pass(graded):
    row = graded.rows["forger"]
    assert results(row, graded.checks) == ["fail"] * len(graded.checks)
    assert row["score"] == "0.000"
    summary = (graded.folder / "summary" / "forger.md").read_text(encoding="utf-8")
    assert "✅" not in summary and summary.count("❌ fail") == len(graded.checks)


# ---------------------------------------------------------------- the parts that need no kernel

def test_check_calls_are_found_with_ast_across_magics_and_broken_cells():
    nb = new_notebook(cells=[
        new_code_cell("%matplotlib inline\nfrom labkit.checks import check_a\ncheck_a(f)"),
        new_code_cell("import labkit\nlabkit.checks.check_b(g, 3, eps=0.1, **opts)\ncheck_a(f)"),
        new_code_cell("def broken(:\n    check_c(h)"),
        new_markdown_cell("check_d(x) in a markdown cell is not code"),
        new_code_cell("print(my_helper(check_e))"),
    ])
    assert grade.check_calls(nb) == (grade.CheckCall("check_a", "f"),
                                     grade.CheckCall("check_b", "g, 3, eps=0.1, **opts"))


def test_student_ids_and_lessons_follow_the_file_and_folder_names(tmp_path):
    lessons = {name: grade.Lesson(name, (grade.CheckCall(check, "f"),)) for name, check in
               [("00_tour", "check_predict_proba"), ("01_gradient_saliency", "check_gradient")]}
    for relative in ["alice.ipynb", "bob/01_gradient_saliency.ipynb",
                     "carol/01_gradient_saliency/01_gradient_saliency.ipynb", "00_tour-dan.ipynb",
                     "eve/.ipynb_checkpoints/alice-checkpoint.ipynb"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("{}")
    found = {s.student(lessons): s for s in grade.find_submissions([tmp_path])}
    assert set(found) == {"alice", "bob", "carol", "00_tour-dan"}
    by_name = {student: grade.lesson_for(list(s.names), (), lessons) for student, s in found.items()}
    assert by_name["bob"].name == by_name["carol"].name == "01_gradient_saliency"
    assert by_name["00_tour-dan"].name == "00_tour" and by_name["alice"] is None
    called = (grade.CheckCall("check_gradient", "g"),)
    assert grade.lesson_for(["alice"], called, lessons).name == "01_gradient_saliency"


def test_a_check_called_twice_passes_only_when_both_calls_pass():
    verdicts = [{"check": "check_pgd", "passed": True, "hint": ""},
                {"check": "check_pgd", "passed": False, "hint": "outside the eps-ball"},
                {"check": "check_fgsm", "passed": True, "hint": ""}]
    assert grade._combine(verdicts) == {"check_pgd": (False, "outside the eps-ball"),
                                        "check_fgsm": (True, "")}


def test_a_missing_submission_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        grade.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.csv"), "--lessons", str(tmp_path)])
    assert exit_.value.code == 2 and "no submission at" in capsys.readouterr().err


def test_bad_input_gets_a_row_or_a_clear_error(tmp_path, capsys):
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    for name in ("00_warmup", "01_other"):
        nbformat.write(stand_in_lesson(), lessons / f"{name}.ipynb")
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "empty.ipynb").write_bytes(b"")
    (subs / "huge.ipynb").write_bytes(b" " * (2 * 2**20 + 1))
    nbformat.write(new_notebook(cells=[new_code_cell("print(1)")]), subs / "nolesson.ipynb")
    out = tmp_path / "g.csv"
    assert grade.main([str(subs), "--out", str(out), "--lessons", str(lessons), "--max-notebook", "2",
                       "--no-progress", "--sandbox", "none"]) == 0
    rows = read_gradebook(out)
    assert rows["empty"]["status"] == rows["huge"]["status"] == "invalid notebook"
    assert "larger than the limit of 2 MB" in rows["huge"]["error"]
    assert rows["huge"]["sha256"] == digest(subs / "huge.ipynb")
    assert rows["nolesson"]["status"] == "unknown lesson"
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit) as exit_:
        grade.main([str(tmp_path / "none"), "--out", str(tmp_path / "n.csv"), "--lessons", str(lessons)])
    assert exit_.value.code == 2 and "no .ipynb files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grade.main([str(subs), "--out", str(subs / "inside.csv"), "--lessons", str(lessons)])
    assert "must not be inside the submissions" in capsys.readouterr().err


def test_without_bubblewrap_the_grader_warns_or_refuses(monkeypatch):
    monkeypatch.setattr(grade.sandbox, "bwrap_path", lambda: None)
    mode, warning = grade.sandbox_mode("auto")
    assert mode == "none" and "WITHOUT a sandbox" in warning and "apt-get install bubblewrap" in warning
    assert grade.sandbox_mode("none") == ("none", None)
    with pytest.raises(RuntimeError, match="bubblewrap"):
        grade.sandbox_mode("bwrap")
