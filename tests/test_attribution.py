"""labkit.attribution on cases whose answer is known in closed form, on bad inputs, and the
guarantee that a call leaves the model exactly as it was (also when it raises).

Peers (captum, pytorch-grad-cam) are in test_attribution_peers.py."""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import warnings

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from labkit import attribution
from labkit.attribution import (completeness_gap, deletion_curve, gradcam, gradient, gradient_x_input,
                                guided_backprop, guided_gradcam, insertion_curve, integrated_gradients,
                                occlusion, path_points, sanity_check, smoothgrad, spearman, to_heatmap)
from labkit.models import FashionCNN


def close(actual, expected, rtol=1e-5):
    """allclose with the absolute tolerance scaled to the expected values."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()) + 1e-12)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 5, 4)).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(3, 2, 6, 5)


@pytest.fixture
def fashion():
    torch.manual_seed(0)
    return FashionCNN().eval()


@pytest.fixture
def fashion_images():
    torch.manual_seed(2)
    return torch.rand(3, 1, 28, 28)


def weights_of(linear_model, target):
    """The weight row of each image's target class, shaped like the images."""
    return linear_model[1].weight[torch.as_tensor(target)].detach().view(-1, 2, 6, 5)


# --- gradients: closed forms on a linear model f_t(x) = w_t . x + b_t -------------------------

TARGETS = [0, 3, 1]


def test_gradient_of_linear_model_is_weight_row(linear, images):
    close(gradient(linear, images, TARGETS), weights_of(linear, TARGETS))


def test_gradient_x_input_of_linear_model_is_contribution(linear, images):
    close(gradient_x_input(linear, images, TARGETS), images * weights_of(linear, TARGETS))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left",
                                    "riemann_right", "riemann_middle"])
@pytest.mark.parametrize("baseline", [None, 0.5, "tensor"])
def test_integrated_gradients_of_linear_model(linear, images, method, baseline):
    if baseline == "tensor":
        baseline = torch.rand(1, 2, 6, 5, generator=torch.Generator().manual_seed(3))
    reference = 0.0 if baseline is None else baseline
    attr = integrated_gradients(linear, images, TARGETS, baseline=baseline, steps=7, method=method)
    close(attr, (images - reference) * weights_of(linear, TARGETS))
    gap = completeness_gap(linear, images, TARGETS, attr, baseline=baseline)
    assert gap.abs().max() < 1e-5


def test_path_points_integrate_polynomials():
    for method, degree in [("gausslegendre", 9), ("riemann_trapezoid", 1), ("riemann_middle", 1)]:
        alphas, weights = path_points(5, method)
        for k in range(degree + 1):
            assert abs(float((weights * alphas**k).sum()) - 1 / (k + 1)) < 1e-12, (method, k)


def test_integrated_gradients_completeness_on_relu_net():
    """sum(attr) -> f_t(x) - f_t(0) as steps grow (float64, so only the integration error
    remains; a ReLU net's kinks make it converge slowly, but converge)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 5)).double().eval()
    x, target = torch.rand(4, 1, 10, 10, dtype=torch.float64), [0, 1, 2, 4]
    with torch.no_grad():
        gain = (net(x) - net(torch.zeros_like(x)))[range(4), target]
    gaps = {steps: completeness_gap(net, x, target, integrated_gradients(net, x, target, steps=steps))
            for steps in (4, 256)}
    assert gaps[256].abs().max() < 2e-3 * gain.abs().max()
    assert gaps[256].abs().max() < gaps[4].abs().max() / 20


def test_smoothgrad_without_noise_is_gradient(fashion, fashion_images):
    target = [1, 2, 3]
    grad = gradient(fashion, fashion_images, target)
    close(smoothgrad(fashion, fashion_images, target, n_samples=1, sigma=0.0), grad)
    close(smoothgrad(fashion, fashion_images, target, n_samples=3, sigma=0.0, squared=True), grad**2)


def test_smoothgrad_of_linear_model_is_weight_row(linear, images):
    close(smoothgrad(linear, images, TARGETS, n_samples=5, sigma=0.3), weights_of(linear, TARGETS))


def test_smoothgrad_noise_is_documented_randn(fashion, fashion_images):
    """Noise = randn(B * n, C, H, W, generator) * sigma * (max - min) per image, row b * n + k:
    so SmoothGrad is the average of plain gradients at exactly those points."""
    n, sigma, target = 4, 0.2, torch.tensor([5, 6, 7])
    noise = torch.randn((3 * n, 1, 28, 28), generator=torch.Generator().manual_seed(9))
    spread = sigma * (fashion_images.amax(dim=(1, 2, 3)) - fashion_images.amin(dim=(1, 2, 3)))
    points = fashion_images.repeat_interleave(n, 0) + noise * spread.repeat_interleave(n)[:, None, None, None]
    # the noisy points leave [0, 1], which the public gradient() refuses: differentiate directly
    points.requires_grad_(True)
    selected = fashion(points)[range(3 * n), target.repeat_interleave(n)].sum()
    (expected,) = torch.autograd.grad(selected, points)
    actual = smoothgrad(fashion, fashion_images, target, n_samples=n, sigma=sigma,
                        generator=torch.Generator().manual_seed(9))
    close(actual, expected.view(3, n, 1, 28, 28).mean(1), rtol=1e-4)


def test_smoothgrad_generator_reproduces(fashion, fashion_images):
    run = lambda seed: smoothgrad(fashion, fashion_images, 2, n_samples=3,
                                  generator=torch.Generator().manual_seed(seed))
    close(run(4), run(4))
    assert not torch.allclose(run(4), run(5))


# --- occlusion ------------------------------------------------------------------------------

def naive_occlusion(model, x, target, window, stride, fill):
    """Window by window, one forward each: captum's convention written out as loops."""
    (h, w), (sh, sw) = window, stride
    rows, cols = x.shape[-2:]
    total, count = torch.zeros_like(x), torch.zeros_like(x)
    with torch.no_grad():
        base = model(x)[range(len(x)), target]
        for top in range(0, rows - h + sh, sh):
            for left in range(0, cols - w + sw, sw):
                occluded = x.clone()
                occluded[..., top:top + h, left:left + w] = fill
                drop = base - model(occluded)[range(len(x)), target]
                total[..., top:top + h, left:left + w] += drop[:, None, None, None]
                count[..., top:top + h, left:left + w] += 1
    return total / count


def test_occlusion_single_pixel_of_linear_model_is_analytic(linear, images):
    attr = occlusion(linear, images, TARGETS, window=1, stride=1, fill=0.25)
    # one pixel, all channels: drop = sum_c w_c (x_c - fill), the same in every channel
    drop = ((images - 0.25) * weights_of(linear, TARGETS)).sum(1, keepdim=True)
    close(attr, drop.expand_as(images))


@pytest.mark.parametrize("window,stride", [((2, 2), (1, 1)), ((3, 2), (2, 2)), ((4, 5), (3, 1)),
                                           ((6, 5), (6, 5))])
def test_occlusion_of_linear_model_matches_window_loop(linear, images, window, stride):
    attr = occlusion(linear, images, TARGETS, window=window, stride=stride, fill=0.5, batch_size=4)
    close(attr, naive_occlusion(linear, images, TARGETS, window, stride, 0.5))
    # the linear answer: mean over covering windows of the window's sum of w_i (x_i - fill)
    assert attr.shape == images.shape


# --- guided backprop and Grad-CAM on nets whose answer is known --------------------------------

def test_guided_backprop_matrix_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU6(),
                        nn.Linear(6, 3)).eval()
    x = torch.rand(4, 1, 3, 4)
    target = [0, 1, 2, 1]
    w1, w2, w3 = (net[i].weight.detach() for i in (1, 3, 5))
    with torch.no_grad():
        h1 = net[1](x.flatten(1))
        h2 = net[3](net[2](h1))
    # backward: R = w3[t]; through ReLU6 guided: relu(R) * (0 < h2 < 6); through w2; ReLU guided; w1
    r = w3[target].clamp_min(0) * ((h2 > 0) & (h2 < 6))
    r = (r @ w2).clamp_min(0) * (h1 > 0)
    close(guided_backprop(net, x, target), (r @ w1).view(4, 1, 3, 4))


def test_guided_backprop_ignores_functional_relu():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(F.relu(self.a(x.flatten(1))))

    torch.manual_seed(0)
    net, x = Functional().eval(), torch.rand(2, 1, 3, 4)
    close(guided_backprop(net, x, [0, 2]), gradient(net, x, [0, 2]))


class ToyCAM(nn.Module):
    """conv (1x1, identity) -> ReLU -> global mean -> linear [2, -1]: the Grad-CAM of class 0 is
    2 relu(x) / (H W), of class 1 it is -relu(x) / (H W) (zero after the ReLU)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[2.0], [-1.0]]))

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def test_gradcam_on_toy_net():
    net, x = ToyCAM().eval(), torch.rand(2, 1, 5, 7)
    area = 5 * 7
    close(gradcam(net, x, [0, 0]), 2 * x / area)
    close(gradcam(net, x, [0, 1], layer="relu", relu=False), torch.stack([2 * x[0], -x[1]]) / area)
    assert gradcam(net, x, 1).abs().max() == 0
    # guided backprop of class 0 is relu(2 / area) * (x > 0); guided Grad-CAM multiplies in the CAM
    close(guided_backprop(net, x, 0), 2 * (x > 0) / area)
    close(guided_gradcam(net, x, [0, 0], layer=net.conv), (2 * (x > 0) / area) * (2 * x / area))


def test_gradcam_default_layer_upsampling(fashion, fashion_images):
    small = gradcam(fashion, fashion_images, [1, 2, 3], layer="relu5", upsample=False)
    assert small.shape == (3, 1, 7, 7) and (small >= 0).all()
    large = gradcam(fashion, fashion_images, [1, 2, 3])  # default: the model's gradcam_layer, relu5
    close(large, F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False))
    # bilinear upsampling keeps the coarse map's mean within its range, and its 4 x 4 block means
    assert large.shape == (3, 1, 28, 28)


def test_guided_gradcam_is_product(fashion, fashion_images):
    target = [4, 5, 6]
    close(guided_gradcam(fashion, fashion_images, target, layer="conv4"),
          guided_backprop(fashion, fashion_images, target)
          * gradcam(fashion, fashion_images, target, "conv4"))


# --- evaluation ---------------------------------------------------------------------------------

def test_to_heatmap_reductions():
    attr = torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]])  # 1 x 3 x 1 x 1
    assert to_heatmap(attr).item() == 3.0
    assert to_heatmap(attr, "sum").item() == 0.0
    assert to_heatmap(attr, "l2").item() == pytest.approx(14**0.5)


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).float()
    b = a + torch.randint(0, 3, (3, 40), generator=g).float()
    for i in range(3):
        expected = scipy.stats.spearmanr(a[i], b[i]).statistic
        assert spearman(a, b)[i].item() == pytest.approx(expected, abs=1e-6)
    assert torch.isnan(spearman(torch.ones(1, 5), b[:1, :5])).all()


@pytest.mark.parametrize("layers", ["cascade", "independent"])
def test_sanity_check(fashion, fashion_images, layers):
    target = [0, 1, 2]
    result = sanity_check(gradient, fashion, fashion_images, target, layers=layers, progress=False)
    assert result.layers == ["classifier", "conv5", "conv4", "conv3", "conv2", "conv1"]
    assert result.rank_correlation.shape == result.rank_correlation_signed.shape == (6, 3)
    assert result.heatmaps.shape == (7, 3, 28, 28)
    close(result.heatmaps[0], gradient(fashion, fashion_images, target).sum(1))
    # an attribution that ignores the model (the input itself) passes nothing: correlation 1
    blind = sanity_check(lambda m, x, t: x.clone(), fashion, fashion_images, target, layers=layers,
                         progress=False)
    assert torch.allclose(blind.rank_correlation, torch.ones(6, 3))


def test_deletion_and_insertion_of_linear_model(linear, images):
    """Deleting pixels in order of contribution w_i x_i (grad x input, fill 0): the logit falls
    by exactly the removed contributions."""
    attr = gradient_x_input(linear, images, TARGETS)
    contributions = to_heatmap(attr, "sum").flatten(1)
    ordered = contributions.sort(dim=1, descending=True).values
    bias = linear[1].bias.detach()[TARGETS]
    logit = bias + contributions.sum(1)
    steps, pixels = 5, 30
    curve = deletion_curve(linear, images, TARGETS, attr, steps=steps, score="logit", batch_size=4)
    expected = torch.stack([logit - ordered[:, :round(k * pixels / steps)].sum(1)
                            for k in range(steps + 1)], 1)
    close(curve.scores, expected)
    close(curve.auc, torch.trapezoid(expected, torch.linspace(0, 1, steps + 1), dim=1))
    inserted = insertion_curve(linear, images, TARGETS, attr, steps=steps, score="logit")
    close(inserted.scores, torch.stack([bias + ordered[:, :round(k * pixels / steps)].sum(1)
                                        for k in range(steps + 1)], 1))
    probability = deletion_curve(linear, images, TARGETS, attr, steps=steps)
    with torch.no_grad():
        close(probability.scores[:, 0], linear(images).softmax(1)[range(3), TARGETS])


# --- batching never changes the result --------------------------------------------------------

@pytest.mark.parametrize("name", ["smoothgrad", "integrated_gradients", "occlusion", "deletion"])
def test_batch_size_does_not_change_result(fashion, fashion_images, name):
    target = [1, 8, 9]
    call = {
        "smoothgrad": lambda bs: smoothgrad(fashion, fashion_images, target, n_samples=5, batch_size=bs,
                                            generator=torch.Generator().manual_seed(0)),
        "integrated_gradients": lambda bs: integrated_gradients(fashion, fashion_images, target, steps=5,
                                                                batch_size=bs),
        "occlusion": lambda bs: occlusion(fashion, fashion_images, target, window=7, stride=7, batch_size=bs),
        "deletion": lambda bs: deletion_curve(fashion, fashion_images, target, fashion_images, steps=6,
                                              batch_size=bs).scores,
    }[name]
    close(call(2), call(None), rtol=1e-4)
    close(call(7), call(None), rtol=1e-4)


# --- bad inputs ----------------------------------------------------------------------------------

# every registered method with its quick options, and the evaluation functions that call a model
METHODS = {
    **{name: functools.partial(m.function, **m.quick) for name, m in attribution.METHODS.items()},
    "completeness_gap": lambda m, x, t, **kw: completeness_gap(m, x, t, torch.zeros(x.shape, device=x.device),
                                                               **kw),
    "sanity_check": lambda m, x, t, **kw: sanity_check(gradient, m, x, t, progress=False, **kw),
    "deletion_curve": lambda m, x, t, **kw: deletion_curve(m, x, t, torch.ones(x.shape, device=x.device),
                                                           steps=2, **kw),
    "insertion_curve": lambda m, x, t, **kw: insertion_curve(m, x, t, torch.ones(x.shape, device=x.device),
                                                             steps=2, **kw),
}

GOOD = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
BAD_INPUTS = {
    "rank 3": (GOOD[0], [1, 2], ValueError, "4 dimensions"),
    "uint8": ((GOOD * 255).to(torch.uint8), [1, 2], TypeError, "float"),
    "above 1": (GOOD * 2, [1, 2], ValueError, "[0, 1]"),
    "NaN": (GOOD.masked_fill(GOOD > 0.9, float("nan")), [1, 2], ValueError, "NaN"),
    "target out of range": (GOOD, [1, 10], ValueError, "[0, 9]"),
    "negative target": (GOOD, -1, ValueError, "[0, 9]"),
    "target wrong length": (GOOD, [1, 2, 3], ValueError, "expected length 2"),
    "float target": (GOOD, torch.tensor([1.0, 2.0]), TypeError, "integer"),
    "not a tensor": (GOOD.numpy(), [1, 2], TypeError, "torch.Tensor"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_with_message(fashion, method, case):
    x, target, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        METHODS[method](fashion, x, target)


@pytest.mark.parametrize("method", METHODS)
def test_input_on_other_device_raises(fashion, method):
    on_meta = copy.deepcopy(fashion).to("meta")
    with pytest.raises(ValueError, match="is on cpu but the model is on meta"):
        METHODS[method](on_meta, GOOD, [1, 2])


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_unknown_layer_raises(fashion, method):
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        METHODS[method](fashion, GOOD, [1, 2], layer="conv9")
    with pytest.raises(TypeError, match="layer must be"):
        METHODS[method](fashion, GOOD, [1, 2], layer=5)


@pytest.mark.parametrize("call,error,message", [
    (lambda m: smoothgrad(m, GOOD, 1, n_samples=0), ValueError, "n_samples must be >= 1"),
    (lambda m: smoothgrad(m, GOOD, 1, sigma=-0.1), ValueError, "sigma must be in"),
    (lambda m: smoothgrad(m, GOOD, 1, batch_size=0), ValueError, "batch_size must be >= 1"),
    (lambda m: integrated_gradients(m, GOOD, 1, baseline=torch.rand(3, 28, 28)), ValueError, "broadcasts"),
    (lambda m: integrated_gradients(m, GOOD, 1, baseline=2.0), ValueError, "baseline must be in"),
    (lambda m: integrated_gradients(m, GOOD, 1, method="simpson"), ValueError, "method must be one of"),
    (lambda m: integrated_gradients(m, GOOD, 1, steps=1.5), TypeError, "steps must be an int"),
    (lambda m: completeness_gap(m, GOOD, 1, torch.zeros(2, 1, 28, 27)), ValueError, "shaped like x"),
    (lambda m: occlusion(m, GOOD, 1, window=30), ValueError, "window must fit"),
    (lambda m: occlusion(m, GOOD, 1, window=4, stride=5), ValueError, "stride must not exceed"),
    (lambda m: occlusion(m, GOOD, 1, window=(2, 2, 2)), ValueError, "window must be an int or"),
    (lambda m: deletion_curve(m, GOOD, 1, torch.ones(2, 28, 27)), ValueError, "one value per pixel"),
    (lambda m: deletion_curve(m, GOOD, 1, GOOD, score="softmax"), ValueError, "score must be"),
    (lambda m: to_heatmap(GOOD, reduce="mean"), ValueError, "reduce must be one of"),
    (lambda m: to_heatmap(GOOD[0]), ValueError, "4 dimensions"),
    (lambda m: sanity_check("gradient", m, GOOD, 1), TypeError, "method must be"),
    (lambda m: sanity_check(gradient, m, GOOD, 1, layers="all"), ValueError, "cascade"),
    (lambda m: gradient("model", GOOD, 1), TypeError, "torch.nn.Module"),
])
def test_bad_options_raise_with_message(fashion, call, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
        call(fashion)


def test_train_mode_warns_and_uses_eval(fashion, fashion_images):
    expected = gradient(fashion, fashion_images, 3)
    fashion.train()
    with pytest.warns(UserWarning, match="train mode"):
        actual = gradient(fashion, fashion_images, 3)
    assert fashion.training and fashion.dropout.training
    close(actual, expected)


# --- the model is exactly as before, after every call and when a call raises --------------------

class Faulty(nn.Module):
    """FashionCNN that raises after its ``fail_at``-th forward pass (hooks already fired),
    counting the passes of its copies too (``count`` is a function, which deepcopy shares)."""

    def __init__(self, fail_at):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.fail_at = FashionCNN(), fail_at
        calls = itertools.count(1)
        self.count = lambda: next(calls)

    def forward(self, x):
        out = self.net(x)
        if self.count() >= self.fail_at:
            raise RuntimeError("injected failure")
        return out


def model_state(model):
    """Everything a call could change: modes, hook dicts, requires_grad, .grad, values."""
    modules = [(m.training, {name: dict(value) for name, value in vars(m).items()
                             if "hooks" in name and isinstance(value, dict)},
                getattr(m, "_is_full_backward_hook", None)) for m in model.modules()]
    params = [(p.requires_grad, p.grad, None if p.grad is None else p.grad.clone(), p.detach().clone())
              for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    return modules, params, buffers


def assert_same_state(before, after):
    (modules0, params0, buffers0), (modules1, params1, buffers1) = before, after
    assert modules0 == modules1
    for (rg0, g0, gv0, v0), (rg1, g1, gv1, v1) in zip(params0, params1):
        assert rg0 == rg1 and g0 is g1 and torch.equal(v0, v1)
        assert (gv0 is None and gv1 is None) or torch.equal(gv0, gv1)
    assert all(torch.equal(a, b) for a, b in zip(buffers0, buffers1))


def prepared_model(fail_at):
    """In train mode (dropout), with a user's hook, a .grad set and a frozen parameter."""
    model = Faulty(fail_at).train()
    model.net.conv1.register_forward_hook(lambda *args: None)
    model.net.classifier.weight.grad = torch.ones_like(model.net.classifier.weight)
    model.net.conv2.bias.requires_grad_(False)
    return model


# methods that take batch_size run several forward passes; the other registered ones, one
BATCHED = {name for name, m in attribution.METHODS.items()
           if "batch_size" in inspect.signature(m.function).parameters} | {"deletion_curve", "insertion_curve"}
ONE_FORWARD = set(attribution.METHODS) - BATCHED
FAILURES = {"none": None, "bad target": "class indices", "forward raises": "injected",
            "later forward raises": "injected"}


@pytest.mark.parametrize("method,failure", [
    (method, failure) for method, failure in itertools.product(METHODS, FAILURES)
    if not (failure == "later forward raises" and method in ONE_FORWARD)])
def test_model_is_unchanged(method, failure):
    model = prepared_model(fail_at={"forward raises": 1, "later forward raises": 2}.get(failure, 10**6))
    before = model_state(model)
    options = {"batch_size": 1} if method in BATCHED else {}  # several forward passes
    target = [1, 11] if failure == "bad target" else [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train-mode warning
        if FAILURES[failure] is None:
            METHODS[method](model, GOOD, target, **options)
        else:
            with pytest.raises((ValueError, RuntimeError), match=FAILURES[failure]):
                METHODS[method](model, GOOD, target, **options)
    assert_same_state(before, model_state(model))


# --- devices: everything runs where the model is --------------------------------------------------

def _tensors(result):
    """The tensors of a method's result (a tensor, a Curve or a SanityCheck)."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [value for value in vars(result).values() if isinstance(value, torch.Tensor)]


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(fashion, method):
    call = (lambda m, x, t: smoothgrad(m, x, t, n_samples=2, sigma=0.0)) if method == "smoothgrad" \
        else METHODS[method]  # noise differs between devices; sigma=0 keeps the batched path
    on_cpu = _tensors(call(fashion, GOOD, [1, 2]))
    on_cuda = _tensors(call(copy.deepcopy(fashion).cuda(), GOOD.cuda(), torch.tensor([1, 2]).cuda()))
    for cpu, cuda in zip(on_cpu, on_cuda, strict=True):
        assert cuda.device.type == "cuda" and not cuda.requires_grad
        close(cuda.cpu(), cpu, rtol=1e-3)


# --- the method table ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", attribution.METHODS)
def test_each_table_row_fits_its_function(name):
    """Its options and quick options are parameters of its function, its heatmap reduction is one
    to_heatmap knows, each choice stands for arguments the function takes, and it is exported."""
    method = attribution.METHODS[name]
    parameters = inspect.signature(method.function).parameters
    assert method.name == name == method.function.__name__ and getattr(attribution, name) is method.function
    assert method.heatmap in attribution.evaluation.REDUCTIONS
    assert set(method.quick) <= set(parameters)
    for option_name, option in method.options.items():
        if option.choices is None:
            assert option_name in parameters
        else:
            assert option.default in option.choices
            assert all(set(kwargs) <= set(parameters) for kwargs in option.choices.values())
