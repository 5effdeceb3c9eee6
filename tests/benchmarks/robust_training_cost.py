"""CPU cost of candidate adversarial-training recipes, to choose one by measurement.

    python tests/benchmarks/robust_training_cost.py [--batches 4] [--threads 1]

Times ``--batches`` minibatches of 128 Fashion-MNIST training images (after one warm-up) of
the training step of :func:`labkit.train.fit` for each candidate, in CPU seconds of this process
(``time.process_time``: meaningful on a shared machine, where wall time is not), and
extrapolates to one epoch (469 minibatches) and to the recipe's epochs on one thread.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from labkit.data import fashion_mnist
from labkit.models import FashionCNN
from labkit.train import RECIPES, PGDAdversary


def wide_cnn() -> nn.Module:
    """FashionCNN with every conv layer twice as wide (about 4x the multiply-adds)."""
    model = FashionCNN()
    widths = {"conv1": (1, 64), "conv2": (64, 64), "conv3": (64, 128), "conv4": (128, 192), "conv5": (192, 256)}
    for name, (c_in, c_out) in widths.items():
        setattr(model, name, nn.Conv2d(c_in, c_out, 3, padding=1))
    model.classifier = nn.Linear(256, 10)
    return model


CANDIDATES = {  # name -> (model, adversary, epochs of the recipe or the proposal)
    "fmnist-cnn-robust (shipped: FGSM-RS, L-inf 0.1)": (FashionCNN, RECIPES["fmnist-cnn-robust"]["adversary"], 12),
    "fmnist-cnn-robust-l2 (L2 PGD-2, eps 1.5)": (FashionCNN, RECIPES["fmnist-cnn-robust-l2"]["adversary"], 3),
    "PGD-7 L-inf 0.1 (Madry), FashionCNN": (FashionCNN, PGDAdversary(eps=0.1, step_size=0.025, steps=7), 30),
    "PGD-7 L-inf 0.1 (Madry), 2x wide CNN": (wide_cnn, PGDAdversary(eps=0.1, step_size=0.025, steps=7), 30),
}


def seconds_per_batch(build, adversary, x_all, y_all, batches: int) -> float:
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    times = []
    for i in range(batches + 1):
        x, y = x_all[i * 128:(i + 1) * 128], y_all[i * 128:(i + 1) * 128]
        start = time.process_time()
        model.train()
        loss = adversary.loss(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.eval()
            F.cross_entropy(model(x), y)  # fit's clean forward for the training accuracy
        times.append(time.process_time() - start)
    return sum(times[1:]) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_all, y_all = fashion_mnist("train").tensors(slice(0, 128 * (args.batches + 1)))
    print(f"CPU seconds per minibatch of 128 ({args.batches} timed), {args.threads} thread(s), torch {torch.__version__}")
    for name, (build, adversary, epochs) in CANDIDATES.items():
        s = seconds_per_batch(build, adversary, x_all, y_all, args.batches)
        print(f"  {name:52s} {s:6.2f} s/batch  {469 * s / 60:6.1f} min/epoch  "
              f"{epochs} epochs: {epochs * 469 * s / 3600:5.2f} h", flush=True)


if __name__ == "__main__":
    main()
