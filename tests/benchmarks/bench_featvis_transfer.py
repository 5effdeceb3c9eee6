"""Do class visualizations transfer between the standard and the robust Fashion-MNIST model?

For each direction, every class is visualized from noise (``per_class`` seeds each) with
:func:`labkit.featvis.class_transfer`; printed: how often the visualizing model itself sees the
class (and its lowest confidence), and how often the other model does (chance: 10 %).

    python tests/benchmarks/bench_featvis_transfer.py [--steps 100 --lr 0.02 --per-class 5 --yosinski]
"""
import argparse

import torch

from labkit import featvis
from labkit.data import FASHION_CLASSES
from labkit.models import load


def measure(steps: int, lr: float, per_class: int, regularization, seed: int) -> None:
    models = {"fmnist-cnn-robust": load("fmnist-cnn-robust"), "fmnist-cnn": load("fmnist-cnn")}
    names = list(models)
    for source, judge in (names, names[::-1]):
        result = featvis.class_transfer(models[source], models[judge], per_class=per_class, steps=steps,
                                        lr=lr, regularization=regularization,
                                        generator=torch.Generator().manual_seed(seed), progress=False)
        per_class_hits = (result.predicted == result.targets).view(per_class, -1).float().mean(dim=0)
        per_class_self = (result.confidence > 0.5).view(per_class, -1).float().mean(dim=0)
        print(f"{source} visualizes, {judge} judges ({steps} steps, lr {lr}, {per_class} per class, "
              f"regularization {regularization}):")
        print(f"  self rate {result.self_rate:.0%} (confidence: mean {result.confidence.mean():.3f}, "
              f"lowest {result.confidence.min():.3f}), transfer rate {result.transfer_rate:.0%} (chance 10%)")
        print("  self confidence > 0.5 per class: " + ", ".join(
            f"{name} {hit:.0%}" for name, hit in zip(FASHION_CLASSES, per_class_self)))
        print("  transfer per class: " + ", ".join(f"{name} {hit:.0%}" for name, hit
                                                   in zip(FASHION_CLASSES, per_class_hits)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--yosinski", action="store_true", help="use featvis.YOSINSKI priors")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    measure(args.steps, args.lr, args.per_class, featvis.YOSINSKI if args.yosinski else None, args.seed)


if __name__ == "__main__":
    main()
