"""Student notebooks from solution notebooks: ``python -m labkit.notebooks build|check``.

``solutions/NN_name.ipynb`` is the source an instructor edits; ``notebooks/NN_name.ipynb`` is
generated from it and never edited by hand. Generating a student notebook

- replaces the code between nbgrader's markers ``### BEGIN SOLUTION`` and ``### END SOLUTION``
  by one line ``raise NotImplementedError("...")`` at the indentation of the BEGIN marker; a
  ``### HINT: ...`` comment inside the block becomes the message (several are joined);
- removes cells tagged ``solution-only`` (cell metadata ``tags``), e.g. answers to questions;
- clears outputs, execution counts, execution timings and saved widget state;
- inserts a setup cell after the title that installs labkit where the kernel cannot import it
  (Colab, a fresh environment) and does nothing elsewhere: from a ``labkit-*.whl`` or
  ``labkit-*.tar.gz`` in the notebook's folder when there is one, else from ``INSTALL_SPEC``.

The output is deterministic (nbformat's stable JSON, sorted keys), so ``check`` compares bytes:
it exits with status 1 and lists every student notebook that differs from what its solution
generates, is missing, or has no solution. Because the markers are nbgrader's, instructors who
use nbgrader can feed ``solutions/`` to it directly.

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
import sys
import time
from pathlib import Path

import nbformat

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
HINT = "### HINT:"
SOLUTION_ONLY = "solution-only"
DEFAULT_MESSAGE = "replace this line with your code"

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


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every marked solution block in ``source`` by a ``NotImplementedError`` line."""
    kept, hints, indent, begin_line = [], [], "", None
    for number, line in enumerate(source.split("\n"), start=1):
        stripped = line.strip()
        if stripped.startswith(BEGIN_SOLUTION):
            if begin_line is not None:
                raise ValueError(f"{where}, line {number}: {BEGIN_SOLUTION} inside the solution "
                                 f"block opened on line {begin_line}")
            begin_line, hints, indent = number, [], line[:len(line) - len(line.lstrip())]
        elif stripped.startswith(END_SOLUTION):
            if begin_line is None:
                raise ValueError(f"{where}, line {number}: {END_SOLUTION} without a {BEGIN_SOLUTION}")
            message = " ".join(hints) or DEFAULT_MESSAGE
            kept.append(f"{indent}raise NotImplementedError({json.dumps(message, ensure_ascii=False)})")
            begin_line = None
        elif begin_line is not None:
            if stripped.startswith(HINT):
                hints.append(stripped[len(HINT):].strip())
        else:
            kept.append(line)
    if begin_line is not None:
        raise ValueError(f"{where}, line {begin_line}: {BEGIN_SOLUTION} is never closed by {END_SOLUTION}")
    return "\n".join(kept)


def _setup_cell(nb) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(SETUP_SOURCE)
    if (nb.nbformat, nb.nbformat_minor) >= (4, 5):
        cell.id = SETUP_CELL_ID
    else:
        cell.pop("id", None)
    return cell


def student_notebook(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The student version of a solution notebook (a new notebook; the input is untouched)."""
    nb = copy.deepcopy(solution)
    cells = []
    for index, cell in enumerate(nb.cells):
        if SOLUTION_ONLY in cell.get("metadata", {}).get("tags", []):
            continue
        where = f"{name}, cell {index}"
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, where)
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        elif BEGIN_SOLUTION in cell.source:
            raise ValueError(f"{where}: solution markers are only allowed in code cells; tag a "
                             f"{cell.cell_type} cell that holds answers '{SOLUTION_ONLY}' instead")
        cells.append(cell)
    title_cells = 1 if cells and cells[0].cell_type == "markdown" else 0
    cells.insert(title_cells, _setup_cell(nb))
    nb.cells = cells
    nb.metadata.pop("widgets", None)
    return nb


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
    parser.add_argument("command", choices=("build", "check", "execute"),
                        help="build: write the student notebooks; check: fail if they are out of "
                             "date; execute: re-run solution notebooks in place")
    parser.add_argument("paths", nargs="*", type=Path,
                        help="execute only: the notebooks to run (default: every solution)")
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
