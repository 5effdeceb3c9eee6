"""Speed of labkit's LRP against zennit's and against the floor, on the same inputs in one run.

    python tests/benchmarks/bench_lrp.py [--device cpu|cuda] [--quick] [--repeats 5] [--threads N]

Composite: epsilon-plus (z+ on convolutions, epsilon on dense layers, Pass on activations and
on the model's Normalize, Norm on average pooling and residual sums, BatchNorm merged), on
FashionCNN (B = 256, 28 x 28) and EfficientNet-Lite0 (B = 8, 224 x 224); ``--quick``: B = 64
and B = 2. The floor is one plain forward + backward to the input (the gradient of the target
logits). Medians over ``--repeats`` runs after one warm-up; the three contenders take turns in
every repeat, so a busy machine slows them alike. The last column checks that both agree:
max |labkit - zennit| / max |zennit| from the warm-up run. Not a test: pytest does not collect
bench_*.py files.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import types
from unittest import mock

import torch
from torch import nn

import labkit
from labkit.attribution.lrp import lrp
from labkit.models import FashionCNN, Normalize, load
from labkit.models.efficientnet_lite import Add
from labkit.models import WEIGHTS_DIR


def _have_torchvision() -> bool:
    return "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None


def import_zennit():
    """zennit imports torchvision (for its ResNet canonizers only); torchvision must not be
    installed here, so a stand-in with the two names zennit reads is used while it imports."""
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
    stand_ins = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.models": types.ModuleType("torchvision.models"),
                 "torchvision.models.resnet": resnet}
    with mock.patch.dict(sys.modules, {} if _have_torchvision() else stand_ins):
        names = ("attribution", "canonizers", "composites", "layer", "rules")
        return types.SimpleNamespace(**{n: importlib.import_module(f"zennit.{n}") for n in names})


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


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def measure(name, zennit, model, x, target, repeats, device):
    runs = contenders(zennit, model, x, target)
    warm = {who: timed(fn, device)[1] for who, fn in runs.items()}
    gap = ((warm["labkit"] - warm["zennit"]).abs().max() / warm["zennit"].abs().max()).item()
    times = {who: [] for who in runs}
    for _ in range(repeats):
        for who, fn in runs.items():
            times[who].append(timed(fn, device)[0])
    t = {who: statistics.median(ts) for who, ts in times.items()}
    print(f"{name:<30} {t['labkit']:>9.3f} {t['zennit']:>9.3f} {t['floor']:>9.3f} "
          f"{t['labkit'] / t['zennit']:>8.2f}x {t['labkit'] / t['floor']:>8.2f}x "
          f"{t['zennit'] / t['floor']:>8.2f}x {gap:>10.1e} {'ok' if gap < AGREE[x.dtype] else 'MISMATCH'}",
          flush=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: labkit.get_device()")
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per contender (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (on a busy machine, 1 keeps threads from waiting "
                             "on each other)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else labkit.get_device()
    repeats = args.repeats or (3 if args.quick else 5)
    zennit = import_zennit()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {repeats} after one warm-up; times in seconds")
    print(f"{'case (epsilon-plus)':<30} {'labkit':>9} {'zennit':>9} {'floor':>9} "
          f"{'lk/zen':>9} {'lk/floor':>9} {'zen/floor':>9} {'max diff':>10} agree")
    fashion_batch, effnet_batch = (64, 2) if args.quick else (256, 8)
    measure(f"fmnist-cnn B={fashion_batch}", zennit, *fashion_case(device, fashion_batch), repeats, device)
    effnet = effnet_case(device, effnet_batch)
    measure(f"effnet-lite0 B={effnet_batch} 224x224", zennit, *effnet, repeats, device)


if __name__ == "__main__":
    main()
