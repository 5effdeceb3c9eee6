"""How long each solution notebook takes to run, one after the other, on this machine.

    OMP_NUM_THREADS=1 python tests/benchmarks/time_notebooks.py [NOTEBOOK ...] [--csv PATH]
                                                                [--limit-s 90]

Each notebook (default: every solutions/*.ipynb) is COPIED into a temporary folder and run
there with :func:`labkit.notebooks.execute` in a fresh kernel, so solutions/ is never rewritten.
Prints a Markdown table -- wall seconds, the kernel's CPU seconds (user + system, of the
finished kernel process) and whether it stays under the lessons' limit -- and writes it as CSV.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
from pathlib import Path

from labkit.notebooks import execute
from timing import write_csv

SOLUTIONS = Path(__file__).resolve().parents[2] / "solutions"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_notebook(path: Path, folder: Path) -> dict:
    copy = folder / path.name
    shutil.copy(path, copy)
    cpu = _children_cpu()
    wall = execute(copy)
    return {"notebook": path.name, "wall_s": round(wall, 1), "kernel_cpu_s": round(_children_cpu() - cpu, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every solutions/*.ipynb")
    parser.add_argument("--csv", default="notebook_times.csv")
    parser.add_argument("--limit-s", type=float, default=90, help="the lessons' time limit")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the kernels inherit it
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for path in args.notebooks or sorted(SOLUTIONS.glob("*.ipynb")):
            result = time_notebook(path, Path(folder))
            result["within_limit"] = result["wall_s"] <= args.limit_s
            rows.append(result)
            print(f"{result['notebook']}: {result['wall_s']} s", flush=True)
    print(f"\nOMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs")
    print(f"| notebook | wall s | kernel CPU s | <= {args.limit_s:g} s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['notebook']} | {r['wall_s']} | {r['kernel_cpu_s']} | {'yes' if r['within_limit'] else 'NO'} |")
    print(f"| total | {sum(r['wall_s'] for r in rows):.1f} | {sum(r['kernel_cpu_s'] for r in rows):.1f} | |")
    write_csv(rows, args.csv)
    print(f"written: {args.csv}")


if __name__ == "__main__":
    main()
