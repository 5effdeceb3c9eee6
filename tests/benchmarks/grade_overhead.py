"""What the sandbox costs: 30 lesson-01 submissions graded with ``--jobs 2``, sandboxed
(bubblewrap, cgroups) and with ``--sandbox none``, one after the other in one run.

    OMP_NUM_THREADS=1 python tests/benchmarks/grade_overhead.py [--count 30] [--jobs 2]

The submissions are half copies of solutions/01_gradient_saliency.ipynb and half the untouched
student version (as in the README's grading time). Prints both wall times, the ratio, the load
average before each run, and checks that both gradebooks agree (same pass/fail per check).
Not a test: a measurement (the issue's goal is an overhead of at most 20 %). Both runs use
``--runner kernel`` (``--sandbox none`` has no zygote); the zygote's gain is measured by
grade_throughput.py and grade_breakdown.py.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from labkit.notebooks import student_notebook

ROOT = Path(__file__).resolve().parents[2]
LESSON = ROOT / "solutions" / "01_gradient_saliency.ipynb"


def run(subs: Path, out: Path, jobs: int, sandbox: str) -> tuple[float, dict, float]:
    load = os.getloadavg()[0]
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "labkit.grade", str(subs), "--lessons", str(LESSON), "--out", str(out),
                    "--jobs", str(jobs), "--no-progress", "--sandbox", sandbox,
                    "--runner", "kernel"], check=True)  # the same runner both ways: the sandbox's cost alone
    seconds = time.monotonic() - started
    with open(out, newline="", encoding="utf-8") as file:
        rows = {row["student"]: row for row in csv.DictReader(file)}
    return seconds, rows, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    solution = nbformat.read(LESSON, as_version=4)
    untouched = student_notebook(solution)
    with tempfile.TemporaryDirectory() as folder:
        subs = Path(folder) / "subs"
        subs.mkdir()
        for index in range(args.count):
            nbformat.write(solution if index % 2 == 0 else untouched, subs / f"student{index:03d}.ipynb")
        results = {mode: run(subs, Path(folder) / f"{mode}.csv", args.jobs, mode) for mode in ("bwrap", "none")}
    checks = [c for c in next(iter(results["bwrap"][1].values())) if c.startswith("check_")]
    agree = all([results["bwrap"][1][s][c] for c in checks] == [results["none"][1][s][c] for c in checks]
                for s in results["bwrap"][1])
    print(f"{args.count} lesson-01 submissions, --jobs {args.jobs}, {os.cpu_count()} CPUs")
    for mode, (seconds, rows, load) in results.items():
        passed = sum(row["score"] == "1.000" for row in rows.values())
        print(f"  --sandbox {mode:5}: {seconds:6.1f} s wall ({seconds / args.count:.2f} s per notebook; "
              f"{passed} scored 1.000; load average before: {load:.1f})")
    ratio = results["bwrap"][0] / results["none"][0]
    print(f"  overhead of the sandbox: {100 * (ratio - 1):+.0f} % (ratio {ratio:.2f}); gradebooks agree: {agree}")


if __name__ == "__main__":
    main()
