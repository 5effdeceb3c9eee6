"""Fair to correct work, for every lesson: each solution notebook, handed in as a submission,
gets full marks from the sandboxed grader (``python -m labkit.grade``, bubblewrap when it works
here), with the lessons' own check calls, their functions removed from or withheld in the
sandbox's labkit, and the verdicts computed outside. A check that the notebook passes but the
grader fails (an answer compared differently on the two sides) shows up here. Marked
``grading`` (real kernels; a few minutes)."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import sandbox

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
pytestmark = pytest.mark.grading


@pytest.fixture(scope="module")
def gradebook(tmp_path_factory):
    folder = tmp_path_factory.mktemp("solutions-graded")
    for path in SOLUTIONS:
        (folder / "subs" / f"s{path.name[:2]}").mkdir(parents=True)
        shutil.copy(path, folder / "subs" / f"s{path.name[:2]}" / path.name)
    out = folder / "grades.csv"
    mode = "bwrap" if sandbox.bwrap_works() is None else "none"
    done = subprocess.run([sys.executable, "-m", "labkit.grade", str(folder / "subs"), "--lessons",
                           str(ROOT / "solutions"), "--out", str(out), "--summary", str(folder / "summary"),
                           "--jobs", "2", "--sandbox", mode, "--no-progress"],
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as file:
        return {row["lesson"]: row for row in csv.DictReader(file)}, folder


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_solution_gets_full_marks_from_the_sandboxed_grader(gradebook, path):
    rows, folder = gradebook
    row = rows[path.stem]
    summary = (folder / "summary" / f"s{path.name[:2]}.md").read_text(encoding="utf-8")
    assert row["status"] == "ok" and row["score"] == "1.000", summary
