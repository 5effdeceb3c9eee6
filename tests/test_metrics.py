"""labkit.attribution.metrics against its peers on the same inputs -- ROAD against
pytorch-grad-cam's, infidelity and max-sensitivity against captum.metrics (the same
perturbation function handed to both), sparseness and complexity against Quantus -- and on
cases whose answer is known in closed form; bad inputs; the model left as it was."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from labkit.attribution import gradcam, gradient, gradients, metrics, smoothgrad, to_heatmap
from labkit.attribution.metrics import (complexity, impute, infidelity, max_sensitivity, random_logit, road,
                                        sparseness)
from labkit.models import WEIGHTS_DIR, FashionCNN, load

import grad_cam_stand_ins
from quantus_stand_in import import_quantus
from test_attribution import assert_same_state, model_state


def close(actual, expected, rtol=1e-4):
    expected = torch.as_tensor(np.asarray(expected), dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()) + 1e-6)


@pytest.fixture(scope="module")
def fashion():
    if (WEIGHTS_DIR / "fmnist-cnn.pt").is_file():
        return load("fmnist-cnn")
    torch.manual_seed(0)
    return FashionCNN().eval()


@pytest.fixture(scope="module")
def batch():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([0, 3, 7, 9])


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 5, 4)).eval()


def gaussian_perturb(sigma=0.05, seed=0):
    """captum's perturb_func convention: (I, x - I); the same draws on every call."""
    def perturb(xs):
        noise = sigma * torch.randn(xs.shape, generator=torch.Generator().manual_seed(seed))
        return noise, xs - noise
    return perturb


# --- ROAD: pytorch-grad-cam ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grad_cam_road():
    with grad_cam_stand_ins.pytorch_grad_cam():
        from pytorch_grad_cam.metrics import perturbation_confidence as pc
        from pytorch_grad_cam.metrics.road import NoisyLinearImputer
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
    return pc, NoisyLinearImputer, {"logit": ClassifierOutputTarget, "probability": ClassifierOutputSoftmaxTarget}


@pytest.mark.peers
def test_imputation_matches_pytorch_grad_cam(grad_cam_road):
    _, imputer, _ = grad_cam_road
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 20, 24, generator=generator)
    keep = torch.rand(20, 24, generator=generator) > 0.6     # 60 % removed, holes touch the border
    ours = impute(image[None], keep[None, None], noise=0.0)[0]
    close(ours, imputer(noise=0.0)(image, keep.float()), rtol=1e-5)
    assert torch.equal(ours[:, keep], image[:, keep])


@pytest.mark.peers
@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_road_matches_pytorch_grad_cam(fashion, batch, grad_cam_road, order, score):
    pc, imputer, targets = grad_cam_road
    x, y = batch
    heat = to_heatmap(gradient(fashion, x, y), "sum")
    fractions = (0.1, 0.5, 0.9)
    removal = pc.RemoveMostRelevantFirst if order == "morf" else pc.RemoveLeastRelevantFirst
    peer = np.stack([pc.PerturbationConfidenceMetric(removal(round(100 * (1 - f)), imputer(noise=0.0)))(
        x, heat.numpy(), [targets[score](int(c)) for c in y], fashion) for f in fractions], axis=1)
    close(road(fashion, x, y, heat, order, fractions, score, noise=0.0), peer, rtol=1e-4)


def test_road_noise_is_seeded_and_only_on_removed_pixels():
    x = torch.rand(2, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(2, 1, 10, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    plain = impute(x, keep, noise=0.0)
    noisy = impute(x, keep, noise=0.1, generator=torch.Generator().manual_seed(5))
    again = impute(x, keep, noise=0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noisy, again)
    difference = (noisy - plain).masked_select(~keep.expand_as(x))
    assert torch.equal(noisy.masked_select(keep.expand_as(x)), x.masked_select(keep.expand_as(x)))
    assert abs(difference.std().item() - 0.1) < 0.015 and abs(difference.mean().item()) < 0.015


def test_imputation_is_the_neighbour_mean_and_reproduces_linear_ramps():
    """A removed pixel equals the weighted mean of its neighbours; a linear ramp is harmonic,
    so it comes back exactly whatever is removed (away from the border the weights are symmetric)."""
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    keep = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    keep[..., 3:12, 4:13] = False
    close(impute(ramp, keep, noise=0.0), ramp, rtol=1e-6)
    single = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    keep[..., 2, 2] = False
    window = single[0, 0, 1:4, 1:4]
    expected = ((window[0, 1] + window[2, 1] + window[1, 0] + window[1, 2]) / 6
                + (window[0, 0] + window[0, 2] + window[2, 0] + window[2, 2]) / 12)
    close(impute(single, keep, noise=0.0)[0, 0, 2, 2], expected, rtol=1e-6)


def test_road_of_a_perfect_map_on_a_linear_model_orders_morf_below_lerf(linear):
    x = torch.rand(3, 2, 6, 5, generator=torch.Generator().manual_seed(1))
    target = [0, 3, 1]
    attr = gradients.gradient_x_input(linear, x, target)
    morf = road(linear, x, target, attr, "morf", noise=0.0, progress=False)
    lerf = road(linear, x, target, attr, "lerf", noise=0.0, progress=False)
    assert (morf.mean(1) < lerf.mean(1)).all()


# --- infidelity and max-sensitivity: captum.metrics -------------------------------------------------

@pytest.mark.peers
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_infidelity_matches_captum(fashion, batch, normalize, score):
    captum_metrics = pytest.importorskip("captum.metrics")
    x, y = batch
    attr = smoothgrad(fashion, x, y, n_samples=4, generator=torch.Generator().manual_seed(0), progress=False)
    forward = fashion if score == "logit" else (lambda inputs: fashion(inputs).softmax(1))
    peer = captum_metrics.infidelity(forward, gaussian_perturb(), x, attr, target=y, n_perturb_samples=8,
                                     normalize=normalize)
    ours = infidelity(fashion, x, y, attr, n_perturb=8, score=score, normalize=normalize, perturb=gaussian_perturb())
    close(ours, peer, rtol=1e-4)


@pytest.mark.peers
@pytest.mark.parametrize("explain", ["gradient", "gradcam"])
def test_max_sensitivity_matches_captum(fashion, batch, explain):
    captum_metrics = pytest.importorskip("captum.metrics")
    x, y = batch
    method = {"gradient": gradient, "gradcam": gradcam}[explain]

    def perturb(xs):  # in [0, 1], so labkit's own clipping changes nothing
        step = torch.rand(xs.shape, generator=torch.Generator().manual_seed(1)) * 0.1 - 0.05
        return (xs + step).clamp(0, 1)

    def explanation(inputs, target):  # captum passes and expects tuples, and calls it under no_grad
        with torch.enable_grad():
            return (method(fashion, inputs[0] if isinstance(inputs, tuple) else inputs, target),)
    peer = captum_metrics.sensitivity_max(explanation, x, perturb_func=perturb, n_perturb_samples=6, target=y)
    close(max_sensitivity(method, fashion, x, y, n_perturb=6, perturb=perturb), peer, rtol=1e-4)


def test_a_linear_model_is_explained_without_infidelity_or_sensitivity(linear):
    """For f = w.x + b the gradient w predicts every change exactly, I.w = f(x) - f(x - I),
    and it does not depend on x."""
    x = torch.rand(3, 2, 6, 5, generator=torch.Generator().manual_seed(1))
    target = [0, 3, 1]
    attr = gradient(linear, x, target)
    scale = float(linear(x).detach().abs().max()) ** 2
    for options in ({}, {"baseline": 0.0}, {"baseline": 0.5, "fraction": 1.0}, {"normalize": False}):
        assert (infidelity(linear, x, target, attr, **options) < 1e-9 * scale).all(), options
    assert (max_sensitivity(gradient, linear, x, target) < 1e-6).all()
    # A map of the wrong sign is maximally unfaithful unless normalize rescales it by beta = -1.
    assert (infidelity(linear, x, target, -attr, normalize=False) > 0.01).all()
    assert (infidelity(linear, x, target, -attr) < 1e-9 * scale).all()


def test_infidelity_removal_perturbation_sets_pixels_to_the_baseline(linear):
    """With fraction 1 every pixel becomes the baseline: I = x - x0, the same for every draw."""
    x = torch.rand(2, 2, 6, 5, generator=torch.Generator().manual_seed(1))
    attr = torch.zeros_like(x)  # predicts no change: infidelity = (f(x) - f(x0))^2
    gap = linear(x)[[0, 1], [2, 2]] - linear(torch.full_like(x, 0.3))[[0, 1], [2, 2]]
    close(infidelity(linear, x, 2, attr, baseline=0.3, fraction=1.0, normalize=False), gap.detach() ** 2)


# --- sparseness and complexity: Quantus and closed forms -----------------------------------------

@pytest.fixture(scope="module")
def quantus():
    try:
        return import_quantus()
    except ImportError as error:
        pytest.skip(f"quantus is the oracle for these tests: {error}")


@pytest.mark.peers
@pytest.mark.parametrize("name", ["Sparseness", "Complexity"])
def test_sparseness_and_complexity_match_quantus(quantus, fashion, batch, name):
    x, y = batch
    maps = to_heatmap(smoothgrad(fashion, x, y, n_samples=4, generator=torch.Generator().manual_seed(0),
                                 progress=False), "sum")[:, None]
    peer = getattr(quantus, name)(disable_warnings=True, normalise=False)(
        model=None, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy().copy(), device="cpu")
    ours = {"Sparseness": sparseness, "Complexity": complexity}[name](maps)
    close(ours, np.array(peer, dtype=np.float32), rtol=1e-4)


def test_sparseness_and_complexity_closed_forms():
    n = 6 * 7
    uniform = torch.full((1, 1, 6, 7), -0.3)
    one_hot = torch.zeros(1, 6, 7)
    one_hot[0, 2, 3] = 5.0
    half = torch.zeros(1, 1, 6, 7)
    half.view(-1)[: n // 2] = 1.0  # equal mass on half the pixels: G = 1/2, H = log(n/2)
    maps = [uniform, one_hot[:, None], half]
    close(sparseness(torch.cat(maps)), torch.tensor([0.0, 1 - 1 / n, 0.5]), rtol=1e-5)
    close(complexity(torch.cat(maps)), torch.tensor([math.log(n), 0.0, math.log(n / 2)]), rtol=1e-5)
    assert sparseness(torch.zeros(2, 4, 4)).eq(0).all() and complexity(torch.zeros(2, 4, 4)).eq(0).all()
    # Both ignore the scale and the sign.
    close(sparseness(-3 * half), sparseness(half)), close(complexity(7 * half), complexity(half))


# --- random logit: a linear model, whose gradients are its weight rows ----------------------------

def test_random_logit_of_a_linear_model_is_the_correlation_of_weight_rows(linear):
    x = torch.rand(3, 2, 6, 5, generator=torch.Generator().manual_seed(1))
    target, other = [0, 3, 1], [2, 0, 3]
    rows = linear[1].weight.detach().view(4, 2, 6, 5).sum(1).flatten(1)
    expected = [scipy.stats.spearmanr(rows[t], rows[o]).statistic for t, o in zip(target, other)]
    close(random_logit(gradient, linear, x, target, other=other), torch.tensor(expected, dtype=torch.float32))
    with torch.no_grad():
        linear[1].weight[2] = 2 * linear[1].weight[0] + 0.1   # same ranking -> 1
        linear[1].weight[1] = -linear[1].weight[3]            # reversed -> -1
    close(random_logit(gradient, linear, x[:2], [0, 3], other=[2, 1]), torch.tensor([1.0, -1.0]))


def test_random_logit_draws_another_class(linear):
    x = torch.rand(64, 2, 6, 5, generator=torch.Generator().manual_seed(1))
    result = random_logit(gradient, linear, x, 0, generator=torch.Generator().manual_seed(0))
    assert result.shape == (64,) and (result < 0.999).all()  # never the target's own map


def test_completeness_gap_is_the_same_function():
    assert metrics.completeness_gap is gradients.completeness_gap


# --- bad input, and the model is exactly as before -----------------------------------------------

GOOD = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
MAP = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
CALLS = {
    "road": lambda m, **kw: road(m, GOOD, [1, 2], kw.get("attr", MAP), progress=False, **kw.get("options", {})),
    "infidelity": lambda m, **kw: infidelity(m, GOOD, [1, 2], kw.get("attr", MAP), **kw.get("options", {})),
    "max_sensitivity": lambda m, **kw: max_sensitivity(gradient, m, GOOD, [1, 2], **kw.get("options", {})),
    "random_logit": lambda m, **kw: random_logit(gradient, m, GOOD, [1, 2], **kw.get("options", {})),
    "sparseness": lambda m, **kw: sparseness(kw.get("attr", MAP)),
    "complexity": lambda m, **kw: complexity(kw.get("attr", MAP)),
}
BAD = [
    ("road", {"attr": MAP[:, :, :20]}, ValueError, r"one value per pixel .*\(2, 1, 28, 28\).*got shape \(2, 1, 20, 28\)"),
    ("road", {"attr": MAP.masked_fill(MAP > 0.9, float("nan"))}, ValueError, "NaN"),
    ("road", {"options": {"order": "most"}}, ValueError, "'morf'.*got 'most'"),
    ("road", {"options": {"fractions": (0.5, 1.0)}}, ValueError, r"\(0, 1\), got \[0.5, 1.0\]"),
    ("road", {"options": {"score": "softmax"}}, ValueError, "one of .*got 'softmax'"),
    ("road", {"options": {"noise": -1.0}}, ValueError, "noise must be in"),
    ("infidelity", {"attr": MAP[0]}, ValueError, r"shaped like x \(2, 1, 28, 28\).*got shape \(1, 28, 28\)"),
    ("infidelity", {"attr": MAP.masked_fill(MAP > 0.9, float("nan"))}, ValueError, "NaN"),
    ("infidelity", {"attr": MAP.long()}, TypeError, "float tensor.*torch.int64"),
    ("infidelity", {"options": {"baseline": 1.5}}, ValueError, r"baseline must be in \[0.0, 1.0\], got 1.5"),
    ("infidelity", {"options": {"baseline": torch.full((1, 28, 28), -0.1)}}, ValueError, r"\[0, 1\]"),
    ("infidelity", {"options": {"n_perturb": 0}}, ValueError, "n_perturb must be >= 1, got 0"),
    ("infidelity", {"options": {"n_perturb": 2.5}}, TypeError, "n_perturb must be an int, got float"),
    ("max_sensitivity", {"options": {"n_perturb": 0}}, ValueError, "n_perturb must be >= 1, got 0"),
    ("max_sensitivity", {"options": {"radius": -0.1}}, ValueError, "radius must be in"),
    ("random_logit", {"options": {"other": [1, 5]}}, ValueError, "differ from target"),
    ("random_logit", {"options": {"other": [1, 10]}}, ValueError, r"\[0, 9\]"),
    ("sparseness", {"attr": MAP[0, 0]}, ValueError, r"B x C x H x W or B x H x W, got shape \(28, 28\)"),
    ("sparseness", {"attr": MAP.masked_fill(MAP > 0.9, float("nan"))}, ValueError, "NaN"),
    ("complexity", {"attr": MAP.numpy()}, TypeError, "float tensor.*got ndarray"),
]


@pytest.mark.parametrize("name,given,error,message", BAD,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_naming_expected_and_got(fashion, name, given, error, message):
    with pytest.raises(error, match=message):
        CALLS[name](fashion, **given)


def test_bad_images_and_methods_raise(fashion):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        road(fashion, GOOD * 2, [1, 2], MAP)
    with pytest.raises(TypeError, match="attribution function"):
        max_sensitivity("gradient", fashion, GOOD, [1, 2])


FAILING = {  # a class the model does not have, found once its output is seen
    "road": lambda m: road(m, GOOD, [1, 12], MAP, progress=False),
    "infidelity": lambda m: infidelity(m, GOOD, [1, 12], MAP),
    "max_sensitivity": lambda m: max_sensitivity(gradient, m, GOOD, [1, 12]),
    "random_logit": lambda m: random_logit(gradient, m, GOOD, [1, 12]),
}


@pytest.mark.parametrize("name,fails", [(name, False) for name in CALLS] + [(name, True) for name in FAILING])
def test_model_is_unchanged(name, fails):
    torch.manual_seed(0)
    model = FashionCNN().train()
    model.conv1.register_forward_hook(lambda *args: None)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.conv2.bias.requires_grad_(False)
    before = model_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train-mode warning
        if fails:
            with pytest.raises(ValueError, match=r"\[0, 9\]"):
                FAILING[name](model)
        else:
            CALLS[name](model)
    assert_same_state(before, model_state(model))


def test_summary_is_one_line(fashion, batch):
    x, y = batch
    line = metrics.summary(fashion, x[:1], y[:1], gradient(fashion, x[:1], y[:1]))
    assert "\n" not in line and all(word in line for word in ("MoRF", "LeRF", "infidelity", "Gini", "entropy"))


@pytest.mark.gpu
def test_every_metric_on_the_accelerator_matches_the_cpu(accelerator, fashion, batch):
    """The same inputs and draws on both sides (ROAD without noise, perturbations made on the CPU
    and moved); TF32 off, so only the order of sums differs."""
    import copy
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x, y = batch
        heat = to_heatmap(gradient(fashion, x, y), "sum")
        noise = 0.05 * torch.randn(len(x) * 4, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        step = 0.02 * torch.rand(len(x) * 4, *x.shape[1:], generator=torch.Generator().manual_seed(1))

        def run(model, x, y, heat):
            d = x.device
            return [road(model, x, y, heat, "morf", (0.3, 0.7), noise=0.0, progress=False),
                    road(model, x, y, heat, "lerf", (0.3, 0.7), "probability", noise=0.0, progress=False),
                    infidelity(model, x, y, heat[:, None], n_perturb=4,
                               perturb=lambda xs: (noise.to(d), xs - noise.to(d))),
                    max_sensitivity(gradient, model, x, y, n_perturb=4, perturb=lambda xs: xs + step.to(d)),
                    random_logit(gradient, model, x, y, other=(y + 1) % 10),
                    sparseness(heat), complexity(heat)]
        on_cpu = run(fashion, x, y, heat)
        device_model = copy.deepcopy(fashion).to(accelerator)
        on_device = run(device_model, x.to(accelerator), y.to(accelerator), heat.to(accelerator))
        for cpu, device in zip(on_cpu, on_device, strict=True):
            assert device.device.type == accelerator.type
            close(device.cpu(), cpu, rtol=1e-3)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
