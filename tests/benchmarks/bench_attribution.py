"""Speed of labkit.attribution against its peers (captum, pytorch-grad-cam) and against the floor.

    python tests/benchmarks/bench_attribution.py [--device cpu|cuda] [--quick] [--repeats 3]
                                                 [--threads N] [--clock user|process|wall] [--only WORD,...]

One run, the same inputs for every contender; timing as in tests/benchmarks/timing.py
(medians of interleaved rounds after a warm-up, user CPU time on a CPU, synchronised wall time
on CUDA). Per method: labkit / peer and labkit / floor, where the floor is the
bare model work the method needs: the same number of model evaluations as plain batched forward
(+ backward to the input) passes of labkit's default rows per forward for the device. labkit runs
with its defaults; the peer gets the closest batching it offers (captum's NoiseTunnel and
IntegratedGradients cannot go below one row per image per pass). The check: max |labkit - peer| /
max |peer| of the warm-up run (in which captum's NoiseTunnel gets labkit's noise), ok up to 1e-3.

Full sizes: EfficientNet-Lite0, B = 8, 224 x 224, SmoothGrad N = 50, IG 50 steps, occlusion
32 x 32 windows by 16 (B = 2); FashionCNN B = 64. ``--quick``: B = 2, 128 x 128, N = 10, 10 steps;
FashionCNN B = 16. ``rows(...)`` returns the table for tests/benchmarks/run.py. Not a test:
pytest does not collect bench_*.py files.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from captum import attr as captum_attr
from captum._utils.common import _register_backward_hook
from torch import nn

import labkit
from labkit import attribution as A
from labkit.attribution._common import per_forward as labkit_per_forward
from labkit.models import FashionCNN, load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the stand-ins
import grad_cam_stand_ins  # noqa: E402
from timing import add_arguments, agreement, evaluations, frozen, markdown, measure, relative_gap, row, setup  # noqa: E402

TOLERANCE = 1e-3  # max |labkit - peer| / max |peer|: float32 rounding, summed over many passes

# Where each registered method (labkit.attribution.METHODS) is timed: the start of its case
# names here, or another benchmark, or why not. rows() refuses to run while one is missing.
TIMED_AS = {
    "gradient": "gradient",
    "gradient_x_input": "not timed: the gradient's cost and one product",
    "smoothgrad": "SmoothGrad",
    "integrated_gradients": "IG",
    "occlusion": "occlusion",
    "guided_backprop": "guided backprop",
    "gradcam": "Grad-CAM",
    "guided_gradcam": "guided Grad-CAM",
    "lrp": "bench_lrp.py",
}


def check_coverage() -> None:
    missing = sorted(set(A.METHODS) - set(TIMED_AS))
    if missing:
        raise SystemExit(f"no benchmark for the registered methods {missing}: add a case and its "
                         f"entry in TIMED_AS (bench_attribution.py)")


class GuidedBackpropReLU6(captum_attr.GuidedBackprop):
    """captum guides nn.ReLU modules only; labkit also guides nn.ReLU6, EfficientNet-Lite's
    activation: the peer gets captum's own hook on those too, so both do the same work."""

    def _register_hooks(self, module):
        if isinstance(module, nn.ReLU6):
            self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))
        super()._register_hooks(module)


@dataclass
class Case:
    name: str
    model_name: str
    batch: int
    labkit: Callable
    peers: dict[str, Callable]
    floor: Callable
    # peer name -> how to bring labkit's result to the peer's convention for the check
    to_peer: dict[str, Callable] = field(default_factory=dict)


def shared_noise(noise: torch.Tensor, batch: int, n_samples: int):
    """A stand-in for torch.normal inside captum's NoiseTunnel that hands out labkit's noise
    (row b * n + k for sample k of image b) partition by partition, in captum's layout."""
    by_image = noise.view(batch, n_samples, *noise.shape[1:])
    used = [0]

    def normal(mean, std):
        k = std.shape[0] // batch
        part = by_image[:, used[0]:used[0] + k].reshape(batch * k, *noise.shape[1:])
        used[0] += k
        return part
    return normal


def effnet_cases(model, x, y, sizes) -> list[Case]:
    batch, n, steps = len(x), sizes["samples"], sizes["steps"]
    per_forward = labkit_per_forward(x, None)  # labkit's default for this device and image size
    sigma, seed = 0.15, 0
    floor_model = frozen(load("imagenet-effnet-lite0", device=x.device))
    noise = torch.randn((batch * n, *x.shape[1:]), generator=torch.Generator(x.device).manual_seed(seed),
                        device=x.device)
    spread = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    noisy = x.repeat_interleave(n, 0) + noise * spread.repeat_interleave(n)[:, None, None, None]
    alphas, _ = A.path_points(steps)
    path = torch.cat([alpha.item() * x for alpha in alphas])
    checked = []  # the first (warm-up, checked) run of captum's NoiseTunnel gets labkit's noise

    def noise_tunnel():
        tunnel = captum_attr.NoiseTunnel(captum_attr.Saliency(model))
        run = lambda: tunnel.attribute(x, nt_type="smoothgrad", nt_samples=n, stdevs=float(spread.mean()),
                                       nt_samples_batch_size=max(1, per_forward // batch), target=y,
                                       abs=False)
        if checked:
            return run()
        checked.append(True)
        original, torch.normal = torch.normal, shared_noise(noisy - x.repeat_interleave(n, 0), batch, n)
        try:
            return run()
        finally:
            torch.normal = original

    window, stride = sizes["window"], sizes["stride"]
    occlusion_x, occlusion_y = x[:2], y[:2]
    n_windows = ((x.shape[-1] - window + stride - 1) // stride + 1) ** 2
    occluded = occlusion_x.repeat_interleave(n_windows, 0)
    layer = "head.conv"
    return [
        Case("gradient", "effnet-lite0", batch, lambda: A.gradient(model, x, y),
             {"captum Saliency": lambda: captum_attr.Saliency(model).attribute(x, target=y, abs=False)},
             lambda: evaluations(floor_model, x, y, batch, backward=True)),
        Case(f"SmoothGrad N={n}", "effnet-lite0", batch,
             lambda: A.smoothgrad(model, x, y, n_samples=n, sigma=sigma,
                                  generator=torch.Generator(x.device).manual_seed(seed), progress=False),
             {"captum NoiseTunnel": noise_tunnel},
             lambda: evaluations(floor_model, noisy, y.repeat_interleave(n), per_forward, backward=True)),
        Case(f"IG {steps} steps", "effnet-lite0", batch,
             lambda: A.integrated_gradients(model, x, y, steps=steps, progress=False),
             {"captum IntegratedGradients": lambda: captum_attr.IntegratedGradients(model).attribute(
                 x, target=y, n_steps=steps, internal_batch_size=max(per_forward, batch))},
             lambda: evaluations(floor_model, path, y.repeat(steps), per_forward, backward=True)),
        Case(f"occlusion {window}/{stride}", "effnet-lite0", 2,
             lambda: A.occlusion(model, occlusion_x, occlusion_y, window=window, stride=stride,
                                 progress=False),
             {"captum Occlusion": lambda: captum_attr.Occlusion(model).attribute(
                 occlusion_x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                 target=occlusion_y, perturbations_per_eval=max(1, per_forward // 2))},
             lambda: evaluations(floor_model, torch.cat([occlusion_x, occluded]),
                                 torch.cat([occlusion_y, occlusion_y.repeat_interleave(n_windows)]),
                                 per_forward, backward=False)),
        *cam_cases(model, floor_model, x, y, layer, "effnet-lite0"),
    ]


def cam_cases(model, floor_model, x, y, layer, model_name) -> list[Case]:
    module = model.get_submodule(layer)
    floor = lambda: evaluations(floor_model, x, y, len(x), backward=True)

    def layer_gradcam():
        cam = captum_attr.LayerGradCam(model, module).attribute(x, target=y, relu_attributions=True)
        return captum_attr.LayerAttribution.interpolate(cam, x.shape[-2:], interpolate_mode="bilinear")

    def guided_gradcam():
        peer = captum_attr.GuidedGradCam(model, module)
        peer.guided_backprop = GuidedBackpropReLU6(model)
        return peer.attribute(x, target=y, interpolate_mode="bilinear")

    gradcam_peers = {"captum LayerGradCam": layer_gradcam}
    to_peer = {}
    try:
        with grad_cam_stand_ins.pytorch_grad_cam() as (GradCAM, ClassifierOutputTarget):
            peer_model = copy.deepcopy(model)  # pytorch-grad-cam accumulates .grad in its parameters
            cam = GradCAM(peer_model, [peer_model.get_submodule(layer)])
            targets = [ClassifierOutputTarget(int(t)) for t in y]
            gradcam_peers["pytorch-grad-cam GradCAM (stand-ins)"] = \
                lambda: torch.from_numpy(cam(x, targets=targets)).to(x.device)[:, None]
            to_peer["pytorch-grad-cam GradCAM (stand-ins)"] = minmax
    except ImportError as err:
        print(f"pytorch-grad-cam skipped: {err}")
    return [
        Case("Grad-CAM", model_name, len(x), lambda: A.gradcam(model, x, y, layer=layer), gradcam_peers, floor,
             to_peer),
        Case("guided backprop", model_name, len(x), lambda: A.guided_backprop(model, x, y),
             {"captum GuidedBackprop": lambda: GuidedBackpropReLU6(model).attribute(x, target=y)}, floor),
        Case("guided Grad-CAM", model_name, len(x), lambda: A.guided_gradcam(model, x, y, layer=layer),
             {"captum GuidedGradCam": guided_gradcam}, floor),
    ]


def minmax(cam: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam scales each map to [0, 1] (an all-zero map stays 0)."""
    low, high = cam.amin(dim=(1, 2, 3), keepdim=True), cam.amax(dim=(1, 2, 3), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-12)


def fashion_cases(device, sizes) -> list[Case]:
    weights = labkit.models.WEIGHTS_DIR / "fmnist-cnn.pt"
    if weights.is_file():
        model, floor_model = load("fmnist-cnn", device=device), frozen(load("fmnist-cnn", device=device))
    else:
        torch.manual_seed(0)
        model = FashionCNN().to(device).eval()
        floor_model = frozen(FashionCNN().to(device).eval())
    x, y = labkit.data.fashion_mnist("test").tensors(list(range(sizes["fashion_batch"])))
    x, y = x.to(device), y.to(device)
    window, stride, per_forward = 4, 2, labkit_per_forward(x, None)
    n_windows = ((28 - window + stride - 1) // stride + 1) ** 2
    occluded = x.repeat_interleave(n_windows, 0)
    return [
        Case(f"occlusion {window}/{stride}", "fmnist-cnn", len(x),
             lambda: A.occlusion(model, x, y, window=window, stride=stride, progress=False),
             {"captum Occlusion": lambda: captum_attr.Occlusion(model).attribute(
                 x, sliding_window_shapes=(1, window, window), strides=(1, stride, stride), target=y,
                 perturbations_per_eval=max(1, per_forward // len(x))),
              "captum Occlusion, its default batching": lambda: captum_attr.Occlusion(model).attribute(
                 x, sliding_window_shapes=(1, window, window), strides=(1, stride, stride), target=y)},
             lambda: evaluations(floor_model, torch.cat([x, occluded]),
                                 torch.cat([y, y.repeat_interleave(n_windows)]), per_forward,
                                 backward=False)),
        *cam_cases(model, floor_model, x, y, "conv5", "fmnist-cnn"),
    ]


def measured(case: Case, device: torch.device, repeats: int, clock: str) -> list[dict]:
    seconds, outputs, runs = measure({"labkit": case.labkit, **case.peers, "floor": case.floor},
                                     device, repeats, clock)
    ours = outputs["labkit"]
    return [row(f"{case.name}", case.model_name, case.batch, device, seconds, peer,
                agreement(relative_gap(case.to_peer.get(peer, lambda t: t)(ours), outputs[peer]), TOLERANCE),
                runs)
            for peer in case.peers]


def sizes_for(quick: bool) -> dict:
    return (dict(batch=2, side=128, samples=10, steps=10, window=32, stride=32, fashion_batch=16) if quick
            else dict(batch=8, side=224, samples=50, steps=50, window=32, stride=16, fashion_batch=64))


def rows(device: torch.device, quick: bool = False, repeats: int = 3, clock: str = "user",
         only: str | None = None) -> list[dict]:
    """One dict per method and peer (tests/benchmarks/timing.py's ``row``); ``only``: the
    cases whose name contains one of these comma-separated words."""
    check_coverage()
    sizes = sizes_for(quick)
    warnings.filterwarnings("ignore", module="captum")
    model = load("imagenet-effnet-lite0", device=device)
    photos, _ = labkit.data.sample_photos(sizes["side"])
    x = photos.repeat((sizes["batch"] + len(photos) - 1) // len(photos), 1, 1, 1)[:sizes["batch"]].to(device)
    y = torch.tensor([285, 967, 834, 812, 281, 968, 835, 813][:sizes["batch"]], device=device)  # per-sample
    results = []
    for case in effnet_cases(model, x, y, sizes) + fashion_cases(device, sizes):
        if not only or any(part in case.name for part in only.split(",")):
            results += measured(case, device, repeats, clock)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--only", default=None,
                        help="run the cases whose name contains one of these comma-separated words")
    args = parser.parse_args()
    device, clock = setup(args.threads, args.device, args.clock)
    sizes = sizes_for(args.quick)
    x = torch.zeros(1, 3, sizes["side"], sizes["side"], device=device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, sizes {sizes}, "
          f"{clock} time; labkit's default rows per forward: {labkit_per_forward(x, None)} "
          f"(EfficientNet-Lite0), {labkit_per_forward(torch.zeros(1, 1, 28, 28, device=device), None)} "
          f"(FashionCNN)")
    print(markdown(rows(device, args.quick, args.repeats, clock, args.only)))


if __name__ == "__main__":
    main()
