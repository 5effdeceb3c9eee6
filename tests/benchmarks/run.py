"""Every speed benchmark in one table: labkit against its peers and against the floor.

    python tests/benchmarks/run.py [--device cpu|cuda] [--quick] [--threads 1] [--csv PATH]
                                   [--only attribution,lrp,attacks,metrics] [--repeats 3]

Runs bench_attribution (captum, pytorch-grad-cam), bench_lrp (zennit), bench_attacks
(torchattacks) and bench_metrics (pytorch-grad-cam's ROAD, captum.metrics, Quantus), each on
the same inputs for labkit and the peer, whose results are checked in the same run; prints one
Markdown table (work, labkit time, peer time, ratio, floor ratio, device) and writes it as CSV.
Timing: tests/benchmarks/timing.py. On a CPU use ``--threads 1``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attacks  # noqa: E402
import bench_attribution  # noqa: E402
import bench_lrp  # noqa: E402
import bench_metrics  # noqa: E402
from timing import COLUMNS, add_arguments, markdown, setup, write_csv  # noqa: E402

BENCHMARKS = {"attribution": bench_attribution.rows, "lrp": bench_lrp.rows, "attacks": bench_attacks.rows,
              "metrics": bench_metrics.rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--csv", default="benchmarks.csv", help="where the table goes as CSV")
    args = parser.parse_args(argv)
    device, clock = setup(args.threads, args.device, args.clock)
    start, rows = time.perf_counter(), []
    for name in args.only.split(","):
        rows += BENCHMARKS[name](device, quick=args.quick, repeats=args.repeats, clock=clock)
        write_csv(rows, args.csv, COLUMNS)  # after each benchmark, so a long run keeps what it measured
        print(f"{name} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} time, "
          f"{'quick' if args.quick else 'full'} sizes, medians after a warm-up, "
          f"{time.perf_counter() - start:.0f} s wall in all")
    print(markdown(rows))
    print(f"written: {args.csv}")


if __name__ == "__main__":
    main()
