"""Running a course with labkit.grade: points, all-or-nothing, hidden checks, regrades, late and
duplicate submissions, and the Canvas, Gradescope and HTML feedback exports.

Most tests need no kernel (rows made by hand, lessons parsed with ast). Two are marked
``grading``: the real command line on a small lesson (the real ``check_predict_proba``) with
``--sandbox none`` (the sandbox is not what they test; tests/test_grade.py and the red-team tests
cover it), and the generated Gradescope ``run_autograder`` on lesson 01's solution in
Gradescope's folder layout, its ``results.json`` validated against Gradescope's documented format
(https://gradescope-autograders.readthedocs.io/en/latest/specs/, "Output format").
"""
from __future__ import annotations

import csv
import datetime
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit import checks, grade, gradebook
from labkit.notebooks import build, nbgrader_source, student_notebook

ROOT = Path(__file__).resolve().parents[1]


def hidden_cell(source: str):
    cell = new_code_cell(source)
    cell.metadata["tags"] = [grade.HIDDEN_TAG]
    return cell


def small_lesson(hidden: str | None = "check_predict_proba(predict_proba, points=3)",
                 visible: str = "check_predict_proba(predict_proba, points=2)") -> nbformat.NotebookNode:
    """A one-exercise solution notebook with the real check_predict_proba, 2 visible points and
    a hidden check worth 3."""
    cells = [
        new_markdown_cell("# 00 Warm-up"),
        new_code_cell("import torch\nfrom labkit.checks import check_predict_proba"),
        new_code_cell("def predict_proba(model, x):\n    ### BEGIN SOLUTION\n    with torch.no_grad():\n"
                      "        return model(x).softmax(dim=1)\n    ### END SOLUTION"),
        new_code_cell(visible),
    ]
    if hidden:
        cells.append(hidden_cell(hidden))
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})


def row_for(lesson: grade.Lesson, passed: list[bool], student="alice", hints=None) -> grade.Row:
    """A graded row as the grader makes it, from one verdict per call."""
    hints = hints or ["" if ok else f"hint {i}" for i, ok in enumerate(passed)]
    row = grade.Row(student, f"{student}.ipynb", lesson)
    row.verdicts = [{"check": call.check, "passed": ok, "hint": hint}
                    for call, ok, hint in zip(lesson.calls, passed, hints)]
    row.results = grade._combine(v for v, call in zip(row.verdicts, lesson.calls) if not call.hidden)
    return row


# ---------------------------------------------------------------- points and hidden checks

def test_points_and_all_or_nothing_are_read_from_the_call_and_left_out_of_its_arguments():
    nb = new_notebook(cells=[
        new_code_cell("check_a(f, points=2)\ncheck_b(g, eps=0.1, all_or_nothing=True, points=0.5)"),
        new_code_cell("check_c(h)"),
        hidden_cell("check_a(f, points=3)"),
    ])
    calls = grade.lesson_calls(nb, "lesson.ipynb")
    assert calls == (grade.CheckCall("check_a", "f", points=2),
                     grade.CheckCall("check_b", "g, eps=0.1", points=0.5, all_or_nothing=True),
                     grade.CheckCall("check_c", "h"),
                     grade.CheckCall("check_a", "f", points=3, hidden=True))
    lesson = grade.Lesson("00", calls)
    assert lesson.max_points == 6.5 and [c.check for c in lesson.hidden] == ["check_a"]
    # a submission's own calls: its points and tags are not the lesson's to set
    assert grade.check_calls(nb, strict=False)[0] == grade.CheckCall("check_a", "f")


@pytest.mark.parametrize("source, message", [
    ("check_a(f, points=-1)", "points=-1: points must not be negative"),
    ("check_a(f, points='two')", "expected a number"),
    ("check_a(f, points=n)", "expected a number"),
    ("check_a(f, points=True)", "expected a number"),
    ("check_a(f, all_or_nothing=1)", "expected True, False or the name of an exercise"),
    ("check_a(f, all_or_nothing='')", "expected True, False or the name of an exercise"),
])
def test_a_bad_points_value_names_the_file_cell_and_line(tmp_path, source, message):
    path = tmp_path / "00_x.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("import labkit\n" + source)]), path)
    with pytest.raises(ValueError, match=f"{path}, cell 2, line 2: .*{message}"):
        grade.load_lessons(path)


def test_a_hidden_check_needs_a_visible_counterpart(tmp_path):
    lonely = new_notebook(cells=[new_code_cell("check_a(f)"), hidden_cell("print(1)\ncheck_b(f)")])
    with pytest.raises(ValueError, match=r"x.ipynb, cell 2, line 2: hidden check check_b has no visible counterpart"):
        grade.lesson_calls(lonely, "x.ipynb")
    with pytest.raises(ValueError, match="tagged 'hidden-check' but calls no check"):
        grade.lesson_calls(new_notebook(cells=[hidden_cell("x = 1")]), "x.ipynb")
    # --hidden: the hidden calls of another notebook, checked against the student lesson
    lessons, hidden = tmp_path / "lessons", tmp_path / "hidden"
    lessons.mkdir(), hidden.mkdir()
    nbformat.write(new_notebook(cells=[new_code_cell("check_a(f)")]), lessons / "00_x.ipynb")
    nbformat.write(new_notebook(cells=[hidden_cell("check_a(f, points=2)")]), hidden / "00_x.ipynb")
    lesson = grade.load_lessons(lessons, hidden)["00_x"]
    assert lesson.calls == (grade.CheckCall("check_a", "f"), grade.CheckCall("check_a", "f", points=2, hidden=True))
    nbformat.write(new_notebook(cells=[hidden_cell("check_z(f)")]), hidden / "00_x.ipynb")
    with pytest.raises(ValueError, match=r"hidden/00_x.ipynb, cell 1, line 1: hidden check check_z has no visible"):
        grade.load_lessons(lessons, hidden)
    (hidden / "00_x.ipynb").unlink()
    nbformat.write(new_notebook(cells=[hidden_cell("check_a(f)")]), hidden / "01_y.ipynb")
    with pytest.raises(ValueError, match="01_y.ipynb: hidden checks for lesson 01_y, which is not among"):
        grade.load_lessons(lessons, hidden)


def test_points_per_check_all_or_nothing_and_the_hidden_count():
    lesson = grade.Lesson("01", (grade.CheckCall("check_a", "f", points=2),
                                 grade.CheckCall("check_b", "g", all_or_nothing=True),
                                 grade.CheckCall("check_a", "f", points=3, hidden=True),
                                 grade.CheckCall("check_b", "g", points=4, hidden=True)))
    row = row_for(lesson, [True, True, False, False])
    # check_a: its visible 2 points stay; check_b is all or nothing: its hidden call failed
    assert [earned for _, _, earned in row.call_points()] == [2, 0, 0, 0]
    assert (row.points, row.max_points, row.hidden_passed) == (2, 10, (0, 2))
    assert (row.passed, row.total) == (2, 2)  # the visible checks
    assert row_for(lesson, [True] * 4).points == 10
    columns, table = grade.gradebook_table([row])
    assert columns.index("hidden_total") < columns.index("points: check_a") < columns.index("points")
    cells = table[0]
    assert (cells["check_a"], cells["check_b"], cells["hidden_passed"], cells["hidden_total"]) == ("pass", "pass", "0", "2")
    assert (cells["points: check_a"], cells["points: check_b"]) == ("2", "0")
    assert (cells["points"], cells["max_points"], cells["score"]) == ("2", "10", "0.200")
    # all_or_nothing="name": the checks marked with one name are one exercise (hidden calls included)
    ibp = grade.Lesson("11", (grade.CheckCall("check_x", "f", all_or_nothing="ibp"),
                              grade.CheckCall("check_y", "g", points=2, all_or_nothing="ibp"),
                              grade.CheckCall("check_z", "h"), grade.CheckCall("check_x", "f", hidden=True)))
    assert ibp.exercises() == {"check_x": "ibp", "check_y": "ibp"}
    assert [e for _, _, e in row_for(ibp, [True, True, True, False]).call_points()] == [0, 0, 1, 0]
    assert [e for _, _, e in row_for(ibp, [True, True, False, True]).call_points()] == [1, 2, 0, 1]
    # a notebook that never ran (invalid): no points, the lesson's maximum
    broken = grade.Row("bob", "bob.ipynb", lesson, status=grade.INVALID)
    assert (broken.points, broken.max_points, grade.score_text(broken)) == (0, 10, "0.000")


def test_the_in_notebook_checks_accept_and_ignore_the_grading_keywords(capsys):
    def predict_proba(model, x):
        return model(x).softmax(dim=1).detach()
    assert checks.check_predict_proba(predict_proba, points=3, all_or_nothing=True)
    assert checks.check_q00_row_sum(1, points=1) is not None
    for name in ("check_gradient", "check_q01_sanity"):
        keywords = [p.name for p in inspect.signature(getattr(checks, name)).parameters.values()
                    if p.kind is p.KEYWORD_ONLY]
        assert tuple(keywords) == grade.GRADING_KEYWORDS
    with pytest.raises(TypeError):
        checks.check_predict_proba(predict_proba, pionts=3)  # a misspelt keyword is not swallowed


def test_build_removes_hidden_cells_and_nbgrader_gets_them_as_hidden_tests(tmp_path):
    solution = small_lesson()
    student = student_notebook(solution, "00_warmup")
    assert not any("points=3" in cell.source for cell in student.cells)
    assert [grade.CheckCall("check_predict_proba", "predict_proba", points=2)] == list(grade.lesson_calls(student))
    source = nbgrader_source(solution, "00_warmup")
    hidden = [cell for cell in source.cells if grade.HIDDEN_TAG in cell.metadata.get("tags", [])]
    assert len(hidden) == 1 and hidden[0].source.startswith("### BEGIN HIDDEN TESTS\n")
    assert hidden[0].source.endswith("\n### END HIDDEN TESTS")
    assert hidden[0].metadata["nbgrader"]["points"] == 3 and hidden[0].metadata["nbgrader"]["grade"]
    visible = next(c for c in source.cells if c.source == "check_predict_proba(predict_proba, points=2)")
    assert visible.metadata["nbgrader"]["points"] == 2
    # build refuses a solution whose hidden check has no visible counterpart, naming it
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    nbformat.write(small_lesson(hidden="check_gradient(predict_proba)"), solutions / "00_warmup.ipynb")
    with pytest.raises(ValueError, match=r"00_warmup.ipynb, cell 5, line 1: hidden check check_gradient"):
        build(solutions, notebooks)
    assert not list(notebooks.glob("*.ipynb")) if notebooks.exists() else True


def test_nbgrader_releases_the_source_version_without_the_hidden_checks():
    """nbgrader's own preprocessor (the one `generate_assignment` runs) empties the hidden region
    and accepts the cell as a graded test cell (it refuses hidden tests outside one)."""
    preprocessors = pytest.importorskip("nbgrader.preprocessors")
    source = nbgrader_source(small_lesson(), "00_warmup")
    released, _ = preprocessors.ClearHiddenTests().preprocess(source, {})
    hidden = [cell for cell in released.cells if grade.HIDDEN_TAG in cell.metadata.get("tags", [])]
    assert [cell.source for cell in hidden] == [""]
    assert "check_predict_proba(predict_proba, points=2)" in [cell.source for cell in released.cells]


# ---------------------------------------------------------------- late, duplicate, regrade

def test_late_and_duplicate_submissions_are_noted_never_merged(tmp_path):
    lesson = grade.Lesson("00_x", (grade.CheckCall("check_a", "f"),))
    rows = []
    for name in ("alice.ipynb", "carol.ipynb", "carol/00_x.ipynb"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
        row = row_for(lesson, [True], student=Path(name).stem if "/" not in name else "carol")
        row.notebook = str(path)
        rows.append(row)
    deadline = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
    before, after = deadline.timestamp() - 60, deadline.timestamp() + 2 * 3600 + 5 * 60
    for path, when in ((tmp_path / "alice.ipynb", after), (tmp_path / "carol.ipynb", before),
                       (tmp_path / "carol" / "00_x.ipynb", before)):
        os.utime(path, (when, when))
    log = []
    gradebook.mark(rows, deadline, log.append)
    assert rows[0].notes == ["late: modified " + datetime.datetime.fromtimestamp(after).astimezone().isoformat(
        timespec="seconds") + ", 2 h 5 min after the deadline"]
    assert all(len(row.notes) == 1 and row.notes[0].startswith("duplicate: carol handed in 00_x 2 times")
               for row in rows[1:])
    assert any(line.startswith(f"alice ({rows[0].notebook}): late: modified") for line in log) and any("duplicate: carol" in line for line in log)
    assert gradebook.parse_deadline("2026-01-01T12:00Z") == deadline
    with pytest.raises(ValueError, match="--deadline 'tomorrow': expected a date and time"):
        gradebook.parse_deadline("tomorrow")


def test_a_regrade_replaces_only_its_rows_and_keeps_the_others(tmp_path, capsys):
    lesson = grade.Lesson("00_x", (grade.CheckCall("check_a", "f"),))
    other = grade.Lesson("01_y", (grade.CheckCall("check_b", "g", points=2),))
    out = tmp_path / "grades.csv"
    grade.write_gradebook([row_for(lesson, [False], "alice"), row_for(lesson, [True], "=bob"),
                           row_for(other, [False], "alice")], out)
    before = out.read_text(encoding="utf-8").splitlines()
    log = []
    gradebook.merge_gradebook([row_for(lesson, [True], "alice"), row_for(lesson, [True], "dan")], out, log.append)
    with open(out, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [(r["student"], r["lesson"], r["points"]) for r in rows] == [
        ("alice", "00_x", "1"), ("'=bob", "00_x", "1"), ("alice", "01_y", "0"), ("dan", "00_x", "1")]
    assert rows[2]["points: check_b"] == "0" and rows[2]["max_points"] == "2"  # untouched row, its columns
    assert out.read_text(encoding="utf-8").splitlines()[2] == before[2]  # bob's row, byte for byte
    assert log == [f"regrade: 2 rows written into {out} (1 old rows replaced, 1 added, 2 kept as they were)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grades.csv"]  # no temporary file left
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv, line 1: not a labkit gradebook"):
        gradebook.merge_gradebook([row_for(lesson, [True])], tmp_path / "other.csv", log.append)
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"
    (tmp_path / "subs").mkdir()
    nbformat.write(small_lesson(), tmp_path / "00_x.ipynb")
    with pytest.raises(SystemExit):  # refused before anything is graded
        grade.main([str(tmp_path / "subs"), "--out", str(tmp_path / "other.csv"), "--only-student", "bob",
                    "--lessons", str(tmp_path / "00_x.ipynb")])
    assert "other.csv, line 1: not a labkit gradebook" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a lesson that is not a notebook, named
        grade.main([str(tmp_path / "subs"), "--out", str(tmp_path / "g.csv"), "--lessons", str(out)])
    assert f"{out}: not a lesson notebook (Notebook does not appear to be JSON" in capsys.readouterr().err


def test_only_lesson_and_only_student_choose_the_submissions_to_regrade(tmp_path):
    lessons = {name: grade.Lesson(name, (grade.CheckCall("check_a", "f"),)) for name in ("00_tour", "01_saliency")}
    assert gradebook.resolve_lesson("01", lessons) == gradebook.resolve_lesson("01_saliency", lessons) == "01_saliency"
    with pytest.raises(ValueError, match="--only-lesson 7: expected one of the lessons \\(00_tour, 01_saliency\\)"):
        gradebook.resolve_lesson("7", lessons)
    for relative in ("alice/00_tour.ipynb", "alice/01_saliency.ipynb", "bob/01_saliency.ipynb", "bob/extra.ipynb"):
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        (tmp_path / relative).write_text("{}")
    found = grade.find_submissions([tmp_path])
    chosen = lambda select: sorted(str(s.path.relative_to(tmp_path)) for s in found if select(s, lessons))  # noqa: E731
    assert chosen(gradebook.selector(["alice"], None)) == ["alice/00_tour.ipynb", "alice/01_saliency.ipynb"]
    # a file whose name tells no lesson is graded too; its row is kept only if it is lesson 01's
    assert chosen(gradebook.selector(None, "01_saliency")) == ["alice/01_saliency.ipynb", "bob/01_saliency.ipynb",
                                                               "bob/extra.ipynb"]
    assert chosen(gradebook.selector(["bob"], "00_tour")) == []


# ---------------------------------------------------------------- Canvas

ROSTER = ("Student,ID,SIS User ID,SIS Login ID,Section\n"
          "    Points Possible,,,,\n"
          "\"Smith, Alice\",101,S1,alice,A\n"
          "\"Jones, Bob\",102,S2,bob,B\n"
          "\"Doe, =Carol\",103,S3,carol,A\n")


@pytest.mark.parametrize("text, message", [
    ("Student,Section\nAlice,A\n", r"roster.csv, line 1: the roster needs the columns Student and ID.*missing ID"),
    ("Student,ID\nAlice,1\nBob,\n", r"roster.csv, line 3: Bob has no ID"),
    ("Student,ID\nAlice,1\nBob,2\nCarol,1\n", r"roster.csv, line 4: ID 1 is also the ID on line 2"),
    ("Student,ID\n", r"roster.csv: no students"),
])
def test_a_roster_with_missing_or_repeated_ids_is_refused_naming_the_line(tmp_path, text, message):
    (tmp_path / "roster.csv").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        gradebook.read_roster(tmp_path / "roster.csv")


def test_canvas_import_has_one_column_per_lesson_and_lists_the_unmatched(tmp_path):
    (tmp_path / "roster.csv").write_text("\ufeff" + ROSTER, encoding="utf-8")  # Canvas's export has a BOM
    roster = gradebook.read_roster(tmp_path / "roster.csv")
    assert [s["ID"] for s in roster] == ["101", "102", "103"]
    l0 = grade.Lesson("00_x", (grade.CheckCall("check_a", "f", points=2),))
    l1 = grade.Lesson("01_y", (grade.CheckCall("check_b", "g", points=3),))
    rows = [row_for(l0, [True], "ALICE"), row_for(l1, [False], "alice"), row_for(l0, [True], "S2"),
            row_for(l0, [False], "carol"), row_for(l0, [True], "carol"), row_for(l0, [True], "mallory")]
    rows[4].notebook = "carol-again.ipynb"
    columns, table = grade.gradebook_table(rows)
    log = []
    unmatched = gradebook.write_canvas(table, roster, tmp_path / "canvas.csv", log.append)
    assert unmatched == ["mallory"] and "not in the roster, not exported (1): mallory" in log[-1]
    assert any("Doe, =Carol has 2 rows for 00_x (carol.ipynb, carol-again.ipynb): left empty" in m for m in log)
    with open(tmp_path / "canvas.csv", newline="", encoding="utf-8") as file:
        written = list(csv.reader(file))
    assert written[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "00_x", "01_y"]
    assert written[1] == ["    Points Possible", "", "", "", "", "2", "3"]
    assert written[2:] == [["Smith, Alice", "101", "S1", "alice", "A", "2", "0"],
                           ["Jones, Bob", "102", "S2", "bob", "B", "2", ""],
                           ["Doe, =Carol", "103", "S3", "carol", "A", "", ""]]


# ---------------------------------------------------------------- feedback and Gradescope's format

def test_feedback_escapes_the_submission_and_shows_hidden_checks_as_a_count():
    lesson = grade.Lesson("00_x", (grade.CheckCall("check_a", "f", points=2),
                                   grade.CheckCall("check_a", "f", hidden=True)))
    row = row_for(lesson, [False, False], student="<script>alert(1)</script>",
                  hints=["your <b>code</b> raised", "SECRET hidden hint"])
    row.error, row.notes = "cell 3: <img src=x onerror=alert(2)>", ["late: <i>"]
    page = gradebook.feedback_html(row)
    assert "<script>" not in page and "<img" not in page and "<b>code" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "your &lt;b&gt;code&lt;/b&gt; raised" in page
    assert "SECRET" not in page and "Hidden checks: 0 of 1 passed" in page
    assert "Score: 0 / 3 points (0%)" in page
    assert gradebook.page_names([row, row]) == ["script_alert_1_script--00_x.html", "script_alert_1_script--00_x-2.html"]


VISIBILITIES = {"hidden", "after_due_date", "after_published", "visible"}


def assert_gradescope_results(results: dict) -> None:
    """results.json as Gradescope documents it (Autograder Specifications, "Output format"):
    top-level score (required unless every test has one), optional execution_time (seconds),
    output, visibility, stdout_visibility, extra_data, tests; each test: optional score,
    max_score, status ("passed"/"failed"), name, number, output, tags, visibility, extra_data."""
    top = {"score", "execution_time", "output", "output_format", "test_output_format", "test_name_format",
           "visibility", "stdout_visibility", "extra_data", "tests", "leaderboard"}
    assert set(results) <= top, set(results) - top
    assert isinstance(results["score"], (int, float)) and not isinstance(results["score"], bool)
    assert isinstance(results.get("execution_time", 0), int)
    assert isinstance(results.get("output", ""), str)
    assert isinstance(results["tests"], list)
    for test in results["tests"]:
        assert set(test) <= {"score", "max_score", "status", "name", "name_format", "number", "output",
                             "output_format", "tags", "visibility", "extra_data"}, test
        assert isinstance(test["score"], float) and isinstance(test["max_score"], float)
        assert 0 <= test["score"] <= test["max_score"]
        assert test["status"] in ("passed", "failed") and test["visibility"] in VISIBILITIES
        assert isinstance(test["name"], str) and isinstance(test["output"], str)
    assert results["score"] == pytest.approx(sum(t["score"] for t in results["tests"]))


def test_gradescope_results_follow_the_documented_format():
    lesson = grade.Lesson("00_x", (grade.CheckCall("check_a", "f", points=2), grade.CheckCall("check_b", "g"),
                                   grade.CheckCall("check_a", "f", points=3, hidden=True)))
    results = gradebook.gradescope_results([row_for(lesson, [True, False, False],
                                                    hints=["", "wrong sign", "SECRET"])])
    assert_gradescope_results(results)
    assert [(t["name"], t["score"], t["max_score"], t["visibility"], t["output"]) for t in results["tests"]] == [
        ("check_a", 2.0, 2.0, "visible", "passed"), ("check_b", 0.0, 1.0, "visible", "wrong sign"),
        ("check_a (hidden 1)", 0.0, 3.0, "after_published", "failed")]
    assert results["score"] == 2.0 and "SECRET" not in json.dumps(results)


def test_export_flags_refuse_an_existing_folder_or_a_roster_alone(tmp_path, capsys):
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    nbformat.write(small_lesson(), lessons / "00_warmup.ipynb")
    (tmp_path / "exists").mkdir()
    for extra, message in [(["--gradescope", str(tmp_path / "exists")], "the folder exists"),
                           (["--feedback", str(tmp_path / "exists")], "the folder exists"),
                           (["--roster", str(tmp_path / "r.csv")], "--canvas and --roster go together")]:
        with pytest.raises(SystemExit):
            grade.main([str(tmp_path / "subs"), "--out", str(tmp_path / "g.csv"), "--lessons", str(lessons), *extra])
        assert message in capsys.readouterr().err
    nbformat.write(small_lesson(visible="check_predict_proba(predict_proba, points=-2)"), lessons / "00_warmup.ipynb")
    with pytest.raises(SystemExit):
        grade.main([str(tmp_path / "subs"), "--out", str(tmp_path / "g.csv"), "--lessons", str(lessons)])
    assert "00_warmup.ipynb, cell 4, line 1: points=-2: points must not be negative" in capsys.readouterr().err
    assert not (tmp_path / "g.csv").exists()


# ---------------------------------------------------------------- the real grader, end to end

def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


@pytest.mark.grading
def test_a_class_graded_exported_and_one_student_regraded(tmp_path):
    """The instructor's workflow: student notebooks as --lessons and the solutions as --hidden;
    points, the hidden check, a late and a duplicate submission, Canvas and feedback pages; then
    one student's fixed submission regraded into the same gradebook and Canvas file."""
    solutions, lessons, subs = tmp_path / "solutions", tmp_path / "notebooks", tmp_path / "subs"
    for folder in (solutions, subs / "carol"):
        folder.mkdir(parents=True)
    solution = small_lesson()
    nbformat.write(solution, solutions / "00_warmup.ipynb")
    build(solutions, lessons)
    student = nbformat.read(lessons / "00_warmup.ipynb", as_version=4)
    assert "points=3" not in (lessons / "00_warmup.ipynb").read_text()  # the hidden check stays with us
    for path, nb in {subs / "alice.ipynb": solution, subs / "bob.ipynb": student,
                     subs / "carol.ipynb": solution, subs / "carol" / "00_warmup.ipynb": student,
                     subs / "<i>eve&.ipynb": solution}.items():
        nbformat.write(nb, path)
    late = time.time() + 3600
    os.utime(subs / "alice.ipynb", (late, late))
    roster = tmp_path / "roster.csv"
    roster.write_text(ROSTER, encoding="utf-8")
    deadline = (datetime.datetime.now() + datetime.timedelta(minutes=10)).isoformat(timespec="minutes")
    common = [sys.executable, "-m", "labkit.grade", "--lessons", str(lessons), "--hidden", str(solutions),
              "--sandbox", "none", "--no-progress", "--out", str(tmp_path / "grades.csv"),
              "--canvas", str(tmp_path / "canvas.csv"), "--roster", str(roster), "--summary", str(tmp_path / "summary")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(common + [str(subs), "--jobs", "2", "--deadline", deadline,
                                   "--feedback", str(tmp_path / "feedback")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    rows = {(r["student"], Path(r["notebook"]).name): r for r in read_csv(tmp_path / "grades.csv")}
    alice, bob = rows[("alice", "alice.ipynb")], rows[("bob", "bob.ipynb")]
    assert (alice["check_predict_proba"], alice["hidden_passed"], alice["points"], alice["max_points"],
            alice["score"]) == ("pass", "1", "5", "5", "1.000")
    assert alice["points: check_predict_proba"] == "5" and alice["notes"].startswith("late: modified")
    assert (bob["check_predict_proba"], bob["hidden_passed"], bob["points"], bob["score"]) == ("fail", "0", "0", "0.000")
    assert bob["notes"] == "" and "after the deadline" in alice["notes"]
    carols = [r for (name, _), r in rows.items() if name == "carol"]
    assert len(carols) == 2 and all("duplicate: carol handed in 00_warmup 2 times" in r["notes"] for r in carols)
    assert "alice.ipynb): late: modified" in run.stderr and "duplicate: carol" in run.stderr
    assert "not in the roster, not exported (1): <i>eve&" in run.stderr
    canvas = {r["ID"]: r for r in read_csv(tmp_path / "canvas.csv") if r["ID"]}
    assert (canvas["101"]["00_warmup"], canvas["102"]["00_warmup"], canvas["103"]["00_warmup"]) == ("5", "0", "")
    pages = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "feedback").iterdir()}
    assert set(pages) == {"alice--00_warmup.html", "bob--00_warmup.html", "carol--00_warmup.html",
                          "carol--00_warmup-2.html", "i_eve--00_warmup.html"}
    assert "<i>eve" not in pages["i_eve--00_warmup.html"] and "&lt;i&gt;eve&amp;" in pages["i_eve--00_warmup.html"]
    assert "not implemented yet" in pages["bob--00_warmup.html"] and "Hidden checks: 0 of 1 passed" in pages["bob--00_warmup.html"]
    assert "Score: 5 / 5 points (100%)" in pages["alice--00_warmup.html"]

    # bob fixes his notebook: regrade him alone; everyone else's row stays as it was
    before = {key: r for key, r in rows.items() if key[0] != "bob"}
    nbformat.write(solution, subs / "bob.ipynb")
    run = subprocess.run(common + [str(subs), "--only-student", "bob", "--feedback", str(tmp_path / "feedback")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert "regrade: 1 rows written into" in run.stderr and "(1 old rows replaced, 0 added, 4 kept" in run.stderr
    rows = {(r["student"], Path(r["notebook"]).name): r for r in read_csv(tmp_path / "grades.csv")}
    assert {key: r for key, r in rows.items() if key[0] != "bob"} == before
    assert (rows[("bob", "bob.ipynb")]["points"], rows[("bob", "bob.ipynb")]["hidden_passed"]) == ("5", "1")
    assert rows[("bob", "bob.ipynb")]["notes"].startswith("regraded ")
    assert {r["ID"]: r["00_warmup"] for r in read_csv(tmp_path / "canvas.csv") if r["ID"]}["102"] == "5"
    assert "Score: 5 / 5" in (tmp_path / "feedback" / "bob--00_warmup.html").read_text(encoding="utf-8")
    assert len(list((tmp_path / "feedback").iterdir())) == 5
    summaries = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "summary").iterdir()}
    assert len(summaries) == 5 and "score: 5/5 points" in summaries["bob.md"]  # the others' pages kept
    assert "score: 5/5 points" in summaries["alice.md"] and "hidden checks passed: 1/1" in summaries["alice.md"]


@pytest.mark.grading
def test_the_gradescope_autograder_runs_lesson_01_in_gradescopes_layout(tmp_path):
    """--gradescope writes the autograder; its run_autograder, run here with the root moved to a
    temporary folder, grades lesson 01's solution with one hidden check and writes results.json."""
    lesson = ROOT / "solutions" / "01_gradient_saliency.ipynb"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    nbformat.write(new_notebook(cells=[hidden_cell("checks.check_gradient(gradient, points=2)")]),
                   hidden / lesson.name)
    out = tmp_path / "gradescope"
    run = subprocess.run([sys.executable, "-m", "labkit.grade", "--gradescope", str(out), "--lessons",
                          str(ROOT / "solutions"), "--hidden", str(hidden), "--only-lesson", "01", "--sandbox", "none"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert {p.name for p in out.iterdir()} >= {"setup.sh", "run_autograder", "labkit-src", "lessons", "hidden",
                                               "config.json", "apt.txt"}
    assert os.access(out / "run_autograder", os.X_OK) and os.access(out / "setup.sh", os.X_OK)
    assert subprocess.run(["bash", "-n", str(out / "setup.sh")]).returncode == 0
    # setup.sh's `pip install ./labkit-src`: the copy builds into a wheel with the model weights
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(out / "labkit-src")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    import zipfile
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("labkit-*.whl"))) as wheel:
        names = wheel.namelist()
    assert "labkit/gradebook.py" in names and any(n.startswith("labkit/models/weights/") for n in names)
    assert [p.name for p in (out / "lessons").iterdir()] == [lesson.name]
    released = (out / "lessons" / lesson.name).read_text(encoding="utf-8")
    assert "### BEGIN SOLUTION" not in released and "NotImplementedError" in released  # the student version
    # Gradescope's layout: /autograder/{source,submission,results}
    root = tmp_path / "autograder"
    shutil.copytree(out, root / "source")
    (root / "submission").mkdir()
    (root / "results").mkdir()
    shutil.copy(lesson, root / "submission" / "my_work.ipynb")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update({gradebook.ROOT_ENV: str(root), "LABKIT_PYTHON": sys.executable,
                "PYTHONPATH": str(root / "source" / "labkit-src")})  # the autograder's own copy of labkit
    run = subprocess.run([str(root / "source" / "run_autograder")], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((root / "results" / "results.json").read_text(encoding="utf-8"))
    assert_gradescope_results(results)
    calls = grade.load_lessons(lesson)[lesson.stem].calls
    assert [t["name"] for t in results["tests"]] == [c.check for c in calls] + ["check_gradient (hidden 1)"]
    assert results["score"] == sum(c.points for c in calls) + 2, results["output"]
    assert [t["visibility"] for t in results["tests"]] == ["visible"] * len(calls) + ["after_published"]
