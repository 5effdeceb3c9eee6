"""The nbgrader route: check results and the raising mode, nbgrader metadata from
``labkit.notebooks``, and nbgrader itself end to end on lesson 01 (the README's commands)."""
import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest
import torch

from labkit import checks
from labkit import notebooks as tool
from labkit.checks import _engine
from labkit.grade import check_calls

ROOT = Path(__file__).resolve().parents[1]
LESSON = "01_gradient_saliency"


def right_gradient(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[torch.arange(len(x)), target].sum(), x)
    return grad


def flipped_gradient(model, x, target):
    return -right_gradient(model, x, target)


# ---------------------------------------------------------------- what a check returns

def test_a_check_returns_a_result_truthy_exactly_on_a_pass(capsys):
    passed = checks.check_gradient(right_gradient)
    failed = checks.check_gradient(flipped_gradient)
    assert passed and passed.passed and passed.name == "check_gradient" and passed.hint == ""
    assert not failed and not failed.passed and "opposite sign" in failed.hint
    assert isinstance(passed, checks.Result)
    # it prints as before: the line, nothing else, and str() of the result is that line
    assert capsys.readouterr().out.splitlines() == [str(passed), str(failed)]
    assert str(passed) == "✅ check_gradient: passed" and str(failed) == f"❌ check_gradient: {failed.hint}"
    assert checks.results()[-1] == {"check": "check_gradient", "passed": False, "hint": failed.hint,
                                    "time": failed.time, "seed": failed.seed}
    assert checks.check_gradient(right_gradient)
    with pytest.raises(AssertionError):
        assert checks.check_gradient(flipped_gradient)


def noisy_gradient(model, x, target):
    warnings.warn("a warning from the student's code")
    print("progress", file=sys.stderr)
    return right_gradient(model, x, target)


def test_raising_mode_raises_the_hint_and_a_pass_writes_no_stderr(capsys):
    with checks.raising():
        with pytest.raises(AssertionError) as info:
            checks.check_gradient(flipped_gradient)
        assert str(info.value) == checks.results()[-1]["hint"] and "opposite sign" in str(info.value)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # as in a kernel (pytest records warnings instead): printed to the current sys.stderr
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            assert checks.check_gradient(noisy_gradient)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.endswith("✅ check_gradient: passed\n")
    assert not checks.check_gradient(flipped_gradient)  # off again after the block


@pytest.mark.parametrize("value, raises", [("autograde", True), ("validate", True), ("", False)])
def test_nbgrader_execution_switches_raising_on(monkeypatch, value, raises):
    monkeypatch.setenv(_engine.NBGRADER_ENV, value)
    if raises:
        with pytest.raises(AssertionError, match="opposite sign"):
            checks.check_gradient(flipped_gradient)
    else:
        assert not checks.check_gradient(flipped_gradient)


# ---------------------------------------------------------------- nbgrader metadata

def lesson_notebook(check_metadata=None, solution_metadata=None, extra_cells=()):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Lesson 98"),
        nbformat.v4.new_code_cell("def area(r):\n    ### BEGIN SOLUTION\n    ### HINT: pi r squared\n"
                                  "    return 3.14159 * r ** 2\n    ### END SOLUTION"),
        nbformat.v4.new_code_cell("checks.check_area(area)"),
        nbformat.v4.new_markdown_cell("Notes for instructors: 42.", metadata={"tags": ["solution-only"]}),
        *extra_cells,
    ]
    for i, cell in enumerate(nb.cells):
        cell.id = f"98-{i:02d}"
    if solution_metadata is not None:
        nb.cells[1].metadata["nbgrader"] = solution_metadata
    if check_metadata is not None:
        nb.cells[2].metadata["nbgrader"] = check_metadata
    return nb


def nbgrader_cells(nb):
    return {cell.metadata["nbgrader"]["grade_id"]: cell for cell in nb.cells if "nbgrader" in cell.metadata}


def test_solution_check_and_setup_cells_get_nbgrader_metadata():
    source = tool.nbgrader_source(lesson_notebook())
    cells = nbgrader_cells(source)
    assert set(cells) == {"labkit_setup", "solution_area", "check_area"}
    assert cells["solution_area"].metadata.nbgrader == {
        "schema_version": 3, "grade": False, "locked": False, "solution": True, "grade_id": "solution_area"}
    assert cells["check_area"].metadata.nbgrader == {
        "schema_version": 3, "grade": True, "locked": True, "solution": False, "points": 1,
        "grade_id": "check_area"}
    assert cells["labkit_setup"].metadata.nbgrader["locked"] and cells["labkit_setup"].source == tool.SETUP_SOURCE
    # the hint moves above nbgrader's block, where the release keeps it; the answer stays inside
    assert cells["solution_area"].source == ("def area(r):\n    # Hint: pi r squared\n    ### BEGIN SOLUTION\n"
                                             "    return 3.14159 * r ** 2\n    ### END SOLUTION")
    assert not any("instructors" in cell.source for cell in source.cells)
    # the student notebook carries the same metadata, so nbgrader can grade it as a submission
    student = tool.student_notebook(lesson_notebook())
    assert {k: c.metadata for k, c in nbgrader_cells(student).items()} == {k: c.metadata for k, c in cells.items()}


def test_a_check_called_in_two_cells_gets_two_grade_ids_and_explicit_metadata_is_kept():
    again = nbformat.v4.new_code_cell("checks.check_area(area)\nchecks.check_volume(volume)")
    explicit = {"schema_version": 3, "grade": True, "locked": True, "solution": False, "points": 5,
                "grade_id": "area_test"}
    cells = nbgrader_cells(tool.nbgrader_source(lesson_notebook(check_metadata=explicit, extra_cells=[again])))
    assert cells["area_test"].metadata.nbgrader["points"] == 5
    assert cells["check_area__check_volume"].metadata.nbgrader["points"] == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"solution_metadata": {"schema_version": 3, "grade": False, "locked": False, "solution": False,
                            "grade_id": "area"}},
     "cell 1 (id 98-01): a solution block outside a solution cell"),
    ({"solution_metadata": {"schema_version": 3, "grade": False, "locked": False, "solution": True,
                            "grade_id": "same"},
      "check_metadata": {"schema_version": 3, "grade": True, "locked": True, "solution": False,
                         "points": 1, "grade_id": "same"}},
     "cell 2 (id 98-02): grade_id 'same' is also the grade_id of"),
    ({"check_metadata": {"schema_version": 3, "grade": True, "locked": True, "solution": False,
                         "grade_id": "area_test"}},
     "cell 2 (id 98-02): a check cell (check_area) without points"),
])
def test_check_names_notebook_and_cell_of_bad_nbgrader_metadata(tmp_path, capsys, kwargs, message):
    (tmp_path / "solutions").mkdir()
    nbformat.write(lesson_notebook(**kwargs), tmp_path / "solutions" / "98_bad.ipynb")
    status = tool.main(["check", "--solutions", str(tmp_path / "solutions"),
                        "--notebooks", str(tmp_path / "notebooks")])
    err = capsys.readouterr().err
    assert status == 2 and f"98_bad.ipynb, {message}" in err


def test_every_lesson_passes_nbgraders_own_metadata_validator():
    pytest.importorskip("nbgrader", reason="nbgrader is a test dependency (pip install -e '.[test]')")
    from nbgrader.nbgraderformat import MetadataValidator
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        solution = nbformat.read(path, as_version=4)
        for nb in (tool.nbgrader_source(solution, path.name), nbformat.read(ROOT / "notebooks" / path.name, as_version=4)):
            MetadataValidator().validate_nb(nb)
            ids = [c.metadata.nbgrader["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
            calls = [c for c in nb.cells if check_calls(nbformat.v4.new_notebook(cells=[c]))]
            assert len(ids) == len(set(ids)) and all(c.metadata.nbgrader["grade"] for c in calls), path.name


# ---------------------------------------------------------------- nbgrader end to end

def run(command, cwd):
    """One command of the README's nbgrader section, with the environment's bin/ first on PATH
    (as `source .venv/bin/activate` does: nbgrader calls `alembic` from there)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1")
    env.pop(_engine.NBGRADER_ENV, None)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def with_answers(nb, answers, flip=None):
    """``nb`` with each solution cell's source taken from ``answers`` (by grade_id); ``flip``:
    the grade_id whose gradient is returned with the wrong sign."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            cell.source = answers[meta["grade_id"]]
            if meta["grade_id"] == flip:
                assert "    return grad\n" in cell.source + "\n"
                cell.source = (cell.source + "\n").replace("    return grad\n", "    return -grad\n")
    return nb


@pytest.mark.nbgrader
def test_nbgrader_generates_validates_autogrades_and_exports_lesson_01(tmp_path):
    pytest.importorskip("nbgrader", reason="nbgrader is a test dependency (pip install -e '.[test]')")
    nbgrader = ["nbgrader"]  # the environment's script: run() puts its bin/ first on PATH
    course = tmp_path / "course"
    run([*nbgrader, "quickstart", "course"], tmp_path)
    run([sys.executable, "-m", "labkit.notebooks", "nbgrader-source", str(course / "source"),
         str(ROOT / "solutions" / f"{LESSON}.ipynb")], ROOT)
    run([*nbgrader, "generate_assignment", LESSON], course)

    name = f"{LESSON}.ipynb"
    source = nbformat.read(course / "source" / LESSON / name, as_version=4)
    release = nbformat.read(course / "release" / LESSON / name, as_version=4)
    text = "\n".join(cell.source for cell in release.cells)
    assert "# Hint: a copy of x that requires grad" in text  # the hints survive the release
    assert "Notes for instructors" not in text and "find_spec(\"labkit\")" in text  # setup cell kept
    answers = {c.metadata.nbgrader["grade_id"]: c.source for c in source.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    released = {c.metadata.nbgrader["grade_id"]: c.source for c in release.cells if "nbgrader" in c.metadata}
    for grade_id, answer in answers.items():
        body = answer.split(tool.BEGIN_SOLUTION)[1].split(tool.END_SOLUTION)[0].strip().splitlines()
        assert body and not any(line.strip() in released[grade_id] for line in body), grade_id
    student = nbformat.read(ROOT / "notebooks" / name, as_version=4)  # labkit's own student notebook
    submissions = {
        "solved": with_answers(release, answers),
        "untouched": release,
        "wrong": with_answers(release, answers, flip="solution_gradient"),
        "solved_labkit_notebook": with_answers(student, answers),
    }
    for student_id, nb in submissions.items():
        folder = course / "submitted" / student_id / LESSON
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / name)

    validated = run([*nbgrader, "validate", f"release/{LESSON}/{name}", f"submitted/solved/{LESSON}/{name}"], course)
    # the untouched release fails on every graded check cell: the exercises' and the questions'
    graded = sum(1 for c in release.cells if c.metadata.get("nbgrader", {}).get("grade"))
    assert graded >= 3 and validated.count(f"VALIDATION FAILED ON {graded} CELL(S)") == 1
    assert "not implemented yet" in validated
    assert validated.count("Success! Your notebook passes all the tests.") == 1  # the solved one

    run([*nbgrader, "autograde", LESSON], course)
    run([*nbgrader, "export"], course)
    with open(course / "grades.csv", newline="") as file:
        grades = {row["student_id"]: row for row in csv.DictReader(file)}
    print((course / "grades.csv").read_text())  # shown with pytest -s
    scores = {student_id: (float(row["score"]), float(row["max_score"])) for student_id, row in grades.items()}
    # the flipped gradient fails check_gradient and check_gradient_x_input (which calls it);
    # check_saliency_map takes |gradient|, so that one really passes
    # the sign-flipped gradient fails check_gradient and check_gradient_x_input, nothing else
    full = float(graded)
    assert scores == {"solved": (full, full), "untouched": (0.0, full), "wrong": (full - 2, full),
                      "solved_labkit_notebook": (full, full)}
    wrong = nbformat.read(course / "autograded" / "wrong" / LESSON / name, as_version=4)
    errors = {c.metadata.nbgrader["grade_id"]: o.evalue for c in wrong.cells if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"}
    assert set(errors) == {"check_gradient", "check_gradient_x_input"}
    assert all("opposite sign" in hint for hint in errors.values())  # the check's hint is the message
