"""labkit.certify: interval bounds contain every logit the box can produce (random, vertex and
PGD samples), are exact on a linear model and tight at eps = 0, agree with an independent
per-neuron implementation on the shipped IBP models, and refuse bad input with the model left
as it was.

The issue asked for auto_LiRPA's IBP as the oracle. Its only PyPI release (auto-lirpa 0.3,
2022) installs with --no-deps but does not import with NumPy 2 (``numpy.lib.arraysetops`` is
gone), so the oracle here is a naive per-neuron implementation: every layer as an explicit
matrix, every output bounded by ``b_i + sum_j min/max(W_ij l_j, W_ij u_j)`` in a loop over
neurons — a different formula from labkit's centre/radius form, written without it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import labkit.attacks as attacks
from attack_setup import fixed_images, trained_available
from labkit import certify
from labkit.models import FashionCNN, FashionMLP, Normalize, SmallCNN, load


def _ibp_model(name: str, cls) -> nn.Module:
    """The shipped model; a seeded random one of the same architecture until its weights exist."""
    if trained_available(name):
        return load(name, device="cpu")
    torch.manual_seed(0)
    return cls().eval()


MODELS = {
    "fmnist-mlp-ibp": lambda: _ibp_model("fmnist-mlp-ibp", FashionMLP),
    "fmnist-cnn-ibp": lambda: _ibp_model("fmnist-cnn-ibp", SmallCNN),
    # max pooling, adaptive average pooling and dropout
    "fmnist-cnn-robust": lambda: _ibp_model("fmnist-cnn-robust", FashionCNN),
    "batchnorm-avgpool": lambda: _bn_model(),
}


def _bn_model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 4, 3), nn.ReLU(),
                          nn.AdaptiveMaxPool2d(3), nn.Flatten(), nn.Dropout(0.3), nn.Linear(36, 5))
    bn = model[2]
    with torch.no_grad():  # running statistics and a negative scale, as after training
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(-2, 2)
    return model.eval()


def _samples(x: torch.Tensor, eps: float, n: int, generator) -> torch.Tensor:
    """``n`` points per image in the box: half uniform, half vertices (where bounds are hit)."""
    x = x.unsqueeze(1)
    uniform = x + eps * (2 * torch.rand((x.shape[0], n // 2) + x.shape[2:], generator=generator) - 1)
    signs = torch.randint(0, 2, (x.shape[0], n - n // 2) + x.shape[2:], generator=generator) * 2 - 1
    return torch.cat([uniform, x + eps * signs], 1).clamp(0, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_bounds_contain_random_and_vertex_samples(name):
    model = MODELS[name]()
    x, _ = fixed_images(2 if name == "fmnist-cnn-robust" else 8)  # FashionCNN: 30x costlier per image
    if name == "batchnorm-avgpool":
        x = F.interpolate(x, size=12)
    generator = torch.Generator().manual_seed(0)
    for eps in (0.01, 0.05, 0.1):
        lower, upper = certify.interval_bounds(model, x, eps)
        points = _samples(x, eps, 500, generator)  # 500 per image: 1,000 to 4,000 samples per eps
        with torch.no_grad():
            logits = model(points.flatten(0, 1)).view(len(x), 500, -1)
        slack = 1e-4 * (1 + upper.abs().max())
        assert (logits >= lower[:, None] - slack).all() and (logits <= upper[:, None] + slack).all()
        assert (lower <= upper).all()


@pytest.mark.parametrize("name", ["fmnist-mlp-ibp", "fmnist-cnn-ibp", "fmnist-cnn-robust"])
def test_bounds_contain_pgd_samples_that_push_each_logit(name):
    """PGD pushing every logit up and down, and away from the label: the extreme points an
    attack finds stay inside the bounds, and so do their margins."""
    model = MODELS[name]()
    x, y = fixed_images(32 if name.endswith("ibp") else 4)  # FashionCNN is 20x costlier per image
    eps = 0.05
    lower, upper = certify.interval_bounds(model, x, eps)
    with torch.no_grad():
        margins = certify.margin_lower_bounds(certify.layers(model), (x - eps).clamp(0, 1),
                                              (x + eps).clamp(0, 1), y)
    points = [attacks.pgd(model, x, y, eps=eps, step_size=eps / 8, steps=20)]
    for k in range(10):
        for sign in (1, -1):
            push = lambda model, x, y, k=k, sign=sign: sign * model(x)[:, k]  # noqa: E731
            points.append(attacks.pgd(model, x, y, eps=eps, step_size=eps / 8, steps=20, loss_fn=push))
    for x_adv in points:
        with torch.no_grad():
            logits = model(x_adv)
        assert (logits >= lower - 1e-4).all() and (logits <= upper + 1e-4).all()
        if x_adv is not points[0]:  # the attack reached a logit's extreme, which the bound encloses
            assert (logits > lower + 1e-3).any() or (logits < upper - 1e-3).any()
        true_margins = logits.gather(1, y[:, None]) - logits
        assert (true_margins >= margins - 1e-4).all()


def test_margin_bounds_are_tighter_than_logit_bounds():
    model = MODELS["fmnist-cnn-ibp"]()
    x, y = fixed_images(16)
    lower, upper = certify.interval_bounds(model, x, 0.03)
    margins = certify.margin_lower_bounds(certify.layers(model), (x - 0.03).clamp(0, 1),
                                          (x + 0.03).clamp(0, 1), y)
    naive = lower.gather(1, y[:, None]) - upper
    assert (margins >= naive - 1e-4).all() and (margins > naive + 1e-3).any()


def test_exact_on_a_one_layer_linear_model():
    """For z = W x + b the bound is reached: the upper bound of z_k at the vertex with x_i high
    where W_ki > 0 and low where W_ki < 0 (and the box cut to [0, 1])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 7)).eval()
    x = torch.rand(4, 2, 5, 5)
    x[0, 0, 0] = 0.0  # pixels at the edge of [0, 1], where the box is cut
    x[1, 1, 2] = 1.0
    eps = 0.2
    lower, upper = certify.interval_bounds(model, x, eps)
    lo, hi = (x - eps).clamp(0, 1).flatten(1), (x + eps).clamp(0, 1).flatten(1)
    w, b = model[1].weight, model[1].bias
    for k in range(7):
        best = torch.where(w[k] > 0, hi, lo)
        worst = torch.where(w[k] > 0, lo, hi)
        with torch.no_grad():
            assert torch.allclose(upper[:, k], model(best.view_as(x))[:, k], atol=1e-5)
            assert torch.allclose(lower[:, k], model(worst.view_as(x))[:, k], atol=1e-5)
            assert torch.allclose(upper[:, k], best @ w[k] + b[k], atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_tight_at_eps_zero(name):
    model = MODELS[name]()
    x, _ = fixed_images(4)
    if name == "batchnorm-avgpool":
        x = F.interpolate(x, size=12)
    lower, upper = certify.interval_bounds(model, x, 0.0)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(lower, upper)
    assert torch.allclose(lower, logits, atol=1e-5)


def test_stable_relu_passes_the_linear_bounds_unchanged():
    """Where a ReLU is stably active (l > 0) its box is the Linear layer's; stably inactive, 0."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0] * 6, [-1.0] * 6, [0.5, -0.5] * 3, [0.1] * 6]))
        linear.bias.copy_(torch.tensor([5.0, -5.0, 0.0, 0.0]))
    model = nn.Sequential(nn.Flatten(), linear, nn.ReLU()).eval()
    x = torch.full((1, 1, 2, 3), 0.5)
    lower, upper = certify.interval_bounds(model, x, 0.1)
    assert torch.allclose(lower[0, 0], torch.tensor(8.0 - 0.6)) and torch.allclose(upper[0, 0], torch.tensor(8.0 + 0.6))
    assert lower[0, 1] == 0 and upper[0, 1] == 0
    assert lower[0, 2] == 0 and torch.allclose(upper[0, 2], torch.tensor(0.3))  # unstable: [0, u]


# ---------------------------------------------------------------- the independent implementation

def _dense(layer: nn.Module, in_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer as ``out = W @ in + b`` on flattened tensors, from its response to unit inputs."""
    n = int(torch.tensor(in_shape).prod())
    with torch.no_grad():
        basis = torch.eye(n).view((n,) + in_shape)
        bias = layer(torch.zeros((1,) + in_shape)).flatten()
        weight = (layer(basis).view(n, -1) - bias).T
    return weight, bias


def naive_interval_bounds(model: nn.Module, x: torch.Tensor, eps: float):
    """IBP one neuron at a time: ``u_i = b_i + sum_j max(W_ij l_j, W_ij u_j)`` (and min for l)."""
    lower, upper = (x - eps).clamp(0, 1)[0], (x + eps).clamp(0, 1)[0]
    for layer in model.children():
        if isinstance(layer, (nn.Linear, nn.Conv2d, Normalize)):
            weight, bias = _dense(layer, tuple(lower.shape))
            with torch.no_grad():
                out_shape = layer(lower[None]).shape[1:]
            lo, hi = lower.flatten(), upper.flatten()
            new_lower, new_upper = torch.empty(len(bias)), torch.empty(len(bias))
            for i in range(len(bias)):
                a, b = weight[i] * lo, weight[i] * hi
                new_lower[i] = bias[i] + torch.minimum(a, b).sum()
                new_upper[i] = bias[i] + torch.maximum(a, b).sum()
            lower, upper = new_lower.view(out_shape), new_upper.view(out_shape)
        elif isinstance(layer, nn.ReLU):
            lower, upper = lower.clamp(min=0), upper.clamp(min=0)
        elif isinstance(layer, nn.Flatten):
            lower, upper = lower.flatten(), upper.flatten()
        else:
            raise AssertionError(f"the naive oracle does not know {type(layer).__name__}")
    return lower[None], upper[None]


@pytest.mark.parametrize("name", ["fmnist-mlp-ibp", "fmnist-cnn-ibp"])
def test_agrees_with_a_naive_per_neuron_implementation(name):
    model = MODELS[name]()
    x, _ = fixed_images(2)
    for eps in (0.0, 0.02, 0.1):
        for i in range(len(x)):
            lower, upper = certify.interval_bounds(model, x[i:i + 1], eps)
            naive_lower, naive_upper = naive_interval_bounds(model, x[i:i + 1], eps)
            scale = 1e-4 * (1 + naive_upper.abs().max())
            assert torch.allclose(lower, naive_lower, atol=scale) and torch.allclose(upper, naive_upper, atol=scale)


# ---------------------------------------------------------------- certified accuracy

def test_certified_accuracy_is_a_lower_bound():
    model = MODELS["fmnist-cnn-ibp"]()
    data = fixed_images(200)
    clean = attacks.accuracy(model, data, progress=False)
    assert certify.certified_accuracy(model, data, 0.0) == clean
    previous = clean
    for eps in (0.01, 0.05, 0.1):
        certified = certify.certified_accuracy(model, data, eps)
        attacked = attacks.accuracy(model, data, attacks.pgd, eps=eps, step_size=eps / 4, steps=20, progress=False)
        assert certified <= attacked <= clean and certified <= previous
        previous = certified
    if trained_available("fmnist-cnn-ibp"):
        assert certify.certified_accuracy(model, data, 0.1) > 0.4  # IBP training did certify


def test_certified_accuracy_batches_agree():
    model = MODELS["fmnist-mlp-ibp"]()
    data = fixed_images(50)
    assert certify.certified_accuracy(model, data, 0.05, batch_size=7) == certify.certified_accuracy(model, data, 0.05)


# ---------------------------------------------------------------- bad input, model untouched

class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten, self.linear = nn.Flatten(), nn.Linear(16, 16)

    def forward(self, x):
        x = self.flatten(x)
        return x + self.linear(x)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    with pytest.raises(TypeError, match=r"'2'.*GELU"):
        certify.interval_bounds(model, torch.rand(2, 1, 4, 4), 0.1)
    with pytest.raises(TypeError, match="chain"):
        certify.interval_bounds(_Residual().eval(), torch.rand(2, 1, 4, 4), 0.1)


def test_bad_eps_and_images():
    model = MODELS["fmnist-mlp-ibp"]()
    x, y = fixed_images(2)
    with pytest.raises(ValueError, match="eps"):
        certify.interval_bounds(model, x, -0.1)
    with pytest.raises(ValueError, match="eps"):
        certify.certified_accuracy(model, (x, y), float("nan"))
    with pytest.raises(TypeError, match="eps"):
        certify.interval_bounds(model, x, "0.1")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        certify.interval_bounds(model, x * 2, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        certify.certified_accuracy(model, (x - 0.5, y), 0.1)


def test_model_left_as_it_was_also_when_it_raises():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[1].weight.grad = torch.ones_like(model[1].weight)
    handle = model[1].register_forward_hook(lambda *args: None)
    x = torch.rand(3, 1, 4, 4)
    with pytest.warns(UserWarning, match="train mode"):
        lower, upper = certify.interval_bounds(model, x, 0.1)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model[1].weight.grad, torch.ones_like(model[1].weight))
    assert len(model[1]._forward_hooks) == 1 and not lower.requires_grad
    model.append(nn.GELU())
    with pytest.raises(TypeError), pytest.warns(UserWarning):
        certify.interval_bounds(model, x, 0.1)
    assert model.training and len(model[1]._forward_hooks) == 1
    handle.remove()
