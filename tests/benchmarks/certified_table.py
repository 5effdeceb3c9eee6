"""Certified (IBP, a lower bound) against attacked (``labkit.attacks.evaluate``, an upper bound)
accuracy of the shipped models against L-inf eps: the true robust accuracy lies between them.

    python tests/benchmarks/certified_table.py [--limit 1000] [--steps 100] [--queries 5000]
                                               [--targets 9] [--models fmnist-mlp-ibp,fmnist-cnn-ibp]

Prints a Markdown table over the first ``--limit`` test images (default all 10,000). Certified
accuracy is :func:`labkit.certify.certified_accuracy` (margin bounds); attacked accuracy is the
per-image worst case over APGD-CE, APGD-T (``--targets`` classes) and Square (``--queries``).
"""
from __future__ import annotations

import argparse
import time

import labkit
from labkit import attacks, certify
from labkit.data import fashion_mnist
from labkit.models import load

EPS = (0.0, 0.02, 0.05, 0.1, 0.15)
MODELS = ("fmnist-mlp-ibp", "fmnist-cnn-ibp")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--targets", type=int, default=9)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    test = fashion_mnist("test").tensors(slice(0, args.limit))
    print(f"{len(test[1])} test images; evaluate: APGD-CE {args.steps} steps, APGD-T {args.targets} "
          f"targets, Square {args.queries} queries\n")
    print("| model | eps | certified (IBP) | attacked (evaluate) | seconds |\n|---|---|---|---|---|")
    for name in args.models.split(","):
        model = load(name, device=args.device)
        for eps in EPS:
            start = time.perf_counter()
            labkit.seed_everything(0)
            certified = certify.certified_accuracy(model, test, eps)
            attacked = attacks.evaluate(model, test, eps, steps=args.steps, queries=args.queries,
                                        n_targets=args.targets, progress=False).final
            print(f"| {name} | {eps:g} | {100 * certified:.2f} % | {100 * attacked:.2f} % | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
