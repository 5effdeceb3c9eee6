"""Accuracy of the shipped Fashion-MNIST models under FGSM and PGD-20 (L-inf) against eps.

    python tests/benchmarks/robustness_table.py [--device cpu|cuda] [--limit N] [--batch-size 500]
                                                [--models fmnist-cnn,fmnist-cnn-robust]

Prints a Markdown table: the 10,000 test images (or the first ``--limit``), eps in
{0, 0.01, 0.03, 0.05, 0.1, 0.2}; PGD-20 with a random start, step 2.5 * eps / 20 (Madry et al.)
and early stop (an image counts as broken as soon as one iterate fools the model), seeded.
"""
from __future__ import annotations

import argparse
import time

import torch

import labkit
from labkit.attacks import robustness_curve
from labkit.data import fashion_mnist
from labkit.models import load

EPS = (0, 0.01, 0.03, 0.05, 0.1, 0.2)
MODELS = ("fmnist-cnn", "fmnist-cnn-robust")
ATTACKS = {"FGSM": dict(attack="fgsm"),
           "PGD-20": dict(attack="pgd", steps=20, random_start=True, early_stop=True)}


def measure(device=None, limit=None, batch_size=500, progress=True, models=MODELS) -> dict:
    """``{(model, attack): {eps: accuracy}}``."""
    device = torch.device(device) if device else labkit.get_device()
    test = fashion_mnist("test")
    curves = {}
    for name in models:
        model = load(name, device=device)
        for attack, options in ATTACKS.items():
            labkit.seed_everything(0)
            curves[name, attack] = robustness_curve(model, test, eps_list=EPS, limit=limit,
                                                    batch_size=batch_size, progress=progress, **options)
    return curves


def table(curves) -> str:
    columns = list(curves)
    lines = ["| eps | " + " | ".join(f"{model} {attack}" for model, attack in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for eps in EPS:
        lines.append(f"| {eps} | " + " | ".join(f"{100 * curves[c][eps]:.2f} %" for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="torch device (default: labkit.get_device())")
    parser.add_argument("--limit", type=int, help="only the first N test images")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated (one per process runs them in parallel)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    curves = measure(args.device, args.limit, args.batch_size, models=args.models.split(","))
    images = args.limit or len(fashion_mnist("test"))
    print(f"accuracy on {images} Fashion-MNIST test images ({time.perf_counter() - start:.0f} s)")
    print(table(curves))


if __name__ == "__main__":
    main()
