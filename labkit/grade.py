"""A gradebook from a folder of submitted notebooks: ``python -m labkit.grade SUBMISSIONS... --out grades.csv``.

Every submission (an ``.ipynb`` file, or a folder searched recursively for them) runs in its own
fresh kernel, in a fresh empty temporary directory holding a *copy* of the notebook; the file
handed in is only ever read. The gradebook (CSV) has one row per submission: the student, the
lesson, one column per check of that lesson (``pass``, ``fail``, or empty when the check never
ran), ``passed``/``total``/``score``, a ``status`` and the ``error`` (what went wrong, which
cell). ``--summary DIR`` also writes one Markdown page per submission with the hints it got;
``--executed DIR`` keeps the executed copies for a look at what happened.

Who and which lesson
--------------------
The student id is the file name without ``.ipynb`` (``alice.ipynb`` -> ``alice``); when that is
a lesson's name (``alice/01_gradient_saliency.ipynb``) it is the nearest parent folder whose name
is not a lesson's name (so nbgrader's ``submitted/alice/01_gradient_saliency/01_gradient_saliency.ipynb``
gives ``alice`` too). The lessons are the notebooks in ``--lessons`` (default: ``./solutions``,
else the ``solutions/`` folder next to the labkit package); a submission belongs to the lesson
whose number starts its file or folder name (``01_...``), else to the lesson whose checks it
calls. The lesson notebook, not the submission, says which checks count and what each is
called on: its code cells are parsed with ``ast`` for calls ``check_*(...)``, so deleting a
check call does not remove it from the score, which is ``passed / checks of the lesson``. The
arguments are evaluated once the notebook has run to its end, so ``check_gradient(gradient)``
grades whatever ``gradient`` is then (a check that cannot run, e.g. ``gradient`` is undefined,
is a fail with that hint). A check called several times passes when every call passes.

What each kernel may use (isolation)
------------------------------------
- Working directory: its own empty temporary directory, deleted afterwards.
- Time: ``--timeout S`` seconds of wall clock for the notebook's own cells, then the kernel is
  interrupted and the checks get another ``S`` seconds; a kernel that ignores the interrupt is
  killed with its whole process group.
- Memory: ``--memory MB`` is the kernel's address-space limit (``RLIMIT_AS``, soft = hard, so
  the notebook cannot raise it; its child processes inherit it). Past it, allocations fail with
  ``MemoryError`` in that cell and the rest of the notebook goes on. Address space is more
  than resident memory (libraries, thread stacks and malloc arenas reserve some; the kernels
  get ``MALLOC_ARENA_MAX=2``), so the default, 6 GB, is well above what a lesson uses: a kernel
  running EfficientNet-Lite0 with SmoothGrad peaked at 2.6 GB of address space, 1.2 GB resident.
  CUDA reserves far more address space than that, so kernels with a limit see no GPU
  (``CUDA_VISIBLE_DEVICES=""``); ``--memory 0`` lifts the limit and gives them the GPU.
- Output: at most ``--max-output`` KB of a notebook's outputs are kept; the rest is dropped.
  The kernel's own stdout/stderr (not the notebook's) go to /dev/null.
- Threads: each kernel gets ``cores / jobs`` OpenMP threads (unless ``OMP_NUM_THREADS`` is
  set), so parallel kernels do not fight over the cores.

Not isolated: the notebook's code runs with the grader's user rights. It can read every file
the grader can, write outside its directory, use the network, start processes, and patch
anything in its own process (torch, builtins, the import system). For a class, run the grader
in a container (the README's "Grading" section says how: the repo2docker image of this repository).

Why printing "passed" is not a pass (anti-forgery)
--------------------------------------------------
Stored outputs are ignored: every notebook is executed again. After its last cell, the grader
runs one cell of its own (:func:`_grade_in_kernel`): it drops every ``labkit`` module from
``sys.modules`` and loads ``labkit.checks`` afresh from the package's files, so checks the
notebook redefined or monkeypatched (functions, the engine, recorded results) are gone; it
re-evaluates the lesson's check arguments (e.g. ``gradient`` in ``check_gradient(gradient)``)
in the notebook's namespace, calls the fresh checks on them, and writes the verdicts to a random
path that appears only in that cell's source, which the kernel receives only after the
notebook's cells have run. The grader reads that file, nothing else.

This stops what a student can do by accident or with a quick hack: print a pass, define their
own ``check_*``, patch ``labkit.checks``, append fake results, write a results file, skip a
check, hand in labkit's own function. It does not stop code written against the grader itself:
code in the same process can patch ``open``, ``json``, torch or the import machinery before the
grader's cell runs, leave a thread behind that rewrites files, or edit labkit's files on disk
where the user may write them. Reading a suspicious notebook, and the container, are the answer.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import csv
import inspect
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

LABKIT_DIR = Path(__file__).resolve().parent
DEFAULT_TIMEOUT = 600
DEFAULT_MEMORY_MB = 6144
DEFAULT_MAX_OUTPUT_KB = 1024

# what nbclient reports for a cell it interrupted at its time limit
TIMED_OUT_REPLY = {"ename": "LabkitGradeTimeout", "evalue": "interrupted at the time limit", "traceback": []}

OK, CELL_ERRORS, TIMEOUT, KERNEL_DIED = "ok", "cell errors", "timeout", "kernel died"
INVALID, UNKNOWN_LESSON, GRADER_ERROR = "invalid notebook", "unknown lesson", "grader error"

# The kernel of one submission: limit its address space (and no core files), then start
# ipykernel exactly as `python -m ipykernel_launcher` would.
KERNEL_LAUNCHER = """\
import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
"""


# ---------------------------------------------------------------- lessons and their checks

@dataclass(frozen=True)
class CheckCall:
    """``check(arguments)`` as written in a lesson notebook, e.g. ``("check_gradient", "gradient")``."""
    check: str
    arguments: str


@dataclass(frozen=True)
class Lesson:
    name: str
    calls: tuple[CheckCall, ...]

    @property
    def checks(self) -> list[str]:
        return list(dict.fromkeys(call.check for call in self.calls))

    @property
    def number(self) -> str | None:
        match = re.match(r"(\d+)(?:[_\- ]|$)", self.name)
        return match.group(1) if match else None


def _check_name(function: ast.expr) -> str | None:
    name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
    return name if isinstance(name, str) and name.startswith("check_") else None


def _arguments_source(call: ast.Call) -> str:
    keywords = [f"**{ast.unparse(k.value)}" if k.arg is None else f"{k.arg}={ast.unparse(k.value)}"
                for k in call.keywords]
    return ", ".join([ast.unparse(a) for a in call.args] + keywords)


def check_calls(nb: nbformat.NotebookNode) -> tuple[CheckCall, ...]:
    """Every distinct ``check_*(...)`` call in the code cells, in order (IPython magics are
    translated first; a cell that is not valid Python is skipped)."""
    from IPython.core.inputtransformer2 import TransformerManager
    transformer, calls = TransformerManager(), []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(transformer.transform_cell(cell.source))
        except (SyntaxError, ValueError):
            continue
        found = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _check_name(node.func)]
        found.sort(key=lambda node: (node.lineno, node.col_offset))
        calls += [CheckCall(_check_name(node.func), _arguments_source(node)) for node in found]
    return tuple(dict.fromkeys(calls))


def load_lessons(path: Path) -> dict[str, Lesson]:
    """``{name: Lesson}`` for a lesson notebook or every notebook in a folder."""
    path = Path(path)
    files = sorted(path.glob("*.ipynb")) if path.is_dir() else [path]
    return {file.stem: Lesson(file.stem, check_calls(nbformat.read(file, as_version=4)))
            for file in files}


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


def find_submissions(paths) -> list[Submission]:
    """The notebooks in ``paths`` (files, or folders searched recursively), in a stable order."""
    found = []
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*.ipynb") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(given).parts))
            found += [Submission(p, (p.stem, *reversed(p.relative_to(given).parent.parts))) for p in files]
        elif given.is_file():
            found.append(Submission(given, (given.stem, *reversed(given.parent.parts))))
        else:
            raise FileNotFoundError(f"no submission at {given}: expected an .ipynb file or a folder of them")
    return found


# ---------------------------------------------------------------- the grader's own cell

def _grade_in_kernel(calls, labkit_dir, result_path):
    """Runs in the submission's kernel after its own cells: loads labkit.checks afresh from
    ``labkit_dir`` (whatever the notebook redefined or patched is dropped), calls each check on
    the notebook's objects, and writes the verdicts as JSON to ``result_path``."""
    import builtins
    import importlib
    import importlib.util
    import json
    import sys
    namespace = sys._getframe().f_globals  # the notebook's own variables
    for name in [name for name in sys.modules if name == "labkit" or name.startswith("labkit.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "labkit", f"{labkit_dir}/__init__.py", submodule_search_locations=[labkit_dir])
    sys.modules["labkit"] = labkit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(labkit)
    checks = importlib.import_module("labkit.checks")
    verdicts = []
    for check, arguments in calls:
        try:
            args, kwargs = builtins.eval(f"(lambda *a, **k: (a, k))({arguments})", namespace)
        except BaseException as err:
            verdicts.append({"check": check, "passed": False, "hint": (
                f"`{arguments}` could not be evaluated at the end of the notebook ({type(err).__name__}: "
                f"{str(err)[:200]}): did the cell that defines it run without an error?")})
            continue
        checks.clear_results()
        try:
            getattr(checks, check)(*args, **kwargs)
            recorded = checks.results()[-1]
            verdicts.append({"check": check, "passed": recorded["passed"], "hint": recorded["hint"]})
        except BaseException as err:
            verdicts.append({"check": check, "passed": False,
                             "hint": f"the check could not run: {type(err).__name__}: {str(err)[:200]}"})
    with builtins.open(result_path, "w", encoding="utf-8") as file:
        json.dump(verdicts, file)


def grader_cell_source(calls, result_path: Path) -> str:
    pairs = [(call.check, call.arguments) for call in calls]
    return (inspect.getsource(_grade_in_kernel)
            + f"\n_grade_in_kernel({pairs!r}, {str(LABKIT_DIR)!r}, {str(result_path)!r})\n"
            + "del _grade_in_kernel\n")


# ---------------------------------------------------------------- running one notebook

def _content_size(content: dict) -> int:
    parts = [content.get("text", ""), *content.get("traceback", []), *content.get("data", {}).values()]
    return sum(len(part) if isinstance(part, str) else len(json.dumps(part)) for part in parts)


def _client_class():
    from nbclient import NotebookClient

    class CappedClient(NotebookClient):
        """nbclient's client that keeps at most ``max_output`` bytes of outputs and notes every
        cell error as ``(cell number, "Name: message")``."""

        def __init__(self, nb, max_output: int, **kw):
            super().__init__(nb, **kw)
            self.max_output, self.output_bytes, self.cell_errors = max_output, 0, []
            self.running_cell, self.timed_out = "startup", False
            self.on_cell_error = self._note_error

        def output(self, outs, msg, display_id, cell_index):
            self.output_bytes += _content_size(msg["content"])
            if self.output_bytes <= self.max_output:
                return super().output(outs, msg, display_id, cell_index)
            if self.output_bytes - _content_size(msg["content"]) <= self.max_output:
                outs.append(nbformat.v4.new_output("stream", name="stderr", text=(
                    f"\n[labkit.grade: output truncated, this notebook printed more than "
                    f"{self.max_output // 1024} KB]\n")))
            return None

        def _note_error(self, cell, cell_index, execute_reply):
            content = execute_reply["content"]
            if content.get("ename") == TIMED_OUT_REPLY["ename"]:
                self.timed_out = True
                return
            message = f"{content.get('ename', 'Error')}: {content.get('evalue', '')}".strip()
            self.cell_errors.append((cell_index + 1, message.splitlines()[0][:200] if message else ""))

    return CappedClient


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


@dataclass
class Outcome:
    verdicts: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # (status, message), worst first
    cell_errors: list = field(default_factory=list)


def _kernel_spec(options: Options):
    from jupyter_client.kernelspec import KernelSpec
    argv = [sys.executable, "-c", KERNEL_LAUNCHER, str(options.memory_mb * 2**20), "-f",
            "{connection_file}", "--HistoryManager.hist_file=:memory:"]
    return KernelSpec(argv=argv, display_name="labkit grader", language="python",
                      interrupt_mode="signal")


def _kernel_env(options: Options) -> dict:
    env = dict(os.environ)
    env.pop("LABKIT_CHECK_LOG", None)  # checks run by the notebook itself must not write the instructor's log
    threads = str(max(1, cores() // options.jobs))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", threads)
    env.setdefault("MALLOC_ARENA_MAX", "2")  # each glibc arena reserves 64 MB of address space
    if options.memory_mb > 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CUDA reserves far more address space than the limit
    return env


def _kernel_manager(options: Options):
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    class GraderKernel(KernelSpecManager):
        """Always the grader's own Python with the limits, whatever a notebook's metadata names."""
        def get_kernel_spec(self, kernel_name):
            return _kernel_spec(options)

    return AsyncKernelManager(kernel_name="labkit-grader", kernel_spec_manager=GraderKernel())


async def _run_cells(client, deadline: float) -> int | None:
    """Execute the notebook's cells in order; the number of the cell that was running when
    ``deadline`` passed (nbclient interrupted it), or None."""
    for index, cell in enumerate(client.nb.cells):
        client.timeout = max(1, math.ceil(deadline - time.monotonic()))
        client.running_cell, client.timed_out = f"cell {index + 1}", False
        await client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
        if client.timed_out:
            return index + 1
    return None


async def execute(nb, workdir: Path, calls, options: Options, results_dir: Path) -> Outcome:
    """Run ``nb`` (in place) in a fresh kernel in ``workdir``, then the grader's checks."""
    from nbclient.exceptions import DeadKernelError
    outcome, result_path = Outcome(), results_dir / f"{secrets.token_hex(16)}.json"
    km = _kernel_manager(options)
    client = _client_class()(nb, km=km, max_output=options.max_output_kb * 1024,
                             allow_errors=True, shutdown_kernel="immediate", startup_timeout=120,
                             interrupt_on_timeout=True, error_on_timeout=TIMED_OUT_REPLY)
    try:
        async with client.async_setup_kernel(cleanup_kc=True, cwd=str(workdir), env=_kernel_env(options),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            interrupted = await _run_cells(client, time.monotonic() + options.timeout)
            if interrupted:
                outcome.problems.append((TIMEOUT, f"timeout: stopped after {options.timeout} s, "
                                                  f"in cell {interrupted}"))
            nb.cells.append(nbformat.v4.new_code_cell(grader_cell_source(calls, result_path)))
            client.timeout, client.running_cell = options.timeout, "the grader's checks"
            await client.async_execute_cell(nb.cells[-1], len(nb.cells) - 1, store_history=False)
            if client.timed_out:
                outcome.problems.append((TIMEOUT, f"timeout: the checks did not finish within "
                                                  f"{options.timeout} s (the kernel ignored the interrupt?)"))
    except DeadKernelError:
        outcome.problems.append((KERNEL_DIED, f"the kernel died in {client.running_cell} (a crash, "
                                              f"exit() or the memory limit)"))
    finally:
        if km.has_kernel:  # cancelled while the kernel was starting: nbclient has not cleaned up
            await km.shutdown_kernel(now=True)
    outcome.cell_errors = client.cell_errors
    outcome.verdicts = _read_verdicts(result_path)
    if not outcome.verdicts and calls and not outcome.problems:
        outcome.problems.append((GRADER_ERROR, "the grader's checks wrote no results (see the last cell)"))
    return outcome


def _read_verdicts(path: Path) -> list:
    try:
        verdicts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    finally:
        path.unlink(missing_ok=True)
    return [v for v in verdicts if isinstance(v, dict) and isinstance(v.get("check"), str)
            and isinstance(v.get("passed"), bool) and isinstance(v.get("hint"), str)]


# ---------------------------------------------------------------- rows of the gradebook

@dataclass
class Row:
    student: str
    notebook: str
    lesson: Lesson | None
    status: str = OK
    error: str = ""
    results: dict = field(default_factory=dict)  # check -> (passed, hint)
    seconds: float = 0.0
    executed: nbformat.NotebookNode | None = None

    @property
    def passed(self) -> int:
        return sum(passed for passed, _ in self.results.values())

    @property
    def total(self) -> int | None:
        return len(self.lesson.checks) if self.lesson else None


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


async def grade_submission(submission: Submission, lessons: dict[str, Lesson], options: Options,
                           results_dir: Path) -> Row:
    """One row of the gradebook; never raises for anything the notebook does."""
    started = time.monotonic()
    row = Row(submission.student(lessons), str(submission.path), None)
    try:
        await _grade_into(row, submission, lessons, options, results_dir)
    except Exception as err:  # e.g. the kernel did not start: this row only
        row.status, row.error = GRADER_ERROR, f"{type(err).__name__}: {str(err)[:300]}"
    row.seconds = time.monotonic() - started
    return row


async def _grade_into(row: Row, submission: Submission, lessons, options: Options, results_dir: Path):
    try:
        nb = nbformat.reads(submission.path.read_bytes().decode("utf-8"), as_version=4)
        own_calls = check_calls(nb)
    except Exception as err:  # not JSON, not a notebook, not UTF-8
        row.lesson = lesson_for(list(submission.names), (), lessons)
        row.status, row.error = INVALID, f"not a valid notebook: {type(err).__name__}: {str(err)[:200]}"
        return
    row.lesson = lesson_for(list(submission.names), own_calls, lessons) if lessons else Lesson("", own_calls)
    if row.lesson is None:
        row.status, row.error = UNKNOWN_LESSON, "cannot tell the lesson; pass --lessons with its notebook"
        return
    for cell in nb.cells:  # stored outputs are never trusted, and not needed
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    workdir = Path(tempfile.mkdtemp(prefix="labkit-grade-"))
    try:
        shutil.copyfile(submission.path, workdir / submission.path.name)
        outcome = await execute(nb, workdir, row.lesson.calls, options, results_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    row.results, row.executed = _combine(outcome.verdicts), nb if options.keep_executed else None
    messages = [message for _, message in outcome.problems] + [_describe_errors(outcome.cell_errors)]
    row.status = outcome.problems[0][0] if outcome.problems else CELL_ERRORS if outcome.cell_errors else OK
    row.error = "; ".join(m for m in messages if m)


# ---------------------------------------------------------------- the whole class

async def _grade_all(submissions, lessons, options: Options, progress: bool) -> list[Row]:
    from tqdm.auto import tqdm
    gate = asyncio.Semaphore(options.jobs)
    results_dir = Path(tempfile.mkdtemp(prefix="labkit-grade-results-"))

    async def one(submission):
        async with gate:
            return await grade_submission(submission, lessons, options, results_dir)

    tasks = [asyncio.ensure_future(one(s)) for s in submissions]
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
        shutil.rmtree(results_dir, ignore_errors=True)


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
          progress: bool = True) -> list[Row]:
    """Grade every notebook in ``paths``; one :class:`Row` per notebook, in a stable order."""
    options = options or Options()
    lessons_path = lessons or default_lessons()
    known = load_lessons(lessons_path) if lessons_path else {}
    submissions = find_submissions(paths)
    return _run_in_thread(lambda: _grade_all(submissions, known, options, progress))


def write_gradebook(rows: list[Row], out: Path) -> None:
    checks = list(dict.fromkeys(c for row in rows if row.lesson for c in row.lesson.checks))
    columns = ["student", "lesson", "notebook", *checks,
               "passed", "total", "score", "status", "error", "seconds"]
    with open(out, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        for row in rows:
            total = row.total
            writer.writerow({
                "student": row.student, "lesson": row.lesson.name if row.lesson else "",
                "notebook": row.notebook, "passed": row.passed, "total": "" if total is None else total,
                "score": f"{row.passed / total:.3f}" if total else "", "status": row.status,
                "error": row.error, "seconds": f"{row.seconds:.1f}",
                **{check: ("pass" if row.results[check][0] else "fail") if check in row.results else ""
                   for check in checks}})


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
             f"- notebook: `{row.notebook}`",
             f"- score: {row.passed}/{total}" + (f" ({row.passed / total:.0%})" if total else ""),
             f"- status: {row.status}" + (f" — {row.error}" if row.error else ""), ""]
    if row.lesson and row.lesson.checks:
        lines += ["| check | result | hint |", "|---|---|---|"]
        for check in row.lesson.checks:
            passed, hint = row.results.get(check, (None, "did not run"))
            result = {True: "✅ pass", False: "❌ fail", None: "— not run"}[passed]
            cell = hint.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{check}` | {result} | {cell} |")
    return "\n".join(lines) + "\n"


def write_summaries(rows: list[Row], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for row, name in zip(rows, _file_names(rows)):
        (folder / f"{name}.md").write_text(summary_markdown(row), encoding="utf-8")


def write_executed(rows: list[Row], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for row, name in zip(rows, _file_names(rows)):
        if row.executed is not None:
            nbformat.write(row.executed, folder / f"{name}.ipynb")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.grade", description=(
        "Run each submitted notebook in its own kernel and collect the checks' results into a gradebook."))
    parser.add_argument("submissions", nargs="+", type=Path,
                        help=".ipynb files or folders of them (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="the gradebook to write (CSV)")
    parser.add_argument("--lessons", type=Path, help="a lesson notebook or a folder of them, whose check "
                        "calls define the checks (default: ./solutions or the one next to labkit)")
    parser.add_argument("--jobs", type=int, default=cores(),
                        help="submissions run in parallel, one kernel each (default: the number of cores)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT,
                        help=f"seconds a notebook's cells may run in all; its checks get as long "
                             f"again (default {DEFAULT_TIMEOUT})")
    parser.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB,
                        help=f"address-space limit of each kernel in MB, 0 for none "
                             f"(default {DEFAULT_MEMORY_MB})")
    parser.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT_KB,
                        help=f"KB of outputs kept per notebook (default {DEFAULT_MAX_OUTPUT_KB})")
    parser.add_argument("--summary", type=Path,
                        help="also write one Markdown page per submission with its hints here")
    parser.add_argument("--executed", type=Path, help="also keep the executed notebooks here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout < 1 or args.memory < 0 or args.max_output < 1:
        parser.error("--jobs and --timeout must be at least 1, --memory at least 0, --max-output at least 1")
    if args.lessons and not args.lessons.exists():
        parser.error(f"no lesson notebook or folder at {args.lessons}")
    if not args.lessons and default_lessons() is None:
        print("warning: no lesson notebooks found (--lessons): each submission is graded on the checks "
              "it calls itself, so deleting a check call goes unnoticed", file=sys.stderr)
    options = Options(args.timeout, args.memory, args.max_output, args.jobs, keep_executed=bool(args.executed))
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, a hub's culler: stop every kernel too
    started = time.monotonic()
    try:
        rows = grade(args.submissions, lessons=args.lessons, options=options, progress=not args.no_progress)
    except FileNotFoundError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print("interrupted: every kernel was stopped, no gradebook written", file=sys.stderr)
        return 130
    if not rows:
        parser.error("no .ipynb files in " + ", ".join(map(str, args.submissions)))
    write_gradebook(rows, args.out)
    if args.summary:
        write_summaries(rows, args.summary)
    if args.executed:
        write_executed(rows, args.executed)
    counts = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    print(f"graded {len(rows)} notebooks in {time.monotonic() - started:.0f} s ("
          + ", ".join(f"{n} {status}" for status, n in counts.items()) + f") -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
