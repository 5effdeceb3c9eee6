"""Issue 19's targets for a robust model's perceptual alignment, measured in one run.

    python tests/benchmarks/robust_l2_targets.py [--model fmnist-cnn-robust-l2] [--standard fmnist-cnn]
                                                  [--limit 1000] [--device cpu|cuda]

On the first ``--limit`` test images (default 1,000):
1. targeted L2 PGD at eps = 4, 60 steps (step 2.5 * eps / 60, no random start) on ``--model``
   with target = (label + 1) mod 10: how often the robust model reaches the target, and how
   often ``--standard`` reads the result as the target (Tsipras et al. 2019, Fig. 4: large-eps
   images of a robust model show the target class);
2. the Spearman rank correlation of |gradient of the true-class logit| of ``--model`` with the
   Sobel edge map of the image, averaged over the images (Tsipras et al. 2019, Fig. 2);
3. every class visualized from noise by ``--model`` (featvis.class_transfer, 5 per class,
   100 steps, lr 0.02): how often ``--standard`` recognises the class (Santurkar et al. 2019).
Each line ends with the issue's target and whether the model meets it.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import labkit
from labkit import attacks, featvis
from labkit.attribution import gradient, spearman
from labkit.checks.lesson05 import edge_map
from labkit.data import fashion_mnist
from labkit.models import load

TARGETS = {"robust reaches target": 0.80, "standard reads target": 0.60, "edge rank correlation": 0.50,
           "standard recognises visualizations": 0.90}


def measure(name: str, standard_name: str, limit: int, batch_size: int, device) -> dict:
    robust, standard = load(name, device=device), load(standard_name, device=device)
    x_all, y_all = fashion_mnist("test").tensors(slice(0, limit))
    reached = read = 0
    correlations = []
    for start in range(0, len(y_all), batch_size):
        x, y = x_all[start:start + batch_size].to(device), y_all[start:start + batch_size].to(device)
        target = (y + 1) % 10
        morphed = attacks.pgd(robust, x, target, eps=4.0, steps=60, norm="l2", targeted=True)
        with torch.no_grad():
            reached += (robust(morphed).argmax(1) == target).sum().item()
            read += (standard(morphed).argmax(1) == target).sum().item()
        rho = spearman(gradient(robust, x, y).abs()[:, 0], edge_map(x))
        correlations += [r for r in rho.tolist() if not math.isnan(r)]
    transfer = featvis.class_transfer(robust, standard, per_class=5, steps=100, lr=0.02,
                                      generator=torch.Generator().manual_seed(0), progress=False)
    return {"robust reaches target": reached / len(y_all), "standard reads target": read / len(y_all),
            "edge rank correlation": sum(correlations) / len(correlations),
            "standard recognises visualizations": transfer.transfer_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-cnn-robust-l2")
    parser.add_argument("--standard", default="fmnist-cnn")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else labkit.get_device()
    labkit.seed_everything(0)
    start = time.perf_counter()
    results = measure(args.model, args.standard, args.limit, args.batch_size, device)
    print(f"{args.model} (judge: {args.standard}), {args.limit} test images, {device}, "
          f"{time.perf_counter() - start:.0f} s")
    for key, value in results.items():
        unit = "" if key == "edge rank correlation" else " %"
        shown = f"{value:.3f}" if not unit else f"{100 * value:.1f}"
        goal = f"{TARGETS[key]:.2f}" if not unit else f"{100 * TARGETS[key]:.0f}"
        print(f"  {key:36s} {shown:>7}{unit}   target >= {goal}{unit}   "
              f"{'met' if value >= TARGETS[key] else 'NOT met'}")


if __name__ == "__main__":
    main()
