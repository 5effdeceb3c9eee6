"""The README's container recipe, as far as this machine can run it (no Docker engine here: only
the client is installed, so ``docker build`` cannot run). What the recipe promises is checked
on the image's contents instead: its own ``git archive`` line builds a context without
``solutions/``, and the grader from that context, with ``--lessons notebooks/`` as the recipe
runs it, grades lesson 00 in the sandbox, full marks for the solution and none for the
untouched student version. Marked ``grading`` (real kernels)."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest

from labkit import sandbox
from labkit.notebooks import student_notebook

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.grading,
              pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                 reason="needs the git repository")]


def recipe() -> tuple[list[str], str]:
    """The recipe's ``git archive`` command and its grading command, read from the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Grading in a container"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    archive = block.strip().splitlines()[0].split("|")[0].split()
    grading = re.search(r"python -m labkit\.grade .*", block).group(0)
    return [part.strip("'") for part in archive], grading


def test_the_recipe_builds_an_image_without_the_answer_key_that_grades(tmp_path):
    archive, grading = recipe()
    assert archive[:3] == ["git", "archive", "HEAD"] and "--lessons /labkit/notebooks" in grading
    data = subprocess.run(archive, cwd=ROOT, capture_output=True, check=True).stdout
    image = tmp_path / "labkit"
    image.mkdir()
    (tmp_path / "context.tar").write_bytes(data)
    with tarfile.open(tmp_path / "context.tar") as tar:
        tar.extractall(image, filter="data")
    assert not (image / "solutions").exists() and (image / "notebooks").is_dir()
    assert not list(image.rglob("*solution*.ipynb"))

    lesson = next((ROOT / "solutions").glob("00_*.ipynb"))
    subs = tmp_path / "subs"
    for student, nb in {"ada": nbformat.read(lesson, as_version=4),
                        "bob": student_notebook(nbformat.read(lesson, as_version=4))}.items():
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, subs / student / lesson.name)
    out = tmp_path / "out" / "grades.csv"
    mode = "bwrap" if sandbox.bwrap_works() is None else "none"
    # the recipe's command, with the container's paths replaced by this test's folders
    command = grading.replace("/subs", str(subs)).replace("/labkit/notebooks", str(image / "notebooks"))
    command = command.replace("/out/grades.csv", str(out)).replace("/out/feedback", str(tmp_path / "out" / "feedback"))
    argv = [sys.executable, *command.split()[1:], "--sandbox", mode, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(image), "OMP_NUM_THREADS": "1"}
    which = subprocess.run([sys.executable, "-c", "import labkit; print(labkit.__file__)"], cwd=image, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(which).is_relative_to(image), which  # the image's labkit grades, not this checkout's
    done = subprocess.run(argv, cwd=image, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as file:
        rows = {row["student"]: row for row in csv.DictReader(file)}
    assert rows["ada"]["score"] == "1.000" and rows["ada"]["status"] == "ok", rows["ada"]
    assert rows["bob"]["score"] == "0.000", rows["bob"]

