"""PGD next to the AutoAttack-style evaluation (labkit.attacks.evaluate) of a shipped model.

    python tests/benchmarks/autoattack_table.py [--model fmnist-cnn-robust] [--norm linf --eps 0.1]
        [--limit 1000] [--steps 100] [--targets 9] [--queries 5000] [--device cpu|cuda]

Prints, on the first ``--limit`` test images: clean accuracy, PGD-20 (step 2.5 * eps / 20, one
random start, early stop: as in README's Models table), then the accuracy left after APGD-CE, + APGD-T
(``--targets`` target classes), + Square (``--queries``), the final worst case per image and
any sanity flag. The defaults are AutoAttack's standard budget; the figures say which budget
they were measured with.
"""
from __future__ import annotations

import argparse
import time

import torch

import labkit
from labkit import attacks
from labkit.data import fashion_mnist
from labkit.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-cnn-robust")
    parser.add_argument("--norm", default="linf")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--targets", type=int, default=9)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else labkit.get_device()
    model, test = load(args.model, device=device), fashion_mnist("test")
    labkit.seed_everything(0)
    start = time.perf_counter()
    pgd = attacks.accuracy(model, test, attacks.pgd, limit=args.limit, eps=args.eps, norm=args.norm,
                           steps=20, random_start=True, early_stop=True, progress=False)
    pgd_seconds = time.perf_counter() - start
    result = attacks.evaluate(model, test, eps=args.eps, norm=args.norm, steps=args.steps,
                              n_targets=args.targets, queries=args.queries, limit=args.limit, progress=False)
    seconds = time.perf_counter() - start - pgd_seconds
    print(f"{args.model}, {args.norm} eps = {args.eps:g}, first {args.limit} test images, {device}")
    print(f"| attack | accuracy |\n|---|---|\n| none (clean) | {100 * result.clean:.2f} % |")
    print(f"| PGD-20, one random start ({pgd_seconds:.0f} s) | {100 * pgd:.2f} % |")
    labels = {"apgd-ce": f"APGD-CE ({args.steps} steps)",
              "apgd-t": f"+ APGD-T ({args.targets} targets x {args.steps} steps)",
              "square": f"+ Square ({args.queries} queries)"}
    for name, accuracy in result.after.items():
        print(f"| {labels[name]} | {100 * accuracy:.2f} % |")
    print(f"| evaluate: worst case per image ({seconds:.0f} s) | {100 * result.final:.2f} % |")
    for flag in result.flags:
        print(f"FLAG: {flag}")


if __name__ == "__main__":
    main()
