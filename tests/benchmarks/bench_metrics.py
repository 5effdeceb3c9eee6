"""Speed of labkit.attribution.metrics against its peers on the same inputs, results checked in
the same run: ROAD against pytorch-grad-cam (its ROAD with the noise set to 0 on both sides, so
the results can be compared; the percentiles of the fractions labkit removes), infidelity and
max-sensitivity against captum.metrics (one perturbation function handed to both),
sparseness and complexity against Quantus.

    python tests/benchmarks/bench_metrics.py [--device cpu|cuda] [--quick] [--repeats 3] [--threads 1]

Full sizes: FashionCNN B = 64 (ROAD fractions 0.1, ..., 0.9), EfficientNet-Lite0 B = 2 at
224 x 224 (ROAD fractions 0.2, 0.5, 0.8; maps: gradient and Grad-CAM); ``--quick``: FashionCNN
B = 8, EfficientNet-Lite0 at 112 x 112. Timing: tests/benchmarks/timing.py. ``rows(...)``
returns the table for tests/benchmarks/run.py (``--only metrics``). Random logit has no peer
run here (Quantus's RandomLogit compares by SSIM): it is tested on an analytic case.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import labkit
from labkit.attribution import gradcam, gradient, metrics, smoothgrad, to_heatmap
from labkit.models import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the stand-ins
import grad_cam_stand_ins  # noqa: E402
from quantus_stand_in import import_quantus  # noqa: E402
from timing import add_arguments, agreement, markdown, measure, relative_gap, row, setup  # noqa: E402

TOLERANCE = 1e-3


def _road_peer():
    with grad_cam_stand_ins.pytorch_grad_cam():
        from pytorch_grad_cam.metrics import perturbation_confidence as pc
        from pytorch_grad_cam.metrics.road import NoisyLinearImputer
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    return pc, NoisyLinearImputer, ClassifierOutputTarget


def _case(name, model_name, batch, device, repeats, clock, ours, peer_name, peer, to_tensor=torch.as_tensor):
    seconds, outputs, runs = measure({"labkit": ours, peer_name: peer}, device, repeats, clock)
    theirs = to_tensor(outputs[peer_name]).float().to(outputs["labkit"].device)
    return row(name, model_name, batch, device, seconds, peer_name,
               agreement(relative_gap(outputs["labkit"].float(), theirs), TOLERANCE), runs)


def _cases(model, model_name, x, y, maps, fractions, device, repeats, clock):
    """ROAD (MoRF) per map, infidelity, max-sensitivity, sparseness, complexity on one model."""
    pc, imputer, Target = _road_peer()
    quantus = import_quantus()
    import captum.metrics as captum_metrics
    results = []
    for map_name, heat in maps.items():
        def peer_road(heat=heat):
            return np.stack([pc.PerturbationConfidenceMetric(pc.RemoveMostRelevantFirst(
                round(100 * (1 - f)), imputer(noise=0.0)))(x, heat.cpu().numpy(),
                                                            [Target(int(c)) for c in y], model)
                for f in fractions], axis=1)
        results.append(_case(f"ROAD MoRF, {len(fractions)} fractions, {map_name}", model_name, len(x), device,
                             repeats, clock,
                             lambda heat=heat: metrics.road(model, x, y, heat, "morf", fractions, noise=0.0,
                                                            progress=False),
                             "pytorch-grad-cam", peer_road))
    attr = maps["gradient"][:, None].expand_as(x).contiguous()

    def perturb(xs):
        noise = 0.05 * torch.randn(xs.shape, generator=torch.Generator(device=xs.device).manual_seed(0),
                                   device=xs.device)
        return noise, xs - noise
    results.append(_case("infidelity, 16 perturbations", model_name, len(x), device, repeats, clock,
                         lambda: metrics.infidelity(model, x, y, attr, n_perturb=16, perturb=perturb),
                         "captum", lambda: captum_metrics.infidelity(model, perturb, x, attr, target=y,
                                                                     n_perturb_samples=16, normalize=True)))

    def shifted(xs):
        step = torch.rand(xs.shape, generator=torch.Generator(device=xs.device).manual_seed(1), device=xs.device)
        return (xs + 0.04 * step - 0.02).clamp(0, 1)

    def explanation(inputs, target):
        with torch.enable_grad():
            return (gradient(model, inputs[0] if isinstance(inputs, tuple) else inputs, target),)
    results.append(_case("max-sensitivity of the gradient, 8 points", model_name, len(x), device, repeats, clock,
                         lambda: metrics.max_sensitivity(gradient, model, x, y, n_perturb=8, perturb=shifted),
                         "captum", lambda: captum_metrics.sensitivity_max(explanation, x, perturb_func=shifted,
                                                                           n_perturb_samples=8, target=y)))
    a = maps["gradient"][:, None]
    for name, ours in (("Sparseness", metrics.sparseness), ("Complexity", metrics.complexity)):
        metric = getattr(quantus, name)(disable_warnings=True, normalise=False)
        results.append(_case(f"{name.lower()}", model_name, len(x), device, repeats, clock,
                             lambda ours=ours: ours(a),
                             "Quantus", lambda metric=metric: metric(
                                 model=None, x_batch=x.cpu().numpy(), y_batch=y.cpu().numpy(),
                                 a_batch=a.cpu().numpy().copy(), device="cpu"),
                             to_tensor=lambda v: torch.tensor(np.asarray(v, dtype=np.float32))))
    return results


def rows(device: torch.device, quick: bool = False, repeats: int = 3, clock: str = "user") -> list[dict]:
    warnings.filterwarnings("ignore")
    fashion = load("fmnist-cnn", device=device)
    x, y = labkit.data.fashion_mnist("test").tensors(range(8 if quick else 64))
    x, y = x.to(device), y.to(device)
    heat = {"gradient": to_heatmap(gradient(fashion, x, y), "sum"),
            "SmoothGrad": to_heatmap(smoothgrad(fashion, x, y, n_samples=10, progress=False,
                                                generator=torch.Generator(device=device).manual_seed(0)), "sum")}
    results = _cases(fashion, "FashionCNN", x, y, heat, tuple(k / 10 for k in range(1, 10)), device, repeats,
                     clock)
    effnet = load("imagenet-effnet-lite0", device=device)
    photos, _ = labkit.data.sample_photos(112 if quick else 224)
    px, py = photos[:2].to(device), torch.tensor([285, 967], device=device)
    maps = {"gradient": to_heatmap(gradient(effnet, px, py), "sum"), "Grad-CAM": gradcam(effnet, px, py)[:, 0]}
    results += _cases(effnet, "EfficientNet-Lite0", px, py, maps, (0.2, 0.5, 0.8), device, repeats, clock)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    device, clock = setup(args.threads, args.device, args.clock)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} time")
    print(markdown(rows(device, args.quick, args.repeats, clock)))


if __name__ == "__main__":
    main()
