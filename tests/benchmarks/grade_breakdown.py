"""Where a lesson-01 row's time goes in the sandboxed grader, stage by stage (CPU seconds, the
median of ``--repeat`` runs; wall seconds beside them, which a shared machine inflates).

    OMP_NUM_THREADS=1 nice -n 10 python tests/benchmarks/grade_breakdown.py [--repeat 3]

Each stage runs in a sandbox built as the grader builds it (lesson 01's view of labkit); the
CPU time is that of the stage's processes (a cpuacct cgroup of their own, else
``RUSAGE_CHILDREN``). Stages: bwrap around ``true``; a Python start; the kernel runner's imports
(nbformat, nbclient, jupyter_client); the libraries a lesson imports (torch, numpy, matplotlib,
IPython; then labkit's sandbox copy and the modules lesson 01 uses); lesson 01's cells and the
grader's cell (the solution, run in-process, its per-cell times from the executed notebook);
then whole rows: ``python -m labkit.grade --jobs 2`` on two and on six copies of the solution
with each runner (the difference between them is the cost of four rows, without the grader's
start; ``--jobs 2`` on 2 cores gives each sandbox one thread, as in the class benchmark).
Not a test: a measurement.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grade_throughput import LESSON, CpuClock  # noqa: E402

from labkit import grade, sandbox  # noqa: E402

STAGES = [
    ("bwrap: build the sandbox, run `true`", ["true"]),
    ("Python start (`python -c pass`)", [sys.executable, "-c", "pass"]),
    ("+ the kernel runner's imports (nbformat, nbclient, jupyter_client)",
     [sys.executable, "-c", "import nbformat, nbclient, jupyter_client"]),
    ("+ ipykernel (what a kernel imports to start)", [sys.executable, "-c", "import ipykernel.kernelapp"]),
    ("+ torch, numpy", [sys.executable, "-c", "import torch, numpy"]),
    ("+ torch, numpy, matplotlib.pyplot, IPython",
     [sys.executable, "-c", "import torch, numpy, matplotlib.pyplot, IPython"]),
    ("+ ... and labkit (sandbox copy) with lesson 01's modules",
     [sys.executable, "-c", "import torch, numpy, matplotlib.pyplot, IPython, labkit; "
                            "from labkit import attribution, checks, data, models, plot"]),
]


def measure(command: list, env: dict, repeat: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(repeat):
        clock = CpuClock()
        started = time.monotonic()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       preexec_fn=lambda: clock.enter(os.getpid()))
        wall.append(time.monotonic() - started)
        cpu.append(clock.seconds())
        clock.close()
    return statistics.median(cpu), statistics.median(wall)


def cell_times(executed: Path) -> list[tuple[str, float]]:
    nb = nbformat.read(executed, as_version=4)
    stamp = lambda text: datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    times = []
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        started = timing.get("shell.execute_reply.started") or timing.get("iopub.execute_input")  # nbclient's
        if "shell.execute_reply" in timing and started:
            seconds = (stamp(timing["shell.execute_reply"]) - stamp(started)).total_seconds()
            times.append((cell.source.splitlines()[0][:60] if cell.source else "", seconds))
    return times


def grade_run(folder: Path, copies: int, runner: str) -> tuple[float, float, Path]:
    subs = folder / f"subs-{runner}-{copies}"
    subs.mkdir()
    for index in range(copies):
        (subs / f"s{index}.ipynb").write_bytes(LESSON.read_bytes())
    clock, started = CpuClock(), time.monotonic()
    executed = folder / f"executed-{runner}-{copies}"
    subprocess.run([sys.executable, "-m", "labkit.grade", str(subs), "--lessons", str(LESSON), "--out",
                    str(folder / f"g-{runner}-{copies}.csv"), "--jobs", "2", "--no-progress", "--sandbox", "bwrap",
                    "--runner", runner, "--executed", str(executed)],
                   cwd=ROOT, check=True, stderr=subprocess.DEVNULL, preexec_fn=lambda: clock.enter(os.getpid()))
    wall, cpu = time.monotonic() - started, clock.seconds()
    clock.close()
    with open(folder / f"g-{runner}-{copies}.csv", newline="") as file:
        assert all(row["score"] == "1.000" for row in csv.DictReader(file)), f"{runner}: the solution did not pass"
    return cpu, wall, executed / "s0.ipynb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if sandbox.bwrap_works():
        sys.exit(f"needs the sandbox: {sandbox.bwrap_works()}")
    print(f"load average before: {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs; CPU s / wall s (median of {args.repeat})")
    with tempfile.TemporaryDirectory(prefix="labkit-breakdown-") as name:
        folder = Path(name)
        lesson = grade.load_lessons(LESSON)[LESSON.stem]
        views = grade.Views(folder, LESSON, grade.check_specs(), lambda message: None)
        view = views.get(lesson)
        io = folder / "io"
        io.mkdir()
        env = sandbox.sandbox_env(1)
        for title, command in STAGES:
            cpu, wall = measure(sandbox.bwrap_command(view, io, 64 * 2**20, command), env, args.repeat)
            print(f"  {title:78} {cpu:5.2f} / {wall:5.2f}")
        rows = {}
        for runner in ("kernel", "zygote"):
            two = grade_run(folder, 2, runner)
            six = grade_run(folder, 6, runner)
            rows[runner] = (two, six)
            print(f"  whole rows, --runner {runner:6}: grader start + 2 rows {two[0]:5.1f} / {two[1]:5.1f}; "
                  f"each further row {(six[0] - two[0]) / 4:5.2f} CPU s")
        for runner in ("kernel", "zygote"):
            times = cell_times(rows[runner][1][2])
            print(f"  lesson-01 solution's cells, --runner {runner} (wall s, one row of two running at once): "
                  f"total {sum(t for _, t in times):.2f}")
            for source, seconds in times:
                if seconds >= 0.05:
                    print(f"      {seconds:5.2f}  {source}")


if __name__ == "__main__":
    main()
