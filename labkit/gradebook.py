"""Running a course with :mod:`labkit.grade`: regrades, late and duplicate submissions, and the
exports (Canvas, Gradescope, HTML feedback). The flags are ``python -m labkit.grade``'s; this
module holds what they do, after the rows are graded.

- ``--only-student NAME`` / ``--only-lesson NN``: grade those submissions only and merge their
  rows into the gradebook given by ``--out`` (rows of the same student and lesson are replaced,
  every other row is kept), written atomically.
- ``--deadline WHEN``: a submission whose file was modified after it gets the note ``late``;
  two submissions of one student for one lesson each get the note ``duplicate``. Both are
  printed, kept in the ``notes`` column, and never merged silently: the Canvas export leaves a
  duplicate's cell empty and lists it.
- ``--canvas FILE --roster CSV``: Canvas's gradebook import (Student, ID, SIS User ID, SIS Login
  ID, Section, then the points of each lesson). The roster is Canvas's own gradebook export (or
  any CSV with at least Student and ID); a submission's name is matched, ignoring case, against
  its ``Submission`` column when it has one, then SIS Login ID, SIS User ID, ID and Student.
- ``--gradescope DIR``: an autograder for Gradescope (``setup.sh``, ``run_autograder``, a copy of
  labkit, the lessons, the hidden checks); ``run_autograder`` calls ``python -m labkit.gradebook
  gradescope /autograder`` (the root is ``$LABKIT_AUTOGRADER_ROOT`` when set), which writes
  ``results/results.json`` in Gradescope's format.
- ``--feedback DIR``: one HTML page per student and lesson: the score, each visible check with
  its hint, the hidden checks as a count passed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import html
import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat

from . import grade

ROSTER_COLUMNS = ("Student", "ID", "SIS User ID", "SIS Login ID", "Section")
MATCH_COLUMNS = ("Submission", "SIS Login ID", "SIS User ID", "ID", "Student")
POINTS_POSSIBLE = "    Points Possible"  # the second row of Canvas's gradebook export, as it writes it
ROOT_ENV = "LABKIT_AUTOGRADER_ROOT"  # where run_autograder finds submission/, source/, results/


# ---------------------------------------------------------------- late, duplicate, regrade

def parse_deadline(text: str) -> datetime.datetime:
    """``2026-12-04T23:59`` (local time) or with an offset (``...+01:00``, ``...Z``)."""
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--deadline {text!r}: expected a date and time such as 2026-12-04T23:59 "
                         f"or 2026-12-04T23:59+01:00") from None
    return when if when.tzinfo else when.astimezone()


def mark(rows: list, deadline: datetime.datetime | None, log) -> None:
    """Add the notes ``late`` (the file's modification time is after ``deadline``) and
    ``duplicate`` (the same student handed in the same lesson more than once) to the rows."""
    for row in rows:
        if deadline is None:
            break
        try:
            modified = datetime.datetime.fromtimestamp(os.stat(row.notebook).st_mtime, datetime.timezone.utc)
        except OSError:
            continue
        if modified > deadline:
            late = modified - deadline
            row.notes.append(f"late: modified {modified.astimezone().isoformat(timespec='seconds')}, "
                             f"{_duration(late)} after the deadline")
            log(f"{row.student} ({row.notebook}): {row.notes[-1]}")
    groups = {}
    for row in rows:
        groups.setdefault((row.student, row.lesson.name if row.lesson else ""), []).append(row)
    for (student, lesson), same in groups.items():
        if len(same) > 1:
            for row in same:
                others = ", ".join(other.notebook for other in same if other is not row)
                row.notes.append(f"duplicate: {student} handed in {lesson or 'an unknown lesson'} "
                                 f"{len(same)} times (also {others})")
            log(f"duplicate: {student}, lesson {lesson or '?'}: " + ", ".join(r.notebook for r in same))


def _duration(delta: datetime.timedelta) -> str:
    seconds = int(delta.total_seconds())
    minutes = seconds // 60
    return (f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min" if minutes
            else f"{seconds} s")


def resolve_lesson(given: str, lessons: dict) -> str:
    """The lesson named, or numbered, ``given`` (``01`` or ``01_gradient_saliency``)."""
    matching = [name for name, lesson in lessons.items() if given in (name, lesson.number)]
    if len(matching) != 1:
        raise ValueError(f"--only-lesson {given}: expected one of the lessons "
                         f"({', '.join(sorted(lessons)) or 'none found'}), got {len(matching)} matches")
    return matching[0]


def selector(students: list[str] | None, lesson: str | None):
    """``select(submission, lessons)`` for :func:`labkit.grade.grade`: the submissions of these
    students, of this lesson (or whose lesson only their calls can tell)."""
    wanted = set(students or ())

    def select(submission, lessons) -> bool:
        if wanted and submission.student(lessons) not in wanted:
            return False
        if lesson:
            found = grade.lesson_for(list(submission.names), (), lessons) if len(lessons) > 1 else None
            return found is None or found.name == lesson
        return True
    return select


def read_gradebook(path: Path) -> tuple[list[str], list[dict]]:
    """The columns and rows of a gradebook CSV; ``ValueError`` when it is not one."""
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns, table = list(reader.fieldnames or []), list(reader)
    if "student" not in columns or "lesson" not in columns:
        raise ValueError(f"{path}, line 1: not a labkit gradebook (no student and lesson columns)")
    return columns, table


PREFIX = ["student", "lesson", "notebook", "sha256"]
SUFFIX = ["passed", "total", "points", "max_points", "score", "status", "error", "notes", "seconds"]


def merge_gradebook(rows: list, out: Path, log) -> None:
    """Write ``rows`` into the gradebook ``out``: each replaces the rows of its student and
    lesson, every other row stays; new columns are added (empty in the old rows). Atomic."""
    columns, table = grade.gradebook_table(rows)
    if not Path(out).exists():
        grade.write_table(columns, table, out)
        return
    old_columns, old_table = read_gradebook(out)
    middle = [c for c in dict.fromkeys(old_columns + columns) if c not in PREFIX + SUFFIX]
    merged_columns = PREFIX + middle + SUFFIX
    regraded = {}
    for cells in table:
        regraded.setdefault((cells["student"], cells["lesson"]), []).append(cells)
    merged, emitted, replaced = [], set(), 0
    for cells in old_table:
        key = (cells.get("student", ""), cells.get("lesson", ""))
        if key not in regraded:
            merged.append(cells)
            continue
        replaced += 1  # an old row of a regraded student and lesson: the new rows take its place
        if key not in emitted:
            merged += regraded[key]
            emitted.add(key)
    added = [cells for key, rows_ in regraded.items() if key not in emitted for cells in rows_]
    grade.write_table(merged_columns, merged + added, out)
    log(f"regrade: {len(table)} rows written into {out} ({replaced} old rows replaced, "
        f"{len(added)} added, {len(old_table) - replaced} kept as they were)")


# ---------------------------------------------------------------- Canvas

def read_roster(path: Path) -> list[dict]:
    """The students of a roster CSV (Canvas's gradebook export, or any CSV with the columns
    Student and ID); ``ValueError`` naming the file and line for a missing or repeated ID."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:  # Canvas writes a BOM
            reader = csv.DictReader(file)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in ("Student", "ID") if name not in header]
            if missing:
                raise ValueError(f"{path}, line 1: the roster needs the columns Student and ID "
                                 f"(Canvas's gradebook export has them); missing {', '.join(missing)}, "
                                 f"found {', '.join(header) or 'nothing'}")
            reader.fieldnames = header
            students, ids = [], {}
            for record in reader:
                line = reader.line_num
                record = {key: (value or "").strip() for key, value in record.items() if key is not None}
                if not any(record.values()) or record.get("Student") == POINTS_POSSIBLE.strip():
                    continue  # a blank line; the export's "Points Possible" row
                if not record.get("ID"):
                    raise ValueError(f"{path}, line {line}: {record.get('Student') or 'a student'} has no ID")
                if record["ID"] in ids:
                    raise ValueError(f"{path}, line {line}: ID {record['ID']} is also the ID on line "
                                     f"{ids[record['ID']]}; each student needs an ID of their own")
                ids[record["ID"]] = line
                students.append(record)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 CSV file ({err.reason})") from None
    if not students:
        raise ValueError(f"{path}: no students in the roster")
    return students


def match_students(names, roster: list[dict]) -> tuple[dict, list[str]]:
    """``{submission name: roster index}`` and the names no single student matches."""
    index = {}
    for number, student in enumerate(roster):
        for column in MATCH_COLUMNS:
            if student.get(column):
                index.setdefault((column, student[column].lower()), set()).add(number)
    found, unmatched = {}, []
    for name in names:
        for column in MATCH_COLUMNS:
            candidates = index.get((column, name.lower()), set())
            if len(candidates) == 1:
                found[name] = next(iter(candidates))
                break
        else:
            unmatched.append(name)
    return found, unmatched


def _plain(cell: str) -> str:
    """A gradebook cell as it was before the CSV's formula escape."""
    return cell[1:] if cell.startswith("'") and cell[1:2] and cell[1] in "=+-@\t\r\n" else cell


def write_canvas(table: list[dict], roster: list[dict], out: Path, log) -> list[str]:
    """Canvas's gradebook import from the gradebook's rows (``table``, as in the CSV): one column
    per lesson with the points, a Points Possible row, one row per roster student (empty where
    no submission). Returns the submission names not in the roster, which are listed by ``log``."""
    lessons = list(dict.fromkeys(_plain(c["lesson"]) for c in table if c.get("lesson")))
    names = list(dict.fromkeys(_plain(c["student"]) for c in table))
    found, unmatched = match_students(names, roster)
    possible, cells, conflicts = {}, {}, {}
    for c in table:
        lesson, name = _plain(c.get("lesson", "")), _plain(c["student"])
        if not lesson:
            continue
        with_max = c.get("max_points", "")
        if with_max:
            possible[lesson] = max(float(with_max), possible.get(lesson, 0.0))
        if name not in found:
            continue
        key = (found[name], lesson)
        if key in cells:
            conflicts.setdefault(key, [cells[key][1]]).append(c.get("notebook", ""))
        cells[key] = (c.get("points", ""), c.get("notebook", ""))
    for (number, lesson), notebooks in conflicts.items():
        cells.pop((number, lesson), None)
        log(f"canvas: {roster[number]['Student']} has {len(notebooks)} rows for {lesson} "
            f"({', '.join(notebooks)}): left empty; regrade the one that counts with --only-student")
    columns = [*ROSTER_COLUMNS, *lessons]
    table_out = [{"Student": POINTS_POSSIBLE, **{lesson: grade.format_points(possible[lesson])
                                                 for lesson in lessons if lesson in possible}}]
    for number, student in enumerate(roster):
        table_out.append({**{column: grade.csv_cell(student.get(column, "")) for column in ROSTER_COLUMNS},
                          **{lesson: cells[(number, lesson)][0] for lesson in lessons if (number, lesson) in cells}})
    grade.write_table(columns, table_out, out)
    if unmatched:
        log(f"canvas: not in the roster, not exported ({len(unmatched)}): {', '.join(unmatched)}")
    return unmatched


# ---------------------------------------------------------------- feedback pages

STYLE = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;"
         "vertical-align:top}.pass{color:#060}.fail{color:#a00}")


def feedback_html(row) -> str:
    """A page a student can read: score, status, each visible check with its points and hint, the
    hidden checks as a count. Everything that comes from the submission is escaped."""
    e = html.escape
    lesson = row.lesson.name if row.lesson else "unknown lesson"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{e(row.student)} — {e(lesson)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{e(row.student)} — {e(lesson)}</h1>"]
    if row.max_points:
        parts.append(f"<p><strong>Score: {grade.format_points(row.points)} / "
                     f"{grade.format_points(row.max_points)} points ({row.points / row.max_points:.0%})"
                     f"</strong></p>")
    parts.append(f"<p>Status: {e(row.status)}" + (f" — {e(row.error)}" if row.error else "") + "</p>")
    parts += [f"<p>Note: {e(note)}</p>" for note in row.notes]
    visible = [(call, ok, earned, row.verdicts[i]["hint"] if i < len(row.verdicts) else "")
               for i, (call, ok, earned) in enumerate(row.call_points()) if not call.hidden]
    if visible:
        parts.append("<table><tr><th>check</th><th>result</th><th>points</th><th>hint</th></tr>")
        for call, ok, earned, hint in visible:
            result = {True: '<span class="pass">pass</span>', False: '<span class="fail">fail</span>',
                      None: "not run"}[ok]
            parts.append(f"<tr><td><code>{e(call.check)}</code></td><td>{result}</td>"
                         f"<td>{grade.format_points(earned)} / {grade.format_points(call.points)}</td>"
                         f"<td>{e(hint or '')}</td></tr>")
        parts.append("</table>")
    if row.lesson and row.lesson.hidden:
        passed, count = row.hidden_passed
        parts.append(f"<p>Hidden checks: {passed} of {count} passed (run by the grader on inputs "
                     f"you did not see; their hints are not shown).</p>")
    groups = {}
    for check, exercise in (row.lesson.exercises() if row.lesson else {}).items():
        groups.setdefault(exercise, []).append(check)
    for checks in groups.values():
        parts.append(f"<p>All or nothing: {e(', '.join(sorted(checks)))} earn their points only when "
                     f"every one of their checks, hidden ones included, passes.</p>")
    return "\n".join(parts) + "\n</body></html>\n"


def page_names(rows: list) -> list[str]:
    """``student--lesson.html`` per row, filesystem-safe and distinct."""
    names, used = [], set()
    for row in rows:
        base = "--".join(re.sub(r"[^\w.-]+", "_", part).strip("._") or "x"
                         for part in (row.student, row.lesson.name if row.lesson else "unknown"))
        name, number = base, 2
        while name in used:
            name, number = f"{base}-{number}", number + 1
        used.add(name)
        names.append(name + ".html")
    return names


def write_feedback(rows: list, folder: Path, into_existing: bool = False) -> None:
    """One page per row. A new folder is written whole (atomically); a regrade (``into_existing``)
    replaces only its rows' pages, each atomically."""
    if not into_existing or not Path(folder).exists():
        with grade.atomic_folder(folder) as temporary:
            for row, name in zip(rows, page_names(rows)):
                (temporary / name).write_text(feedback_html(row), encoding="utf-8")
        return
    for row, name in zip(rows, page_names(rows)):
        with grade.atomic_file(Path(folder) / name) as file:
            file.write(feedback_html(row))


# ---------------------------------------------------------------- Gradescope

SETUP_SH = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu).
set -euo pipefail
cd /autograder/source
apt-get update
apt-get install -y python3 python3-pip python3-venv
for package in $(grep -v '^#' apt.txt); do  # bubblewrap, the Fashion-MNIST data (Debian's package)
    apt-get install -y "$package" || echo "setup.sh: $package is not available on this image"
done
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install --upgrade pip
# the CPU build of torch (the sandbox sees no GPU; Gradescope's machines have none)
/autograder/venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
/autograder/venv/bin/pip install ./labkit-src ipykernel
# the data the lessons load, now (the submissions run offline); without Debian's package, labkit
# downloads it with torchvision into its cache
LOAD='from labkit import data; data.fashion_mnist("train"); data.fashion_mnist("test")'
if ! /autograder/venv/bin/python -c "$LOAD"; then
    /autograder/venv/bin/pip install torchvision
    /autograder/venv/bin/python -c "$LOAD"
fi
"""

RUN_AUTOGRADER = """\
#!/usr/bin/env bash
# Gradescope runs this for each submission: labkit's grader on /autograder/submission, the
# result in /autograder/results/results.json. LABKIT_AUTOGRADER_ROOT and LABKIT_PYTHON
# replace /autograder and its Python (to try it on a machine of your own).
set -euo pipefail
ROOT="${LABKIT_AUTOGRADER_ROOT:-/autograder}"
PYTHON="${LABKIT_PYTHON:-/autograder/venv/bin/python}"
cd "$ROOT"
exec "$PYTHON" -m labkit.gradebook gradescope "$ROOT"
"""


def is_solution(nb) -> bool:
    from .notebooks import BEGIN_SOLUTION, SOLUTION_ONLY
    return any(BEGIN_SOLUTION in cell.source or {SOLUTION_ONLY, grade.HIDDEN_TAG} & set(cell.metadata.get("tags", []))
               for cell in nb.cells)


def hidden_notebook(lesson) -> nbformat.NotebookNode:
    """A notebook of the lesson's hidden check calls only, each in a ``hidden-check`` cell."""
    cells = []
    for call in lesson.hidden:
        extra = f", points={grade.format_points(call.points)}" + (
            f", all_or_nothing={call.all_or_nothing!r}" if call.all_or_nothing else "")
        cell = nbformat.v4.new_code_cell(f"{call.check}({call.arguments}{extra})")
        cell.metadata["tags"] = [grade.HIDDEN_TAG]
        cells.append(cell)
    return nbformat.v4.new_notebook(cells=cells)


def write_gradescope(folder: Path, lessons: dict, lessons_path: Path, options: dict) -> None:
    """Gradescope's autograder source: ``setup.sh``, ``run_autograder``, ``labkit-src/`` (this
    labkit, installable), ``lessons/`` (the student versions), ``hidden/`` (the hidden check
    calls), ``config.json`` (the grader's options) and ``apt.txt``. Zip the folder's contents."""
    from .notebooks import render, student_notebook
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"--gradescope {folder}: exists; remove it or name a new folder")
    files = grade._notebook_files(lessons_path)
    with grade.atomic_folder(folder) as temporary:
        source = temporary / "labkit-src"
        shutil.copytree(grade.LABKIT_DIR, source / "labkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        project = grade.LABKIT_DIR.parent / "pyproject.toml"
        (source / "pyproject.toml").write_text(project.read_text(encoding="utf-8") if project.is_file() else (
            '[project]\nname = "labkit"\nversion = "0"\n[tool.setuptools.packages.find]\ninclude = ["labkit*"]\n'),
            encoding="utf-8")
        (source / "README.md").write_text("labkit, copied by python -m labkit.grade --gradescope\n", encoding="utf-8")
        (temporary / "lessons").mkdir()
        for file in files:
            if file.stem not in lessons:
                continue
            nb = nbformat.read(file, as_version=4)
            student = student_notebook(nb, str(file)) if is_solution(nb) else nb
            (temporary / "lessons" / file.name).write_text(render(student), encoding="utf-8")
            if lessons[file.stem].hidden:
                (temporary / "hidden").mkdir(exist_ok=True)
                (temporary / "hidden" / file.name).write_text(render(hidden_notebook(lessons[file.stem])),
                                                              encoding="utf-8")
        apt = grade.LABKIT_DIR.parent / "apt.txt"
        (temporary / "apt.txt").write_text(apt.read_text(encoding="utf-8") if apt.is_file() else "bubblewrap\n",
                                           encoding="utf-8")
        (temporary / "config.json").write_text(json.dumps(options, indent=1) + "\n", encoding="utf-8")
        for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER)):
            (temporary / name).write_text(text, encoding="utf-8")
            (temporary / name).chmod(0o755)


def gradescope_results(rows: list) -> dict:
    """Gradescope's results.json for the graded notebooks of one submission: the score, and one
    test per check call (visible: the hint; hidden: after_published, pass or fail only)."""
    tests, output = [], []
    for row in rows:
        prefix = f"{Path(row.notebook).name}: " if len(rows) > 1 else ""
        lesson = row.lesson.name if row.lesson else "unknown lesson"
        output.append(f"{prefix}{lesson}: {grade.format_points(row.points)}/"
                      f"{grade.format_points(row.max_points or 0)} points, status {row.status}"
                      + (f" ({row.error})" if row.error else "") + "".join(f"; {n}" for n in row.notes))
        numbers = {}
        for i, (call, ok, earned) in enumerate(row.call_points()):
            numbers[(call.check, call.hidden)] = numbers.get((call.check, call.hidden), 0) + 1
            count = numbers[(call.check, call.hidden)]
            name = call.check + (f" (hidden {count})" if call.hidden else f" ({count})" if count > 1 else "")
            hint = row.verdicts[i]["hint"] if i < len(row.verdicts) else "did not run"
            tests.append({
                "name": prefix + name, "score": float(earned), "max_score": float(call.points),
                "status": "passed" if ok else "failed",
                "output": ("passed" if ok else "failed" if call.hidden else hint or "failed"),
                "visibility": "after_published" if call.hidden else "visible"})
    return {"score": float(sum(row.points for row in rows)),
            "execution_time": int(sum(row.seconds for row in rows)),
            "output": "\n".join(output) or "no notebook (.ipynb) in the submission",
            "tests": tests}


def gradescope_run(root: Path) -> int:
    """What ``run_autograder`` does: grade ``root/submission`` with ``root/source``'s lessons,
    hidden checks and options; write ``root/results/results.json``."""
    root = Path(root)
    source = root / "source"
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    hidden = source / "hidden"
    results = root / "results" / "results.json"
    try:
        rows = grade.grade([root / "submission"], lessons=source / "lessons", options=grade.Options(**config),
                           progress=False, hidden=hidden if hidden.is_dir() else None)
        payload, code = gradescope_results(rows), 0
    except Exception as err:  # the student still gets a result that says what went wrong
        payload, code = {"score": 0.0, "output": f"the autograder failed: {type(err).__name__}: {err}",
                         "tests": []}, 1
    with grade.atomic_file(results) as file:
        json.dump(payload, file, indent=1)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.gradebook",
                                     description="What the exports of python -m labkit.grade run elsewhere.")
    parser.add_argument("command", choices=("gradescope",),
                        help="gradescope ROOT: grade ROOT/submission as Gradescope's run_autograder does")
    parser.add_argument("root", type=Path, nargs="?", default=Path(os.environ.get(ROOT_ENV, "/autograder")))
    args = parser.parse_args(argv)
    return gradescope_run(args.root)


if __name__ == "__main__":
    sys.exit(main())
