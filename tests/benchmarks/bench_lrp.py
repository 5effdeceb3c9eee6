"""Speed of labkit's LRP against zennit's and against the floor, on the same inputs in one run.

    python tests/benchmarks/bench_lrp.py [--device cpu|cuda] [--quick] [--repeats 5] [--threads N]
                                         [--clock user|process|wall]

Composite: epsilon-plus (z+ on convolutions, epsilon on dense layers, Pass on activations and
on the model's Normalize, Norm on average pooling and residual sums, BatchNorm merged), on
FashionCNN (B = 256, 28 x 28) and EfficientNet-Lite0 (B = 8, 224 x 224); ``--quick``: B = 64
and B = 2. The floor is one plain forward + backward to the input (the gradient of the target
logits). Timing as in tests/benchmarks/timing.py (medians of interleaved rounds after a warm-up).
The check: max |labkit - zennit| / max |zennit| from the warm-up run. ``rows(...)`` returns the
table for tests/benchmarks/run.py. Not a test: pytest does not collect bench_*.py files.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

import labkit
from labkit.attribution.lrp import lrp
from labkit.models import FashionCNN, Normalize, load
from labkit.models.efficientnet_lite import Add
from labkit.models import WEIGHTS_DIR
from timing import add_arguments, agreement, markdown, measure, relative_gap, row, setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the zennit stand-in
from zennit_stand_in import import_zennit  # noqa: E402


def zennit_epsilon_plus(zennit):
    """zennit's EpsilonPlus with labkit's conventions: Pass on Normalize, BatchNorm merged, and
    labkit's residual Add computed as zennit's Sum over the stacked summands (Norm rule)."""
    def add_as_sum(self, a, b):
        return self.canonizer_sum(torch.stack([a, b], dim=-1))

    def attributes(name, module):
        return {"forward": add_as_sum.__get__(module), "canonizer_sum": zennit.layer.Sum()} \
            if isinstance(module, Add) else None

    canonizers = [zennit.canonizers.SequentialMergeBatchNorm(),
                  zennit.canonizers.AttributeCanonizer(attributes)]
    return zennit.composites.EpsilonPlus(layer_map=[(Normalize, zennit.rules.Pass())], canonizers=canonizers)


def zennit_ready(model):
    """zennit 0.5.1 leaves a merged BatchNorm computing x / sqrt(1 + eps): move eps into
    running_var (the same function) so its result is exact."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var += m.eps - 1e-12
            m.eps = 1e-12
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return model


# max |labkit - zennit| / max |zennit| that rounding explains: in float32 the two forward passes
# differ in the last bits (zennit runs the merged convolutions), and residual sums that nearly
# cancel (R_a = a R / (a + b)) magnify that
AGREE = {torch.float32: 1e-3, torch.float64: 1e-9}


def start_relevance(logits, target):
    return torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None])).detach()


def contenders(zennit, model, x, target):
    ready, composite = zennit_ready(model), zennit_epsilon_plus(zennit)

    def run_labkit():
        return lrp(model, x, target, composite="epsilon_plus")

    def run_zennit():
        with zennit.attribution.Gradient(ready, composite) as attributor:
            return attributor(x, lambda logits: start_relevance(logits, target))[1]

    def run_floor():
        inputs = x.detach().requires_grad_(True)
        return torch.autograd.grad(ready(inputs).gather(1, target[:, None]).sum(), inputs)[0]

    return {"labkit": run_labkit, "zennit": run_zennit, "floor": run_floor}


def measured(name, zennit, model, x, target, repeats, device, clock) -> dict:
    seconds, outputs, runs = measure(contenders(zennit, model, x, target), device, repeats, clock)
    gap = relative_gap(outputs["labkit"], outputs["zennit"])
    return row("LRP epsilon-plus", name, len(x), device, seconds, "zennit", agreement(gap, AGREE[x.dtype]), runs)


def fashion_case(device, batch):
    if (WEIGHTS_DIR / "fmnist-cnn.pt").is_file():
        model = load("fmnist-cnn", device=device)
    else:  # the shipped weights are not built yet: same speed with random ones
        torch.manual_seed(0)
        model = FashionCNN().to(device).eval()
    x, labels = labkit.data.fashion_mnist("test").tensors(list(range(batch)))
    return model, x.to(device), labels.to(device)


def effnet_case(device, batch):
    model = load("imagenet-effnet-lite0", device=device)
    photos = labkit.data.sample_photos(224)[0]
    both = torch.cat([photos, photos.flip(-1)])
    x = both.repeat(batch // len(both) + 1, 1, 1, 1)[:batch].to(device)
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def rows(device: torch.device, quick: bool = False, repeats: int = 5, clock: str = "user") -> list[dict]:
    """The two cases as rows of tests/benchmarks/timing.py."""
    zennit = import_zennit()
    fashion_batch, effnet_batch = (64, 2) if quick else (256, 8)
    return [measured("fmnist-cnn", zennit, *fashion_case(device, fashion_batch), repeats, device, clock),
            measured("effnet-lite0", zennit, *effnet_case(device, effnet_batch), repeats, device, clock)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, repeats=5)
    args = parser.parse_args()
    device, clock = setup(args.threads, args.device, args.clock)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} time")
    print(markdown(rows(device, args.quick, args.repeats, clock)))


if __name__ == "__main__":
    main()
