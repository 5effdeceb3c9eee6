"""labkit.attacks against torchattacks and against the floor, measured in one run.

    python tests/benchmarks/bench_attacks.py [--device cpu|cuda] [--quick] [--batch 1024]
        [--deepfool-batch N] [--repeats 3] [--threads N] [--clock wall|process]

Each row times labkit and torchattacks on the same images (fmnist-cnn, the first ``--batch``
test images; a seeded random FashionCNN if its weights are missing), interleaved, one warm-up
round first, medians of ``--repeats`` rounds, CUDA synchronised; the two results are checked
equal (bit-identical for FGSM and PGD under a shared seed; for DeepFool, whose full runs differ by
design, the first steps are compared and the fooled rates printed). The floor is what any
implementation has to compute: the same number of batched forward + input-backward passes
(no parameter gradients). ``rows(...)`` returns the table for a combined benchmark report.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import labkit
from labkit import attacks
from labkit._core import preserved
from labkit.data import fashion_mnist
from labkit.models import REGISTRY, FashionCNN, load


def _model(device):
    if REGISTRY["fmnist-cnn"].weights().is_file():
        return load("fmnist-cnn", device=device), "fmnist-cnn"
    torch.manual_seed(0)
    return FashionCNN().to(device).eval(), "random FashionCNN (fmnist-cnn weights missing)"


def _floor(model, x, y, passes):
    """``passes`` batched forward + backward passes to the input, parameters frozen."""
    with preserved(model):
        for _ in range(passes):
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)


def _seeded(fn):
    def run():
        torch.manual_seed(0)
        return fn()
    return run


@dataclass
class Case:
    work: str
    batch: int
    labkit: Callable
    torchattacks: Callable
    floor: Callable | None
    check: Callable  # (labkit's output, torchattacks' output) -> a few words for the table


def _equal(ours, theirs):
    if torch.equal(ours, theirs):
        return "identical"
    return f"DIFFER (max {(ours - theirs).abs().max().item():.1e})"


def _deepfool_check(model, x, predicted, torchattacks):
    """The full runs differ by design (overshoot per step in torchattacks, on the sum in labkit):
    compare their first steps, and how many images each run fools."""
    def check(ours, theirs):
        first_ours = attacks.deepfool(model, x, steps=1)
        first_theirs = torchattacks.DeepFool(model, steps=1)(x, predicted)
        cosine = F.cosine_similarity((first_ours - x).flatten(1), (first_theirs - x).flatten(1)).min()
        with torch.no_grad():
            fooled = [(model(out).argmax(1) != predicted).float().mean().item() for out in (ours, theirs)]
        return (f"step 1: max diff {(first_ours - first_theirs).abs().max().item():.1e}, min cosine "
                f"{cosine.item():.5f}; fooled {100 * fooled[0]:.1f} % vs {100 * fooled[1]:.1f} %")
    return check


def _cases(model, x, y, torchattacks, deepfool_batch):
    xd = x[:deepfool_batch]
    with torch.no_grad():
        predicted = model(xd).argmax(1)
    pgd_l2 = torchattacks.PGDL2(model, eps=2.0, alpha=0.2, steps=20, eps_for_division=0)
    return [
        Case("PGD-20 L-inf (eps 0.1, random start)", len(x),
             _seeded(lambda: attacks.pgd(model, x, y, eps=0.1, step_size=0.01, steps=20, random_start=True)),
             _seeded(lambda: torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=20)(x, y)),
             lambda: _floor(model, x, y, 20), _equal),
        Case("PGD-20 L2 (eps 2.0, random start)", len(x),
             _seeded(lambda: attacks.pgd(model, x, y, eps=2.0, step_size=0.2, steps=20, norm="l2",
                                         random_start=True)),
             _seeded(lambda: pgd_l2(x, y)),
             lambda: _floor(model, x, y, 20), _equal),
        Case("FGSM (eps 0.1)", len(x),
             lambda: attacks.fgsm(model, x, y, eps=0.1),
             lambda: torchattacks.FGSM(model, eps=0.1)(x, y),
             lambda: _floor(model, x, y, 1), _equal),
        Case("DeepFool (50 steps, overshoot 0.02)", len(xd),
             lambda: attacks.deepfool(model, xd, steps=50, overshoot=0.02),
             lambda: torchattacks.DeepFool(model, steps=50, overshoot=0.02)(xd, predicted),
             None, _deepfool_check(model, xd, predicted, torchattacks)),
    ]


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _timed(fn, device, clock):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start, out


def _measure(case: Case, device, repeats: int, clock):
    """Median seconds per implementation (interleaved rounds, the first one a warm-up) and the
    last outputs."""
    times, outputs = {}, {}
    for round_ in range(1 + repeats):
        for name in ("labkit", "torchattacks", "floor"):
            fn = getattr(case, name)
            if fn is None:
                continue
            seconds, outputs[name] = _timed(fn, device, clock)
            if round_:
                times.setdefault(name, []).append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}, outputs


def rows(device=None, batch: int = 1024, repeats: int = 3, deepfool_batch: int | None = None,
         clock: str = "wall") -> list[dict]:
    """One dict per attack: labkit, torchattacks and floor seconds (medians), ratios, check.
    ``clock="process"`` counts this process's CPU time instead of wall time: steadier on a
    shared CPU (with one thread), meaningless on CUDA."""
    import torchattacks
    device = torch.device(device) if device else labkit.get_device()
    model, model_name = _model(device)
    x, y = (t.to(device) for t in fashion_mnist("test").tensors(slice(0, batch)))
    results = []
    for case in _cases(model, x, y, torchattacks, deepfool_batch or batch):
        seconds, outputs = _measure(case, device, repeats, CLOCKS[clock])
        floor = seconds.get("floor")
        results.append({
            "work": case.work, "model": model_name, "batch": case.batch, "device": str(device),
            "labkit_s": seconds["labkit"], "peer": "torchattacks", "peer_s": seconds["torchattacks"],
            "ratio": seconds["labkit"] / seconds["torchattacks"], "floor_s": floor,
            "floor_ratio": None if floor is None else seconds["labkit"] / floor,
            "check": case.check(outputs["labkit"], outputs["torchattacks"]),
        })
    return results


def _table(results) -> str:
    lines = ["| work | batch | labkit s | torchattacks s | labkit / torchattacks | floor s | labkit / floor | results |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        floor = "—" if r["floor_s"] is None else f"{r['floor_s']:.3f}"
        floor_ratio = "—" if r["floor_ratio"] is None else f"{r['floor_ratio']:.2f}x"
        lines.append(f"| {r['work']} | {r['batch']} | {r['labkit_s']:.3f} | {r['peer_s']:.3f} | "
                     f"{r['ratio']:.2f}x | {floor} | {floor_ratio} | {r['check']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="torch device (default: labkit.get_device())")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--deepfool-batch", type=int, help="images for DeepFool (default: --batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a busy CPU)")
    parser.add_argument("--quick", action="store_true", help="batch 128, DeepFool on 64, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.deepfool_batch, args.repeats = 128, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = rows(args.device, args.batch, args.repeats, args.deepfool_batch, args.clock)
    print(f"model {results[0]['model']} on {results[0]['device']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.clock} clock, medians of {args.repeats} "
          f"rounds after a warm-up")
    print(_table(results))


if __name__ == "__main__":
    main()
