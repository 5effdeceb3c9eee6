"""How the lessons' typical work scales with torch's thread count, on an idle and on a busy CPU.

    python tests/benchmarks/threads.py [--threads default 1 2] [--busy 0 1] [--repeats 3]

Each (threads, busy) setting runs in a fresh Python process, so torch starts with exactly that
many threads: ``default`` leaves torch's own choice (one per physical core) and clears
``OMP_NUM_THREADS``/``LABKIT_THREADS``; a number sets ``LABKIT_THREADS`` (which ``import labkit``
applies). ``--busy K`` starts K single-threaded busy loops for the duration of that setting, as
another student's kernel or job on a shared machine would. Each workload's time is the median
wall time of ``--repeats`` runs after one warm-up run. The results decide labkit's default
thread count in notebook kernels (``labkit._default_threads``).

Workloads, one per lesson kind: lesson 06's gradient ascent on class logits (FashionCNN, 5
images, 100 steps: many tiny passes), lesson 03's PGD-20 (FashionCNN, 256 images) and lesson
07's gradient on EfficientNet-Lite0 (4 photos, one big pass).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, statistics, sys, time
import torch
import labkit
from labkit import attacks, attribution, data, featvis, models
from labkit.featvis import ClassLogit

repeats = int(sys.argv[1])
cnn = models.load("fmnist-cnn")
effnet = models.load("imagenet-effnet-lite0")
x, y = data.fashion_mnist("test").tensors(range(256))
photos = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
work = {
    "06 class visualization (FashionCNN, 5 x 100 steps)": lambda: featvis.maximize(
        cnn, [ClassLogit(c) for c in range(5)], steps=100, generator=torch.Generator().manual_seed(1),
        progress=False),
    "03 PGD-20 (FashionCNN, 256 images)": lambda: attacks.pgd(cnn, x, y, eps=0.1, step_size=0.01, steps=20),
    "07 gradient (EfficientNet-Lite0, 4 photos)": lambda: attribution.gradient(effnet, photos, [0] * 4),
}
times = {}
for name, run in work.items():
    run()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    times[name] = statistics.median(samples)
print(json.dumps({"threads": torch.get_num_threads(), "times": times}))
"""

BUSY = "while True: pass"


def measure(threads: str, busy: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LABKIT_THREADS")}
    if threads != "default":
        env["LABKIT_THREADS"] = threads
    loops = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, "-c", WORKER, str(repeats)], env=env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", default=["default", "1", "2"])
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for busy in args.busy:
        for threads in args.threads:
            started = time.perf_counter()
            result = measure(threads, busy, args.repeats)
            rows.append((busy, threads, result))
            print(f"busy={busy} threads={threads} (torch: {result['threads']}): "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    names = list(rows[0][2]["times"])
    print(f"{os.cpu_count()} CPUs; median wall seconds of {args.repeats} runs")
    print("| busy loops | threads | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for busy, threads, result in rows:
        label = f"{threads} ({result['threads']})" if threads == "default" else threads
        print(f"| {busy} | {label} | " + " | ".join(f"{result['times'][n]:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
