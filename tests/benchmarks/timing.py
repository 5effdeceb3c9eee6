"""What every benchmark shares: the clock, timed runs, the floor, and the row of the table.

On a CPU the clock is user CPU time: what the computation costs, whatever else shares the
machine (run with one thread, as idle OpenMP threads spin), and without the kernel's page-fault
time, which depends on what ran just before (glibc hands big freed blocks back to the system,
so a run after a bigger one faults less: 0.17 s of 0.54 s for 8 EfficientNet-Lite0 forward +
backward passes, none after a guided Grad-CAM). On CUDA: wall time, synchronised before and
after the timed call.
"""
from __future__ import annotations

import csv

import math
import resource
import statistics
import time
from typing import Callable

import torch
from torch import nn

CLOCKS = {"user": lambda: resource.getrusage(resource.RUSAGE_SELF).ru_utime,
          "process": time.process_time, "wall": time.perf_counter}


def default_clock(device: torch.device) -> str:
    return "user" if device.type == "cpu" else "wall"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device, clock: str):
    """``(seconds, fn())``, the accelerator's queue drained before and after."""
    synchronize(device)
    start = CLOCKS[clock]()
    result = fn()
    synchronize(device)
    return CLOCKS[clock]() - start, result


def measure(contenders: dict[str, Callable], device: torch.device, repeats: int, clock: str,
            budget_s: float = 3.0):
    """Median seconds per contender and the outputs of their warm-up run (the ones to check).

    One warm-up run each, then interleaved rounds, so background load hits every contender
    alike; the first contender's warm-up time sets the rounds: at least ``repeats``, more (up to
    30) while they fit in ``budget_s`` of its time, as short runs are noisy on a shared machine.
    """
    warm_up = {name: timed(fn, device, clock) for name, fn in contenders.items()}
    first = next(iter(warm_up.values()))[0]
    rounds = max(repeats, min(30, math.ceil(budget_s / max(first, 1e-3))))
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device, clock)[0])
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians, {name: output for name, (_, output) in warm_up.items()}, rounds


def frozen(model: nn.Module) -> nn.Module:
    """The model with its parameters out of autograd: the floor, like labkit, computes input
    gradients only."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def evaluations(model: nn.Module, rows: torch.Tensor, target: torch.Tensor, per_forward: int,
                backward: bool, passes: int = 1) -> None:
    """The floor: ``passes`` times plain batched forward (+ backward to the input) passes over
    ``rows``, ``per_forward`` rows at a time, of a ``frozen`` model."""
    for _ in range(passes):
        for start in range(0, len(rows), per_forward):
            inputs, chosen = rows[start:start + per_forward], target[start:start + per_forward]
            if backward:
                inputs = inputs.detach().requires_grad_(True)
                torch.autograd.grad(model(inputs).gather(1, chosen[:, None]).sum(), inputs)
            else:
                with torch.no_grad():
                    model(inputs)


def relative_gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|."""
    theirs = theirs.detach().to(ours.device)
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


def row(work: str, model: str, batch: int, device, seconds: dict, peer: str, check: str, runs: int,
        floor: str = "floor") -> dict:
    """A line of the combined table (tests/benchmarks/run.py); ``seconds`` holds the medians of
    "labkit", ``peer`` and (if measured) ``floor``."""
    floor_s = seconds.get(floor)
    return {"work": work, "model": model, "batch": batch, "device": str(device),
            "labkit_s": seconds["labkit"], "peer": peer, "peer_s": seconds[peer],
            "ratio": seconds["labkit"] / seconds[peer], "floor_s": floor_s,
            "floor_ratio": None if floor_s is None else seconds["labkit"] / floor_s,
            "check": check, "runs": runs}


def agreement(gap: float, tolerance: float) -> str:
    return f"{'ok' if gap <= tolerance else 'DIFFER'} {gap:.1e}"


COLUMNS = ("work", "model", "batch", "device", "labkit_s", "peer", "peer_s", "ratio", "floor_s",
           "floor_ratio", "check", "runs")


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    def cell(value):
        if value is None:
            return "—"
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    header = ["work", "model", "batch", "device", "labkit s", "peer", "peer s", "labkit / peer",
              "floor s", "labkit / floor", "results (max rel. diff)", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def setup(threads: int | None, device: str | None, clock: str | None):
    """Torch threads, then ``(device, clock)`` from the command line's choices."""
    import labkit
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device) if device else labkit.get_device()
    return device, clock or default_clock(device)


def add_arguments(parser, repeats: int = 3) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: labkit.get_device())")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a quick look")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds at least")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 on a shared machine: idle OpenMP threads spin)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default=None,
                        help="default: user CPU time on a CPU, synchronised wall time on CUDA")


def write_csv(rows: list[dict], path, columns=None) -> None:
    """The rows as a CSV file with a header (``columns``: default the first row's keys)."""
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(columns or rows[0]))
        writer.writeheader()
        writer.writerows(rows)
