"""Student notebooks from solution notebooks: ``python -m labkit.notebooks build|check``.

``solutions/NN_name.ipynb`` is the source an instructor edits; ``notebooks/NN_name.ipynb`` is
generated from it and never edited by hand. Generating a student notebook

- replaces the code between nbgrader's markers ``### BEGIN SOLUTION`` and ``### END SOLUTION``
  by one line ``raise NotImplementedError("...")`` at the indentation of the BEGIN marker; a
  ``### HINT: ...`` comment inside the block becomes the message (several are joined);
- removes cells tagged ``solution-only`` (cell metadata ``tags``), e.g. answers to questions,
  and cells tagged ``hidden-check``: check calls only the grader runs (``labkit.grade``; a hidden
  check needs a visible call of the same check, and ``points=`` values must be numbers >= 0, or
  ``build`` stops naming the cell and line);
- clears outputs, execution counts, execution timings and saved widget state;
- inserts a setup cell after the title that installs labkit where the kernel cannot import it
  (Colab, a fresh environment) and does nothing elsewhere: from a ``labkit-*.whl`` or
  ``labkit-*.tar.gz`` in the notebook's folder when there is one, else from ``INSTALL_SPEC``;
- gives the cells nbgrader's metadata (below), so that nbgrader can grade them as submissions.

The output is deterministic (nbformat's stable JSON, sorted keys), so ``check`` compares bytes:
it exits with status 1 and lists every student notebook that differs from what its solution
generates, is missing, or has no solution, and with status 2 naming notebook and cell when a
solution notebook is malformed or its nbgrader metadata is wrong.

nbgrader
--------
``python -m labkit.notebooks nbgrader-source DIR [NOTEBOOK ...]`` writes nbgrader's *source*
version of lessons (default: every solution) as ``DIR/NN_name/NN_name.ipynb``, one assignment
per lesson; ``DIR`` is a course's ``source/`` folder (README, "Using labkit with nbgrader").
It is generated, not stored: ``solutions/`` stays the only source. It is the student version
with the solutions still in nbgrader's markers and each ``### HINT:`` moved above its block as
a ``# Hint:`` comment, because ``nbgrader generate_assignment`` replaces the whole block. Both
versions carry the same cell metadata, written where a solution cell has none of its own:

- the setup cell: read-only (locked), ``grade_id`` ``labkit_setup``;
- a code cell with a solution block: a solution cell, ``grade_id`` ``solution_<function>``;
- a code cell that calls checks: a locked test cell worth its calls' points (``points=`` in
  the call, 1 by default), ``grade_id`` the check's name (``check_gradient``); a name taken
  already gets ``_2``, ``_3``, ...;
- ``solution-only`` cells are left out of both, so nbgrader never sees them; ``hidden-check``
  cells are left out of the student version and kept in the source version inside nbgrader's
  ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS``, which nbgrader strips on release.

A cell whose solution notebook sets ``metadata.nbgrader`` keeps that metadata as it is (e.g.
other points). Wrong metadata fails ``build`` and ``check``: a solution block outside a solution
cell, two cells with one ``grade_id``, a check cell without points. Test cells need nothing
else: while nbgrader autogrades or validates, a failing check raises ``AssertionError(hint)``
(``labkit.checks.raising``).

``python -m labkit.notebooks execute [NOTEBOOK ...]`` (default: every solution) re-runs solution
notebooks in place, in a fresh kernel in their own folder, so that their stored outputs (which
nbval compares) are current; it stores no execution timings and no widget state, and runs the
kernel with ``OMP_NUM_THREADS=1`` unless set (the same as the nbval settings in
``solutions/conftest.py``). Run ``build`` afterwards.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import nbformat

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
HINT = "### HINT:"
SOLUTION_ONLY = "solution-only"
BEGIN_HIDDEN_TESTS = "### BEGIN HIDDEN TESTS"  # nbgrader's markers for tests it releases without
END_HIDDEN_TESTS = "### END HIDDEN TESTS"
DEFAULT_MESSAGE = "replace this line with your code"
NBGRADER_SCHEMA = 3  # nbgrader 0.6 and later

# Where Colab and other fresh environments install labkit from; one place to change.
INSTALL_SPEC = "labkit @ git+https://github.com/OWNER/labkit"
SETUP_CELL_ID = "labkit-setup"
# A wheel or sdist uploaded next to the notebook (Colab: the Files panel; built by `make wheel`)
# wins over INSTALL_SPEC, so the notebooks also work where the repository has no public address.
SETUP_SOURCE = (
    "# Colab or a fresh environment: install labkit when this kernel cannot import it, from a\n"
    "# labkit wheel uploaded next to this notebook (`make wheel` builds it), else from the web.\n"
    "import glob\n"
    "import importlib.util\n"
    "\n"
    "if importlib.util.find_spec(\"labkit\") is None:\n"
    "    uploaded = sorted(glob.glob(\"labkit-*.whl\") + glob.glob(\"labkit-*.tar.gz\"))\n"
    f"    source = uploaded[-1] if uploaded else \"{INSTALL_SPEC}\"\n"
    "    %pip install --quiet \"{source}\"\n"
)


def _rewrite_blocks(source: str, where: str, block: Callable[[str, list, list], list]) -> str:
    """``source`` with every marked solution block replaced by ``block(indent, hints, body)``:
    ``hints`` the texts of its ``### HINT:`` lines, ``body`` its other lines."""
    kept, hints, body, indent, begin_line = [], [], [], "", None
    for number, line in enumerate(source.split("\n"), start=1):
        stripped = line.strip()
        if stripped.startswith(BEGIN_SOLUTION):
            if begin_line is not None:
                raise ValueError(f"{where}, line {number}: {BEGIN_SOLUTION} inside the solution "
                                 f"block opened on line {begin_line}")
            begin_line, hints, body, indent = number, [], [], line[:len(line) - len(line.lstrip())]
        elif stripped.startswith(END_SOLUTION):
            if begin_line is None:
                raise ValueError(f"{where}, line {number}: {END_SOLUTION} without a {BEGIN_SOLUTION}")
            kept += block(indent, hints, body)
            begin_line = None
        elif begin_line is not None:
            if stripped.startswith(HINT):
                hints.append(stripped[len(HINT):].strip())
            else:
                body.append(line)
        else:
            kept.append(line)
    if begin_line is not None:
        raise ValueError(f"{where}, line {begin_line}: {BEGIN_SOLUTION} is never closed by {END_SOLUTION}")
    return "\n".join(kept)


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every marked solution block in ``source`` by a ``NotImplementedError`` line."""
    def placeholder(indent, hints, body):
        message = " ".join(hints) or DEFAULT_MESSAGE
        return [f"{indent}raise NotImplementedError({json.dumps(message, ensure_ascii=False)})"]
    return _rewrite_blocks(source, where, placeholder)


def hints_above_solutions(source: str, where: str = "cell") -> str:
    """Move each block's ``### HINT:`` lines above its ``### BEGIN SOLUTION`` as ``# Hint:``
    comments, where they survive nbgrader's release (which replaces the whole block)."""
    def commented(indent, hints, body):
        return ([f"{indent}# Hint: {hint}" for hint in hints]
                + [f"{indent}{BEGIN_SOLUTION}", *body, f"{indent}{END_SOLUTION}"])
    return _rewrite_blocks(source, where, commented)


def _setup_cell(nb) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(SETUP_SOURCE)
    if (nb.nbformat, nb.nbformat_minor) >= (4, 5):
        cell.id = SETUP_CELL_ID
    else:
        cell.pop("id", None)
    return cell


def _cell_name(name: str, index: int, cell) -> str:
    return f"{name}, cell {index}" + (f" (id {cell.id})" if cell.get("id") else "")


def _lesson(solution: nbformat.NotebookNode, name: str, rewrite: Callable[[str, str], str],
            keep_hidden: bool = False):
    """What the student and the nbgrader versions share: no ``solution-only`` cells, no outputs,
    the setup cell, nbgrader metadata on every solution, check and setup cell; ``rewrite(source,
    where)`` turns each code cell's solution blocks into that version's form. ``hidden-check``
    cells are left out, or (``keep_hidden``, nbgrader's version) kept inside nbgrader's
    ``### BEGIN HIDDEN TESTS`` markers, which nbgrader removes when it releases the assignment.
    The lesson's check calls are checked first (points, hidden checks' counterparts)."""
    from .grade import HIDDEN_TAG, lesson_calls
    lesson_calls(solution, name)  # ValueError naming cell and line: bad points, a lone hidden check
    nb = copy.deepcopy(solution)
    cells, names = [], []
    for index, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if SOLUTION_ONLY in tags or (HIDDEN_TAG in tags and not keep_hidden):
            continue
        if HIDDEN_TAG in tags:
            cell.source = f"{BEGIN_HIDDEN_TESTS}\n{cell.source.rstrip()}\n{END_HIDDEN_TESTS}"
        where = _cell_name(name, index, cell)
        if cell.cell_type != "code" and BEGIN_SOLUTION in cell.source:
            raise ValueError(f"{where}: solution markers are only allowed in code cells; tag a "
                             f"{cell.cell_type} cell that holds answers '{SOLUTION_ONLY}' instead")
        cells.append(cell)
        names.append(where)
    title_cells = 1 if cells and cells[0].cell_type == "markdown" else 0
    cells.insert(title_cells, _setup_cell(nb))
    names.insert(title_cells, f"{name}, the setup cell")
    _add_nbgrader_metadata(cells, setup_index=title_cells)
    problems = nbgrader_problems(cells, names)
    if problems:
        raise ValueError("\n".join(problems))
    for cell, where in zip(cells, names):
        if cell.cell_type == "code":
            cell.source = rewrite(cell.source, where)
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    nb.cells = cells
    nb.metadata.pop("widgets", None)
    return nb


def student_notebook(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The student version of a solution notebook (a new notebook; the input is untouched)."""
    return _lesson(solution, name, strip_solutions)


def nbgrader_source(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The version of a solution notebook that ``nbgrader generate_assignment`` takes: the
    student version's cells and metadata, with the solutions in nbgrader's markers and the hints
    as comments above them (a new notebook; the input is untouched)."""
    return _lesson(solution, name, hints_above_solutions, keep_hidden=True)


# ---------------------------------------------------------------- nbgrader cell metadata

def _calls(cell) -> tuple:
    from .grade import check_calls  # the grader's reading of a check call, in one place
    return check_calls(nbformat.v4.new_notebook(cells=[cell]))


def _checks_called(cell) -> list[str]:
    return list(dict.fromkeys(call.check for call in _calls(cell)))


def _nbgrader_defaults(cell, setup: bool) -> dict | None:
    """nbgrader's metadata for a cell that has none: the setup cell is read-only; a cell with a
    solution block is a solution cell; a cell that calls checks is a locked test worth one
    point per check, ``grade_id`` the check's name."""
    base = {"schema_version": NBGRADER_SCHEMA, "grade": False, "locked": False, "solution": False}
    if setup:
        return {**base, "locked": True, "grade_id": "labkit_setup"}
    if cell.cell_type != "code":
        return None
    if BEGIN_SOLUTION in cell.source:
        defined = [line.split("(")[0][4:].strip() for line in cell.source.split("\n") if line.startswith("def ")]
        fallback = re.sub(r"[^A-Za-z0-9_\-]", "_", cell.get("id") or "cell")
        return {**base, "solution": True, "grade_id": "solution_" + "_".join(defined or [fallback])}
    calls = _calls(cell)
    if calls:
        checks = list(dict.fromkeys(call.check for call in calls))
        points = sum(call.points for call in calls)
        return {**base, "grade": True, "locked": True, "points": int(points) if points == int(points) else points,
                "grade_id": "__".join(checks)}
    return None


def _add_nbgrader_metadata(cells: list, setup_index: int) -> None:
    """Defaults where a cell has no ``nbgrader`` metadata (metadata written in the solution
    notebook is kept as it is); a default ``grade_id`` taken already gets ``_2``, ``_3``, ..."""
    taken = {cell.metadata["nbgrader"].get("grade_id") for cell in cells if "nbgrader" in cell.metadata}
    for index, cell in enumerate(cells):
        if "nbgrader" in cell.metadata:
            continue
        metadata = _nbgrader_defaults(cell, setup=index == setup_index)
        if metadata is None:
            continue
        grade_id, number = metadata["grade_id"], 2
        while metadata["grade_id"] in taken:
            metadata["grade_id"], number = f"{grade_id}_{number}", number + 1
        taken.add(metadata["grade_id"])
        cell.metadata["nbgrader"] = metadata


def nbgrader_problems(cells: list, names: list[str]) -> list[str]:
    """What nbgrader would reject or grade wrongly, one line per problem, naming the cell: a
    solution block outside a solution cell, a ``grade_id`` used twice or malformed, a check
    call outside a graded test cell with points, a check in a solution cell."""
    problems, seen = [], {}
    for cell, where in zip(cells, names):
        meta = cell.metadata.get("nbgrader")
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source and not (meta or {}).get("solution"):
            problems.append(f"{where}: a solution block outside a solution cell (its nbgrader "
                            f"metadata lacks solution: true); nbgrader refuses to release it")
        if meta is None:
            continue
        grade_id = meta.get("grade_id")
        if grade_id is None and any(meta.get(key) for key in ("grade", "locked", "solution")):
            problems.append(f"{where}: nbgrader metadata without a grade_id")
        if grade_id is not None and not re.fullmatch(r"[A-Za-z0-9_\-]+", grade_id):
            problems.append(f"{where}: grade_id {grade_id!r} may contain only letters, digits, _ and -")
        if grade_id in seen:
            problems.append(f"{where}: grade_id {grade_id!r} is also the grade_id of {seen[grade_id]}; "
                            f"nbgrader needs one grade_id per cell")
        elif grade_id is not None:
            seen[grade_id] = where
        checks = _checks_called(cell) if cell.cell_type == "code" else []
        if checks and meta.get("solution"):
            problems.append(f"{where}: calls {', '.join(checks)} in a solution cell, which nbgrader "
                            f"does not grade automatically; put the check in a cell of its own")
        elif checks and not (meta.get("grade") and isinstance(meta.get("points"), (int, float))
                             and meta["points"] > 0):
            problems.append(f"{where}: a check cell ({', '.join(checks)}) without points: nbgrader "
                            f"metadata needs grade: true and points > 0")
    return problems


def render(nb: nbformat.NotebookNode) -> str:
    """The notebook as nbformat's stable JSON text, ending in a newline."""
    text = nbformat.writes(nb, version=nbformat.NO_CONVERT)
    return text if text.endswith("\n") else text + "\n"


def expected_notebooks(solutions: Path) -> dict[str, str]:
    """``{file name: student notebook text}`` for every solution notebook in ``solutions``."""
    expected = {}
    for path in sorted(Path(solutions).glob("*.ipynb")):
        solution = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        expected[path.name] = render(student_notebook(solution, str(path)))
    return expected


def build(solutions: Path, notebooks: Path) -> list[Path]:
    """Write the student notebooks; returns the files that changed (unchanged files are left
    alone, so their modification times stay)."""
    notebooks = Path(notebooks)
    notebooks.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in expected_notebooks(solutions).items():
        target = notebooks / name
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            written.append(target)
    return written


def drift(solutions: Path, notebooks: Path) -> list[str]:
    """Every way ``notebooks`` differs from what ``solutions`` generates, one line each."""
    solutions, notebooks = Path(solutions), Path(notebooks)
    expected = expected_notebooks(solutions)
    problems = []
    for name, text in expected.items():
        target = notebooks / name
        if not target.is_file():
            problems.append(f"{target}: missing (generated from {solutions / name})")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"{target}: differs from what {solutions / name} generates")
    for target in sorted(notebooks.glob("*.ipynb")):
        if target.name not in expected:
            problems.append(f"{target}: has no source {solutions / target.name}")
    return problems


def write_nbgrader_sources(solutions: list[Path], folder: Path) -> list[Path]:
    """nbgrader's layout: ``folder/NN_name/NN_name.ipynb`` for each solution notebook, one
    assignment per lesson (``folder`` is usually a course's ``source/``)."""
    written = []
    for path in map(Path, solutions):
        solution = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        target = Path(folder) / path.stem / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(nbgrader_source(solution, str(path))), encoding="utf-8")
        written.append(target)
    return written


def execute(path: Path, timeout: int = 600) -> float:
    """Run a notebook in place in a fresh kernel (working directory: its folder), keeping its
    outputs but no execution timings or widget state. Returns the seconds it took."""
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name=kernel, record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    nb.metadata.pop("widgets", None)
    nb.metadata.get("language_info", {}).pop("version", None)  # the machine's Python, not the lesson's
    path.write_text(render(nb), encoding="utf-8")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.notebooks",
                                     description="Generate student notebooks from solution notebooks.")
    parser.add_argument("command", choices=("build", "check", "execute", "nbgrader-source"),
                        help="build: write the student notebooks; check: fail if they are out of "
                             "date or their nbgrader metadata is wrong; execute: re-run solution "
                             "notebooks in place; nbgrader-source DIR [NOTEBOOK ...]: write "
                             "nbgrader's source version of lessons to DIR/NN_name/NN_name.ipynb")
    parser.add_argument("paths", nargs="*", type=Path,
                        help="execute: the notebooks to run (default: every solution); "
                             "nbgrader-source: the folder, then the solution notebooks (default: all)")
    parser.add_argument("--solutions", type=Path, default=Path("solutions"),
                        help="folder of solution notebooks (default: ./solutions)")
    parser.add_argument("--notebooks", type=Path, default=Path("notebooks"),
                        help="folder of student notebooks (default: ./notebooks)")
    args = parser.parse_args(argv)
    if not args.solutions.is_dir():
        parser.error(f"no solutions folder at {args.solutions}; run from the repository root "
                     f"or pass --solutions")
    if args.command == "execute":
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the kernel inherits it
        for path in args.paths or sorted(args.solutions.glob("*.ipynb")):
            print(f"{path}: executed in {execute(path):.1f} s")
        return 0
    try:
        if args.command == "nbgrader-source":
            if not args.paths:
                parser.error("nbgrader-source needs a folder, e.g. course/source")
            folder, chosen = args.paths[0], args.paths[1:] or sorted(args.solutions.glob("*.ipynb"))
            for path in write_nbgrader_sources(chosen, folder):
                print(f"wrote {path}")
            return 0
        if args.command == "build":
            for path in build(args.solutions, args.notebooks):
                print(f"wrote {path}")
            return 0
        problems = drift(args.solutions, args.notebooks)
    except ValueError as err:  # a malformed solution notebook: say which and where
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("run `python -m labkit.notebooks build` and commit the result", file=sys.stderr)
        return 1
    print(f"{args.notebooks}: up to date with {args.solutions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
