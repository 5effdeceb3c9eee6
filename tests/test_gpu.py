"""Every attribution method and attack gives on the accelerator what it gives on the CPU.

The accelerator is ``LABKIT_TEST_DEVICE`` (default ``cuda``; tests/conftest.py skips these tests
when it is missing). ``LABKIT_TEST_DEVICE=cpu`` runs them as a dry run without a GPU: then both
sides run on the CPU and must agree exactly as far as the tolerances go.

Tolerances (TF32 is switched off, so both sides compute in float32 and differ only in the order
of their sums): continuous results agree to ``max |device - cpu| <= RTOL * max |cpu|`` with
RTOL = 1e-4 on FashionCNN and 1e-3 on EfficientNet-Lite0 (17 more layers for rounding to grow
through). Sign-based attacks are compared where the sign is decided: FGSM may differ only on
pixels whose CPU gradient is within 1e-4 of its image's largest one (there rounding picks the
sign), and PGD L-inf, which feeds such flips into later steps, on at most 1 % of the pixels and
at most one image's outcome (fooled or not) of 64.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from labkit import attacks, featvis
from labkit import attribution as A
from labkit.data import fashion_mnist, sample_photos
from labkit.models import load, randomize

pytestmark = pytest.mark.gpu

RTOL = {"fmnist-cnn": 1e-4, "effnet-lite0": 1e-3}


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """TF32 convolutions and matmuls round to 10 bits: a CUDA setting, not labkit's work."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def fashion(fmnist_cnn):
    x, y = fashion_mnist("test").tensors(slice(0, 64))
    return fmnist_cnn, x, y


@pytest.fixture(scope="module")
def effnet():
    x = sample_photos(96)[0][:2]
    return load("imagenet-effnet-lite0", device="cpu"), x, torch.tensor([285, 967])


def on_both(accelerator, setup, call):
    """``call(model, x, y)`` on the CPU and on the accelerator (copies of model and inputs);
    returns both results, the second one checked to live on the accelerator, detached."""
    model, x, y = setup
    on_cpu = call(model, x, y)
    moved = call(copy.deepcopy(model).to(accelerator), x.to(accelerator), y.to(accelerator))
    for value in _tensors(moved):
        assert value.device.type == accelerator.type and not value.requires_grad
    return on_cpu, moved


def _tensors(result):
    """The tensors of a result (a tensor, a Curve or a SanityCheck)."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [value for value in vars(result).values() if isinstance(value, torch.Tensor)]


def assert_close(on_cpu, moved, rtol):
    for cpu, device in zip(_tensors(on_cpu), _tensors(moved), strict=True):
        gap = (device.cpu() - cpu).abs().max() / cpu.abs().max().clamp_min(1e-12)
        assert gap <= rtol, f"max |device - cpu| / max |cpu| = {gap:.1e} > {rtol:.0e}"


@pytest.fixture
def shared_noise(monkeypatch):
    """SmoothGrad draws its noise with torch.randn on the model's device, and CPU and CUDA
    generators give different numbers: hand both sides the same CPU-drawn noise."""
    original = torch.randn

    def randn(shape, generator=None, device=None, dtype=None):
        return original(shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    monkeypatch.setattr(torch, "randn", randn)


def deletion_curve_of_random_ranks(model, x, y):
    # random scores have no ties, so both devices delete the same pixels in the same order
    attr = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device)
    return A.deletion_curve(model, x, y, attr, steps=10, progress=False)


def registered(all_choices: bool) -> dict:
    """Every method of labkit.attribution.METHODS with its quick options; with ``all_choices``
    once per choice of its choice options (LRP: each of its rules and composites), else with
    the option's default choice."""
    table = {}
    for name, method in A.METHODS.items():
        choices = {"": {}}
        for option in method.options.values():
            if option.choices is not None:
                choices = (option.choices if all_choices
                           else {option.default: option.choices[option.default]})
        for choice, options in choices.items():
            table[f"{name} {choice}".strip()] = functools.partial(method.function, **method.quick, **options)
    return table


FASHION_METHODS = {**registered(all_choices=True), "deletion_curve": deletion_curve_of_random_ranks}
EFFNET_METHODS = registered(all_choices=False)


@pytest.mark.parametrize("method", FASHION_METHODS)
def test_attribution_on_fashion_cnn(accelerator, fashion, shared_noise, method):
    on_cpu, moved = on_both(accelerator, fashion, FASHION_METHODS[method])
    assert_close(on_cpu, moved, RTOL["fmnist-cnn"])


@pytest.mark.parametrize("method", EFFNET_METHODS)
def test_attribution_on_efficientnet(accelerator, effnet, shared_noise, method):
    on_cpu, moved = on_both(accelerator, effnet, EFFNET_METHODS[method])
    assert_close(on_cpu, moved, RTOL["effnet-lite0"])


def test_sanity_check(accelerator, fashion, monkeypatch):
    # randomize draws the new weights from the model's device's generator, which differs between
    # CPU and CUDA: both sides get the CPU's copies (moved), so only sanity_check's work differs
    def cpu_copies(model, layers, seed):
        return [(name, net.to(next(model.parameters()).device))
                for name, net in randomize(copy.deepcopy(model).cpu(), layers=layers, seed=seed)]
    monkeypatch.setattr(A.evaluation, "randomize", cpu_copies)
    model, x, y = fashion
    on_cpu, moved = on_both(accelerator, (model, x[:8], y[:8]),
                            lambda m, x, y: A.sanity_check(A.gradient, m, x, y, progress=False))
    assert moved.layers == on_cpu.layers
    assert_close(on_cpu.heatmaps, moved.heatmaps, RTOL["fmnist-cnn"])
    # rank correlations: a tiny change of a heatmap can swap two nearly equal ranks
    assert (moved.rank_correlation.cpu() - on_cpu.rank_correlation).abs().max() <= 1e-3


def test_fgsm_differs_only_where_rounding_decides_the_sign(accelerator, fashion):
    model, x, y = fashion
    on_cpu, moved = on_both(accelerator, fashion, lambda m, x, y: attacks.fgsm(m, x, y, eps=0.1))
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    undecided = grad.abs() <= 1e-4 * grad.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    differ = (moved.cpu() - on_cpu).abs() > 1e-6
    assert not (differ & ~undecided).any()


def _fooled(model, adversarial, y):
    with torch.no_grad():
        return model(adversarial).argmax(1) != y


def test_pgd_linf(accelerator, fashion):
    model, x, y = fashion
    start = attacks.random_delta(x, 0.1, "linf", torch.Generator().manual_seed(0))
    on_cpu, moved = on_both(accelerator, fashion, lambda m, x, y: attacks.pgd(
        m, x, y, eps=0.1, steps=10, random_start=start.to(x.device)))
    differ = (moved.cpu() - on_cpu).abs() > 1e-5
    assert differ.float().mean() <= 0.01
    assert (_fooled(model, moved.cpu(), y) != _fooled(model, on_cpu, y)).sum() <= 1


@pytest.mark.parametrize("name, call", [
    ("pgd l2", lambda m, x, y: attacks.pgd(m, x, y, eps=2.0, steps=10, norm="l2")),
    ("gradient_step", lambda m, x, y: attacks.gradient_step(m, x, y, eps=0.1)),
    ("deepfool", lambda m, x, y: attacks.deepfool(m, x, steps=20)),
])
def test_continuous_attacks(accelerator, fashion, name, call):
    on_cpu, moved = on_both(accelerator, fashion, call)
    assert_close(on_cpu - fashion[1], moved - fashion[1].to(accelerator), RTOL["fmnist-cnn"])


def test_attacks_on_efficientnet(accelerator, effnet):
    on_cpu, moved = on_both(accelerator, effnet,
                            lambda m, x, y: attacks.pgd(m, x, y, eps=1.0, steps=3, norm="l2"))
    assert_close(on_cpu - effnet[1], moved - effnet[1].to(accelerator), RTOL["effnet-lite0"])


# featvis inside the network (lesson 14): the same maps, patches and dreams on the accelerator
@pytest.mark.parametrize("name, call", [
    ("feature_maps", lambda m, x, y: featvis.feature_maps(m, x, "relu3")),
    ("top_patches", lambda m, x, y: featvis.top_patches(
        m, (x, y), [featvis.Channel("conv4", 1), featvis.Channel("conv4", 2)], k=4, progress=False).patches),
    ("deep_dream", lambda m, x, y: featvis.deep_dream(m, x[:8], "relu4", steps=2, octaves=2, jitter=1,
                                                      generator=torch.Generator().manual_seed(0), progress=False)),
])
def test_featvis_inside_the_network(accelerator, fashion, name, call):
    on_cpu, moved = on_both(accelerator, fashion, call)
    assert_close(on_cpu, moved, RTOL["fmnist-cnn"])
