"""labkit top level and the shared validation / model-preserving helpers."""
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import labkit
from labkit import _core, attacks, attribution, featvis
from labkit.attribution.cam import cam_layer_name


def test_get_device_override(monkeypatch):
    monkeypatch.setenv("LABKIT_DEVICE", "cpu")
    assert labkit.get_device() == torch.device("cpu")
    monkeypatch.setenv("LABKIT_DEVICE", "not-a-device")
    with pytest.raises(ValueError, match="LABKIT_DEVICE"):
        labkit.get_device()


def test_get_device_default_matches_hardware(monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else None
    device = labkit.get_device()
    if expected:
        assert device.type == expected
    else:
        assert device.type in ("mps", "cpu")


def test_seed_everything_repeats_all_generators():
    labkit.seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(3))
    labkit.seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
    with pytest.raises(TypeError):
        labkit.seed_everything(1.5)


@pytest.mark.parametrize("bad, error, message", [
    (torch.zeros(1, 28, 28), ValueError, "4 dimensions"),
    (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), TypeError, "float"),
    (torch.full((1, 1, 28, 28), 2.0), ValueError, r"\[0, 1\]"),
    (torch.full((1, 1, 28, 28), float("nan")), ValueError, "NaN"),
    (np.zeros((1, 1, 28, 28)), TypeError, "torch.Tensor"),
])
def test_check_images_rejects_bad_input(bad, error, message):
    with pytest.raises(error, match=message):
        _core.check_images(bad)


def test_check_images_device_mismatch():
    model = nn.Linear(2, 2).to("meta")
    with pytest.raises(ValueError, match="meta"):
        _core.check_images(torch.zeros(1, 1, 2, 2), model)


@pytest.mark.parametrize("target, expected", [
    (3, [3, 3]), ([1, 2], [1, 2]), (torch.tensor([0, 9]), [0, 9]), (torch.tensor(4), [4, 4])])
def test_check_target_accepts(target, expected):
    assert _core.check_target(target, 2, 10).tolist() == expected


@pytest.mark.parametrize("target, error", [
    (10, ValueError), ([1, 2, 3], ValueError), (torch.tensor([0.5, 1.0]), TypeError),
    (True, TypeError), ("3", TypeError), (-1, ValueError)])
def test_check_target_rejects(target, error):
    with pytest.raises(error):
        _core.check_target(target, 2, 10)


def test_resolve_layer(random_cnn):
    assert _core.resolve_layer(random_cnn, "conv5") is random_cnn.conv5
    assert _core.resolve_layer(random_cnn, random_cnn.conv1) is random_cnn.conv1
    with pytest.raises(ValueError, match="conv9"):
        _core.resolve_layer(random_cnn, "conv9")
    with pytest.raises(ValueError, match="not a submodule"):
        _core.resolve_layer(random_cnn, nn.Conv2d(1, 1, 1))
    assert cam_layer_name(random_cnn) == "relu5"  # FashionCNN's gradcam_layer
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU())
    assert cam_layer_name(plain) == "2"  # without one: the last nn.Conv2d


def _state(model):
    return ([m.training for m in model.modules()],
            [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
            [len(getattr(m, d)) for m in model.modules() for d in _core.HOOK_DICTS])


def test_preserved_restores_everything_even_on_error(random_cnn):
    model = random_cnn.train()
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    model.conv2.weight.requires_grad_(False)
    before = _state(model)
    with pytest.raises(RuntimeError), pytest.warns(UserWarning, match="train mode"):
        with _core.preserved(model), _core.hooks() as handles:
            assert not model.training and not model.conv1.weight.requires_grad
            handles.append(model.conv3.register_forward_hook(lambda *a: None))
            model.conv4.register_forward_hook(lambda *a: None)  # leaked on purpose: preserved removes it
            model.conv1.weight.grad = None
            raise RuntimeError("boom")
    after = _state(model)
    assert before[0] == after[0] and before[2] == after[2]
    for (rg_b, g_b), (rg_a, g_a) in zip(before[1], after[1]):
        assert rg_b == rg_a and (g_b is None) == (g_a is None)
        assert g_b is None or torch.equal(g_b, g_a)


def test_preserved_eval_model_gives_no_warning(random_cnn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _core.preserved(random_cnn):
            pass


def test_batches():
    assert _core.batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert _core.batches(5, None) == [slice(0, 5)]
    with pytest.raises(ValueError):
        _core.batches(5, 0)
    with pytest.raises(TypeError):
        _core.batches(5, 2.0)


# --- one validation policy: the same mistake gets the same exception everywhere ------------------

CALLS_WITH_STEPS = {
    "integrated_gradients": lambda m, x, y, steps: attribution.integrated_gradients(m, x, y, steps=steps),
    "smoothgrad n_samples": lambda m, x, y, steps: attribution.smoothgrad(m, x, y, n_samples=steps),
    "deletion_curve": lambda m, x, y, steps: attribution.deletion_curve(m, x, y, x, steps=steps),
    "pgd": lambda m, x, y, steps: attacks.pgd(m, x, y, eps=0.1, steps=steps),
    "deepfool": lambda m, x, y, steps: attacks.deepfool(m, x, steps=steps),
    "maximize": lambda m, x, y, steps: featvis.maximize(m, ("class", 1), x0=x, steps=steps, progress=False),
}


@pytest.mark.parametrize("name", CALLS_WITH_STEPS)
def test_a_count_of_the_wrong_type_is_a_type_error_and_out_of_range_a_value_error(random_cnn, name):
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="must be an int, got float"):
        CALLS_WITH_STEPS[name](random_cnn, x, y, 2.0)
    with pytest.raises(TypeError, match="must be an int, got bool"):
        CALLS_WITH_STEPS[name](random_cnn, x, y, True)
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        CALLS_WITH_STEPS[name](random_cnn, x, y, 0)


# --- images whose channels the model does not take: a ValueError before any layer runs ------------

class Counting(nn.Module):
    """A 1-channel CNN that counts the forward passes that reach its first layer."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


CHANNEL_CALLS = {
    **{f"attribution.{name}": lambda m, x, y, method=method: method.function(m, x, y, **method.quick)
       for name, method in attribution.METHODS.items()},
    **{f"attacks.{name}": (lambda m, x, y, attack=attack, name=name: attack(m, x, y=y) if name == "deepfool"
                           else attack(m, x, y, eps=0.1)) for name, attack in attacks.ATTACKS.items()},
    "featvis.maximize": lambda m, x, y: featvis.maximize(m, ("class", 1), x0=x, steps=2, progress=False),
    "featvis.maximize image_shape": lambda m, x, y: featvis.maximize(m, ("class", 1), image_shape=tuple(x.shape[1:]),
                                                                      steps=2, progress=False),
}


@pytest.mark.parametrize("name", CHANNEL_CALLS)
@pytest.mark.parametrize("channels", [3, 2])
def test_images_with_other_channels_than_the_model_takes_are_refused_before_it_runs(name, channels):
    model = Counting().eval()
    x, y = torch.rand(2, channels, 8, 8), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=f"the model takes 1-channel images but .*{channels}"):
        CHANNEL_CALLS[name](model, x, y)
    assert model.calls == 0


def test_a_model_may_say_how_many_channels_it_takes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    assert _core.input_channels(model) is None  # no convolution: not checked
    model.in_channels = 3
    with pytest.raises(ValueError, match="takes 3-channel images but x has 1"):
        _core.check_images(torch.rand(1, 1, 4, 4), model)
    _core.check_images(torch.rand(1, 3, 4, 4), model)


# --- the one batching loop ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
@pytest.mark.parametrize("lengths", [[3, 3, 3], [1], [4, 1, 2, 5], [2] * 10])
def test_batched_packs_items_into_calls_of_exactly_size_rows(size, lengths):
    items = [(torch.rand(n, 4), torch.rand(n)) for n in lengths]
    calls = []

    def function(a, b):
        calls.append(len(a))
        return a.sum(1) + b

    results = list(_core.batched(function, iter(items), size, len(items)))
    assert [len(r) for r in results] == lengths
    for result, (a, b) in zip(results, items):
        torch.testing.assert_close(result, a.sum(1) + b)
    assert sum(calls) == sum(lengths) and all(c == size for c in calls[:-1]) and calls[-1] <= size
    with pytest.raises(TypeError, match="batch_size must be an int"):
        list(_core.batched(function, iter(items), 2.0))


def test_gradient_methods_work_under_an_outer_no_grad(random_cnn):
    """A notebook may leave gradients off (torch.no_grad() around a cell, set_grad_enabled(False)):
    labkit's gradient methods give the same result and leave the mode as it was."""
    x = torch.rand(2, 1, 28, 28)
    target = torch.tensor([1, 2])
    for method in (labkit.attribution.gradient, labkit.attribution.integrated_gradients,
                   labkit.attribution.gradcam, labkit.attribution.guided_backprop):
        expected = method(random_cnn, x, target)
        with torch.no_grad():
            assert torch.allclose(method(random_cnn, x, target), expected), method.__name__
            assert not torch.is_grad_enabled()
