"""A gradebook from a folder of submitted notebooks: ``python -m labkit.grade SUBMISSIONS... --out grades.csv``.

Threat model: a submission is untrusted code. Each one runs in its own sandbox
(:mod:`labkit.sandbox`: bubblewrap with new PID/network/IPC/UTS/mount namespaces, the system and
a copy of labkit read-only, private size-capped tmpfs for its working copy, ``/tmp`` and
``/dev/shm``, nothing of the instructor's tree, capabilities dropped, memory and processes
capped by cgroups, a wall-clock limit), and the verdicts are computed *outside* it:

1. Every submission is read and hashed (sha256, in its row) before any is graded; the
   originals are never written, nor shown to a sandbox (it gets a copy of the bytes read).
2. For each check call of the lesson (``check_gradient(gradient)``), the grader makes the
   check's inputs with a fresh secret seed and writes them as ``.npy`` arrays and JSON
   (:mod:`labkit._exchange`).
3. In the sandbox the notebook runs in a fresh kernel (``--runner kernel``) or, by default, in
   a fresh process forked from a pre-warmed zygote into that sandbox (``--runner zygote``,
   :class:`labkit.sandbox.Zygote`); then one cell of the grader calls the student's functions
   on those inputs and writes back only numbers: the output, the model and inputs as the call
   left them.
4. The grader reads that over a pipe it owns, with size limits, as JSON and
   ``np.load(allow_pickle=False)``; puts the state back on its own copy of the inputs and
   judges it with its own labkit (:func:`labkit.checks._engine.judge_case`): the same hints as
   the in-notebook checks, which inside the sandbox only print that the grader checks.
5. Rows are kept in memory; the gradebook (CSV, cells escaped against spreadsheet formulas),
   the summaries and the executed notebooks are written after the last row, atomically
   (a temporary file or folder renamed into place), so a crash or a kill leaves the previous ones.

The sandbox's labkit is a copy in which the references of the lesson's checks, and labkit
helpers that return the same answer (``attribution.gradients._logit_gradient`` for ``attribution.gradient``),
raise instead of computing it; handing in or wrapping labkit's own function therefore cannot
pass. Such a function that the lesson notebook itself uses stays in the copy but is withheld
while the student's functions are called (:func:`labkit._exchange.withheld`; the grader lists
them when it starts).

Without bubblewrap (macOS, a laptop without it) ``--sandbox auto`` warns loudly and runs each
submission as a plain subprocess: the verdicts are still computed outside, but the notebook
can read and write whatever the grader's user can. ``--sandbox none`` chooses that explicitly.

Who and which lesson
--------------------
The student id is the file name without ``.ipynb`` (``alice.ipynb`` -> ``alice``); when that is
a lesson's name (``alice/01_gradient_saliency.ipynb``) it is the nearest parent folder whose name
is not a lesson's name. A submission belongs to the lesson whose number starts its file or folder
name (``01_...``), else to the lesson whose checks it calls. The lesson notebook, not the
submission, says which checks count and what each is called on (its ``check_*(...)`` calls,
parsed with ``ast``), so deleting a check call does not remove it from the score. Grading needs
only the lessons' check calls: the student notebooks (``notebooks/``) serve as ``--lessons``
as well as the solutions do.

Points and hidden checks
------------------------
A lesson's check call may carry ``points=`` (default 1) and ``all_or_nothing=True`` (the
exercise, every call of that check, earns its points only when all pass) or
``all_or_nothing="name"`` (every call of the checks marked with that name is one exercise); the
in-notebook checks ignore both. Calls in cells tagged ``hidden-check`` are hidden checks: ``labkit.notebooks build``
removes them from the student notebooks, the grader runs them (from ``--lessons`` when those are
the solutions, else from ``--hidden``) and feedback shows them as a count. The score is points /
maximum. Regrades, late and duplicate notes and the exports are in :mod:`labkit.gradebook`.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import csv
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import sandbox

LABKIT_DIR = Path(__file__).resolve().parent
DEFAULT_TIMEOUT = 600
DEFAULT_MEMORY_MB = 6144
DEFAULT_MAX_OUTPUT_KB = 1024
DEFAULT_PIDS = 256
DEFAULT_TMPFS_MB = 512
DEFAULT_MAX_NOTEBOOK_MB = 20
RESULT_BYTES = 32 * 2**20  # the arrays a sandbox may send back, beyond its outputs

OK, CELL_ERRORS, TIMEOUT, KERNEL_DIED = "ok", "cell errors", "timeout", "kernel died"
INVALID, UNKNOWN_LESSON, GRADER_ERROR = "invalid notebook", "unknown lesson", "grader error"
MEMORY, OUTPUT_LIMIT, SANDBOX_DIED = "memory limit", "output limit", "sandbox died"


# ---------------------------------------------------------------- lessons and their checks

# Keywords of a check call that only the grader reads (the in-notebook checks accept and ignore
# them): ``check_gradient(gradient, points=2, all_or_nothing=True)``.
GRADING_KEYWORDS = ("points", "all_or_nothing")
HIDDEN_TAG = "hidden-check"  # cell tag: instructor-only check calls, removed from student notebooks


@dataclass(frozen=True)
class CheckCall:
    """``check(arguments)`` as written in a lesson notebook, e.g. ``("check_gradient", "gradient")``,
    with what the grader reads from it: its points, whether its exercise (every call of this
    check) scores all or nothing, and whether it is a hidden check (a ``hidden-check`` cell)."""
    check: str
    arguments: str
    points: float = 1
    all_or_nothing: bool | str = False  # True: this check's calls; "name": every check marked "name"
    hidden: bool = False


@dataclass(frozen=True)
class Lesson:
    name: str
    calls: tuple[CheckCall, ...]

    @property
    def checks(self) -> list[str]:
        return list(dict.fromkeys(call.check for call in self.calls))

    @property
    def visible(self) -> tuple[CheckCall, ...]:
        return tuple(call for call in self.calls if not call.hidden)

    @property
    def hidden(self) -> tuple[CheckCall, ...]:
        return tuple(call for call in self.calls if call.hidden)

    @property
    def max_points(self) -> float:
        return sum(call.points for call in self.calls)

    def exercises(self) -> dict[str, str]:
        """``{check: exercise}`` for the all-or-nothing checks: ``all_or_nothing="name"`` on any
        call of a check puts all its calls into exercise ``name``; ``True``, into its own."""
        named = {call.check: call.all_or_nothing for call in self.calls if isinstance(call.all_or_nothing, str)}
        return {call.check: named.get(call.check, call.check) for call in self.calls
                if call.all_or_nothing and call.check not in named} | named

    @property
    def number(self) -> str | None:
        match = re.match(r"(\d+)(?:[_\- ]|$)", self.name)
        return match.group(1) if match else None


def _check_name(function: ast.expr) -> str | None:
    name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
    return name if isinstance(name, str) and name.startswith("check_") else None


def _arguments_source(call: ast.Call) -> str:
    """The call's arguments as source, without the grading keywords (the sandbox evaluates them
    in the student's namespace)."""
    keywords = [f"**{ast.unparse(k.value)}" if k.arg is None else f"{k.arg}={ast.unparse(k.value)}"
                for k in call.keywords if k.arg not in GRADING_KEYWORDS]
    return ", ".join([ast.unparse(a) for a in call.args] + keywords)


def _grading_options(call: ast.Call, where: str) -> dict:
    """``points`` (a number >= 0) and ``all_or_nothing`` (True/False or an exercise's name) of a
    check call, checked."""
    options = {}
    for keyword in call.keywords:
        if keyword.arg not in GRADING_KEYWORDS:
            continue
        try:
            value = ast.literal_eval(keyword.value)
        except ValueError:
            value = ast.unparse(keyword.value)
        if keyword.arg == "points":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                    or value in (float("inf"), float("-inf")):
                raise ValueError(f"{where}: points={ast.unparse(keyword.value)}: expected a number "
                                 f"written in the call (e.g. points=2), got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{where}: points={value}: points must not be negative")
        elif not (isinstance(value, bool) or (isinstance(value, str) and value.strip())):
            raise ValueError(f"{where}: all_or_nothing={ast.unparse(keyword.value)}: expected True, False "
                             f"or the name of an exercise (a string)")
        options[keyword.arg] = value
    return options


def check_calls(nb: nbformat.NotebookNode, where: str = "notebook", strict: bool = True) -> tuple[CheckCall, ...]:
    """Every distinct ``check_*(...)`` call in the code cells, in order (IPython magics are
    translated first; a cell that is not valid Python is skipped). A lesson's calls (``strict``)
    carry their ``points=`` and ``all_or_nothing=`` and are hidden in a ``hidden-check`` cell; a
    bad value raises ``ValueError`` naming ``where``, the cell and the line. A submission's own
    calls (``strict=False``) are read without them: a student does not set points."""
    from IPython.core.inputtransformer2 import TransformerManager
    transformer, calls = TransformerManager(), []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(transformer.transform_cell(cell.source))
        except (SyntaxError, ValueError):
            continue
        hidden = strict and HIDDEN_TAG in cell.get("metadata", {}).get("tags", [])
        found = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _check_name(node.func)]
        found.sort(key=lambda node: (node.lineno, node.col_offset))
        for node in found:
            options = _grading_options(node, f"{where}, cell {index + 1}, line {node.lineno}") if strict else {}
            calls.append(CheckCall(_check_name(node.func), _arguments_source(node), hidden=hidden, **options))
    return tuple(dict.fromkeys(calls))


def lesson_calls(nb: nbformat.NotebookNode, where: str = "notebook") -> tuple[CheckCall, ...]:
    """A lesson's check calls, checked: every hidden check needs a visible call of the same check
    (the exercise students see), and a ``hidden-check`` cell must call a check."""
    calls = check_calls(nb, where)
    visible = {call.check for call in calls if not call.hidden}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or HIDDEN_TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        cell_calls = check_calls(nbformat.v4.new_notebook(cells=[cell]), where)
        if not cell_calls:
            raise ValueError(f"{where}, cell {index + 1}: tagged {HIDDEN_TAG!r} but calls no check_*")
        for call in cell_calls:
            if call.check not in visible:
                raise ValueError(f"{where}, {_hidden_call_where(nb, call.check)}: hidden check {call.check} "
                                 f"has no visible counterpart: the lesson must also call {call.check} in a "
                                 f"cell students see")
    return calls


def _hidden_call_where(nb, check: str) -> str:
    """``cell N, line L`` of the first hidden call of ``check`` (for error messages)."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and HIDDEN_TAG in cell.get("metadata", {}).get("tags", []):
            for number, text in enumerate(cell.source.split("\n"), start=1):
                if check in text:
                    return f"cell {index + 1}, line {number}"
    return "a hidden-check cell"


def _notebook_files(path: Path) -> list[Path]:
    path = Path(path)
    return sorted(path.glob("*.ipynb")) if path.is_dir() else [path]


def _read_lesson(file: Path) -> nbformat.NotebookNode:
    try:
        return nbformat.read(file, as_version=4)
    except (ValueError, UnicodeDecodeError) as err:  # not JSON, not a notebook
        raise ValueError(f"{file}: not a lesson notebook ({str(err).splitlines()[0][:200]})") from None


def load_lessons(path: Path, hidden: Path | None = None) -> dict[str, Lesson]:
    """``{name: Lesson}`` for a lesson notebook or every notebook in a folder; ``hidden``: a
    notebook or folder whose ``hidden-check`` cells add hidden checks to the lessons of the same
    name (the instructor's solutions, when ``path`` holds the student notebooks). ``ValueError``
    naming file, cell and line for bad points or a hidden check without a visible counterpart."""
    lessons = {file.stem: Lesson(file.stem, lesson_calls(_read_lesson(file), str(file)))
               for file in _notebook_files(path)}
    for file in _notebook_files(hidden) if hidden is not None else ():
        if file.stem not in lessons:
            raise ValueError(f"{file}: hidden checks for lesson {file.stem}, which is not among the "
                             f"lessons ({path})")
        nb = _read_lesson(file)
        extra = tuple(call for call in check_calls(nb, str(file)) if call.hidden)
        lesson = lessons[file.stem]
        visible = {call.check for call in lesson.visible}
        for call in extra:
            if call.check not in visible:
                raise ValueError(f"{file}, {_hidden_call_where(nb, call.check)}: hidden check {call.check} "
                                 f"has no visible counterpart in "
                                 f"{path if Path(path).is_file() else Path(path) / (file.stem + '.ipynb')}")
        lessons[file.stem] = Lesson(lesson.name, tuple(dict.fromkeys(lesson.calls + extra)))
    return lessons


def default_lessons() -> Path | None:
    for candidate in (Path("solutions"), LABKIT_DIR.parent / "solutions"):
        if candidate.is_dir() and any(candidate.glob("*.ipynb")):
            return candidate
    return None


def lesson_for(names: list[str], calls, lessons: dict[str, Lesson]) -> Lesson | None:
    """The submission's lesson: the only one; the one whose number starts one of ``names``
    (the file's stem, then its folders upwards); the one whose checks ``calls`` use most."""
    if len(lessons) == 1:
        return next(iter(lessons.values()))
    for name in names:
        number = Lesson(name, ()).number
        matching = [lesson for lesson in lessons.values() if number and lesson.number == number]
        if len(matching) == 1:
            return matching[0]
    called = {call.check for call in calls}
    overlap = sorted(((len(called & set(lesson.checks)), lesson.name) for lesson in lessons.values()),
                     reverse=True)
    if overlap and overlap[0][0] > 0 and (len(overlap) == 1 or overlap[1][0] < overlap[0][0]):
        return lessons[overlap[0][1]]
    return None


# ---------------------------------------------------------------- submissions

@dataclass(frozen=True)
class Submission:
    path: Path
    names: tuple[str, ...]  # the file's stem, then the folders above it (up to the argument given)

    def student(self, lesson_names) -> str:
        lessons = {name.lower() for name in lesson_names}
        return next((name for name in self.names if name.lower() not in lessons), self.names[0])


def scan(paths) -> tuple[list[Submission], list[tuple[Path, str]]]:
    """The notebooks in ``paths`` (files, or folders searched recursively, links not followed),
    in a stable order, and the files skipped with the reason."""
    found, skipped = [], []
    for given in map(Path, paths):
        if given.is_symlink():
            skipped.append((given, "a symbolic link"))
        elif given.is_dir():
            for folder, dirs, files in os.walk(given):
                base = Path(folder)
                for name in sorted(dirs):
                    if name.startswith(".") or (base / name).is_symlink():
                        skipped.append((base / name, "a hidden folder" if name.startswith(".") else "a symbolic link"))
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (base / d).is_symlink())
                for name in sorted(files):
                    path = base / name
                    reason = ("a hidden file" if name.startswith(".") else "a symbolic link" if path.is_symlink()
                              else "not an .ipynb file" if not name.endswith(".ipynb")
                              else "not a regular file" if not path.is_file() else None)
                    if reason:
                        skipped.append((path, reason))
                    else:
                        found.append(Submission(path, (path.stem, *reversed(path.relative_to(given).parent.parts))))
        elif given.is_file():
            found.append(Submission(given, (given.stem, *reversed(given.parent.parts))))
        else:
            raise FileNotFoundError(f"no submission at {given}: expected an .ipynb file or a folder of them")
    return found, skipped


def find_submissions(paths) -> list[Submission]:
    """The notebooks in ``paths`` (see :func:`scan`)."""
    return scan(paths)[0]


@dataclass
class Handed:
    """A submission as read before grading: its bytes (None when unreadable) and their sha256."""
    submission: Submission
    data: bytes | None
    sha256: str
    problem: str = ""


def read_all(submissions, max_bytes: int) -> list[Handed]:
    """Read and hash every submission before any is graded: what is graded is what was handed in
    at this moment, whatever happens to the files later."""
    handed = []
    for submission in submissions:
        try:
            with open(submission.path, "rb") as file:
                data = file.read(max_bytes + 1)
                digest = hashlib.sha256(data)
                if len(data) > max_bytes:
                    for chunk in iter(lambda: file.read(1 << 20), b""):
                        digest.update(chunk)
        except OSError as err:
            handed.append(Handed(submission, None, "", f"could not be read: {err.strerror or err}"))
            continue
        if len(data) > max_bytes:
            handed.append(Handed(submission, None, digest.hexdigest(),
                                 f"larger than the limit of {max_bytes // 2**20} MB (--max-notebook)"))
        else:
            handed.append(Handed(submission, data, digest.hexdigest()))
    return handed


# ---------------------------------------------------------------- options and the lessons' checks

def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass
class Options:
    timeout: int = DEFAULT_TIMEOUT
    memory_mb: int = DEFAULT_MEMORY_MB
    max_output_kb: int = DEFAULT_MAX_OUTPUT_KB
    jobs: int = field(default_factory=cores)
    keep_executed: bool = False  # keep each executed notebook in its Row (memory: up to max_output each)
    sandbox: str = "auto"  # "bwrap", "none", or "auto" (bwrap when it works here)
    pids: int = DEFAULT_PIDS
    tmpfs_mb: int = DEFAULT_TMPFS_MB
    max_notebook_mb: int = DEFAULT_MAX_NOTEBOOK_MB
    cgroups: bool = True  # False: the fallback limits (RLIMIT_AS, tmpfs size, a watchdog) only
    runner: str = "auto"  # "zygote", "kernel", or "auto" (the zygote when it works here, see start_zygote)


def check_specs() -> dict:
    """``{check name: Spec}`` of every lesson's checks, from the grader's own labkit."""
    import importlib
    import pkgutil
    from . import checks
    from .checks import _engine
    specs = {}
    for info in pkgutil.iter_modules(checks.__path__):
        if info.name.startswith("lesson"):
            module = importlib.import_module(f"{checks.__name__}.{info.name}")
            specs.update({v.name: v for v in vars(module).values() if isinstance(v, _engine.Spec)})
    return specs


class Views:
    """labkit as each lesson's sandboxes see it (:func:`labkit.sandbox.build_view`), built once."""

    def __init__(self, folder: Path, lessons_path: Path | None, specs: dict, log):
        self.folder, self.lessons_path, self.specs, self.log = folder, lessons_path, specs, log
        self.views, self.kept, self.withheld = {}, {}, {}

    def sources(self, lesson: Lesson) -> list[str]:
        if self.lessons_path is None:
            return []
        path = self.lessons_path if self.lessons_path.is_file() else self.lessons_path / f"{lesson.name}.ipynb"
        try:
            nb = nbformat.read(path, as_version=4)
        except (OSError, ValueError):
            return []
        return [cell.source for cell in nb.cells if cell.cell_type == "code"]

    def get(self, lesson: Lesson) -> Path:
        if lesson.name not in self.views:
            specs = [self.specs[c] for c in lesson.checks if c in self.specs]
            removed, kept = sandbox.plan_view(specs, self.sources(lesson))
            folder = self.folder / f"view-{len(self.views)}"
            folder.mkdir()
            sandbox.build_view(folder, removed, lesson.name)
            self.views[lesson.name], self.kept[lesson.name] = folder, sorted(q for _, q in kept)
            self.withheld[lesson.name] = sorted(kept)
            if kept:
                self.log(f"note: lesson {lesson.name} uses labkit's {', '.join(self.kept[lesson.name])} itself, "
                         f"so they stay in its sandbox but raise while the grader calls the student's functions")
        return self.views[lesson.name]


# ---------------------------------------------------------------- one submission in its sandbox

@dataclass
class Outcome:
    verdicts: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # (status, message), worst first
    cell_errors: list = field(default_factory=list)
    executed: str | None = None


@dataclass
class Prepared:
    """One check call: its seed, the grader's cases (kept to judge), or why it cannot be sent."""
    call: CheckCall
    spec: object
    seed: int
    cases: list = field(default_factory=list)
    problem: str = ""


def prepare(calls, specs: dict, io_dir: Path, withheld=()) -> list[Prepared]:
    """Make every check call's inputs and write them to ``io_dir`` for the sandbox; ``withheld``:
    ``(file, qualname)`` of labkit functions that must raise while the student's functions run
    (:func:`labkit._exchange.withheld`)."""
    from . import _exchange
    from .checks import _engine
    arrays, prepared, manifest = _exchange.Arrays(io_dir), [], []
    from .checks import _questions
    for call in calls:
        spec = specs.get(call.check)
        item = Prepared(call, spec, secrets.randbits(31))
        prepared.append(item)
        question = _questions.QUESTIONS_BY_CHECK.get(call.check)
        if question is not None:  # the sandbox sends the answer back; it is judged here
            item.spec = question
            manifest.append({"check": call.check, "arguments": call.arguments, "question": True, "cases": []})
            continue
        if spec is None:
            item.problem = f"labkit has no check named {call.check}"
            continue
        with _engine.case_context(item.seed):
            item.cases = _engine.cases_for(spec, item.seed)
        try:
            encoded = _exchange.encode_cases(item.cases, arrays)
        except _exchange.Unsendable as err:
            item.problem, item.cases = f"the grader cannot send this check's inputs to the sandbox ({err})", []
            continue
        manifest.append({"check": call.check, "arguments": call.arguments, "cases": encoded,
                         "adapter": spec.adapter})
    (io_dir / _exchange.MANIFEST).write_text(json.dumps({"seed": secrets.randbits(31), "calls": manifest,
                                                         "withheld": [list(key) for key in withheld]}),
                                             encoding="utf-8")
    return prepared


def judge(prepared: list[Prepared], results: list, arrays) -> list[dict]:
    """The verdicts, computed here with the grader's labkit from what the sandbox sent."""
    from . import _exchange
    verdicts, sent = [], iter(results if isinstance(results, list) else [])
    for item in prepared:
        if item.problem:
            verdicts.append({"check": item.call.check, "passed": False, "hint": item.problem})
            continue
        entry = next(sent, None)
        hint = None
        try:
            if not results:
                hint = "the grader's cell did not finish in the notebook's kernel (see the row's status)"
            elif not isinstance(entry, dict) or entry.get("check") != item.call.check:
                raise ValueError("no answer for this check")
            elif entry.get("unavailable"):
                hint = str(entry["unavailable"])[:500]
            elif entry.get("answer") is not None and hasattr(item.spec, "judge"):  # a concept question
                passed, hint = item.spec.judge(_exchange.answer_value(entry["answer"]))
                hint = None if passed else hint
            else:
                hint = _judge_cases(item, entry.get("cases"), arrays)
        except Exception as err:  # whatever came back, malformed: a fail for this check only
            hint = f"the sandbox's answer could not be read ({type(err).__name__}: {str(err)[:200]})"
        verdicts.append({"check": item.call.check, "passed": hint is None, "hint": hint or ""})
    return verdicts


def _judge_cases(item: Prepared, observations, arrays) -> str | None:
    from . import _exchange
    from .checks import _engine
    if not isinstance(observations, list) or not observations:
        raise ValueError("no cases came back")
    names = _engine.argument_names(item.spec)
    with _engine.case_context(item.seed):
        for case, observation in zip(item.cases, observations):
            if "raised" in observation:  # the student's code raised: a fail, with the hint made inside
                return str(observation["raised"])[:500] or "your code raised an error"
            ref, before = _engine.prepare_case(item.spec, case)
            out = _exchange.returned_value(observation["out"], arrays, ref.device)
            _exchange.apply_observation(case, observation, arrays)
            try:
                _engine.judge_case(item.spec, case, ref, before, out, names)
            except _engine.Failure as failure:
                return str(failure)
    if len(observations) < len(item.cases):
        raise ValueError("fewer cases came back than were sent")
    return None


def _frames(data: bytes) -> list[bytes]:
    frames, offset = [], 0
    while offset + 4 <= len(data):
        (size,) = struct.unpack(">I", data[offset:offset + 4])
        frames.append(data[offset + 4:offset + 4 + size])
        offset += 4 + size
    if offset != len(data):
        raise ValueError("the sandbox's answer is cut off")
    return frames


async def _read_capped(stream, limit: int) -> tuple[bytes, bool]:
    chunks, total = [], 0
    while True:
        chunk = await stream.read(1 << 16)
        if not chunk:
            return b"".join(chunks), False
        total += len(chunk)
        if total > limit:
            return b"", True
        chunks.append(chunk)


async def _watchdog(process, limits: sandbox.Limits, memory_bytes: int, state: dict, also=()):
    """The fallback without cgroups: kill the sandbox when its processes together hold more
    than ``memory_bytes`` resident or more than ``limits.pids`` tasks (``also``: the zygote's
    child in the sandbox, which is not below bwrap's process)."""
    while process.returncode is None:
        counted = [await asyncio.to_thread(sandbox.usage, pid) for pid in (process.pid, *also)]
        resident, tasks = sum(r for r, _ in counted), sum(t for _, t in counted)
        if (memory_bytes > 0 and resident > memory_bytes) or tasks > limits.pids:
            state["watchdog"] = MEMORY if memory_bytes > 0 and resident > memory_bytes else "process limit"
            _kill(process)
            return
        await asyncio.sleep(0.5)


def _kill(process) -> None:
    """Kill the sandbox's first process and everything below it (bwrap's PID namespace ends
    with it anyway; without bwrap, a kernel in a session of its own is below it too)."""
    for pid in reversed(sandbox.descendants(process.pid)) if process.returncode is None else ():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _start_in_zygote(zygote: sandbox.Zygote, command: list, info: tuple, limits: sandbox.Limits,
                           env: dict, options_path: str, probe: bool = False):
    """bwrap builds the sandbox around its placeholder; the zygote forks the submission's process
    into it. (bwrap's process, the pipe the submission's process writes to, that process's pid)."""
    info_read, info_write = info
    try:
        process = await asyncio.create_subprocess_exec(
            *limits.wrap(command), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env, start_new_session=True, pass_fds=(info_write,))
    finally:
        os.close(info_write)
    try:
        ready = await asyncio.wait_for(process.stdout.readline(), 120)
    except asyncio.TimeoutError:
        ready = b""
    if ready.strip() != b"ready":
        os.close(info_read)
        _kill(process)
        raise RuntimeError("bubblewrap did not build the sandbox")
    details = await asyncio.to_thread(sandbox.read_info, info_read)
    channel_read, channel_write = os.pipe()
    try:
        child = await asyncio.to_thread(zygote.spawn, details["child-pid"], sandbox.namespaces_of(details),
                                        limits.groups, options_path, channel_write, probe)
    except BaseException:
        os.close(channel_read)
        _kill(process)
        raise
    finally:
        os.close(channel_write)
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(channel_read, "rb", buffering=0))
    return process, reader, child, transport


async def execute(nb_name: str, prepared_io: Path, view: Path, options: Options,
                  mode: str, zygote: sandbox.Zygote | None = None) -> tuple[Outcome, list, tuple]:
    """Run the notebook and the grader's cell in a sandbox; what came back: the outcome, the
    results (JSON) and the arrays the grader's cell wrote. With ``zygote`` (and bwrap) the
    notebook runs in a process the zygote forks into the sandbox, else in a kernel started there."""
    from . import _exchange
    outcome = Outcome()
    threads = max(1, cores() // options.jobs)
    memory = options.memory_mb * 2**20
    runner_options = {"notebook": f"{sandbox.IO_DIR}/submission.ipynb", "name": nb_name,
                      "timeout": options.timeout, "max_output": options.max_output_kb * 1024,
                      "memory_bytes": memory, "io": sandbox.IO_DIR, "outbox": sandbox.OUT_DIR,
                      "workdir": sandbox.WORK_DIR, "keep_executed": options.keep_executed}
    scratch = Path(tempfile.mkdtemp(prefix="labkit-scratch-"))
    limits = sandbox.Limits(f"labkit-grade-{os.getpid()}-{secrets.token_hex(4)}", memory, options.pids,
                            use_cgroups=options.cgroups and mode == "bwrap")
    env = sandbox.sandbox_env(threads)
    info = None
    if mode == "bwrap" and zygote is not None:
        # the options go in the inputs folder (not through the zygote, whose memory each child copies)
        prepared_io.chmod(0o755)
        (prepared_io / "runner.json").write_text(json.dumps(runner_options), encoding="utf-8")
        (prepared_io / "runner.json").chmod(0o444)
        prepared_io.chmod(0o555)
        info = os.pipe()
        command = sandbox.bwrap_command(view, prepared_io, options.tmpfs_mb * 2**20, sandbox.PLACEHOLDER,
                                        info_fd=info[1])
    elif mode == "bwrap":
        command = sandbox.bwrap_command(view, prepared_io, options.tmpfs_mb * 2**20,
                                        [sys.executable, f"{sandbox.VIEW_ROOT}/labkit/_grade_runner.py",
                                         json.dumps(runner_options)])
    else:  # the same run without walls: the paths are the grader's temporary folders
        runner_options.update(notebook=str(prepared_io / "submission.ipynb"), io=str(prepared_io),
                              outbox=str(scratch / "out"), workdir=str(scratch / "work"))
        env.update(PYTHONPATH=str(view), HOME=str(scratch / "home"), TMPDIR=str(scratch),
                   MPLCONFIGDIR=str(scratch / "home" / "matplotlib"),
                   JUPYTER_RUNTIME_DIR=str(scratch / "home" / "jupyter"), IPYTHONDIR=str(scratch / "home" / "ipython"),
                   XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"))
        command = [sys.executable, str(view / "labkit" / "_grade_runner.py"), json.dumps(runner_options)]
    state, results, arrays = {}, [], _exchange.Arrays(scratch / "back")
    process, also, transport = None, (), None
    try:
        if info is not None:
            process, stream, child, transport = await _start_in_zygote(zygote, command, info, limits, env,
                                                                       f"{sandbox.IO_DIR}/runner.json")
            also = (child,)
        else:
            process = await asyncio.create_subprocess_exec(
                *limits.wrap(command), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, env=env, start_new_session=True,
                cwd=str(scratch) if mode != "bwrap" else None)
            stream = process.stdout
        watchdog = asyncio.ensure_future(_watchdog(process, limits, memory, state, also)) if not limits.cgroups else None
        limit = options.max_output_kb * 1024 + RESULT_BYTES
        try:
            data, too_much = await asyncio.wait_for(_read_capped(stream, limit), 2 * options.timeout + 120)
        except asyncio.TimeoutError:
            data, too_much = b"", False
            state["deadline"] = True
        _kill(process)
        await process.wait()
        if watchdog:
            watchdog.cancel()
        limits.kill_all()  # anything of it still alive: the PID namespace is gone with bwrap, this is the cgroup
        if too_much:
            outcome.problems.append((OUTPUT_LIMIT, f"the sandbox sent more than {limit // 2**20} MB"))
        elif state.get("deadline"):
            outcome.problems.append((TIMEOUT, f"timeout: the sandbox was killed after {2 * options.timeout + 120} s"))
        elif state.get("watchdog") or limits.hit_memory():
            what = state.get("watchdog", MEMORY)
            outcome.problems.append((what, f"{what}: the sandbox's processes together reached "
                                           f"{options.memory_mb} MB" + (" and some were killed" if data else
                                                                      ", it was killed")
                                     if what == MEMORY else f"{what}: the sandbox was killed past {options.pids}"))
        if data or not outcome.problems:
            results = _parse(data, arrays, outcome)
    finally:
        if process is not None and process.returncode is None:
            _kill(process)
        if transport is not None:
            transport.close()
        limits.close()
        if mode != "bwrap":
            shutil.rmtree(scratch / "work", ignore_errors=True)
    return outcome, results, (arrays, scratch)


def _parse(data: bytes, arrays, outcome: Outcome) -> list:
    """The runner's frames: a JSON header, then file names and contents; only ``.npy`` arrays and
    the results' JSON are kept."""
    from . import _exchange
    try:
        frames = _frames(data)
        if not frames:
            raise ValueError("nothing sent")
        header = json.loads(frames[0].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        outcome.problems.append((SANDBOX_DIED, f"the sandbox ended without an answer ({str(err)[:100] or 'nothing sent'})"))
        return []
    for item in header.get("problems") or []:
        if isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            status = item[0] if item[0] in (TIMEOUT, KERNEL_DIED, GRADER_ERROR) else GRADER_ERROR
            outcome.problems.append((status, item[1][:300]))
    outcome.cell_errors = [(int(n), str(m)[:200]) for n, m in (header.get("cell_errors") or [])[:1000]
                           if isinstance(n, int)]
    if isinstance(header.get("executed"), str):
        outcome.executed = header["executed"]
    arrays.folder.mkdir(parents=True, exist_ok=True)
    results = []
    pairs = frames[1:]
    for name, content in zip(pairs[0::2], pairs[1::2]):
        name = name.decode("utf-8", "replace")
        if name == _exchange.RESULT:
            try:
                results = json.loads(content.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                results = []
        elif re.fullmatch(r"\d{1,9}\.npy", name):
            (arrays.folder / name).write_bytes(content)
    return results


# ---------------------------------------------------------------- rows of the gradebook

@dataclass
class Row:
    student: str
    notebook: str
    lesson: Lesson | None
    sha256: str = ""
    status: str = OK
    error: str = ""
    results: dict = field(default_factory=dict)  # check -> (passed, hint), the visible calls
    seconds: float = 0.0
    executed: nbformat.NotebookNode | None = None
    verdicts: list = field(default_factory=list)  # one per call of the lesson (hidden ones included)
    notes: list = field(default_factory=list)  # late, duplicate: reported, never silently merged

    @property
    def passed(self) -> int:
        return sum(passed for passed, _ in self.results.values())

    @property
    def total(self) -> int | None:
        return len({call.check for call in self.lesson.visible}) if self.lesson else None

    def call_points(self) -> list[tuple[CheckCall, bool | None, float]]:
        """``(call, passed, points earned)`` per call of the lesson; ``passed`` is None for a call
        that never ran. An all-or-nothing exercise (:meth:`Lesson.exercises`, hidden calls
        included) earns its points only when all its calls pass."""
        if not self.lesson:
            return []
        count = len(self.lesson.calls)
        passed = [bool(v["passed"]) for v in self.verdicts[:count]] + [None] * (count - len(self.verdicts))
        exercise = self.lesson.exercises()
        failed = {exercise.get(call.check) for call, ok in zip(self.lesson.calls, passed) if not ok} - {None}
        return [(call, ok, call.points if ok and exercise.get(call.check) not in failed else 0)
                for call, ok in zip(self.lesson.calls, passed)]

    @property
    def points(self) -> float:
        return sum(earned for _, _, earned in self.call_points())

    @property
    def max_points(self) -> float | None:
        return self.lesson.max_points if self.lesson else None

    @property
    def hidden_passed(self) -> tuple[int, int]:
        """``(passed, count)`` of the hidden calls: all a student may learn of them."""
        hidden = [ok for call, ok, _ in self.call_points() if call.hidden]
        return sum(bool(ok) for ok in hidden), len(hidden)


def _combine(verdicts) -> dict:
    """``{check: (passed, hint)}``; a check called several times passes when every call passes."""
    results = {}
    for verdict in verdicts:
        passed, hint = results.get(verdict["check"], (True, ""))
        failed_first = not passed
        results[verdict["check"]] = (passed and verdict["passed"],
                                     hint if failed_first or verdict["passed"] else verdict["hint"])
    return results


def _describe_errors(cell_errors) -> str:
    if not cell_errors:
        return ""
    number, message = cell_errors[0]
    more = f" ({len(cell_errors)} cells raised)" if len(cell_errors) > 1 else ""
    return f"cell {number}: {message}{more}"


async def grade_submission(handed: Handed, lessons: dict[str, Lesson], options: Options, context: dict) -> Row:
    """One row of the gradebook; never raises for anything the notebook does."""
    started = time.monotonic()
    submission = handed.submission
    row = Row(submission.student(lessons), str(submission.path), None, sha256=handed.sha256)
    try:
        await _grade_into(row, handed, lessons, options, context)
    except Exception as err:  # e.g. the sandbox did not start: this row only
        row.status, row.error = GRADER_ERROR, f"{type(err).__name__}: {str(err)[:300]}"
    row.seconds = time.monotonic() - started
    return row


async def _grade_into(row: Row, handed: Handed, lessons, options: Options, context: dict):
    submission = handed.submission
    try:
        if handed.data is None:
            raise ValueError(handed.problem)
        nb = nbformat.reads(handed.data.decode("utf-8"), as_version=4)
        own_calls = check_calls(nb, strict=False)
    except Exception as err:  # not JSON, not a notebook, not UTF-8, too large
        row.lesson = lesson_for(list(submission.names), (), lessons)
        row.status, row.error = INVALID, f"not a valid notebook: {type(err).__name__}: {str(err)[:200]}"
        return
    row.lesson = lesson_for(list(submission.names), own_calls, lessons) if lessons else Lesson("", own_calls)
    if row.lesson is None:
        row.status, row.error = UNKNOWN_LESSON, "cannot tell the lesson; pass --lessons with its notebook"
        return
    io_dir = Path(tempfile.mkdtemp(prefix="io-", dir=context["folder"]))
    scratch = None
    try:
        (io_dir / "submission.ipynb").write_bytes(handed.data)
        view = context["views"].get(row.lesson)
        prepared = await asyncio.to_thread(prepare, row.lesson.calls, context["specs"], io_dir,
                                           context["views"].withheld.get(row.lesson.name, ()))
        for path in [io_dir, *io_dir.iterdir()]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        outcome, results, (arrays, scratch) = await execute(submission.path.name, io_dir, view,
                                                            options, context["mode"], context.get("zygote"))
        outcome.verdicts = await asyncio.to_thread(judge, prepared, results, arrays)
    finally:
        shutil.rmtree(io_dir, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    row.verdicts = outcome.verdicts
    row.results = _combine(v for v, call in zip(outcome.verdicts, row.lesson.calls) if not call.hidden)
    if options.keep_executed and outcome.executed:
        with contextlib.suppress(Exception):
            row.executed = nbformat.reads(outcome.executed, as_version=4)
    messages = [message for _, message in outcome.problems] + [_describe_errors(outcome.cell_errors)]
    row.status = outcome.problems[0][0] if outcome.problems else CELL_ERRORS if outcome.cell_errors else OK
    row.error = "; ".join(m for m in messages if m)


# ---------------------------------------------------------------- the whole class

def sandbox_mode(requested: str) -> tuple[str, str | None]:
    """``("bwrap" | "none", warning)`` for ``--sandbox``: auto is bwrap when it works here."""
    if requested == "none":
        return "none", None
    problem = sandbox.bwrap_works()
    if problem is None:
        return "bwrap", None
    if requested == "bwrap":
        raise RuntimeError(f"--sandbox bwrap: {problem}")
    return "none", (f"{problem}: the notebooks run WITHOUT a sandbox (verdicts are still computed "
                    f"outside them, but each notebook can read and write whatever this user can). "
                    f"Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or pass "
                    f"--sandbox none to choose this")


def start_zygote(requested: str, mode: str, options: Options, folder: Path, log) -> sandbox.Zygote | None:
    """The zygote for ``--runner`` (``auto``: when it starts and passes a probe here, else the
    kernel runner with a note), or None for the kernel runner. It needs bwrap (``--sandbox none``
    always runs kernels) and a kernel that lets the grader join the sandbox's namespaces."""
    if requested == "kernel" or mode != "bwrap":
        if requested == "zygote":
            raise RuntimeError("--runner zygote needs the bubblewrap sandbox")
        return None
    zygote = None
    try:
        env = sandbox.sandbox_env(max(1, cores() // options.jobs))
        zygote = sandbox.Zygote(env, folder / "zygote-home")
        asyncio.run(_probe(zygote, folder, options))
        return zygote
    except Exception as err:
        if zygote is not None:
            zygote.close()
        if requested == "zygote":
            raise RuntimeError(f"--runner zygote: {err}") from None
        log(f"note: the fast runner (zygote) does not work here ({str(err)[:300]}); each notebook "
            f"starts its own kernel instead (--runner kernel)")
        return None


async def _probe(zygote: sandbox.Zygote, folder: Path, options: Options) -> None:
    """One empty sandbox entered by the zygote's child: it must see the sandbox's root, no more."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    (probe / "view").mkdir()
    (probe / "io").mkdir()
    limits = sandbox.Limits(f"labkit-grade-{secrets.token_hex(8)}", options.memory_mb * 2**20, options.pids,
                            use_cgroups=options.cgroups)
    info = os.pipe()
    command = sandbox.bwrap_command(probe / "view", probe / "io", 1 << 20, sandbox.PLACEHOLDER, info_fd=info[1])
    process, transport = None, None
    try:
        process, stream, _, transport = await _start_in_zygote(zygote, command, info, limits,
                                                               sandbox.sandbox_env(1), "", probe=True)
        data, _ = await asyncio.wait_for(_read_capped(stream, 1 << 16), 60)
        frames = _frames(data)
        seen = json.loads(frames[0]) if frames else {}
        if sandbox.IO_DIR.strip("/") not in seen.get("root", []) or "sys" in seen.get("root", []):  # the host has /sys
            raise RuntimeError(f"the zygote's child did not enter the sandbox ({seen.get('problems') or seen})")
    finally:
        if process is not None:
            _kill(process)
            await process.wait()
        if transport is not None:
            transport.close()
        limits.close()
        shutil.rmtree(probe, ignore_errors=True)


async def _grade_all(handed: list[Handed], lessons, options: Options, progress: bool, context: dict) -> list[Row]:
    from tqdm.auto import tqdm
    gate = asyncio.Semaphore(options.jobs)

    async def one(item):
        async with gate:
            return await grade_submission(item, lessons, options, context)

    tasks = [asyncio.ensure_future(one(item)) for item in handed]
    try:
        with tqdm(total=len(tasks), desc="grading", unit="notebook", disable=not progress) as bar:
            for finished in asyncio.as_completed(tasks):
                row = await finished
                bar.set_postfix_str(f"{row.student}: {row.status}", refresh=False)
                bar.update()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _run_in_thread(coroutine_function):
    """Run the event loop in a thread of its own: nbclient then installs no signal handlers,
    so Ctrl-C reaches this thread, which cancels the grading (and kills every kernel)."""
    loop, outcome, holder = asyncio.new_event_loop(), {}, {}

    def run():
        asyncio.set_event_loop(loop)
        holder["task"] = loop.create_task(coroutine_function())
        started.set()
        try:
            outcome["value"] = loop.run_until_complete(holder["task"])
        except BaseException as err:
            outcome["error"] = err
        finally:
            loop.close()

    started = threading.Event()
    thread = threading.Thread(target=run, name="labkit-grade", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        started.wait()
        if thread.is_alive():
            loop.call_soon_threadsafe(holder["task"].cancel)
            thread.join(60)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]



def grade(paths, *, lessons: Path | None = None, options: Options | None = None,
          progress: bool = True, log=None, hidden: Path | None = None, select=None) -> list[Row]:
    """Grade every notebook in ``paths``; one :class:`Row` per notebook, in a stable order.
    ``log(message)`` hears the warnings (the sandbox, skipped files, labkit functions left usable).
    ``hidden``: the hidden checks' notebooks when ``lessons`` are the student notebooks (see
    :func:`load_lessons`); ``select(submission, lessons)``: grade only the submissions it accepts
    (a regrade of one student or lesson)."""
    options = options or Options()
    log = log or (lambda message: print(message, file=sys.stderr))
    lessons_path = lessons or default_lessons()
    if hidden is not None and lessons_path is None:
        raise ValueError("hidden checks need the lessons they belong to: pass --lessons")
    known = load_lessons(lessons_path, hidden) if lessons_path else {}
    submissions, skipped = scan(paths)
    if select is not None:
        submissions = [submission for submission in submissions if select(submission, known)]
    for path, reason in skipped:
        log(f"skipped {path}: {reason}")
    handed = read_all(submissions, options.max_notebook_mb * 2**20)
    mode, warning = sandbox_mode(options.sandbox)
    if warning:
        log("\n" + "!" * 78 + f"\nWARNING: {warning}\n" + "!" * 78)
    folder = Path(tempfile.mkdtemp(prefix="labkit-grade-"))
    folder.chmod(0o700)
    context = {}
    try:
        context = {"folder": folder, "specs": check_specs(), "mode": mode}
        context["views"] = Views(folder, lessons_path, context["specs"], log)
        context["zygote"] = start_zygote(options.runner, mode, options, folder, log)
        return _run_in_thread(lambda: _grade_all(handed, known, options, progress, context))
    finally:
        if context.get("zygote") is not None:
            context["zygote"].close()
        for path in [folder, *folder.rglob("*")]:
            with contextlib.suppress(OSError):
                path.chmod(0o700)
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- writing, after every row

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value) -> str:
    """A cell a spreadsheet shows as text: one that starts like a formula gets a leading quote."""
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


@contextlib.contextmanager
def atomic_file(path: Path):
    """Write to a temporary file next to ``path``, then rename it over ``path`` (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_folder(folder: Path):
    """Fill a new folder next to ``folder``, then swap it in for the old one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield temporary
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{secrets.token_hex(4)}"
            os.replace(folder, old)
        os.replace(temporary, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def format_points(value: float) -> str:
    """``2`` for 2.0, ``1.5`` for 1.5: points as an instructor wrote them."""
    return f"{value:g}"


def score_text(row: Row) -> str:
    """The row's score, points / maximum, with three decimals (empty without a lesson or points)."""
    return f"{row.points / row.max_points:.3f}" if row.max_points else ""


def gradebook_table(rows: list[Row]) -> tuple[list[str], list[dict]]:
    """The gradebook's columns and one dict of cells per row: the visible checks (pass, fail or
    empty), ``hidden_passed``/``hidden_total``, the points each check earned (its hidden calls
    included), ``passed``/``total`` visible checks, ``points``/``max_points`` and the ``score``."""
    checks = list(dict.fromkeys(c for row in rows if row.lesson for c in row.lesson.checks))
    hidden = any(row.lesson and row.lesson.hidden for row in rows)
    columns = ["student", "lesson", "notebook", "sha256", *checks, *(["hidden_passed", "hidden_total"] if hidden else []),
               *(f"points: {check}" for check in checks),
               "passed", "total", "points", "max_points", "score", "status", "error", "notes", "seconds"]
    table = []
    for row in rows:
        total, earned = row.total, {}
        for call, _, points in row.call_points():
            earned[call.check] = earned.get(call.check, 0) + points
        cells = {
            "student": row.student, "lesson": row.lesson.name if row.lesson else "",
            "notebook": row.notebook, "sha256": row.sha256, "passed": row.passed,
            "total": "" if total is None else total,
            "points": format_points(row.points) if row.lesson else "",
            "max_points": format_points(row.max_points) if row.lesson else "",
            "score": score_text(row), "status": row.status, "error": row.error,
            "notes": "; ".join(row.notes), "seconds": f"{row.seconds:.1f}",
            **{check: ("pass" if row.results[check][0] else "fail") if check in row.results else ""
               for check in checks},
            **{f"points: {check}": format_points(points) for check, points in earned.items()}}
        if hidden and row.lesson and row.lesson.hidden:
            cells["hidden_passed"], cells["hidden_total"] = row.hidden_passed
        table.append({key: csv_cell(value) for key, value in cells.items()})
    return columns, table


def write_table(columns: list[str], table: list[dict], out: Path) -> None:
    """A CSV of ``table`` (dicts of cells already escaped), written atomically."""
    with atomic_file(out) as file:
        writer = csv.DictWriter(file, columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)


def write_gradebook(rows: list[Row], out: Path) -> None:
    write_table(*gradebook_table(rows), out)


def _file_names(rows: list[Row]) -> list[str]:
    """A distinct, filesystem-safe name per row: the student, plus the lesson or a number when needed."""
    names, used = [], set()
    for row in rows:
        base = re.sub(r"[^\w.-]+", "_", row.student).strip("._") or "submission"
        name = base if base not in used else f"{base}-{row.lesson.name if row.lesson else 'x'}"
        number = 2
        while name in used:
            name, number = f"{base}-{number}", number + 1
        used.add(name)
        names.append(name)
    return names


def summary_markdown(row: Row) -> str:
    total = row.total
    lines = [f"# {row.student}" + (f" — {row.lesson.name}" if row.lesson and row.lesson.name else ""), "",
             f"- notebook: `{row.notebook}` (sha256 `{row.sha256}`)",
             f"- score: {format_points(row.points)}/{format_points(row.max_points or 0)} points"
             + (f" ({row.points / row.max_points:.0%})" if row.max_points else ""),
             f"- checks passed: {row.passed}/{total}",
             f"- status: {row.status}" + (f" — {row.error}" if row.error else ""),
             *([f"- notes: {'; '.join(row.notes)}"] if row.notes else []), ""]
    if row.lesson and row.lesson.hidden:
        lines[-1:-1] = ["- hidden checks passed: {}/{}".format(*row.hidden_passed)]
    if row.lesson and row.lesson.checks:
        lines += ["| check | result | hint |", "|---|---|---|"]
        for check in row.lesson.checks:
            passed, hint = row.results.get(check, (None, "did not run"))
            result = {True: "✅ pass", False: "❌ fail", None: "— not run"}[passed]
            cell = hint.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{check}` | {result} | {cell} |")
    return "\n".join(lines) + "\n"




def write_summaries(rows: list[Row], folder: Path, into_existing: bool = False) -> None:
    """One page per row, the folder written whole; a regrade (``into_existing``) replaces only
    its rows' pages in the folder, each atomically."""
    if into_existing and Path(folder).is_dir():
        for row, name in zip(rows, _file_names(rows)):
            with atomic_file(Path(folder) / f"{name}.md") as file:
                file.write(summary_markdown(row))
        return
    with atomic_folder(folder) as temporary:
        for row, name in zip(rows, _file_names(rows)):
            (temporary / f"{name}.md").write_text(summary_markdown(row), encoding="utf-8")


def write_executed(rows: list[Row], folder: Path, into_existing: bool = False) -> None:
    if into_existing and Path(folder).is_dir():
        for row, name in zip(rows, _file_names(rows)):
            if row.executed is not None:
                with atomic_file(Path(folder) / f"{name}.ipynb") as file:
                    file.write(nbformat.writes(row.executed))
        return
    with atomic_folder(folder) as temporary:
        for row, name in zip(rows, _file_names(rows)):
            if row.executed is not None:
                nbformat.write(row.executed, temporary / f"{name}.ipynb")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.grade", description=(
        "Run each submitted notebook in its own sandbox and judge its functions outside it; "
        "collect the results into a gradebook."))
    parser.add_argument("submissions", nargs="*", type=Path,
                        help=".ipynb files or folders of them (searched recursively)")
    parser.add_argument("--out", type=Path, help="the gradebook to write (CSV); needed with submissions")
    parser.add_argument("--lessons", type=Path, help="a lesson notebook or a folder of them, whose check "
                        "calls define the checks (default: ./solutions or the one next to labkit; the "
                        "student notebooks serve as well)")
    parser.add_argument("--jobs", type=int, default=cores(),
                        help="submissions run in parallel, one sandbox each (default: the number of cores)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT,
                        help=f"seconds a notebook's cells may run in all; its checks get as long "
                             f"again (default {DEFAULT_TIMEOUT})")
    parser.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB,
                        help=f"MB of memory for each sandbox, all its processes and its /tmp and /dev/shm "
                             f"together, and the kernel's address-space limit; 0 for none (default {DEFAULT_MEMORY_MB})")
    parser.add_argument("--pids", type=int, default=DEFAULT_PIDS,
                        help=f"processes and threads of each sandbox (default {DEFAULT_PIDS})")
    parser.add_argument("--tmpfs", type=int, default=DEFAULT_TMPFS_MB,
                        help=f"MB of each sandbox's /tmp and of its /dev/shm (default {DEFAULT_TMPFS_MB})")
    parser.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT_KB,
                        help=f"KB of outputs kept per notebook (default {DEFAULT_MAX_OUTPUT_KB})")
    parser.add_argument("--max-notebook", type=int, default=DEFAULT_MAX_NOTEBOOK_MB,
                        help=f"MB a submitted file may have (default {DEFAULT_MAX_NOTEBOOK_MB})")
    parser.add_argument("--sandbox", choices=("auto", "bwrap", "none"), default="auto",
                        help="bwrap: bubblewrap or fail; none: no sandbox (an explicit choice); auto (default): "
                             "bwrap when it works here, else none with a loud warning")
    parser.add_argument("--runner", choices=("auto", "zygote", "kernel"), default="auto",
                        help="zygote: each sandbox's notebook runs in a process forked from one that has "
                             "torch etc. imported (fast; needs bwrap); kernel: a Jupyter kernel started in "
                             "each sandbox; auto (default): zygote when it works here")
    parser.add_argument("--no-cgroups", action="store_true",
                        help="only the fallback limits (RLIMIT_AS, tmpfs sizes, a watchdog on memory and "
                             "processes), as on a host without cgroup v1: to test the fallback")
    parser.add_argument("--summary", type=Path,
                        help="also write one Markdown page per submission with its hints here")
    parser.add_argument("--executed", type=Path, help="also keep the executed notebooks here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    course = parser.add_argument_group("running a course (labkit.gradebook)")
    course.add_argument("--hidden", type=Path, help="a notebook or folder whose hidden-check cells add hidden "
                        "checks to the lessons of the same name (the solutions, when --lessons are the "
                        "student notebooks)")
    course.add_argument("--only-student", action="append", metavar="NAME",
                        help="regrade: only this student's submissions (repeatable), merged into --out")
    course.add_argument("--only-lesson", metavar="NN", help="regrade: only this lesson (number or name), "
                        "merged into --out; with --gradescope: the one lesson of the autograder")
    course.add_argument("--deadline", metavar="WHEN", help="a submission modified after this time "
                        "(2026-12-04T23:59, local, or with +01:00) is noted late")
    course.add_argument("--canvas", type=Path, metavar="FILE", help="Canvas's gradebook import (needs --roster)")
    course.add_argument("--roster", type=Path, metavar="CSV", help="the students (Canvas's gradebook export, or "
                        "a CSV with Student and ID) to match submission names to")
    course.add_argument("--gradescope", type=Path, metavar="DIR", help="write a Gradescope autograder "
                        "(setup.sh, run_autograder, labkit, the lessons) to this new folder")
    course.add_argument("--feedback", type=Path, metavar="DIR", help="one HTML page per student and lesson: "
                        "score, each check with its hint, hidden checks as a count")
    args = parser.parse_args(argv)
    from . import gradebook
    regrade = bool(args.only_student or args.only_lesson)
    if bool(args.canvas) != bool(args.roster):
        parser.error("--canvas and --roster go together: the roster maps submission names to students")
    if args.gradescope and args.gradescope.exists():
        parser.error(f"--gradescope {args.gradescope}: the folder exists; remove it or name a new one")
    if args.feedback and args.feedback.exists() and not regrade:
        parser.error(f"--feedback {args.feedback}: the folder exists; remove it or name a new one "
                     f"(a regrade with --only-student/--only-lesson updates its pages in place)")
    if args.submissions and not args.out:
        parser.error("--out is needed: the gradebook to write")
    if not args.submissions and not args.gradescope:
        parser.error("give the submissions (.ipynb files or folders), or --gradescope DIR")
    try:
        deadline = gradebook.parse_deadline(args.deadline) if args.deadline else None
        roster = gradebook.read_roster(args.roster) if args.roster else None
        lessons_path = args.lessons or default_lessons()
        if args.hidden and not args.hidden.exists():
            raise ValueError(f"--hidden {args.hidden}: no such notebook or folder")
        known = load_lessons(lessons_path, args.hidden) if lessons_path and (
            args.lessons or args.hidden or regrade or args.gradescope) else None
        only_lesson = gradebook.resolve_lesson(args.only_lesson, known) if args.only_lesson else None
        if regrade and args.out and args.out.exists():
            gradebook.read_gradebook(args.out)  # the gradebook a regrade merges into, before any grading
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.jobs < 1 or args.timeout < 1 or args.memory < 0 or args.max_output < 1 or args.pids < 16 \
            or args.tmpfs < 1 or args.max_notebook < 1:
        parser.error("--jobs, --timeout, --max-output, --tmpfs and --max-notebook must be at least 1, "
                     "--memory at least 0, --pids at least 16")
    if args.lessons and not args.lessons.exists():
        parser.error(f"no lesson notebook or folder at {args.lessons}")
    if not args.lessons and default_lessons() is None:
        print("warning: no lesson notebooks found (--lessons): each submission is graded on the checks "
              "it calls itself, so deleting a check call goes unnoticed", file=sys.stderr)
    if args.gradescope:
        chosen = {name: lesson for name, lesson in (known or {}).items() if only_lesson in (None, name)}
        if not chosen:
            parser.error("--gradescope needs lesson notebooks (--lessons)")
        gradebook.write_gradescope(args.gradescope, chosen, lessons_path, {
            "timeout": args.timeout, "memory_mb": args.memory, "max_output_kb": args.max_output, "jobs": 1,
            "sandbox": args.sandbox, "pids": args.pids, "tmpfs_mb": args.tmpfs,
            "max_notebook_mb": args.max_notebook, "cgroups": not args.no_cgroups})
        print(f"wrote the Gradescope autograder to {args.gradescope} (lessons: {', '.join(chosen)}); "
              f"zip its contents and upload them", file=sys.stderr)
        if not args.submissions:
            return 0
    outputs = [p.resolve() for p in (args.out, args.summary, args.executed, args.canvas, args.feedback) if p]
    for given in args.submissions:
        if any(o == given.resolve() or given.resolve() in o.parents for o in outputs):
            parser.error(f"the outputs must not be inside the submissions ({given})")
    options = Options(args.timeout, args.memory, args.max_output, args.jobs, keep_executed=bool(args.executed),
                      sandbox=args.sandbox, pids=args.pids, tmpfs_mb=args.tmpfs, max_notebook_mb=args.max_notebook,
                      cgroups=not args.no_cgroups, runner=args.runner)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, a hub's culler: stop every sandbox too
    started = time.monotonic()
    try:
        rows = grade(args.submissions, lessons=args.lessons, options=options, progress=not args.no_progress,
                     hidden=args.hidden, select=gradebook.selector(args.only_student, only_lesson) if regrade else None)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print(f"interrupted: every sandbox was stopped; nothing was written, {args.out} is as it was",
              file=sys.stderr)
        return 130
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if only_lesson:
        rows = [row for row in rows if row.lesson and row.lesson.name == only_lesson]
    if not rows:
        parser.error("no .ipynb files in " + ", ".join(map(str, args.submissions))
                     + (" for --only-student/--only-lesson" if regrade else ""))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for row in rows if regrade else ():
        row.notes.append(f"regraded {stamp}")
    gradebook.mark(rows, deadline, log)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the files are written now; a few ms, then done
    if regrade:
        gradebook.merge_gradebook(rows, args.out, log)
    else:
        write_gradebook(rows, args.out)
    if args.summary:
        write_summaries(rows, args.summary, into_existing=regrade)
    if args.executed:
        write_executed(rows, args.executed, into_existing=regrade)
    if args.feedback:
        gradebook.write_feedback(rows, args.feedback, into_existing=regrade)
    if args.canvas:
        # the whole class from the gradebook just written, after a regrade too
        gradebook.write_canvas(gradebook.read_gradebook(args.out)[1], roster, args.canvas, log)
    counts = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    print(f"graded {len(rows)} notebooks in {time.monotonic() - started:.0f} s ("
          + ", ".join(f"{n} {status}" for status, n in counts.items()) + f") -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
