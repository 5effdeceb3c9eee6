"""labkit.attacks against torchattacks and against the floor, measured in one run.

    python tests/benchmarks/bench_attacks.py [--device cpu|cuda] [--quick] [--batch 1024]
        [--deepfool-batch N] [--repeats 3] [--threads N] [--clock user|process|wall]

Each row times labkit and torchattacks on the same images (fmnist-cnn, the first ``--batch``
test images; a seeded random FashionCNN if its weights are missing), timed as in
tests/benchmarks/timing.py (medians of interleaved rounds after a warm-up); the two results are checked
equal (bit-identical for FGSM and PGD under a shared seed; for DeepFool, whose full runs differ by
design, the first steps are compared and the fooled rates printed). The floor is what any
implementation has to compute: the same number of batched forward + input-backward passes
(no parameter gradients). ``rows(...)`` returns the table for a combined benchmark report.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from labkit import attacks
from labkit.data import fashion_mnist
from labkit.models import REGISTRY, FashionCNN, load
from timing import add_arguments, evaluations, frozen, markdown, measure, row, setup


def _model(device):
    if REGISTRY["fmnist-cnn"].weights().is_file():
        return load("fmnist-cnn", device=device), "fmnist-cnn"
    torch.manual_seed(0)
    return FashionCNN().to(device).eval(), "random FashionCNN (fmnist-cnn weights missing)"


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
    floor_model = frozen(copy.deepcopy(model))
    floor = lambda passes: evaluations(floor_model, x, y, len(x), backward=True, passes=passes)
    xd = x[:deepfool_batch]
    with torch.no_grad():
        predicted = model(xd).argmax(1)
    pgd_l2 = torchattacks.PGDL2(model, eps=2.0, alpha=0.2, steps=20, eps_for_division=0)
    return [
        Case("PGD-20 L-inf (eps 0.1, random start)", len(x),
             _seeded(lambda: attacks.pgd(model, x, y, eps=0.1, step_size=0.01, steps=20, random_start=True)),
             _seeded(lambda: torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=20)(x, y)),
             lambda: floor(20), _equal),
        Case("PGD-20 L2 (eps 2.0, random start)", len(x),
             _seeded(lambda: attacks.pgd(model, x, y, eps=2.0, step_size=0.2, steps=20, norm="l2",
                                         random_start=True)),
             _seeded(lambda: pgd_l2(x, y)),
             lambda: floor(20), _equal),
        Case("FGSM (eps 0.1)", len(x),
             lambda: attacks.fgsm(model, x, y, eps=0.1),
             lambda: torchattacks.FGSM(model, eps=0.1)(x, y),
             lambda: floor(1), _equal),
        Case("DeepFool (50 steps, overshoot 0.02)", len(xd),
             lambda: attacks.deepfool(model, xd, steps=50, overshoot=0.02),
             lambda: torchattacks.DeepFool(model, steps=50, overshoot=0.02)(xd, predicted),
             None, _deepfool_check(model, xd, predicted, torchattacks)),
    ]


def rows(device: torch.device, quick: bool = False, repeats: int = 3, clock: str = "user",
         batch: int | None = None, deepfool_batch: int | None = None) -> list[dict]:
    """One row (tests/benchmarks/timing.py) per attack; ``quick``: 128 images, DeepFool on 64."""
    import torchattacks
    batch = batch or (128 if quick else 1024)
    deepfool_batch = deepfool_batch or (64 if quick else batch)
    model, model_name = _model(device)
    x, y = (t.to(device) for t in fashion_mnist("test").tensors(slice(0, batch)))
    results = []
    for case in _cases(model, x, y, torchattacks, deepfool_batch):
        contenders = {"labkit": case.labkit, "torchattacks": case.torchattacks}
        if case.floor is not None:
            contenders["floor"] = case.floor
        seconds, outputs, runs = measure(contenders, device, repeats, clock)
        results.append(row(case.work, model_name, case.batch, device, seconds, "torchattacks",
                           case.check(outputs["labkit"], outputs["torchattacks"]), runs))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--batch", type=int, help="test images (default 1024, quick 128)")
    parser.add_argument("--deepfool-batch", type=int, help="images for DeepFool (default: --batch)")
    args = parser.parse_args(argv)
    device, clock = setup(args.threads, args.device, args.clock)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} time")
    print(markdown(rows(device, args.quick, args.repeats, clock, args.batch, args.deepfool_batch)))


if __name__ == "__main__":
    main()
