"""How fast a class is graded: N generated lesson-01 submissions (default 300: correct, wrong and
broken ones), ``python -m labkit.grade --jobs 2`` with the sandbox on, one run.

    OMP_NUM_THREADS=1 nice -n 10 python tests/benchmarks/grade_throughput.py [--count 300] [--jobs 2] [--runner zygote]

Prints the wall time, rows per second, the CPU time of the grader and everything it started
(a cpuacct cgroup, else ``getrusage(RUSAGE_CHILDREN)``), the peak memory (the largest resident set of one process, and
the peak of the proportional set size summed over the grader's whole process tree, sampled every
half second: shared pages such as the zygote's counted once), the load average before and after
(the machine may be shared), and checks every row against what its kind must get. Not a test:
a measurement (issue 18's goal: 300 rows in at most 5 minutes on 2 cores).

The mix, in a fixed order by index: 40 % the solution (every check passes), 30 % wrong answers
(the gradient of the sum of all logits; the concept questions answered wrongly: every check
fails, every cell runs), 30 % broken (the untouched student notebook, a syntax error in the
exercise, an import error in the first cell, a file that is not a notebook).
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from labkit import sandbox  # noqa: E402
from labkit.notebooks import student_notebook  # noqa: E402

LESSON = ROOT / "solutions" / "01_gradient_saliency.ipynb"
CORRECT_LINE = "score = model(x)[torch.arange(len(x)), target].sum()"


def _replace(nb, old: str, new: str):
    nb = nbformat.from_dict(nbformat.reads(nbformat.writes(nb), as_version=4))
    hits = [cell for cell in nb.cells if cell.cell_type == "code" and old in cell.source]
    if not hits:
        raise ValueError(f"lesson 01 has no cell with {old!r}: update the benchmark")
    for cell in hits:
        cell.source = cell.source.replace(old, new)
    return nb


def kinds() -> dict:
    """``{kind: (notebook or bytes, what its row must be)}``."""
    solution = nbformat.read(LESSON, as_version=4)
    wrong = _replace(solution, CORRECT_LINE, "score = model(x).sum()")
    for name, answer in (("q01_linear_gradient", "'a'"), ("q01_black_pixel", "'b'"), ("q01_sanity", "'b'")):
        wrong = _replace(wrong, f"{name} = {answer}", f"{name} = 'c'")
    return {
        "correct": (solution, "all pass"),
        "wrong": (wrong, "all fail"),
        "untouched": (student_notebook(solution), "gradient fails"),
        "syntax_error": (_replace(solution, CORRECT_LINE, "score = model(x)[torch.arange(len(x)), target.sum("),
                         "gradient fails"),
        "import_error": (_replace(solution, "import torch\n", "import troch\n"), "gradient fails"),
        "not_a_notebook": (b"{ this is not json", "invalid"),
    }


MIX = ["correct"] * 4 + ["wrong"] * 3 + ["untouched", "syntax_error", "import_error"]


def write_submissions(folder: Path, count: int) -> dict:
    made, expected = kinds(), {}
    for index in range(count):
        kind = MIX[index % len(MIX)]
        if kind == "import_error" and index % 30 == 29:
            kind = "not_a_notebook"  # one in thirty broken ones
        content, _ = made[kind]
        path = folder / f"student{index:04d}.ipynb"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            nbformat.write(content, path)
        expected[path.stem] = (kind, made[kind][1])
    return expected


class CpuClock:
    """CPU seconds of a process and everything it starts: a cpuacct cgroup (v1) of their own when
    we may make one (exact: the sandboxes' processes are not all waited for by the grader), else
    ``getrusage(RUSAGE_CHILDREN)`` (which misses what is not waited for)."""

    def __init__(self):
        self.group = None
        root = sandbox._own_cgroup("cpuacct")
        if root is not None:
            try:
                self.group = root / f"labkit-throughput-{os.getpid()}"
                self.group.mkdir()
            except OSError:
                self.group = None
        self.before = resource.getrusage(resource.RUSAGE_CHILDREN)

    @property
    def how(self) -> str:
        return "a cpuacct cgroup" if self.group else "getrusage(RUSAGE_CHILDREN), a lower bound"

    def enter(self, pid: int) -> None:
        if self.group:
            (self.group / "cgroup.procs").write_text(str(pid))

    def seconds(self) -> float:
        if self.group:
            return int((self.group / "cpuacct.usage").read_text()) / 1e9
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - self.before.ru_utime) + (after.ru_stime - self.before.ru_stime)

    def close(self) -> None:
        if self.group:
            for _ in range(50):
                try:
                    self.group.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


def tree_pss(root: int) -> int:
    """Proportional set size of ``root`` and everything below it, in bytes."""
    total = 0
    for pid in sandbox.descendants(root):
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def judge(rows: dict, expected: dict) -> list[str]:
    wrong = []
    for student, (kind, must) in expected.items():
        row = rows.get(student)
        results = [v for k, v in (row or {}).items() if k.startswith("check_")]
        ok = row is not None and (
            (must == "all pass" and row["score"] == "1.000" and row["status"] == "ok")
            or (must == "all fail" and all(v == "fail" for v in results) and row["status"] in ("ok", "cell errors"))
            or (must == "gradient fails" and row["check_gradient"] == "fail")
            or (must == "invalid" and row["status"] == "invalid notebook"))
        if not ok:
            wrong.append(f"{student} ({kind}): {dict(row) if row else 'missing'}")
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runner", choices=("auto", "zygote", "kernel"), default="zygote")
    parser.add_argument("--keep", type=Path, help="also copy the gradebook here")
    args = parser.parse_args()
    problem = sandbox.bwrap_works()
    if problem:
        sys.exit(f"needs the sandbox: {problem}")
    with tempfile.TemporaryDirectory(prefix="labkit-throughput-") as folder:
        subs, out = Path(folder) / "subs", Path(folder) / "grades.csv"
        subs.mkdir()
        expected = write_submissions(subs, args.count)
        load_before = os.getloadavg()
        clock = CpuClock()
        started = time.monotonic()
        grader = subprocess.Popen([sys.executable, "-m", "labkit.grade", str(subs), "--lessons", str(LESSON),
                                   "--out", str(out), "--jobs", str(args.jobs), "--no-progress",
                                   "--sandbox", "bwrap", "--runner", args.runner],
                                  cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: clock.enter(os.getpid()))
        peak, done = [0], threading.Event()

        def sample():
            while not done.wait(0.5):
                peak[0] = max(peak[0], tree_pss(grader.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log = grader.communicate()[1]
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = clock.seconds()
        clock.close()
        load_after = os.getloadavg()
        if grader.returncode != 0:
            sys.exit(f"the grader failed ({grader.returncode}):\n{log[-3000:]}")
        with open(out, newline="", encoding="utf-8") as file:
            rows = {row["student"]: row for row in csv.DictReader(file)}
        if args.keep:
            args.keep.write_bytes(out.read_bytes())
    mistakes = judge(rows, expected)
    statuses = collections.Counter(row["status"] for row in rows.values())
    kinds_count = collections.Counter(kind for kind, _ in expected.values())
    print(f"{args.count} lesson-01 submissions ({', '.join(f'{n} {k}' for k, n in kinds_count.items())}), "
          f"--jobs {args.jobs}, --runner {args.runner}, sandbox bwrap, {os.cpu_count()} CPUs")
    print(f"  wall: {seconds:.1f} s, {args.count / seconds:.2f} rows/s ({seconds / args.count:.2f} s per row)")
    print(f"  CPU (grader and all it started, from {clock.how}): {cpu_seconds:.0f} s, "
          f"{cpu_seconds / args.count:.2f} s per row")
    print(f"  peak memory: largest process {cpu.ru_maxrss / 1024:.0f} MB resident; whole tree "
          f"{peak[0] / 2**20:.0f} MB proportional (sampled every 0.5 s)")
    print(f"  load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print(f"  statuses: {dict(statuses)}")
    print(f"  rows as their kind requires: {len(expected) - len(mistakes)}/{len(expected)}")
    for line in mistakes[:10]:
        print("   ", line[:400])
    if log.strip():
        print("  the grader said:", log.strip()[-1000:])


if __name__ == "__main__":
    main()
